//! Typed wrappers over the kernel maps: nothing else touches raw aya maps.

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use portwatch_common::MonitorStat;

use crate::error::{Error, Result};

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// The listener event ring buffer.
pub fn events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>> {
    take(ebpf, "EVENTS")
}

/// Kernel-side counters of the monitor, summed over CPUs.
pub struct MonitorStats {
    map: PerCpuArray<MapData, u64>,
}

impl MonitorStats {
    pub fn open(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            map: take(ebpf, "MONITOR_STATS")?,
        })
    }

    pub fn get(&self, stat: MonitorStat) -> u64 {
        self.map
            .get(&(stat as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}
