//! Runs the XDP guard on crafted frames with BPF_PROG_TEST_RUN: the real
//! program and maps, no interface. For verdict tests and the benchmarks;
//! only built with the `test-helpers` feature, never shipped.

use std::time::Duration;

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use portwatch_common::prog;

use portwatch_common::PortCounters;

use super::{
    PROGRAMS,
    maps::{GuardMaps, GuardSettings, MapImage},
    program,
};
use crate::{
    error::Error,
    model::{IpProto, Mode},
    policy::{Policy, compile::compile, slots::CounterSlots},
    sys,
};

pub use super::probe::{XDP_DROP, XDP_PASS};

pub struct XdpTester {
    ebpf: Ebpf,
    pub maps: GuardMaps,
    image: MapImage,
    slots: CounterSlots,
    /// Record connection attempts in `LEARN` (see [`Self::learning`]).
    learn: bool,
}

impl XdpTester {
    /// Loads the object and the XDP program (not attached anywhere).
    pub fn load() -> anyhow::Result<Self> {
        sys::check_privileges()?;
        let mut ebpf = EbpfLoader::new().load(PROGRAMS).map_err(Error::from)?;
        let maps = GuardMaps::open(&mut ebpf)?;
        let xdp: &mut Xdp = program(&mut ebpf, prog::XDP_GUARD)?;
        xdp.load()?;
        let mut tester = Self {
            ebpf,
            maps,
            image: MapImage::default(),
            slots: CounterSlots::default(),
            learn: false,
        };
        tester.apply(&Policy::default(), Mode::Enforce)?;
        Ok(tester)
    }

    /// Puts `policy` and `mode` into the maps (a diff against the last
    /// call), as the guard does; no drop reports.
    pub fn apply(&mut self, policy: &Policy, mode: Mode) -> anyhow::Result<()> {
        let mut image = compile(policy)?;
        // Each rule counts in a slot of its own, as under the guard; no
        // listeners here.
        self.slots
            .stamp(&mut image, policy, &std::collections::BTreeSet::new());
        self.maps.zero_slots(&self.slots.take_fresh())?;
        let settings = GuardSettings {
            mode,
            report_rate: 0,
            flow_timeout: Duration::from_secs(30),
            forwarded: policy.forwarded.unwrap_or_default(),
            limit_v6_prefix: policy
                .limit_ipv6_prefix
                .unwrap_or(crate::policy::limit::DEFAULT_IPV6_PREFIX),
            learn: self.learn,
        };
        self.maps.install(&self.image, &image, &settings)?;
        self.image = image;
        Ok(())
    }

    /// Turns recording in `LEARN` on or off, as audit mode and `learn
    /// --for` do.
    pub fn learning(&mut self, on: bool) -> anyhow::Result<()> {
        self.learn = on;
        Ok(self.maps.set_learning(on)?)
    }

    /// Forgets the buckets of rate-limited sources (each case of a test
    /// starts from empty state).
    pub fn clear_rate_state(&mut self) -> anyhow::Result<()> {
        let slots: Vec<u32> = self.image.limits.keys().copied().collect();
        Ok(self.maps.clear_rate_state(slots.into_iter())?)
    }

    /// The addresses frames must be sent to to count as the host's own
    /// (the guard reads them from its interfaces); frames to others are
    /// forwarded ones.
    pub fn set_local_addresses(&mut self, addrs: &[std::net::IpAddr]) -> anyhow::Result<()> {
        Ok(self
            .maps
            .set_local_addresses(&addrs.iter().copied().collect())?)
    }

    /// What the counters hold for `proto/port`: its rule's counts, or the
    /// protocol's `other` when no rule covers it.
    pub fn counters(&self, proto: impl Into<IpProto>, port: u16) -> PortCounters {
        let slot = self.slots.slot_of(proto, port);
        self.maps
            .slot_counters(std::iter::once(slot))
            .remove(&slot)
            .unwrap_or_default()
    }

    fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(program(&mut self.ebpf, prog::XDP_GUARD)?)
    }

    /// What the program says of `frame` when asked as `explain` asks:
    /// decided, not acted on.
    pub fn probe(&mut self, frame: &[u8]) -> anyhow::Result<super::probe::Answer> {
        Ok(super::probe::run(
            super::probe::twin(&mut self.ebpf)?,
            frame,
        )?)
    }

    /// The verdict (`XDP_PASS`, `XDP_DROP`) for one frame.
    pub fn verdict(&mut self, frame: &[u8]) -> anyhow::Result<u32> {
        Ok(self.bench(frame, 1)?.0)
    }

    /// Runs the frame `repeat` times in the kernel; returns the verdict and
    /// the kernel's average time per run.
    pub fn bench(&mut self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
        let out = self.program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        Ok((out.return_value, out.duration))
    }
}
