//! The guard's verdict on an inbound frame: parse it with the shared header
//! walk (bounds-checked), then decide it against the policy maps. Every
//! frame gets a defined verdict; truncated or over-long headers are dropped
//! as malformed. One verdict, two hooks: XDP (hardware drivers: before the
//! kernel builds an skb) and tc ingress (software devices such as veth,
//! where the skb already exists and XDP would copy it).

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT,
        xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    },
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use portwatch_common::{
    AF_INET, AF_INET6, DropReason, DropReport, Flow4Key, FlowKey, Frag4Key, FragKey, FragVerdict,
    GUARD_AUDIT, GUARD_FORWARD_JUDGE, GUARD_LEARN, GUARD_PROBE, GuardConfig, GuardStat,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, LOCAL_INLINE_V4, LOCAL_INLINE_V6, LearnKey, LearnStats,
    LocalKey, PROBE_MAGIC, PassReason, RULE_ANY, RULE_CIDR, RULE_LIMIT, RateKey, RateLimit,
    RateState, XdpProbe, entry_slot, flow_port_byte, other_slot, port_slot, src_prefix_len,
    src4_key, src6_key,
};

use crate::{
    clock::{clock_at, now_ns},
    headers::{Headers, Walk, ports, walk},
    maps::{
        COUNTERS, DROPS, FLOW_PORTS, FLOWS, FLOWS4, FRAGS, FRAGS4, GUARD_CONFIG, LEARN, LIMITS,
        LOCAL_ADDRS, LOCAL_LIST, POLICY_PORTS, POLICY_SRC4, POLICY_SRC6, RATE_OVERFLOW, RATE_STATE,
        REPORT_BUCKET, guard_count,
    },
    packet::{Frame, Pkt, Skb},
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_IGMP: u8 = 2;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS_PER_TOKEN: u64 = 1_000_000_000;

type Verdict = Result<PassReason, DropReason>;

/// No `POLICY_PORTS` entry has every bit set (slots fit the high half
/// with room to spare): the frame's entry was not looked up yet.
const NOT_LOOKED_UP: u32 = u32::MAX;

/// The frame's `POLICY_PORTS` entry, looked up at most once: the verdict
/// and the counter both read it.
struct Entry(u32);

impl Entry {
    #[inline(always)]
    fn of(&mut self, m: &Headers) -> u32 {
        if self.0 == NOT_LOOKED_UP {
            self.0 = match POLICY_PORTS.get(port_slot(m.proto, m.dport)) {
                Some(entry) => *entry,
                None => 0,
            };
        }
        self.0
    }
}

/// What the verdict does with the frame, whichever hook it runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Pass,
    Drop,
    Aborted,
}

impl Action {
    #[inline(always)]
    fn xdp(self) -> u32 {
        match self {
            Action::Pass => XDP_PASS,
            Action::Drop => XDP_DROP,
            Action::Aborted => XDP_ABORTED,
        }
    }

    #[inline(always)]
    fn tc(self) -> i32 {
        match self {
            Action::Pass => TC_ACT_OK,
            Action::Drop | Action::Aborted => TC_ACT_SHOT,
        }
    }
}

/// The guard attached in XDP (hardware drivers).
pub fn try_xdp_guard(ctx: &XdpContext) -> u32 {
    judge::<false, _>(&Pkt::new(ctx), None).xdp()
}

/// The guard attached at tc ingress (software devices: veth): the same
/// verdict on the skb the kernel already built.
pub fn try_tc_guard(ctx: &TcContext) -> i32 {
    judge::<false, _>(&Skb(ctx), None).tc()
}

/// The guard's read-only twin, never attached: `explain` and `verify`
/// test-run it (BPF_PROG_TEST_RUN) on frames whose XDP metadata holds an
/// `XdpProbe`. The same code as the guard's, against the same maps, with
/// every side effect left out at compile time (no counter, report,
/// rate-limit token, fragment or learning record), so that asking costs
/// the wire's packets nothing. Its verdict and reason go back in the
/// metadata.
pub fn try_xdp_probe(ctx: &XdpContext) -> u32 {
    match probe_of(ctx) {
        Some(probe) => {
            // SAFETY: `probe_of` checked the metadata's bounds; the helpers
            // have no preconditions.
            unsafe {
                (*probe).jiffies = bpf_jiffies64();
                (*probe).now_ns = bpf_ktime_get_ns();
            }
            judge::<true, _>(&Pkt::new(ctx), Some(probe)).xdp()
        }
        None => XDP_ABORTED,
    }
}

/// The verdict on one frame; `PROBE` (with its metadata in `probe`) asks
/// without acting.
#[inline(always)]
fn judge<const PROBE: bool, F: Frame>(pkt: &F, probe: Option<*mut XdpProbe>) -> Action {
    let mut cfg = match GUARD_CONFIG.get(0) {
        Some(cfg) => *cfg,
        None => GuardConfig::default(),
    };
    if PROBE {
        cfg.flags |= GUARD_PROBE;
    }
    let mut slot = core::mem::MaybeUninit::uninit();
    let m = Headers::zeroed(&mut slot);
    let mut entry = Entry(NOT_LOOKED_UP);
    let verdict = match classify(pkt, m, &mut entry, &cfg) {
        // Not the host's own traffic: the host routes or bridges it, and
        // what it reaches judges it. Only a frame that would drop pays for
        // the lookup; a malformed one still drops.
        Err(reason)
            if reason != DropReason::Malformed
                && cfg.flags & GUARD_FORWARD_JUDGE == 0
                && m.family != 0
                && !addressed_to_host(m) =>
        {
            if PROBE {
                return answer(probe, &Ok(PassReason::Forwarded), &cfg);
            }
            if m.first_frag {
                record_first_fragment(m, &Ok(PassReason::Forwarded));
            }
            guard_count(GuardStat::Forwarded);
            return Action::Pass;
        }
        verdict => verdict,
    };
    if PROBE {
        return answer(probe, &verdict, &cfg);
    }
    if cfg.flags & GUARD_LEARN != 0 {
        learn(m, &verdict, &cfg);
    }
    // A first fragment's verdict, whatever it is, is what its later
    // fragments get.
    if m.first_frag {
        record_first_fragment(m, &verdict);
    }
    if m.family != 0 {
        count_port(m, &mut entry, verdict.is_err(), pkt.wire_len());
    }
    let Err(reason) = verdict else {
        // One count a packet: a reply to the host's own flow is counted as
        // that, and user space adds those to the passed.
        guard_count(if matches!(verdict, Ok(PassReason::OwnFlow)) {
            GuardStat::FlowReplies
        } else {
            GuardStat::Passed
        });
        return Action::Pass;
    };
    guard_count(match reason {
        DropReason::NoRule => GuardStat::DropNoRule,
        DropReason::Source => GuardStat::DropSource,
        DropReason::Malformed => GuardStat::DropMalformed,
        DropReason::Fragment => GuardStat::DropFragment,
        DropReason::RateLimited => GuardStat::DropRateLimited,
    });
    let audit = cfg.flags & GUARD_AUDIT != 0;
    report(pkt.ifindex(), m, reason, audit, &cfg);
    if audit { Action::Pass } else { Action::Drop }
}

/// The probe metadata of a test run from user space (`XdpProbe`), if the
/// frame carries it.
#[inline(always)]
fn probe_of(ctx: &XdpContext) -> Option<*mut XdpProbe> {
    let meta = ctx.metadata();
    if meta + core::mem::size_of::<XdpProbe>() > ctx.data() {
        return None;
    }
    let probe = meta as *mut XdpProbe;
    // SAFETY: bounds-checked against `data` just above.
    if unsafe { (*probe).magic } != PROBE_MAGIC {
        return None;
    }
    Some(probe)
}

/// Records a connection attempt (a TCP SYN; a packet of another protocol)
/// that the policy decided: what `portwatch learn` proposes rules from.
/// Replies to the host's own flows, connection segments and control
/// traffic are not the host's services' clients and are left out. Counts
/// are plain adds: two CPUs on one pair at once may lose one. Out of line:
/// inlined, its map calls would cost the fast path registers.
#[inline(never)]
fn learn(m: &Headers, verdict: &Verdict, cfg: &GuardConfig) {
    let dropped = match verdict {
        Ok(PassReason::Rule) => false,
        Err(DropReason::NoRule | DropReason::Source | DropReason::RateLimited) => true,
        _ => return,
    };
    if m.proto == IPPROTO_TCP && m.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let key = LearnKey {
        family: m.family,
        proto: m.proto,
        port: m.dport,
        src: m.src,
    };
    let now = now_ns(cfg);
    match LEARN.get_ptr_mut(&key) {
        Some(stats) => {
            // SAFETY: a pointer from a map lookup is valid for writes.
            let stats = unsafe { &mut *stats };
            stats.last_ns = now;
            if dropped {
                stats.dropped += 1;
            } else {
                stats.passed += 1;
            }
        }
        None => {
            let fresh = LearnStats {
                first_ns: now,
                last_ns: now,
                passed: u64::from(!dropped),
                dropped: u64::from(dropped),
            };
            let _ = LEARN.insert(&key, &fresh, 0);
        }
    }
}

/// Writes a probe's verdict into its metadata; the action it would get.
#[inline(always)]
fn answer(probe: Option<*mut XdpProbe>, verdict: &Verdict, cfg: &GuardConfig) -> Action {
    let Some(probe) = probe else {
        return Action::Aborted;
    };
    let (pass, drop) = match verdict {
        Ok(why) => (*why as u8, 0),
        Err(reason) => (0, *reason as u8),
    };
    // SAFETY: `probe_of` checked the metadata's bounds.
    unsafe {
        (*probe).pass = pass;
        (*probe).drop = drop;
    }
    if verdict.is_ok() || cfg.flags & GUARD_AUDIT != 0 {
        Action::Pass
    } else {
        Action::Drop
    }
}

// Inlined into the guard and its twin alike: out of line (shared by the
// two), the call costs the guard's fast path a few ns per frame.
#[inline(always)]
fn classify<F: Frame>(pkt: &F, m: &mut Headers, entry: &mut Entry, cfg: &GuardConfig) -> Verdict {
    match walk(pkt, m) {
        Err(_) => Err(DropReason::Malformed),
        // ARP and every other non-IP protocol: the host needs them.
        Ok(Walk::NotIp) => Ok(PassReason::NotIp),
        Ok(Walk::LaterFragment(id)) => later_fragment(m, id),
        Ok(Walk::Transport(off)) => transport(pkt, off, m, entry, cfg),
    }
}

/// Whether the destination is one of the host's addresses, a broadcast or
/// a multicast group (the host may have joined it; it is judged).
#[inline(always)]
fn addressed_to_host(m: &Headers) -> bool {
    let multicast = if m.family == AF_INET as u8 {
        // 224/4 multicast, 240/4 reserved and the limited broadcast.
        m.dst[0] >= 224
    } else {
        m.dst[0] == 0xff
    };
    if multicast {
        return true;
    }
    // The first addresses inline: most hosts have no others.
    if let Some(list) = LOCAL_LIST.get(0) {
        let more = if m.family == AF_INET as u8 {
            let a = u32::from_ne_bytes(m.dst4());
            let n = list.n4 as usize;
            for i in 0..LOCAL_INLINE_V4 {
                if i >= n {
                    break;
                }
                if list.v4[i] == a {
                    return true;
                }
            }
            list.more4
        } else {
            let hi = u64::from_ne_bytes([
                m.dst[0], m.dst[1], m.dst[2], m.dst[3], m.dst[4], m.dst[5], m.dst[6], m.dst[7],
            ]);
            let lo = u64::from_ne_bytes([
                m.dst[8], m.dst[9], m.dst[10], m.dst[11], m.dst[12], m.dst[13], m.dst[14],
                m.dst[15],
            ]);
            let n = list.n6 as usize;
            for i in 0..LOCAL_INLINE_V6 {
                if i >= n {
                    break;
                }
                if list.v6[i][0] == hi && list.v6[i][1] == lo {
                    return true;
                }
            }
            list.more6
        };
        if more == 0 {
            return false;
        }
    }
    let key = LocalKey {
        family: m.family,
        _pad: 0,
        _pad2: 0,
        addr: m.dst,
    };
    // SAFETY: a lookup without holding the value past this statement.
    unsafe { LOCAL_ADDRS.get(&key) }.is_some()
}

/// IPv4 names a datagram by (src, dst, id, protocol) (RFC 791), in
/// `FRAGS4`; IPv6 by (src, dst, id) (RFC 8200), whatever extension headers
/// follow, in `FRAGS`.
#[inline(always)]
fn frag4_key(m: &Headers, id: u32) -> Frag4Key {
    Frag4Key {
        proto: m.ip_proto,
        _pad: 0,
        _pad2: 0,
        id,
        src: m.src4(),
        dst: m.dst4(),
    }
}

#[inline(always)]
fn frag6_key(m: &Headers, id: u32) -> FragKey {
    FragKey {
        family: m.family,
        proto: 0,
        _pad: 0,
        id,
        src: m.src,
        dst: m.dst,
    }
}

fn record_first_fragment(m: &Headers, verdict: &Verdict) {
    let decided = FragVerdict {
        reason: match verdict {
            Ok(_) => 0,
            Err(reason) => *reason as u8,
        },
        proto: m.proto,
        port: m.dport,
        _pad: 0,
    };
    let _ = if m.family == AF_INET as u8 {
        FRAGS4.insert(frag4_key(m, m.frag_id), decided, 0)
    } else {
        FRAGS.insert(frag6_key(m, m.frag_id), decided, 0)
    };
}

/// A later fragment carries no ports: it follows its first fragment.
fn later_fragment(m: &mut Headers, id: u32) -> Verdict {
    let first = if m.family == AF_INET as u8 {
        FRAGS4.get_ptr(frag4_key(m, id))
    } else {
        FRAGS.get_ptr(frag6_key(m, id))
    };
    let Some(first) = first else {
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
        None => Ok(PassReason::Fragment),
        Some(reason) => Err(reason),
    }
}

#[inline(always)]
fn transport<F: Frame>(
    pkt: &F,
    off: usize,
    m: &mut Headers,
    entry: &mut Entry,
    cfg: &GuardConfig,
) -> Verdict {
    match m.proto {
        IPPROTO_TCP => {
            ports(pkt, off, m).map_err(|_| DropReason::Malformed)?;
            tcp(m, entry, cfg)
        }
        IPPROTO_UDP => {
            ports(pkt, off, m).map_err(|_| DropReason::Malformed)?;
            udp(m, entry, cfg)
        }
        // Neighbour discovery, path MTU discovery, multicast membership.
        IPPROTO_ICMP | IPPROTO_ICMPV6 | IPPROTO_IGMP => Ok(PassReason::Control),
        IPPROTO_SCTP => {
            ports(pkt, off, m).map_err(|_| DropReason::Malformed)?;
            or_own_flow(m, entry, cfg)
        }
        // Every other protocol as a whole (port 0): VRRP, GRE, ESP, ...
        _ => or_own_flow(m, entry, cfg),
    }
}

/// A rule, else an answer to a flow the host itself opened (tc egress
/// records SCTP associations and port-less protocols' peers as it does
/// UDP flows). Inlined, with the flow's lookup out of line behind the
/// port's mark: a datagram to a closed port, the common drop, then makes
/// one call (the rule's), not two.
#[inline(always)]
fn or_own_flow(m: &Headers, entry: &mut Entry, cfg: &GuardConfig) -> Verdict {
    match permitted(m, entry.of(m), cfg) {
        Ok(why) => Ok(why),
        Err(_) if flow_port_marked(m) && reply_to_own_flow(m, cfg) => Ok(PassReason::OwnFlow),
        Err(reason) => Err(reason),
    }
}

fn tcp(m: &Headers, entry: &mut Entry, cfg: &GuardConfig) -> Verdict {
    let flags = m.tcp_flags;
    // A segment that can belong to a connection passes whatever the port:
    // one with ACK (not an opening SYN), or a RST (to which no stack
    // answers). Everything else needs a rule: a SYN opens a connection, and
    // a segment with neither (FIN, NULL, Xmas, PSH-only scans) would make
    // the kernel answer a closed port with a RST and a listener with
    // silence, telling a scanner which blocked ports have a listener.
    let opening = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
    if !opening && flags & (TCP_ACK | TCP_RST) != 0 {
        Ok(PassReason::Connection)
    } else {
        permitted(m, entry.of(m), cfg)
    }
}

#[inline(always)]
fn udp(m: &Headers, entry: &mut Entry, cfg: &GuardConfig) -> Verdict {
    // DHCP replies to the host's own client.
    let dhcp = if m.family == AF_INET as u8 {
        m.sport == 67 && m.dport == 68
    } else {
        m.sport == 547 && m.dport == 546
    };
    if dhcp {
        return Ok(PassReason::Dhcp);
    }
    or_own_flow(m, entry, cfg)
}

/// Whether the policy permits (proto, destination port) from this source,
/// within the rule's per-source limit; a protocol without ports is looked
/// up as port 0 (`m.dport` stays 0). `rule` is its `POLICY_PORTS` entry.
#[inline(always)]
fn permitted(m: &Headers, rule: u32, cfg: &GuardConfig) -> Verdict {
    // The common answers inline: no rule, or a rule for every source
    // without a limit. A source list or a limit takes the call.
    if rule & (RULE_ANY | RULE_CIDR) == 0 {
        return Err(DropReason::NoRule);
    }
    if rule & (RULE_ANY | RULE_LIMIT) == RULE_ANY {
        return Ok(PassReason::Rule);
    }
    by_source_and_limit(m, rule, cfg)
}

/// `permitted` for a rule with a source list or a limit.
#[inline(never)]
fn by_source_and_limit(m: &Headers, rule: u32, cfg: &GuardConfig) -> Verdict {
    source_permitted(m, rule)?;
    if rule & RULE_LIMIT != 0 {
        within_limit(m, entry_slot(rule), cfg)?;
    }
    Ok(PassReason::Rule)
}

/// The rule bits' answer for this source.
fn source_permitted(m: &Headers, rule: u32) -> Result<(), DropReason> {
    if rule & RULE_ANY != 0 {
        return Ok(());
    }
    if rule & RULE_CIDR == 0 {
        return Err(DropReason::NoRule);
    }
    let allowed = if m.family == AF_INET as u8 {
        let data = src4_key(m.proto, m.dport, m.src4());
        POLICY_SRC4
            .get(Key::new(src_prefix_len(32), data))
            .is_some()
    } else {
        let data = src6_key(m.proto, m.dport, &m.src);
        POLICY_SRC6
            .get(Key::new(src_prefix_len(128), data))
            .is_some()
    };
    if allowed {
        Ok(())
    } else {
        Err(DropReason::Source)
    }
}

/// Takes one packet's cost from the source's bucket of rule `slot`, or
/// says it is over the limit. A new source starts with a full bucket; when
/// the table of sources is full, new sources share the rule's overflow
/// bucket. A probe reads the bucket and takes nothing.
fn within_limit(m: &Headers, slot: u32, cfg: &GuardConfig) -> Result<(), DropReason> {
    let Some(limit) = LIMITS.get(slot) else {
        return Ok(());
    };
    let limit = *limit;
    if limit.cost_ns == 0 {
        return Ok(());
    }
    let mut key = RateKey {
        slot: slot as u16,
        family: m.family,
        _pad: 0,
        addr: m.src,
    };
    if m.family == AF_INET6 as u8 {
        mask_prefix(&mut key.addr, cfg.limit_v6_prefix);
    }
    let now = now_ns(cfg);
    if cfg.flags & GUARD_PROBE != 0 {
        return probe_limit(&key, slot, &limit, now);
    }
    // A new source: a full bucket less this packet.
    let fresh = RateState {
        tokens_ns: limit.cap_ns.saturating_sub(limit.cost_ns),
        last_ns: now,
    };
    let state = match RATE_STATE.get_ptr_mut(&key) {
        Some(state) => state,
        // BPF_NOEXIST: of two CPUs racing on a new source, one inserts.
        None if RATE_STATE.insert(&key, &fresh, 1).is_ok() => return Ok(()),
        None => match RATE_STATE.get_ptr_mut(&key) {
            Some(state) => state, // the other CPU's
            None => {
                // The table is full: the rule's overflow bucket (an
                // untouched one reads as empty at time 0, which refills
                // it to full at once).
                guard_count(GuardStat::RateTableFull);
                match RATE_OVERFLOW.get_ptr_mut(slot) {
                    Some(state) => state,
                    None => return Ok(()),
                }
            }
        },
    };
    // SAFETY: a pointer from a map lookup is valid for reads and writes;
    // other CPUs may update the same bucket at once, which can only let a
    // packet more or less through.
    let state = unsafe { &mut *state };
    let tokens = refilled(state, &limit, now);
    state.last_ns = now;
    if tokens < limit.cost_ns {
        state.tokens_ns = tokens;
        return Err(DropReason::RateLimited);
    }
    state.tokens_ns = tokens - limit.cost_ns;
    Ok(())
}

/// A probe's answer to a limit: what the source's bucket holds now,
/// refilled, without taking a token. For a source without a bucket, the
/// table is asked whether it has room (a fresh bucket, removed at once),
/// else the rule's overflow bucket answers, as for a real packet.
fn probe_limit(key: &RateKey, slot: u32, limit: &RateLimit, now: u64) -> Result<(), DropReason> {
    // SAFETY: the value is copied out at once.
    let state = match unsafe { RATE_STATE.get(key) } {
        Some(state) => *state,
        None => {
            let fresh = RateState {
                tokens_ns: limit.cap_ns,
                last_ns: now,
            };
            if RATE_STATE.insert(key, &fresh, 1).is_ok() {
                let _ = RATE_STATE.remove(key);
                fresh
            } else {
                match RATE_OVERFLOW.get(slot) {
                    Some(state) => *state,
                    None => return Ok(()),
                }
            }
        }
    };
    if refilled(&state, limit, now) < limit.cost_ns {
        Err(DropReason::RateLimited)
    } else {
        Ok(())
    }
}

/// The tokens a bucket holds at `now`: what it had, plus the time since,
/// up to the rule's burst.
#[inline(always)]
fn refilled(state: &RateState, limit: &RateLimit, now: u64) -> u64 {
    state
        .tokens_ns
        .saturating_add(now.saturating_sub(state.last_ns))
        .min(limit.cap_ns)
}

/// Clears the address bits past `prefix` (IPv6 sources share a bucket per
/// prefix).
#[inline(always)]
fn mask_prefix(addr: &mut [u8; 16], prefix: u32) {
    let mut i = 0;
    while i < 16 {
        let first = (i as u32) * 8;
        if first >= prefix {
            addr[i] = 0;
        } else if first + 8 > prefix {
            addr[i] &= 0xffu8 << (8 - (prefix - first));
        }
        i += 1;
    }
}

/// Whether a flow ever left from the packet's port (or, for a port-less
/// protocol, with it): if not, it cannot be a reply, and nothing need be
/// looked up.
#[inline(always)]
fn flow_port_marked(m: &Headers) -> bool {
    let (entry, byte) = flow_port_byte(port_slot(m.proto, m.dport));
    matches!(FLOW_PORTS.get(entry), Some(marks) if marks[byte] != 0)
}

/// Whether a packet answers a flow the host opened (tc egress records
/// them): UDP and SCTP by ports and addresses, other protocols by
/// addresses (ports 0).
#[inline(never)]
fn reply_to_own_flow(m: &Headers, cfg: &GuardConfig) -> bool {
    // As tc egress recorded it (local and remote swapped): IPv4 under the
    // compact key, built from the headers directly.
    let last = if m.family == AF_INET as u8 {
        let key = Flow4Key::new(m.proto, m.dport, m.sport, m.dst4(), m.src4());
        // SAFETY: a pointer from a map lookup is valid for reads.
        FLOWS4.get_ptr(key).map(|last| unsafe { *last })
    } else {
        flow6_last(m)
    };
    let Some(last) = last else {
        return false;
    };
    // Tick resolution is enough for a 30 s timeout. A flow tc egress
    // stamped within this tick reads as a little younger, never older.
    now_ns(cfg).saturating_sub(last) <= cfg.flow_timeout_ns
}

/// An IPv6 flow's last outbound packet. Out of line: with both lookups in
/// one function LLVM merges them into one call on a map chosen at run
/// time, which the verifier cannot inline, and IPv4 replies paid for it.
#[inline(never)]
fn flow6_last(m: &Headers) -> Option<u64> {
    let key = FlowKey {
        family: m.family,
        proto: m.proto,
        _pad: 0,
        local_port: m.dport,
        remote_port: m.sport,
        local: m.dst,
        remote: m.src,
    };
    // SAFETY: a pointer from a map lookup is valid for reads.
    FLOWS.get_ptr(key).map(|last| unsafe { *last })
}

/// Adds the frame to its port's counter slot: the one user space gave the
/// port or protocol (its rule's, or its listener's), else the protocol's
/// `other`.
fn count_port(m: &Headers, entry: &mut Entry, dropped: bool, len: u64) {
    let slot = match entry_slot(entry.of(m)) {
        0 => other_slot(m.proto),
        slot => slot,
    };
    let Some(c) = COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: this CPU's own copy of the slot; programs do not preempt
    // each other on one CPU.
    let c = unsafe { &mut *c };
    if dropped {
        c.drop_packets += 1;
        c.drop_bytes += len;
    } else {
        c.pass_packets += 1;
        c.pass_bytes += len;
    }
}

/// Sends a drop report unless the per-CPU token bucket is empty. Inlined:
/// shared by the two hooks it would become a call on every drop.
#[inline(always)]
fn report(ifindex: u32, m: &Headers, reason: DropReason, audit: bool, cfg: &GuardConfig) {
    let Some(bucket) = REPORT_BUCKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's own bucket; no concurrent writer.
    let bucket = unsafe { &mut *bucket };
    // A flood empties the bucket; the coarse clock moves only at a tick,
    // so until jiffies moves the bucket cannot have refilled. jiffies64
    // is inlined by the verifier (a load), the clock is a helper call.
    // SAFETY: bpf_jiffies64 has no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    if bucket.tokens < NS_PER_TOKEN && jiffies == bucket.last_jiffies {
        bucket.suppressed += 1;
        return;
    }
    bucket.last_jiffies = jiffies;
    // Tick resolution is enough for a per-second rate limit.
    let now = clock_at(jiffies, cfg);
    // Cap the refill interval so the product cannot overflow.
    let elapsed = now.saturating_sub(bucket.last_ns).min(10 * NS_PER_TOKEN);
    let cap = u64::from(cfg.report_burst) * NS_PER_TOKEN;
    let tokens = (bucket.tokens + elapsed * u64::from(cfg.report_rate)).min(cap);
    bucket.last_ns = now;
    if tokens < NS_PER_TOKEN {
        bucket.tokens = tokens;
        bucket.suppressed += 1;
        return;
    }
    bucket.tokens = tokens - NS_PER_TOKEN;
    let Some(mut entry) = DROPS.reserve::<DropReport>(0) else {
        guard_count(GuardStat::ReportsLost);
        return;
    };
    entry.write(DropReport {
        ts_ns: now,
        ifindex,
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
