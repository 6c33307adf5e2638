//! Baselines for `cargo xtask bench --only verdict`, in the benchmark object
//! only (portwatch never loads them). `try_parse_drop` runs the guard's
//! header walk — Ethernet, up to two VLAN tags, IPv4 with fragments, IPv6
//! with extension headers, the transport ports — then drops: no map, no
//! counter, no decision. The guard's cost above it is its verdict's.
//!
//! `try_parse_lookup_drop` adds what the classes whose semantics need a
//! lookup cannot do without: one LRU hash lookup keyed by the frame's
//! addresses, protocol and ports (the guard's IPv4 flow key), then the
//! clock (jiffies times the tick, as the guard reads it) against the value
//! found. Its cost above parse→drop is the floor of those classes (a UDP
//! reply to an own flow, a rate-limited SYN, a later fragment, a source
//! prefix): what no implementation of their semantics avoids.
//!
//! The walk's result is kept live through the fields every verdict reads
//! (family, protocol, flags, ports, fragment): folding the 32 address bytes
//! too, a byte at a time, cost more than the whole guard and made this
//! floor meaningless. Copies of address bytes nothing reads may be elided
//! here, as they are in the guard on paths that do not read them.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_jiffies64,
    maps::LruHashMap,
    programs::XdpContext,
};
use portwatch_common::{AF_INET, Flow4Key};

use crate::{
    headers::{Headers, Walk, ports, walk},
    packet::Pkt,
};

/// No real frame folds to this; comparing against it keeps every parsed
/// field live, so the compiler cannot drop the parsing.
const NEVER: u32 = 0x5eed_cafe;

pub fn try_parse_drop(ctx: &XdpContext) -> u32 {
    let pkt = Pkt::new(ctx);
    let mut slot = core::mem::MaybeUninit::uninit();
    let h = Headers::zeroed(&mut slot);
    let end = parse(&pkt, h);
    if fold(h) ^ end == NEVER {
        XDP_PASS
    } else {
        XDP_DROP
    }
}

/// The walk, one flow lookup and a clock read (see the module's comment),
/// then drop. `flows` holds the keys the bench's lookup classes hit.
pub fn try_parse_lookup_drop(ctx: &XdpContext, flows: &LruHashMap<Flow4Key, u64>) -> u32 {
    let pkt = Pkt::new(ctx);
    let mut slot = core::mem::MaybeUninit::uninit();
    let h = Headers::zeroed(&mut slot);
    let end = parse(&pkt, h);
    // Inbound: the destination is local, the source the remote peer; the
    // key built as the guard builds it.
    let v4 = (h.family == AF_INET as u8)
        .then(|| Flow4Key::new(h.proto, h.dport, h.sport, h.dst4(), h.src4()));
    let fresh = match v4 {
        Some(v4) => match flows.get_ptr(&v4) {
            Some(last) => {
                // SAFETY: a pointer from a map lookup is valid for reads.
                let last = unsafe { *last };
                // SAFETY: bpf_jiffies64 has no preconditions. A 250 Hz tick.
                let now = unsafe { bpf_jiffies64() }.wrapping_mul(4_000_000);
                u32::from(now.saturating_sub(last) <= 30_000_000_000)
            }
            None => 3,
        },
        None => 4,
    };
    if fold(h) ^ end ^ fresh == NEVER {
        XDP_PASS
    } else {
        XDP_DROP
    }
}

/// The guard's walk and ports; a word for how it ended, to fold in.
#[inline(always)]
fn parse(pkt: &Pkt, h: &mut Headers) -> u32 {
    match walk(pkt, h) {
        Ok(Walk::Transport(off)) => {
            let _ = ports(pkt, off, h);
            0
        }
        Ok(Walk::LaterFragment(id)) => id,
        Ok(Walk::NotIp) => 1,
        Err(_) => 2,
    }
}

/// The fields every verdict reads, folded into one word.
#[inline(always)]
fn fold(h: &Headers) -> u32 {
    let acc = u32::from(h.family) << 24 ^ u32::from(h.proto) << 16 ^ u32::from(h.tcp_flags);
    acc ^ (u32::from(h.sport) << 16 | u32::from(h.dport)) ^ h.frag_id ^ u32::from(h.first_frag)
}
