//! The guard's XDP program: parse the inbound frame (bounds-checked), then
//! decide it against the policy maps. Every frame gets a defined verdict;
//! truncated or over-long headers are dropped as malformed.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_xdp_get_buff_len},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use portwatch_common::{
    AF_INET, AF_INET6, DropReason, DropReport, FlowKey, FragKey, FragVerdict, GUARD_AUDIT,
    GuardConfig, GuardStat, IPPROTO_TCP, IPPROTO_UDP, PortCounters, RULE_ANY, RULE_CIDR,
    SRC_KEY_PORT_BITS, SRC4_KEY_LEN, SRC6_KEY_LEN, counter_key, port_slot,
};

use crate::{
    maps::{
        DROPS, FLOWS, FRAGS, GUARD_CONFIG, POLICY_PORTS, POLICY_SRC4, POLICY_SRC6, PORT_COUNTERS,
        REPORT_BUCKET, guard_count,
    },
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, MAX_EXT_HEADERS, NEXTHDR_AUTH, NEXTHDR_DEST,
        NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING, Pkt, be16, is_vlan,
    },
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_IGMP: u8 = 2;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const NS_PER_TOKEN: u64 = 1_000_000_000;

/// What parsing learned about the packet.
struct Meta {
    family: u8,
    proto: u8,
    /// Ports in host order; `has_ports` says whether they were read.
    sport: u16,
    dport: u16,
    has_ports: bool,
    src: [u8; 16],
    dst: [u8; 16],
    /// First fragment of several, and its id. Plain fields, not an Option:
    /// an Option's unset payload lets the compiler store any register there,
    /// which the verifier rejects.
    first_frag: bool,
    frag_id: u32,
}

type Verdict = Result<(), DropReason>;

pub fn try_xdp_guard(ctx: &XdpContext) -> u32 {
    let cfg = match GUARD_CONFIG.get(0) {
        Some(cfg) => *cfg,
        None => GuardConfig::default(),
    };
    let mut m = Meta {
        family: 0,
        proto: 0,
        sport: 0,
        dport: 0,
        has_ports: false,
        src: [0; 16],
        dst: [0; 16],
        first_frag: false,
        frag_id: 0,
    };
    let pkt = Pkt::new(ctx);
    let verdict = classify(&pkt, &mut m, &cfg);
    // A first fragment's verdict, whatever it is, is what its later
    // fragments get.
    if m.first_frag {
        record_first_fragment(&m, &verdict);
    }
    if m.has_ports {
        // The whole frame, fragments of a multi-buffer frame included: the
        // linear part alone undercounts jumbo frames.
        // SAFETY: `ctx.ctx` is the xdp_md the kernel passed to this program.
        let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) };
        count_port(&m, verdict.is_err(), len);
    }
    let Err(reason) = verdict else {
        guard_count(GuardStat::Passed);
        return XDP_PASS;
    };
    guard_count(match reason {
        DropReason::NoRule => GuardStat::DropNoRule,
        DropReason::Source => GuardStat::DropSource,
        DropReason::Malformed => GuardStat::DropMalformed,
        DropReason::Fragment => GuardStat::DropFragment,
    });
    let audit = cfg.flags & GUARD_AUDIT != 0;
    report(ctx, &m, reason, audit, &cfg);
    if audit { XDP_PASS } else { XDP_DROP }
}

fn classify(pkt: &Pkt, m: &mut Meta, cfg: &GuardConfig) -> Verdict {
    let eth = pkt.bytes::<ETH_HLEN>(0).ok_or(DropReason::Malformed)?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    // Up to two tags (802.1Q, or 802.1ad outer + 802.1Q inner).
    if is_vlan(ethertype) {
        let tag = pkt.bytes::<4>(off).ok_or(DropReason::Malformed)?;
        ethertype = be16(tag[2], tag[3]);
        off += 4;
        if is_vlan(ethertype) {
            let tag = pkt.bytes::<4>(off).ok_or(DropReason::Malformed)?;
            ethertype = be16(tag[2], tag[3]);
            off += 4;
            if is_vlan(ethertype) {
                return Err(DropReason::Malformed);
            }
        }
    }
    match ethertype {
        ETH_P_IP => ipv4(pkt, off, m, cfg),
        ETH_P_IPV6 => ipv6(pkt, off, m, cfg),
        // ARP and every other non-IP protocol: the host needs them.
        _ => Ok(()),
    }
}

fn ipv4(pkt: &Pkt, off: usize, m: &mut Meta, cfg: &GuardConfig) -> Verdict {
    let h = pkt.bytes::<20>(off).ok_or(DropReason::Malformed)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let total = be16(h[2], h[3]) as usize;
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl || !pkt.has(off + ihl) {
        return Err(DropReason::Malformed);
    }
    m.family = AF_INET as u8;
    m.proto = h[9];
    m.src[..4].copy_from_slice(&h[12..16]);
    m.dst[..4].copy_from_slice(&h[16..20]);
    let frag = be16(h[6], h[7]);
    let id = u32::from(be16(h[4], h[5]));
    if frag & 0x1fff != 0 {
        return later_fragment(m, id);
    }
    if frag & 0x2000 != 0 {
        m.first_frag = true;
        m.frag_id = id;
    }
    transport(pkt, off + ihl, m, cfg)
}

fn ipv6(pkt: &Pkt, off: usize, m: &mut Meta, cfg: &GuardConfig) -> Verdict {
    let h = pkt.bytes::<40>(off).ok_or(DropReason::Malformed)?;
    if h[0] >> 4 != 6 {
        return Err(DropReason::Malformed);
    }
    m.family = AF_INET6 as u8;
    m.src.copy_from_slice(&h[8..24]);
    m.dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = off + 40;
    // One pass per extension header, plus the one that reaches transport:
    // the pass after the 8th header accepts only a transport header.
    for i in 0..=MAX_EXT_HEADERS {
        let is_ext = matches!(
            next,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
        );
        if !is_ext {
            m.proto = next;
            return transport(pkt, off, m, cfg);
        }
        if i == MAX_EXT_HEADERS {
            break;
        }
        let e = pkt.bytes::<2>(off).ok_or(DropReason::Malformed)?;
        let len = match next {
            NEXTHDR_AUTH => (e[1] as usize + 2) * 4,
            NEXTHDR_FRAGMENT => 8,
            _ => (e[1] as usize + 1) * 8,
        };
        if next == NEXTHDR_FRAGMENT {
            let f = pkt.bytes::<8>(off).ok_or(DropReason::Malformed)?;
            let frag = be16(f[2], f[3]);
            let id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
            if frag >> 3 != 0 {
                m.proto = f[0];
                // A later fragment names no datagram of its own.
                m.first_frag = false;
                return later_fragment(m, id);
            }
            // Offset 0 without M is an atomic fragment: a whole datagram.
            // The last fragment header with M names the datagram.
            if frag & 1 != 0 {
                m.first_frag = true;
                m.frag_id = id;
            }
        }
        next = e[0];
        off += len;
        // The whole header must be in the frame.
        if !pkt.has(off) {
            return Err(DropReason::Malformed);
        }
    }
    // Longer chains than any legitimate stack sends: refuse them.
    Err(DropReason::Malformed)
}

/// IPv4 names a datagram by (src, dst, id, protocol) (RFC 791); IPv6 by
/// (src, dst, id) (RFC 8200), whatever extension headers follow.
fn frag_key(m: &Meta, id: u32) -> FragKey {
    FragKey {
        family: m.family,
        proto: if m.family == AF_INET6 as u8 {
            0
        } else {
            m.proto
        },
        _pad: 0,
        id,
        src: m.src,
        dst: m.dst,
    }
}

fn record_first_fragment(m: &Meta, verdict: &Verdict) {
    let decided = FragVerdict {
        reason: match verdict {
            Ok(()) => 0,
            Err(reason) => *reason as u8,
        },
        proto: m.proto,
        port: m.dport,
        _pad: 0,
    };
    let _ = FRAGS.insert(frag_key(m, m.frag_id), decided, 0);
}

/// A later fragment carries no ports: it follows its first fragment.
fn later_fragment(m: &mut Meta, id: u32) -> Verdict {
    let Some(first) = FRAGS.get_ptr(frag_key(m, id)) else {
        return Err(DropReason::Fragment);
    };
    // SAFETY: a pointer from a map lookup is valid for reads.
    let first = unsafe { *first };
    // Count it under the first fragment's transport protocol and port.
    m.proto = first.proto;
    if first.port != 0 {
        m.dport = first.port;
        m.has_ports = true;
    }
    match DropReason::from_u8(first.reason) {
        None => Ok(()),
        Some(reason) => Err(reason),
    }
}

fn transport(pkt: &Pkt, off: usize, m: &mut Meta, cfg: &GuardConfig) -> Verdict {
    match m.proto {
        IPPROTO_TCP => tcp(pkt, off, m),
        IPPROTO_UDP => udp(pkt, off, m, cfg),
        // Neighbour discovery, path MTU discovery, multicast membership.
        IPPROTO_ICMP | IPPROTO_ICMPV6 | IPPROTO_IGMP => Ok(()),
        // Default deny: no rule can permit other protocols.
        _ => Err(DropReason::NoRule),
    }
}

fn tcp(pkt: &Pkt, off: usize, m: &mut Meta) -> Verdict {
    let t = pkt.bytes::<20>(off).ok_or(DropReason::Malformed)?;
    m.sport = be16(t[0], t[1]);
    m.dport = be16(t[2], t[3]);
    m.has_ports = true;
    let doff = ((t[12] >> 4) as usize) * 4;
    // The whole header, options included, must be there.
    if doff < 20 || !pkt.has(off + doff) {
        return Err(DropReason::Malformed);
    }
    let flags = t[13];
    // Only a connection attempt needs a rule; everything else belongs to a
    // connection that exists or that the host itself opened.
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        permitted(m)
    } else {
        Ok(())
    }
}

fn udp(pkt: &Pkt, off: usize, m: &mut Meta, cfg: &GuardConfig) -> Verdict {
    let u = pkt.bytes::<8>(off).ok_or(DropReason::Malformed)?;
    m.sport = be16(u[0], u[1]);
    m.dport = be16(u[2], u[3]);
    m.has_ports = true;
    // DHCP replies to the host's own client.
    let dhcp = if m.family == AF_INET as u8 {
        m.sport == 67 && m.dport == 68
    } else {
        m.sport == 547 && m.dport == 546
    };
    if dhcp {
        return Ok(());
    }
    match permitted(m) {
        Ok(()) => Ok(()),
        Err(reason) if reply_to_own_flow(m, cfg) => {
            let _ = reason;
            guard_count(GuardStat::FlowReplies);
            Ok(())
        }
        Err(reason) => Err(reason),
    }
}

/// Whether the policy permits (proto, destination port) from this source.
fn permitted(m: &Meta) -> Verdict {
    let rule = match POLICY_PORTS.get(port_slot(m.proto, m.dport)) {
        Some(rule) => *rule,
        None => 0,
    };
    if rule & RULE_ANY != 0 {
        return Ok(());
    }
    if rule & RULE_CIDR == 0 {
        return Err(DropReason::NoRule);
    }
    let [hi, lo] = m.dport.to_be_bytes();
    let allowed = if m.family == AF_INET as u8 {
        let mut data = [0u8; SRC4_KEY_LEN];
        data[0] = m.proto;
        data[1] = hi;
        data[2] = lo;
        data[3..7].copy_from_slice(&m.src[..4]);
        POLICY_SRC4
            .get(Key::new(SRC_KEY_PORT_BITS + 32, data))
            .is_some()
    } else {
        let mut data = [0u8; SRC6_KEY_LEN];
        data[0] = m.proto;
        data[1] = hi;
        data[2] = lo;
        data[3..19].copy_from_slice(&m.src);
        POLICY_SRC6
            .get(Key::new(SRC_KEY_PORT_BITS + 128, data))
            .is_some()
    };
    if allowed {
        Ok(())
    } else {
        Err(DropReason::Source)
    }
}

/// Whether a UDP packet answers a flow the host opened (tc egress records them).
fn reply_to_own_flow(m: &Meta, cfg: &GuardConfig) -> bool {
    let key = FlowKey {
        family: m.family,
        proto: IPPROTO_UDP,
        _pad: 0,
        local_port: m.dport,
        remote_port: m.sport,
        local: m.dst,
        remote: m.src,
    };
    let Some(last) = FLOWS.get_ptr(key) else {
        return false;
    };
    // SAFETY: a pointer from a map lookup is valid for reads.
    let last = unsafe { *last };
    // The coarse clock (tick resolution) is enough for a 30 s timeout and a
    // per-second rate limit, and much cheaper on the per-packet path.
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    now.saturating_sub(last) <= cfg.flow_timeout_ns
}

fn count_port(m: &Meta, dropped: bool, len: u64) {
    let key = counter_key(m.proto, m.dport);
    match PORT_COUNTERS.get_ptr_mut(key) {
        Some(c) => {
            // SAFETY: this CPU's own copy of the value; no concurrent writer.
            let c = unsafe { &mut *c };
            if dropped {
                c.drop_packets += 1;
                c.drop_bytes += len;
            } else {
                c.pass_packets += 1;
                c.pass_bytes += len;
            }
        }
        None => {
            let mut c = PortCounters::default();
            if dropped {
                c.drop_packets = 1;
                c.drop_bytes = len;
            } else {
                c.pass_packets = 1;
                c.pass_bytes = len;
            }
            let _ = PORT_COUNTERS.insert(key, c, 0);
        }
    }
}

/// Sends a drop report unless the per-CPU token bucket is empty.
fn report(ctx: &XdpContext, m: &Meta, reason: DropReason, audit: bool, cfg: &GuardConfig) {
    // The coarse clock (tick resolution) is enough for a 30 s timeout and a
    // per-second rate limit, and much cheaper on the per-packet path.
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let Some(bucket) = REPORT_BUCKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's own bucket; no concurrent writer.
    let bucket = unsafe { &mut *bucket };
    // Cap the refill interval so the product cannot overflow.
    let elapsed = now.saturating_sub(bucket.last_ns).min(10 * NS_PER_TOKEN);
    let cap = u64::from(cfg.report_burst) * NS_PER_TOKEN;
    let tokens = (bucket.tokens + elapsed * u64::from(cfg.report_rate)).min(cap);
    bucket.last_ns = now;
    if tokens < NS_PER_TOKEN {
        bucket.tokens = tokens;
        guard_count(GuardStat::ReportsSuppressed);
        return;
    }
    bucket.tokens = tokens - NS_PER_TOKEN;
    let Some(mut entry) = DROPS.reserve::<DropReport>(0) else {
        guard_count(GuardStat::ReportsLost);
        return;
    };
    entry.write(DropReport {
        ts_ns: now,
        ifindex: ctx.ingress_ifindex() as u32,
        reason: reason as u8,
        proto: m.proto,
        family: m.family,
        audit: audit as u8,
        src_port: m.sport,
        dst_port: m.dport,
        _pad: 0,
        src: m.src,
        dst: m.dst,
    });
    entry.submit(0);
}
