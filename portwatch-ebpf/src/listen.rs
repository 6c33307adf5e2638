//! The listener monitor: TCP LISTEN transitions from the tracepoint, UDP binds
//! and releases from cgroup socket hooks. Each hook fills one `ListenEvent`.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    programs::{SockContext, TracePointContext},
};
use aya_log_ebpf::debug;
use portwatch_common::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, ListenEvent, ListenKind, MonitorStat, TCP_LISTEN,
};

use crate::maps::{EVENTS, UDP_SOCKS, UdpBind, count};

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
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    entry.submit(0);
}

pub fn try_inet_sock_set_state(ctx: &TracePointContext) {
    // SAFETY (all reads below): offsets and sizes come from the tracepoint's
    // format; read_at goes through bpf_probe_read_kernel, which cannot fault.
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
    let kind = if new == TCP_LISTEN {
        ListenKind::Listen
    } else if old == TCP_LISTEN {
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
    let mut addr = [0u8; 16];
    if family == AF_INET {
        // SAFETY: see above.
        if let Ok(v4) = unsafe { ctx.read_at::<[u8; 4]>(TP_SADDR) } {
            addr[..4].copy_from_slice(&v4);
        }
    } else if family == AF_INET6 {
        // SAFETY: see above.
        if let Ok(v6) = unsafe { ctx.read_at::<[u8; 16]>(TP_SADDR_V6) } {
            addr = v6;
        }
    } else {
        return;
    }
    emit(kind, IPPROTO_TCP, family, sport, addr, skaddr);
}

/// Reads the bound address of a `bpf_sock` as 16 network-order bytes.
#[inline(always)]
fn bound_addr(ctx: &SockContext, family: u16) -> [u8; 16] {
    let mut addr = [0u8; 16];
    // SAFETY: ctx.sock is the program's context pointer; the verifier checks
    // every field access against the bpf_sock layout for this hook.
    let sk = unsafe { &*ctx.sock };
    if family == AF_INET {
        addr[..4].copy_from_slice(&sk.src_ip4.to_ne_bytes());
    } else {
        for (i, word) in sk.src_ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    addr
}

pub fn try_post_bind(ctx: &SockContext) {
    // SAFETY: see bound_addr.
    let sk = unsafe { &*ctx.sock };
    if sk.protocol != u32::from(IPPROTO_UDP) || sk.type_ != SOCK_DGRAM {
        return;
    }
    let family = sk.family as u16;
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let port = sk.src_port as u16;
    let addr = bound_addr(ctx, family);
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
        debug!(ctx, "udp socket table full: close of port {} will not be seen", port);
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
    emit(ListenKind::Close, IPPROTO_UDP, bind.family, bind.port, bind.addr, cookie);
}
