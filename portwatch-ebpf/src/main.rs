//! The object embedded in the portwatch binary: the monitor's and the
//! guard's entry points, each a thin wrapper around a function of the
//! library that holds the logic.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{cgroup_sock, classifier, tracepoint, xdp},
    programs::{SockContext, TcContext, TracePointContext, XdpContext},
};
use portwatch_ebpf::{flows, guard, listen};

/// The kernel reads the licence from this section; GPL-compatible, so that
/// the programs may use every helper they call.
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// `sock/inet_sock_set_state`: TCP sockets entering or leaving LISTEN.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    listen::try_inet_sock_set_state(&ctx);
    0
}

/// `cgroup/post_bind4` at the cgroup v2 root: explicit IPv4 binds, and
/// the owned ports' verdict on them (0 undoes the bind: EPERM).
#[cgroup_sock(post_bind4)]
pub fn post_bind4(ctx: SockContext) -> i32 {
    listen::try_post_bind4(&ctx)
}

/// `cgroup/post_bind6` at the cgroup v2 root: explicit IPv6 binds.
#[cgroup_sock(post_bind6)]
pub fn post_bind6(ctx: SockContext) -> i32 {
    listen::try_post_bind6(&ctx)
}

/// `cgroup/sock_release`: closes of bound UDP sockets, matched by cookie.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    listen::try_sock_release(&ctx);
    1
}

/// The guard: inbound verdicts. `frags` lets it attach on jumbo MTUs.
#[xdp(frags)]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    guard::try_xdp_guard(&ctx)
}

/// The guard at tc ingress, for software devices (veth), where XDP would
/// copy each skb the kernel already built: the same verdict.
#[classifier]
pub fn tc_guard(ctx: TcContext) -> i32 {
    guard::try_tc_guard(&ctx)
}

/// The guard's read-only twin for `explain` and `verify`: never attached,
/// only test-run on probe frames.
#[xdp(frags)]
pub fn xdp_probe(ctx: XdpContext) -> u32 {
    guard::try_xdp_probe(&ctx)
}

/// The guard's egress side: records the host's outbound UDP flows.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    let _ = flows::try_tc_egress(&ctx);
    // Egress is never filtered.
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
