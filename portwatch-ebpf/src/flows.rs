//! tc egress: records the host's own outbound flows that TCP's ACK rule
//! does not cover (UDP and SCTP by ports and addresses, every port-less
//! protocol such as GRE or ESP by addresses), so that the XDP program can
//! admit their replies under default deny.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use portwatch_common::{FlowKey, GuardStat, IPPROTO_TCP, flow_port_byte, port_slot};

use crate::{
    headers::{Headers, Walk, ports, walk},
    maps::{FLOW_PORTS, FLOWS, FLOWS4, guard_count},
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
    // Outbound: the source is local, the destination the remote peer.
    let key = FlowKey {
        family: h.family,
        proto: h.proto,
        _pad: 0,
        local_port: h.sport,
        remote_port: h.dport,
        local: h.src,
        remote: h.dst,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match key.compact() {
        Some(v4) => FLOWS4.insert(v4, now, 0).ok()?,
        None => FLOWS.insert(key, now, 0).ok()?,
    }
    // After the flow: a reply that sees the bit finds the flow.
    mark_flow_port(port_slot(h.proto, h.sport));
    guard_count(GuardStat::FlowsRecorded);
    Some(())
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
