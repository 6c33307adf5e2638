//! The benchmark object (`cargo xtask bench --only verdict`): baselines the
//! guard's cost is measured against. Never shipped, never attached.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::XDP_DROP,
    macros::{map, xdp},
    maps::LruHashMap,
    programs::XdpContext,
};
use portwatch_common::{Flow4Key, MAX_FLOWS};
use portwatch_ebpf::bench;

/// `bench_parse_lookup_drop`'s table: the guard's IPv4 flow table's shape.
#[map]
pub static BENCH_FLOWS4: LruHashMap<Flow4Key, u64> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

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

/// The guard's header walk, one flow lookup and a clock read, then drop:
/// the floor of the classes that need a lookup.
#[xdp(frags)]
pub fn bench_parse_lookup_drop(ctx: XdpContext) -> u32 {
    bench::try_parse_lookup_drop(&ctx, &BENCH_FLOWS4)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
