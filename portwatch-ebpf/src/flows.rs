//! tc egress: records the host's own outbound UDP flows, so that the XDP
//! program can admit their replies under default deny.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use portwatch_common::{FlowKey, GuardStat, IPPROTO_UDP};

use crate::{
    headers::{Headers, Walk, ports, walk},
    maps::{FLOWS, guard_count},
    packet::Skb,
};

pub fn try_tc_egress(ctx: &TcContext) -> Option<()> {
    let skb = Skb(ctx);
    let mut h = Headers::new();
    // Later fragments carry no UDP header; what does not parse is not ours
    // to judge on the way out.
    let Ok(Walk::Transport(off)) = walk(&skb, &mut h) else {
        return None;
    };
    if h.proto != IPPROTO_UDP {
        return None;
    }
    ports(&skb, off, &mut h).ok()?;
    // Outbound: the source is local, the destination the remote peer.
    let key = FlowKey {
        family: h.family,
        proto: IPPROTO_UDP,
        _pad: 0,
        local_port: h.sport,
        remote_port: h.dport,
        local: h.src,
        remote: h.dst,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    FLOWS.insert(key, now, 0).ok()?;
    guard_count(GuardStat::FlowsRecorded);
    Some(())
}
