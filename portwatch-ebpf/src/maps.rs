//! Maps shared by the kernel programs.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use portwatch_common::{EVENTS_RING_BYTES, MAX_UDP_SOCKETS, MONITOR_STATS_LEN, MonitorStat};

/// Listener events for user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Per-CPU counters indexed by `MonitorStat`.
#[map]
pub static MONITOR_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MONITOR_STATS_LEN, 0);

/// What a bound UDP socket was bound to, so its release can be reported with
/// the address and port it held (sock_release cannot read them).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpBind {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Bound UDP sockets by socket cookie.
#[map]
pub static UDP_SOCKS: HashMap<u64, UdpBind> = HashMap::with_max_entries(MAX_UDP_SOCKETS, 0);

#[inline(always)]
pub fn count(stat: MonitorStat) {
    if let Some(slot) = MONITOR_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the slot is this CPU's own copy and programs do not preempt
        // each other on one CPU, so a plain add cannot race.
        unsafe { *slot += 1 };
    }
}
