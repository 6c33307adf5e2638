//! tc egress: records the host's own outbound UDP flows, so that the XDP
//! program can admit their replies under default deny.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use portwatch_common::{AF_INET, AF_INET6, FlowKey, GuardStat, IPPROTO_UDP};

use crate::{
    maps::{FLOWS, guard_count},
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, MAX_EXT_HEADERS, NEXTHDR_DEST, NEXTHDR_HOP,
        NEXTHDR_ROUTING, be16, is_vlan,
    },
};

pub fn try_tc_egress(ctx: &TcContext) -> Option<()> {
    // bpf_skb_load_bytes (ctx.load) also reads non-linear packets.
    let eth: [u8; ETH_HLEN] = ctx.load(0).ok()?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    for _ in 0..2 {
        if !is_vlan(ethertype) {
            break;
        }
        let tag: [u8; 4] = ctx.load(off).ok()?;
        ethertype = be16(tag[2], tag[3]);
        off += 4;
    }
    let mut key = FlowKey {
        proto: IPPROTO_UDP,
        ..FlowKey::default()
    };
    let l4 = match ethertype {
        ETH_P_IP => {
            let h: [u8; 20] = ctx.load(off).ok()?;
            // Later fragments carry no UDP header.
            if h[9] != IPPROTO_UDP || be16(h[6], h[7]) & 0x1fff != 0 {
                return None;
            }
            key.family = AF_INET as u8;
            key.local[..4].copy_from_slice(&h[12..16]);
            key.remote[..4].copy_from_slice(&h[16..20]);
            off + ((h[0] & 0x0f) as usize) * 4
        }
        ETH_P_IPV6 => {
            let h: [u8; 40] = ctx.load(off).ok()?;
            key.family = AF_INET6 as u8;
            key.local.copy_from_slice(&h[8..24]);
            key.remote.copy_from_slice(&h[24..40]);
            let mut next = h[6];
            let mut at = off + 40;
            for _ in 0..MAX_EXT_HEADERS {
                if next != NEXTHDR_HOP && next != NEXTHDR_ROUTING && next != NEXTHDR_DEST {
                    break;
                }
                let e: [u8; 2] = ctx.load(at).ok()?;
                next = e[0];
                at += (e[1] as usize + 1) * 8;
            }
            if next != IPPROTO_UDP {
                return None;
            }
            at
        }
        _ => return None,
    };
    let udp: [u8; 4] = ctx.load(l4).ok()?;
    key.local_port = be16(udp[0], udp[1]);
    key.remote_port = be16(udp[2], udp[3]);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    FLOWS.insert(key, now, 0).ok()?;
    guard_count(GuardStat::FlowsRecorded);
    Some(())
}
