//! The listener monitor: TCP LISTEN transitions from the tracepoint, UDP binds
//! and releases from cgroup socket hooks. Each hook fills one `ListenEvent`.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    programs::{SockContext, TracePointContext},
};
use aya_log_ebpf::debug;
use portwatch_common::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, ListenEvent, ListenKind, MonitorStat, TCP_CLOSE,
    TCP_LISTEN, UdpBind,
};

use crate::{
    aligned::{Chunk, current_comm},
    bind,
    maps::{EVENTS, UDP_SOCKS, count},
};

// Field offsets of sock/inet_sock_set_state, from its tracefs `format` file
// (stable across kernels since 4.16).
const TP_SKADDR: usize = 8;
const TP_OLDSTATE: usize = 16;
const TP_NEWSTATE: usize = 20;
const TP_SPORT: usize = 24;
const TP_FAMILY: usize = 28;
const TP_PROTOCOL: usize = 30;
const TP_SADDR: usize = 32;
const TP_SADDR_V6: usize = 40;

const SOCK_DGRAM: u32 = 2;

/// Queue one event; count it as lost when the ring buffer is full.
#[inline(always)]
fn emit(kind: ListenKind, proto: u8, family: u16, port: u16, addr: [u8; 16], sock_id: u64) {
    let Some(mut entry) = EVENTS.reserve::<ListenEvent>(0) else {
        count(MonitorStat::EventsLost);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    entry.write(ListenEvent {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        sock_id,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        port,
        family,
        proto,
        kind: kind as u8,
        _pad: [0; 6],
        addr,
        comm: current_comm().0,
    });
    entry.submit(0);
}

pub fn try_inet_sock_set_state(ctx: &TracePointContext) {
    // The reads below: offsets and sizes come from the tracepoint's format;
    // read_at goes through bpf_probe_read_kernel, which cannot fault.
    // SAFETY: see above.
    let Ok(protocol) = (unsafe { ctx.read_at::<u16>(TP_PROTOCOL) }) else {
        return;
    };
    if protocol != u16::from(IPPROTO_TCP) {
        return;
    }
    // SAFETY: see above.
    let (Ok(old), Ok(new)) = (unsafe { ctx.read_at::<i32>(TP_OLDSTATE) }, unsafe {
        ctx.read_at::<i32>(TP_NEWSTATE)
    }) else {
        return;
    };
    // LISTEN -> CLOSE is a listener shutting down. Other moves out of
    // LISTEN belong to child sockets: a connection's socket is cloned from
    // its listener (state included) and moves LISTEN -> SYN_RECV.
    let kind = if new == TCP_LISTEN {
        ListenKind::Listen
    } else if old == TCP_LISTEN && new == TCP_CLOSE {
        ListenKind::Close
    } else {
        return;
    };
    // SAFETY: see above.
    let fields = unsafe {
        (
            ctx.read_at::<u64>(TP_SKADDR),
            ctx.read_at::<u16>(TP_SPORT),
            ctx.read_at::<u16>(TP_FAMILY),
        )
    };
    let (Ok(skaddr), Ok(sport), Ok(family)) = fields else {
        return;
    };
    let mut addr = Chunk([0u8; 16]);
    if family == AF_INET {
        // SAFETY: see above.
        if let Ok(v4) = unsafe { ctx.read_at::<Chunk<4>>(TP_SADDR) } {
            addr.0[..4].copy_from_slice(&v4.0);
        }
    } else if family == AF_INET6 {
        // SAFETY: see above.
        if let Ok(v6) = unsafe { ctx.read_at::<Chunk<16>>(TP_SADDR_V6) } {
            addr = v6;
        }
    } else {
        return;
    }
    emit(kind, IPPROTO_TCP, family, sport, addr.0, skaddr);
}

/// Context fields are readable only at a constant offset from the context
/// pointer, and each hook allows only its own family's address fields: so one
/// volatile read per word, in the hook of that family.
macro_rules! ctx_read {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: ctx.sock is the program's context pointer; the verifier
        // checks the read against the bpf_sock fields this hook may access.
        unsafe { read_volatile(&raw const (*$ctx.sock).$($field)+) }
    };
}

/// `post_bind4`: an explicit bind of an IPv4 socket. Returns the hook's
/// answer: 1 lets the bind stand, 0 undoes it (an owned port, see `bind`).
pub fn try_post_bind4(ctx: &SockContext) -> i32 {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ctx_read!(ctx, src_ip4).to_ne_bytes());
    post_bind(ctx, AF_INET, addr)
}

/// `post_bind6`: an explicit bind of an IPv6 socket (`[::]` is dual-stack).
pub fn try_post_bind6(ctx: &SockContext) -> i32 {
    let words = [
        ctx_read!(ctx, src_ip6[0]),
        ctx_read!(ctx, src_ip6[1]),
        ctx_read!(ctx, src_ip6[2]),
        ctx_read!(ctx, src_ip6[3]),
    ];
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    post_bind(ctx, AF_INET6, addr)
}

#[inline(always)]
fn post_bind(ctx: &SockContext, family: u16, addr: [u8; 16]) -> i32 {
    // Host byte order here, also when the kernel picked the port.
    let port = ctx_read!(ctx, src_port) as u16;
    if !bind::allowed(ctx, family, addr, ctx_read!(ctx, protocol), port) {
        return 0;
    }
    record_bind(ctx, family, addr, port);
    1
}

/// Remembers a bound UDP socket by cookie and reports it.
#[inline(always)]
fn record_bind(ctx: &SockContext, family: u16, addr: [u8; 16], port: u16) {
    if ctx_read!(ctx, protocol) != u32::from(IPPROTO_UDP) || ctx_read!(ctx, type_) != SOCK_DGRAM {
        return;
    }
    // SAFETY: the context is a socket, which bpf_get_socket_cookie accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let bind = UdpBind {
        addr,
        port,
        family,
        _pad: 0,
    };
    if UDP_SOCKS.insert(cookie, bind, 0).is_err() {
        count(MonitorStat::UdpTableFull);
        debug!(
            ctx,
            "udp socket table full: close of port {} will not be seen", port
        );
    }
    emit(ListenKind::Listen, IPPROTO_UDP, family, port, addr, cookie);
}

pub fn try_sock_release(ctx: &SockContext) {
    // SAFETY: the context is a socket, which bpf_get_socket_cookie accepts.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Copy out before removing: the value memory is reused once removed.
    let Some(bind) = UDP_SOCKS.get_ptr(cookie).map(|p| {
        // SAFETY: a non-null pointer from a map lookup is valid for reads.
        unsafe { *p }
    }) else {
        return;
    };
    let _ = UDP_SOCKS.remove(cookie);
    emit(
        ListenKind::Close,
        IPPROTO_UDP,
        bind.family,
        bind.port,
        bind.addr,
        cookie,
    );
}
