//! tc egress: records the host's own outbound flows that TCP's ACK rule
//! does not cover (UDP and SCTP by ports and addresses, every port-less
//! protocol such as GRE or ESP by addresses), so that the XDP program can
//! admit their replies under default deny.

use aya_ebpf::{maps::LruHashMap, programs::TcContext};
use portwatch_common::{
    AF_INET, Flow4Key, FlowKey, GuardConfig, GuardStat, IPPROTO_TCP, flow_port_byte, port_slot,
};

use crate::{
    clock::now_ns,
    headers::{Headers, Walk, ports, walk},
    maps::{FLOW_PORTS, FLOWS, FLOWS4, GUARD_CONFIG, guard_count},
    packet::Skb,
};

pub fn try_tc_egress(ctx: &TcContext) -> Option<()> {
    let skb = Skb(ctx);
    let mut slot = core::mem::MaybeUninit::uninit();
    let h = Headers::zeroed(&mut slot);
    // Later fragments carry no UDP header; what does not parse is not ours
    // to judge on the way out.
    let Ok(Walk::Transport(off)) = walk(&skb, h) else {
        return None;
    };
    // TCP replies carry ACK; ICMP, ICMPv6 and IGMP always pass.
    if matches!(h.proto, IPPROTO_TCP | 1 | 2 | 58) {
        return None;
    }
    // Port-less protocols keep ports 0.
    ports(&skb, off, h).ok()?;
    let uncalibrated = GuardConfig::default();
    let cfg = GUARD_CONFIG.get(0).unwrap_or(&uncalibrated);
    // The clock the verdict ages flows by.
    let now = now_ns(cfg);
    // Outbound: the source is local, the destination the remote peer.
    if h.family == AF_INET as u8 {
        let key = Flow4Key::new(h.proto, h.sport, h.dport, h.src4(), h.dst4());
        stamp(&FLOWS4, &key, now)?;
    } else {
        let key = FlowKey {
            family: h.family,
            proto: h.proto,
            _pad: 0,
            local_port: h.sport,
            remote_port: h.dport,
            local: h.src,
            remote: h.dst,
        };
        stamp(&FLOWS, &key, now)?;
    }
    // After the flow: a reply that sees the bit finds the flow.
    mark_flow_port(port_slot(h.proto, h.sport));
    guard_count(GuardStat::FlowsRecorded);
    Some(())
}

/// Stamps a flow with `now`: in place for a known flow, and only when the
/// clock has moved on (once a tick), else a new entry. An update of an LRU
/// hash takes a fresh element from the free list on every call, and every
/// outbound datagram of the host would pay for it.
#[inline(always)]
fn stamp<K>(flows: &LruHashMap<K, u64>, key: &K, now: u64) -> Option<()> {
    match flows.get_ptr_mut(key) {
        Some(last) => {
            // SAFETY: a pointer from a map lookup is valid for reads and
            // writes during the program's run; a u64 store cannot tear,
            // and racing CPUs store the same tick or the next.
            unsafe {
                if *last != now {
                    *last = now;
                }
            }
            Some(())
        }
        None => flows.insert(key, &now, 0).ok(),
    }
}

/// Marks the port in `FLOW_PORTS` (once: a store only when unmarked).
#[inline(always)]
fn mark_flow_port(slot: u32) {
    let (entry, byte) = flow_port_byte(slot);
    let Some(marks) = FLOW_PORTS.get_ptr_mut(entry) else {
        return;
    };
    // SAFETY: a pointer from an array lookup is valid for the program's
    // run; `byte` < the entry's length. A byte store cannot tear, and every
    // writer stores the same value.
    unsafe {
        if (*marks)[byte] == 0 {
            (*marks)[byte] = 1;
        }
    }
}
