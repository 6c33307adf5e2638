//! Baselines for `cargo xtask bench --only verdict`; portwatch never loads
//! them. `try_parse_drop` parses what the guard parses, with the same
//! bounds-checked reads (Ethernet, up to two VLAN tags, IPv4 with fragments,
//! IPv6 with extension headers, TCP, UDP), then drops: no map, no counter,
//! no decision. The guard's cost above it is the cost of its verdict.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    programs::XdpContext,
};
use portwatch_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::parse::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, MAX_EXT_HEADERS, NEXTHDR_AUTH, NEXTHDR_DEST, NEXTHDR_FRAGMENT,
    NEXTHDR_HOP, NEXTHDR_ROUTING, Pkt, be16, is_vlan,
};

/// No real frame folds to this; comparing against it keeps every parsed
/// field live, so the compiler cannot drop the parsing.
const NEVER: u32 = 0x5eed_cafe;

pub fn try_parse_drop(ctx: &XdpContext) -> u32 {
    let pkt = Pkt::new(ctx);
    if parse(&pkt).unwrap_or(0) == NEVER {
        XDP_PASS
    } else {
        XDP_DROP
    }
}

/// Each field the guard reads, folded into one word as it is read: the
/// parsing's cost without a consumer's.
fn word(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn parse(pkt: &Pkt) -> Option<u32> {
    let eth = pkt.bytes::<ETH_HLEN>(0)?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    if is_vlan(ethertype) {
        let tag = pkt.bytes::<4>(off)?;
        ethertype = be16(tag[2], tag[3]);
        off += 4;
        if is_vlan(ethertype) {
            let tag = pkt.bytes::<4>(off)?;
            ethertype = be16(tag[2], tag[3]);
            off += 4;
            if is_vlan(ethertype) {
                return None;
            }
        }
    }
    let acc = u32::from(ethertype);
    match ethertype {
        ETH_P_IP => ipv4(pkt, off).map(|x| x ^ acc),
        ETH_P_IPV6 => ipv6(pkt, off).map(|x| x ^ acc),
        _ => Some(acc),
    }
}

fn ipv4(pkt: &Pkt, off: usize) -> Option<u32> {
    let ip = pkt.bytes::<20>(off)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = be16(ip[2], ip[3]) as usize;
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || !pkt.has(off + ihl) {
        return None;
    }
    let acc = word(&ip[12..16]) ^ word(&ip[16..20]) ^ u32::from(be16(ip[4], ip[5]));
    // A later fragment has no transport header.
    if be16(ip[6], ip[7]) & 0x1fff != 0 {
        return Some(acc ^ u32::from(ip[9]));
    }
    transport(pkt, off + ihl, ip[9]).map(|x| x ^ acc)
}

fn ipv6(pkt: &Pkt, off: usize) -> Option<u32> {
    let ip = pkt.bytes::<40>(off)?;
    if ip[0] >> 4 != 6 {
        return None;
    }
    let mut acc = 0;
    let mut i = 8;
    while i < 40 {
        acc ^= word(&ip[i..i + 4]);
        i += 4;
    }
    let mut next = ip[6];
    let mut off = off + 40;
    for _ in 0..=MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e = pkt.bytes::<2>(off)?;
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let e = pkt.bytes::<2>(off)?;
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let f = pkt.bytes::<8>(off)?;
                next = f[0];
                off += 8;
                acc ^= word(&f[4..8]);
                if be16(f[2], f[3]) >> 3 != 0 {
                    return Some(acc ^ u32::from(next));
                }
            }
            _ => return transport(pkt, off, next).map(|x| x ^ acc),
        }
    }
    None
}

fn transport(pkt: &Pkt, off: usize, proto: u8) -> Option<u32> {
    let acc = u32::from(proto) << 24;
    match proto {
        IPPROTO_TCP => {
            let t = pkt.bytes::<20>(off)?;
            let doff = ((t[12] >> 4) as usize) * 4;
            if doff < 20 || !pkt.has(off + doff) {
                return None;
            }
            Some(acc ^ word(&t[0..4]) ^ u32::from(t[13]))
        }
        IPPROTO_UDP => {
            let u = pkt.bytes::<8>(off)?;
            Some(acc ^ word(&u[0..4]))
        }
        _ => Some(acc),
    }
}
