//! The benchmark object (`cargo xtask bench --only verdict`): baselines the
//! guard's cost is measured against. Never shipped, never attached.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action::XDP_DROP, macros::xdp, programs::XdpContext};
use portwatch_ebpf::bench;

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Drop, nothing else.
#[xdp(frags)]
pub fn bench_xdp_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// The guard's header walk, then drop.
#[xdp(frags)]
pub fn bench_parse_drop(ctx: XdpContext) -> u32 {
    bench::try_parse_drop(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
