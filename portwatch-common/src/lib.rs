//! Types shared by the kernel programs (`portwatch-ebpf`) and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree
//! on the byte layout. User space never transmutes ring-buffer bytes into these
//! types: it decodes them field by field using the offsets published below.
#![no_std]

/// Size of the listener event ring buffer in bytes (a power of two, page aligned).
/// 4 MiB holds about 58,000 events, enough to absorb a burst while user space
/// catches up.
pub const EVENTS_RING_BYTES: u32 = 4 << 20;

/// Maximum number of bound UDP sockets tracked for close matching.
pub const MAX_UDP_SOCKETS: u32 = 1 << 18;

/// Linux socket states and address families used on both sides.
pub const TCP_LISTEN: i32 = 10;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// What happened to a listening socket.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenKind {
    /// A TCP socket entered LISTEN, or a UDP socket was bound.
    Listen = 1,
    /// A TCP socket left LISTEN, or a bound UDP socket was released.
    Close = 2,
}

impl ListenKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Listen),
            2 => Some(Self::Close),
            _ => None,
        }
    }
}

/// One listener event as the kernel writes it into the `EVENTS` ring buffer.
///
/// `sock_id` identifies the socket for matching a close to its open: the
/// kernel address of the `struct sock` for TCP (all the tracepoint offers) and
/// the socket cookie for UDP (the same cookie sock_diag reports).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ListenEvent {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
    pub sock_id: u64,
    /// Process id (tgid) and thread id of the task in whose context it happened.
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// Local port in host byte order.
    pub port: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// A `ListenKind` value.
    pub kind: u8,
    pub _pad: [u8; 6],
    /// Local address: the first 4 bytes for IPv4, all 16 for IPv6, network order.
    pub addr: [u8; 16],
    /// Task command name, NUL padded.
    pub comm: [u8; 16],
}

impl ListenEvent {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Byte offsets of `ListenEvent` fields, for the length-checked decoder.
pub mod listen_event_offsets {
    use super::ListenEvent;
    use core::mem::offset_of;
    pub const TS_NS: usize = offset_of!(ListenEvent, ts_ns);
    pub const SOCK_ID: usize = offset_of!(ListenEvent, sock_id);
    pub const TGID: usize = offset_of!(ListenEvent, tgid);
    pub const TID: usize = offset_of!(ListenEvent, tid);
    pub const UID: usize = offset_of!(ListenEvent, uid);
    pub const PORT: usize = offset_of!(ListenEvent, port);
    pub const FAMILY: usize = offset_of!(ListenEvent, family);
    pub const PROTO: usize = offset_of!(ListenEvent, proto);
    pub const KIND: usize = offset_of!(ListenEvent, kind);
    pub const ADDR: usize = offset_of!(ListenEvent, addr);
    pub const COMM: usize = offset_of!(ListenEvent, comm);
}

/// Indexes into the per-CPU `MONITOR_STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorStat {
    /// Events that could not be queued because the ring buffer was full.
    EventsLost = 0,
    /// UDP binds whose cookie could not be remembered (table full): their
    /// close will not be reported.
    UdpTableFull = 1,
}

pub const MONITOR_STATS_LEN: u32 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: ListenEvent is repr(C), made only of integers and byte arrays,
    // with explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::ListenEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(ListenEvent::SIZE, 72);
        assert_eq!(listen_event_offsets::ADDR, 40);
        assert_eq!(listen_event_offsets::COMM, 56);
    }
}
