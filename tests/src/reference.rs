//! A reference model of the guard's verdict, written from its specification
//! (the README's verdict table and the guard's parsing rules), not from the
//! XDP program: a plain parser over byte slices with early returns, the
//! policy as user space holds it, and the flow and fragment state as maps.
//! The differential tests run it side by side with the kernel program.
//!
//! The rules it implements:
//! - Ethernet: fewer than 14 bytes is malformed; up to two VLAN tags
//!   (0x8100, 0x88a8), a third is malformed; a non-IP EtherType passes.
//! - IPv4: version 4, IHL >= 5, total length >= IHL*4 and the header with
//!   its options present, else malformed. A later fragment (offset != 0)
//!   follows the verdict recorded for the first fragment of the same
//!   (src, dst, id, protocol), else drops (fragment). One AH header
//!   ((n+2)*4 bytes, whole in the frame, else malformed) is looked through:
//!   what it carries is judged.
//! - IPv6: version 6 and the 40-byte header present. Extension headers
//!   hop-by-hop, routing, destination options ((n+1)*8 bytes), AH
//!   ((n+2)*4 bytes) and fragment (8 bytes) are followed; each must lie
//!   whole inside the frame, and a 9th is malformed. A fragment header with
//!   offset != 0 makes a later fragment of (src, dst, id) (and the frame
//!   names no first fragment); with M set and offset 0, a first fragment —
//!   the last such header names the datagram.
//! - ICMP, ICMPv6, IGMP pass. TCP needs its 20-byte header, a data offset
//!   of at least 5 and the whole header; a segment with ACK that is not an
//!   opening SYN, or with RST, passes (it can belong to a connection);
//!   every other one (SYN without ACK; FIN, NULL, Xmas, PSH-only) needs
//!   the policy to permit the port (and the source, for rules with
//!   `from`). UDP needs its 8-byte header; DHCP replies (67->68 over
//!   IPv4, 547->546 over IPv6) pass, then a permitted port, then a reply to
//!   an outbound flow fresher than the flow timeout (30 s); else the
//!   policy's reason. SCTP needs its 12-byte common header, then a
//!   permitted port or a reply to an outbound SCTP flow. Every other IP
//!   protocol is judged as a whole (port 0): a `proto/...` rule, else a
//!   reply to an outbound flow of that protocol between the same addresses.
//! - A rule with a limit admits a source (an IPv6 source: its prefix,
//!   /64 unless the policy says otherwise) up to its burst (the limit's
//!   count) and then drops it (rate limited); the model does not refill,
//!   so it speaks only for limits slow enough not to refill within a case.
//! - Scope: unless the policy says `forwarded = "judge"`, a frame that
//!   would drop for any reason but malformed passes when its destination
//!   is not the host's: not one of its addresses, not multicast
//!   (224.0.0.0/4 and above over IPv4, ff00::/8), not a broadcast. A first
//!   fragment records that pass.
//! - A rule with an owner counts only while its owner listens on its port
//!   (the host's `owners_listening`); otherwise the port is as if the rule
//!   were not there.
//! - A first fragment records its verdict, whatever it is, for the later
//!   ones. Audit mode passes everything and reports the would-be reason.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use portwatch::{
    model::{Forwarded, IpProto, Mode},
    policy::{Policy, PortRange},
};

/// How long a recorded outbound UDP flow admits replies (the guard's default).
pub const FLOW_TIMEOUT_NS: u64 = 30_000_000_000;
/// Extension headers an IPv6 packet may carry before it is malformed.
pub const MAX_EXT_HEADERS: usize = 8;

/// Why a frame is (or in audit mode would be) dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No rule permits the destination port or protocol.
    NoRule,
    /// A rule permits the port, but not from this source.
    Source,
    /// Truncated or over-long headers.
    Malformed,
    /// A later fragment without a recorded first fragment.
    Fragment,
    /// The source is over its rule's limit.
    RateLimited,
}

impl Reason {
    /// The name drop reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRule => "no_rule",
            Reason::Source => "source_not_allowed",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::RateLimited => "rate_limited",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Reason::NoRule,
            Reason::Source,
            Reason::Malformed,
            Reason::Fragment,
            Reason::RateLimited,
        ]
        .into_iter()
        .find(|r| r.as_str() == name)
    }
}

/// The verdict enforce mode gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Pass,
    Drop(Reason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Pass,
    Drop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
        }
    }
}

/// What happens to a frame under a mode: the action taken, and the drop
/// reason when enforce mode drops it (also in audit mode, where it passes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    pub action: Action,
    pub reason: Option<Reason>,
}

impl Outcome {
    pub fn of(verdict: Verdict, mode: Mode) -> Self {
        match (verdict, mode) {
            (Verdict::Pass, _) => Outcome {
                action: Action::Pass,
                reason: None,
            },
            (Verdict::Drop(reason), Mode::Enforce) => Outcome {
                action: Action::Drop,
                reason: Some(reason),
            },
            (Verdict::Drop(reason), Mode::Audit) => Outcome {
                action: Action::Pass,
                reason: Some(reason),
            },
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.action.as_str())?;
        if let Some(reason) = self.reason {
            write!(f, " ({})", reason.as_str())?;
        }
        Ok(())
    }
}

/// The host's outbound flows: (protocol, local, remote) endpoint -> the
/// time of the last outbound packet, and the clock to judge them by.
/// Protocols without ports have port 0 at both ends.
#[derive(Clone, Debug)]
pub struct FlowState {
    /// CLOCK_MONOTONIC now, in nanoseconds.
    pub now_ns: u64,
    pub timeout_ns: u64,
    last: HashMap<(u8, SocketAddr, SocketAddr), u64>,
}

impl FlowState {
    pub fn new(now_ns: u64) -> Self {
        Self {
            now_ns,
            timeout_ns: FLOW_TIMEOUT_NS,
            last: HashMap::new(),
        }
    }

    /// The host sent UDP `local -> remote` at `last_ns`.
    pub fn record(&mut self, local: SocketAddr, remote: SocketAddr, last_ns: u64) {
        self.record_proto(IPPROTO_UDP, local, remote, last_ns);
    }

    /// The host sent `proto` `local -> remote` at `last_ns`.
    pub fn record_proto(&mut self, proto: u8, local: SocketAddr, remote: SocketAddr, last_ns: u64) {
        self.last.insert((proto, local, remote), last_ns);
    }

    /// Whether a packet `remote -> local` answers a flow seen within the timeout.
    pub fn admits_reply(&self, proto: u8, local: SocketAddr, remote: SocketAddr) -> bool {
        self.last
            .get(&(proto, local, remote))
            .is_some_and(|&last| self.now_ns.saturating_sub(last) < self.timeout_ns)
    }
}

/// A fragmented datagram: IPv4 names it by (src, dst, id, protocol), IPv6
/// by (src, dst, id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Datagram {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        id: u16,
        proto: u8,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        id: u32,
    },
}

/// The verdicts of the first fragments seen so far.
#[derive(Clone, Debug, Default)]
pub struct FragState {
    first: HashMap<Datagram, Verdict>,
}

impl FragState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn first(&self, datagram: &Datagram) -> Option<Verdict> {
        self.first.get(datagram).copied()
    }

    pub fn len(&self) -> usize {
        self.first.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    fn record(&mut self, datagram: Datagram, verdict: Verdict) {
        self.first.insert(datagram, verdict);
    }

    /// A later fragment gets its first fragment's verdict, else a drop.
    fn later(&self, datagram: Datagram) -> Result<(), Reason> {
        match self.first(&datagram) {
            Some(Verdict::Pass) => Ok(()),
            Some(Verdict::Drop(reason)) => Err(reason),
            None => Err(Reason::Fragment),
        }
    }
}

/// The host: its addresses (what makes a frame its own, with multicast
/// and the limited broadcast, which are by their form), and what each
/// source of a limited rule has used of its burst. The model's limits
/// never refill: the differential tests only give rules limits per hour,
/// whose refill within a case is a small fraction of one packet.
#[derive(Clone, Debug, Default)]
pub struct Host {
    pub addrs: HashSet<IpAddr>,
    /// Owned rules (by their ports) whose owner listens now.
    pub owners_listening: HashSet<PortRange>,
    used: std::cell::RefCell<HashMap<(PortRange, IpAddr), u32>>,
}

impl Host {
    pub fn of(addrs: &[IpAddr]) -> Self {
        Self {
            addrs: addrs.iter().copied().collect(),
            owners_listening: HashSet::new(),
            used: Default::default(),
        }
    }

    /// The host with the owners of `ports` listening.
    pub fn with_owners_listening(mut self, ports: impl IntoIterator<Item = PortRange>) -> Self {
        self.owners_listening = ports.into_iter().collect();
        self
    }

    pub fn is_hosts(&self, dst: IpAddr) -> bool {
        let by_form = match dst {
            IpAddr::V4(a) => a.octets()[0] >= 224,
            IpAddr::V6(a) => a.octets()[0] == 0xff,
        };
        by_form || self.addrs.contains(&dst)
    }

    /// One more packet of `src` under `rule`'s limit of `burst`: whether
    /// it is within. IPv6 sources count per `/v6_prefix`.
    fn take(&self, rule: PortRange, src: IpAddr, burst: u32, v6_prefix: u8) -> bool {
        let src = match src {
            IpAddr::V6(a) => {
                let bits = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            v4 => v4,
        };
        let mut used = self.used.borrow_mut();
        let n = used.entry((rule, src)).or_insert(0);
        if *n >= burst {
            return false;
        }
        *n += 1;
        true
    }
}

/// The outcome of `frame` under `policy` and `mode` on a host with
/// addresses `local`; a first fragment records its verdict in `frags`.
pub fn verdict(
    frame: &[u8],
    policy: &Policy,
    mode: Mode,
    local: &Host,
    flows: &FlowState,
    frags: &mut FragState,
) -> Outcome {
    Outcome::of(decide(frame, policy, local, flows, frags), mode)
}

/// The verdict enforce mode gives `frame`.
pub fn decide(
    frame: &[u8],
    policy: &Policy,
    local: &Host,
    flows: &FlowState,
    frags: &mut FragState,
) -> Verdict {
    let model = Model {
        policy,
        local,
        flows,
    };
    match model.ethernet(frame, frags) {
        Ok(()) => Verdict::Pass,
        Err(reason) => Verdict::Drop(reason),
    }
}

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_IGMP: u8 = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;

const EXT_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST: u8 = 60;

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

type Step = Result<(), Reason>;

/// `len` bytes at `at`, or malformed when the frame ends before.
fn take(bytes: &[u8], at: usize, len: usize) -> Result<&[u8], Reason> {
    at.checked_add(len)
        .and_then(|end| bytes.get(at..end))
        .ok_or(Reason::Malformed)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn v4(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn v6(b: &[u8], at: usize) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(octets)
}

/// The addresses a transport header is judged with.
#[derive(Clone, Copy)]
struct Addrs {
    src: IpAddr,
    dst: IpAddr,
}

struct Model<'a> {
    policy: &'a Policy,
    local: &'a Host,
    flows: &'a FlowState,
}

impl Model<'_> {
    /// What a frame to `dst` that would get `step` gets, once its scope
    /// is known: forwarded frames pass unless malformed or judged.
    fn scoped(&self, dst: IpAddr, step: Step) -> Step {
        match step {
            Err(reason)
                if reason != Reason::Malformed
                    && self.policy.forwarded.unwrap_or_default() == Forwarded::Pass
                    && !self.local.is_hosts(dst) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    fn ethernet(&self, frame: &[u8], frags: &mut FragState) -> Step {
        let eth = take(frame, 0, ETH_HLEN)?;
        let mut ethertype = be16(eth, 12);
        let mut at = ETH_HLEN;
        let mut tags = 0;
        while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            tags += 1;
            if tags > 2 {
                return Err(Reason::Malformed);
            }
            let tag = take(frame, at, VLAN_HLEN)?;
            ethertype = be16(tag, 2);
            at += VLAN_HLEN;
        }
        let packet = &frame[at..];
        match ethertype {
            ETH_P_IP => self.ipv4(packet, frags),
            ETH_P_IPV6 => self.ipv6(packet, frags),
            _ => Ok(()),
        }
    }

    fn ipv4(&self, packet: &[u8], frags: &mut FragState) -> Step {
        let h = take(packet, 0, 20)?;
        let version = h[0] >> 4;
        let header_len = usize::from(h[0] & 0x0f) * 4;
        let total_len = usize::from(be16(h, 2));
        if version != 4 || header_len < 20 || total_len < header_len || packet.len() < header_len {
            return Err(Reason::Malformed);
        }
        let id = be16(h, 4);
        let more_fragments = h[6] & 0x20 != 0;
        let offset = be16(h, 6) & 0x1fff;
        let proto = h[9];
        let (src, dst) = (v4(h, 12), v4(h, 16));
        let datagram = Datagram::V4 {
            src,
            dst,
            id,
            proto,
        };
        if offset != 0 {
            return self.scoped(dst.into(), frags.later(datagram));
        }
        let addrs = Addrs {
            src: src.into(),
            dst: dst.into(),
        };
        let verdict = self.scoped(
            dst.into(),
            self.ipv4_payload(proto, &packet[header_len..], addrs),
        );
        if more_fragments {
            frags.record(datagram, to_verdict(verdict));
        }
        verdict
    }

    /// An IPv4 payload: AH is looked through once, then the transport.
    fn ipv4_payload(&self, proto: u8, rest: &[u8], addrs: Addrs) -> Step {
        if proto != EXT_AUTH {
            return self.transport(proto, rest, addrs);
        }
        let ah = take(rest, 0, 2)?;
        let len = (usize::from(ah[1]) + 2) * 4;
        take(rest, 0, len)?;
        self.transport(ah[0], &rest[len..], addrs)
    }

    fn ipv6(&self, packet: &[u8], frags: &mut FragState) -> Step {
        let h = take(packet, 0, 40)?;
        if h[0] >> 4 != 6 {
            return Err(Reason::Malformed);
        }
        let (src, dst) = (v6(h, 8), v6(h, 24));
        let mut firsts = Vec::new();
        let verdict = self.scoped(
            dst.into(),
            self.extension_headers(h[6], &packet[40..], src, dst, &mut firsts, frags),
        );
        // The frame is the first fragment of every datagram whose fragment
        // header said so (normally one).
        for id in firsts {
            frags.record(Datagram::V6 { src, dst, id }, to_verdict(verdict));
        }
        verdict
    }

    /// Follows the extension headers from `next` to the transport header.
    fn extension_headers(
        &self,
        mut next: u8,
        mut rest: &[u8],
        src: Ipv6Addr,
        dst: Ipv6Addr,
        firsts: &mut Vec<u32>,
        frags: &FragState,
    ) -> Step {
        let mut count = 0;
        loop {
            let len = match next {
                EXT_HOP | EXT_ROUTING | EXT_DEST => (usize::from(take(rest, 0, 2)?[1]) + 1) * 8,
                EXT_AUTH => (usize::from(take(rest, 0, 2)?[1]) + 2) * 4,
                EXT_FRAGMENT => 8,
                proto => {
                    let addrs = Addrs {
                        src: src.into(),
                        dst: dst.into(),
                    };
                    return self.transport(proto, rest, addrs);
                }
            };
            count += 1;
            if count > MAX_EXT_HEADERS {
                return Err(Reason::Malformed);
            }
            let header = take(rest, 0, len)?;
            if next == EXT_FRAGMENT {
                let offset = be16(header, 2) >> 3;
                let more_fragments = header[3] & 1 != 0;
                let id = be32(header, 4);
                if offset != 0 {
                    // A later fragment names no datagram of its own.
                    firsts.clear();
                    return frags.later(Datagram::V6 { src, dst, id });
                }
                // The last fragment header with M set names the datagram.
                if more_fragments {
                    firsts.clear();
                    firsts.push(id);
                }
            }
            next = header[0];
            rest = &rest[len..];
        }
    }

    fn transport(&self, proto: u8, segment: &[u8], addrs: Addrs) -> Step {
        match proto {
            IPPROTO_ICMP | IPPROTO_ICMPV6 | IPPROTO_IGMP => Ok(()),
            IPPROTO_TCP => self.tcp(segment, addrs),
            IPPROTO_UDP => self.udp(segment, addrs),
            IPPROTO_SCTP => {
                let h = take(segment, 0, 12)?;
                self.or_own_flow(proto, be16(h, 0), be16(h, 2), addrs)
            }
            _ => self.or_own_flow(proto, 0, 0, addrs),
        }
    }

    fn tcp(&self, segment: &[u8], addrs: Addrs) -> Step {
        let h = take(segment, 0, 20)?;
        let header_len = usize::from(h[12] >> 4) * 4;
        if header_len < 20 || segment.len() < header_len {
            return Err(Reason::Malformed);
        }
        let flags = h[13];
        let opening = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
        let of_a_connection = flags & (TCP_ACK | TCP_RST) != 0;
        if opening || !of_a_connection {
            return self.permitted(IPPROTO_TCP, be16(h, 2), addrs.src);
        }
        Ok(())
    }

    fn udp(&self, segment: &[u8], addrs: Addrs) -> Step {
        let h = take(segment, 0, 8)?;
        let (sport, dport) = (be16(h, 0), be16(h, 2));
        let dhcp_reply = match addrs.dst {
            IpAddr::V4(_) => (sport, dport) == (67, 68),
            IpAddr::V6(_) => (sport, dport) == (547, 546),
        };
        if dhcp_reply {
            return Ok(());
        }
        self.or_own_flow(IPPROTO_UDP, sport, dport, addrs)
    }

    /// A rule for the destination port, else a reply to the host's own flow.
    fn or_own_flow(&self, proto: u8, sport: u16, dport: u16, addrs: Addrs) -> Step {
        let Err(reason) = self.permitted(proto, dport, addrs.src) else {
            return Ok(());
        };
        let local = SocketAddr::new(addrs.dst, dport);
        let remote = SocketAddr::new(addrs.src, sport);
        if self.flows.admits_reply(proto, local, remote) {
            return Ok(());
        }
        Err(reason)
    }

    /// Whether a rule admits `src` to (proto, port). A source is matched
    /// within its own family: an IPv4-mapped IPv6 source is an IPv6 address
    /// on the wire.
    fn permitted(&self, proto: u8, port: u16, src: IpAddr) -> Step {
        let proto = IpProto(proto);
        let mut covered = false;
        for rule in self
            .policy
            .rules
            .iter()
            .filter(|r| r.ports.contains(proto, port))
            .filter(|r| r.owner.is_none() || self.local.owners_listening.contains(&r.ports))
        {
            covered = true;
            if rule.from.is_empty() || rule.from.iter().any(|net| net.contains(&src)) {
                let prefix = self.policy.limit_ipv6_prefix.unwrap_or(64);
                return match rule.limit {
                    Some(limit) if !self.local.take(rule.ports, src, limit.count, prefix) => {
                        Err(Reason::RateLimited)
                    }
                    _ => Ok(()),
                };
            }
        }
        Err(if covered {
            Reason::Source
        } else {
            Reason::NoRule
        })
    }
}

fn to_verdict(step: Step) -> Verdict {
    match step {
        Ok(()) => Verdict::Pass,
        Err(reason) => Verdict::Drop(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const POLICY: &str = r#"allow = ["tcp/22", "udp/53", "tcp/8000-8099", { port = "tcp/5432", from = ["198.18.0.0/24", "fd7e::/16"] }]"#;

    const HOST4: [u8; 4] = [198, 19, 0, 1];
    const PEER4: [u8; 4] = [203, 0, 113, 7];
    const INSIDE4: [u8; 4] = [198, 18, 0, 77];
    const HOST6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const PEER6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
    ];
    const INSIDE6: [u8; 16] = [0xfd, 0x7e, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];

    const ETH_P_ARP: u16 = 0x0806;
    const SYN: u8 = TCP_SYN;
    const ACK: u8 = TCP_ACK;
    const RST: u8 = TCP_RST;
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const URG: u8 = 0x20;

    fn eth(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0x5e, 0, 0, 1, 0x02, 0, 0x5e, 0, 0, 2];
        for tpid in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&[0, 10]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4 header (fragment field `frag`, `options` bytes) and `l4`.
    fn ipv4(src: [u8; 4], proto: u8, frag: u16, options: &[u8], l4: &[u8]) -> Vec<u8> {
        let hlen = 20 + options.len();
        let total = u16::try_from(hlen + l4.len()).unwrap_or(u16::MAX);
        let mut p = vec![0x40 | u8::try_from(hlen / 4).unwrap_or(0x0f), 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34]);
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, proto, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&HOST4);
        p.extend_from_slice(options);
        p.extend_from_slice(l4);
        eth(&[], ETH_P_IP, &p)
    }

    /// An IPv6 header whose next header is `next`, then `rest`
    /// (extension headers and the transport header).
    fn ipv6(src: [u8; 16], next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(rest.len()).unwrap_or(0).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&HOST6);
        p.extend_from_slice(rest);
        eth(&[], ETH_P_IPV6, &p)
    }

    fn tcp(dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0x9c, 0x40];
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0; 8]);
        t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = sport.to_be_bytes().to_vec();
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&[0, 8, 0, 0]);
        u
    }

    /// An extension header of `kind` (next header `next`) with length field
    /// `n`, zero-filled to its size.
    fn ext(kind: u8, next: u8, n: u8) -> Vec<u8> {
        let size = if kind == EXT_AUTH {
            (usize::from(n) + 2) * 4
        } else {
            (usize::from(n) + 1) * 8
        };
        let mut e = vec![0; size];
        e[0] = next;
        e[1] = n;
        e
    }

    fn frag6(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
        let mut e = vec![next, 0];
        e.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        e.extend_from_slice(&id.to_be_bytes());
        e
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    struct Check {
        policy: Policy,
        flows: FlowState,
        frags: FragState,
    }

    impl Check {
        fn new() -> Result<Self, Box<dyn std::error::Error>> {
            Ok(Self {
                policy: Policy::parse(POLICY)?,
                flows: FlowState::new(100 * FLOW_TIMEOUT_NS),
                frags: FragState::new(),
            })
        }

        fn decide(&mut self, frame: &[u8]) -> Verdict {
            let local = Host::of(&[Ipv4Addr::from(HOST4).into(), Ipv6Addr::from(HOST6).into()]);
            decide(frame, &self.policy, &local, &self.flows, &mut self.frags)
        }
    }

    use Reason::{Fragment, Malformed, NoRule, Source};
    use Verdict::{Drop, Pass};

    #[test]
    fn ethernet_and_vlan_tags() -> TestResult {
        let mut c = Check::new()?;
        let syn = ipv4(PEER4, IPPROTO_TCP, 0, &[], &tcp(22, SYN));
        for len in 0..ETH_HLEN {
            assert_eq!(c.decide(&syn[..len]), Drop(Malformed), "{len} bytes");
        }
        assert_eq!(c.decide(&eth(&[], ETH_P_ARP, &[0; 28])), Pass, "ARP");
        assert_eq!(c.decide(&eth(&[], 0x88cc, &[])), Pass, "LLDP, empty");
        assert_eq!(c.decide(&eth(&[], 0x0042, &[1, 2])), Pass, "802.3 length");
        let inner = &syn[ETH_HLEN..];
        for tags in [&[ETH_P_8021Q][..], &[ETH_P_8021AD, ETH_P_8021Q]] {
            assert_eq!(c.decide(&eth(tags, ETH_P_IP, inner)), Pass, "{tags:x?}");
        }
        let three = eth(&[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q], ETH_P_IP, inner);
        assert_eq!(c.decide(&three), Drop(Malformed));
        // A tag cut short.
        let one = eth(&[ETH_P_8021Q], ETH_P_ARP, &[]);
        assert_eq!(c.decide(&one[..16]), Drop(Malformed));
        assert_eq!(c.decide(&one), Pass);
        Ok(())
    }

    #[test]
    fn ipv4_header_checks() -> TestResult {
        let mut c = Check::new()?;
        let good = ipv4(PEER4, IPPROTO_ICMP, 0, &[], &[8, 0, 0, 0]);
        assert_eq!(c.decide(&good), Pass);
        let mut bad_version = good.clone();
        bad_version[14] = 0x65;
        assert_eq!(c.decide(&bad_version), Drop(Malformed));
        let mut short_ihl = good.clone();
        short_ihl[14] = 0x44;
        assert_eq!(c.decide(&short_ihl), Drop(Malformed));
        let mut short_total = good.clone();
        short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(c.decide(&short_total), Drop(Malformed));
        // Total length is not checked against the frame.
        let mut long_total = good.clone();
        long_total[16..18].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(c.decide(&long_total), Pass);
        // IHL 15 with 40 bytes of options, then the options cut short.
        let opts = ipv4(PEER4, IPPROTO_ICMP, 0, &[1; 40], &[]);
        assert_eq!(c.decide(&opts), Pass);
        assert_eq!(c.decide(&opts[..opts.len() - 1]), Drop(Malformed));
        assert_eq!(c.decide(&good[..ETH_HLEN + 19]), Drop(Malformed));
        Ok(())
    }

    #[test]
    fn tcp_rules() -> TestResult {
        let mut c = Check::new()?;
        let v4 = |src, dport, flags| ipv4(src, IPPROTO_TCP, 0, &[], &tcp(dport, flags));
        assert_eq!(c.decide(&v4(PEER4, 22, SYN)), Pass);
        assert_eq!(c.decide(&v4(PEER4, 8099, SYN)), Pass);
        assert_eq!(c.decide(&v4(PEER4, 8100, SYN)), Drop(NoRule));
        assert_eq!(c.decide(&v4(PEER4, 53, SYN)), Drop(NoRule), "udp/53 only");
        assert_eq!(c.decide(&v4(PEER4, 23, SYN | ACK)), Pass);
        assert_eq!(c.decide(&v4(PEER4, 23, ACK)), Pass);
        assert_eq!(c.decide(&v4(PEER4, 23, RST)), Pass);
        assert_eq!(c.decide(&v4(PEER4, 23, 0)), Drop(NoRule), "NULL scan");
        assert_eq!(c.decide(&v4(PEER4, 23, FIN)), Drop(NoRule), "FIN scan");
        assert_eq!(
            c.decide(&v4(PEER4, 23, FIN | PSH | URG)),
            Drop(NoRule),
            "Xmas scan"
        );
        assert_eq!(c.decide(&v4(PEER4, 23, SYN | RST)), Drop(NoRule));
        assert_eq!(c.decide(&v4(PEER4, 23, 0xff)), Pass, "all flags: ACK");
        assert_eq!(c.decide(&v4(PEER4, 22, FIN)), Pass, "a permitted port");
        assert_eq!(c.decide(&v4(PEER4, 5432, FIN)), Drop(Source));
        assert_eq!(c.decide(&v4(PEER4, 5432, SYN)), Drop(Source));
        assert_eq!(c.decide(&v4(INSIDE4, 5432, SYN)), Pass);
        let v6 = |src, dport| ipv6(src, IPPROTO_TCP, &tcp(dport, SYN));
        assert_eq!(c.decide(&v6(INSIDE6, 5432)), Pass);
        assert_eq!(c.decide(&v6(PEER6, 5432)), Drop(Source));
        assert_eq!(c.decide(&v6(PEER6, 22)), Pass);
        // An IPv4-mapped IPv6 source is not matched against IPv4 networks.
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&INSIDE4);
        assert_eq!(c.decide(&v6(mapped, 5432)), Drop(Source));

        let syn = v4(PEER4, 22, SYN);
        assert_eq!(c.decide(&syn[..syn.len() - 1]), Drop(Malformed));
        let mut doff4 = syn.clone();
        doff4[ETH_HLEN + 20 + 12] = 0x40;
        assert_eq!(c.decide(&doff4), Drop(Malformed));
        // Data offset 6: the options word must be there.
        let mut doff6 = syn.clone();
        doff6[ETH_HLEN + 20 + 12] = 0x60;
        assert_eq!(c.decide(&doff6), Drop(Malformed));
        doff6.extend_from_slice(&[1, 1, 1, 1]);
        assert_eq!(c.decide(&doff6), Pass);
        // A non-SYN with a bad header is still malformed.
        let mut ack = v4(PEER4, 23, ACK);
        ack[ETH_HLEN + 20 + 12] = 0x10;
        assert_eq!(c.decide(&ack), Drop(Malformed));
        Ok(())
    }

    #[test]
    fn an_owned_port_counts_only_while_its_owner_listens() -> TestResult {
        let policy = Policy::parse(
            "allow = [{ port = \"tcp/6379\", owner = { comm = \"redis-server\" } }]",
        )?;
        let syn = ipv4(PEER4, IPPROTO_TCP, 0, &[], &tcp(6379, SYN));
        let addrs = [Ipv4Addr::from(HOST4).into(), Ipv6Addr::from(HOST6).into()];
        let flows = FlowState::new(100 * FLOW_TIMEOUT_NS);
        let mut frags = FragState::new();
        let away = Host::of(&addrs);
        assert_eq!(
            decide(&syn, &policy, &away, &flows, &mut frags),
            Drop(NoRule)
        );
        let listens = Host::of(&addrs).with_owners_listening([policy.rules[0].ports]);
        assert_eq!(decide(&syn, &policy, &listens, &flows, &mut frags), Pass);
        Ok(())
    }

    #[test]
    fn udp_rules_and_flows() -> TestResult {
        let mut c = Check::new()?;
        let v4 = |sport, dport| ipv4(PEER4, IPPROTO_UDP, 0, &[], &udp(sport, dport));
        assert_eq!(c.decide(&v4(40000, 53)), Pass);
        assert_eq!(c.decide(&v4(40000, 22)), Drop(NoRule));
        assert_eq!(c.decide(&v4(67, 68)), Pass, "DHCP reply");
        assert_eq!(c.decide(&v4(68, 67)), Drop(NoRule), "DHCP request");
        assert_eq!(c.decide(&v4(547, 546)), Drop(NoRule), "DHCPv6 over IPv4");
        let v6 = |sport, dport| ipv6(PEER6, IPPROTO_UDP, &udp(sport, dport));
        assert_eq!(c.decide(&v6(547, 546)), Pass);
        assert_eq!(c.decide(&v6(67, 68)), Drop(NoRule));
        let reply = v4(123, 40000);
        assert_eq!(c.decide(&reply[..reply.len() - 1]), Drop(Malformed));

        // A reply to a recorded flow: fresh passes, stale or another port drops.
        let local = SocketAddr::from((HOST4, 40000));
        let remote = SocketAddr::from((PEER4, 123));
        let now = c.flows.now_ns;
        c.flows.record(local, remote, now - FLOW_TIMEOUT_NS / 2);
        assert_eq!(c.decide(&reply), Pass);
        assert_eq!(c.decide(&v4(124, 40000)), Drop(NoRule));
        c.flows.record(local, remote, now - FLOW_TIMEOUT_NS - 1);
        assert_eq!(c.decide(&reply), Drop(NoRule));
        c.flows.record(local, remote, now + 5);
        assert_eq!(c.decide(&reply), Pass, "recorded after now");

        // Flows also rescue a source the rule does not admit.
        c.policy = Policy::parse(r#"allow = [{ port = "udp/40000", from = ["10.0.0.0/8"] }]"#)?;
        c.flows.record(local, remote, now - FLOW_TIMEOUT_NS - 1);
        assert_eq!(c.decide(&reply), Drop(Source));
        c.flows.record(local, remote, now);
        assert_eq!(c.decide(&reply), Pass);
        Ok(())
    }

    #[test]
    fn other_protocols() -> TestResult {
        let mut c = Check::new()?;
        for proto in [IPPROTO_ICMP, IPPROTO_IGMP, IPPROTO_ICMPV6] {
            assert_eq!(c.decide(&ipv4(PEER4, proto, 0, &[], &[])), Pass);
            assert_eq!(c.decide(&ipv6(PEER6, proto, &[])), Pass);
        }
        for proto in [47, 50, 59, 112, 255] {
            assert_eq!(c.decide(&ipv4(PEER4, proto, 0, &[], &[0; 8])), Drop(NoRule));
            assert_eq!(c.decide(&ipv6(PEER6, proto, &[0; 8])), Drop(NoRule));
        }
        // SCTP needs its common header, then a rule for its port.
        let sctp = |dport: u16| {
            let mut h = 5000u16.to_be_bytes().to_vec();
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&[0; 8]);
            h
        };
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_SCTP, 0, &[], &[0; 11])),
            Drop(Malformed)
        );
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_SCTP, 0, &[], &sctp(3868))),
            Drop(NoRule)
        );

        c.policy = Policy::parse(
            r#"allow = ["sctp/3868", "proto/vrrp", { port = "proto/gre", from = ["203.0.113.0/24"] }]"#,
        )?;
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_SCTP, 0, &[], &sctp(3868))),
            Pass
        );
        assert_eq!(c.decide(&ipv6(PEER6, IPPROTO_SCTP, &sctp(3868))), Pass);
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_SCTP, 0, &[], &sctp(3869))),
            Drop(NoRule)
        );
        assert_eq!(c.decide(&ipv4(PEER4, 112, 0, &[], &[])), Pass, "VRRP");
        assert_eq!(c.decide(&ipv6(PEER6, 112, &[])), Pass, "VRRP over IPv6");
        assert_eq!(
            c.decide(&ipv4(PEER4, 47, 0, &[], &[0; 4])),
            Pass,
            "GRE from its network"
        );
        assert_eq!(c.decide(&ipv4(INSIDE4, 47, 0, &[], &[0; 4])), Drop(Source));
        assert_eq!(
            c.decide(&ipv4(PEER4, 50, 0, &[], &[0; 8])),
            Drop(NoRule),
            "ESP"
        );

        // The host's own ESP to the peer admits the peer's ESP back.
        let now = c.flows.now_ns;
        let (local, remote) = (SocketAddr::from((HOST4, 0)), SocketAddr::from((PEER4, 0)));
        c.flows.record_proto(50, local, remote, now);
        assert_eq!(c.decide(&ipv4(PEER4, 50, 0, &[], &[0; 8])), Pass);
        assert_eq!(c.decide(&ipv4(INSIDE4, 50, 0, &[], &[0; 8])), Drop(NoRule));
        // A UDP flow between the same ends admits no ESP, and no UDP of it.
        c.flows.record(local, remote, now);
        assert_eq!(c.decide(&ipv4(PEER4, 4, 0, &[], &[])), Drop(NoRule));
        Ok(())
    }

    #[test]
    fn forwarded_frames_pass_unless_judged() -> TestResult {
        let mut c = Check::new()?;
        let to = |dst: [u8; 4], l4: &[u8], proto: u8| {
            let mut f = ipv4(PEER4, proto, 0, &[], l4);
            f[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&dst);
            // Not the checksum's business: the guard does not check it.
            f
        };
        let routed = [172, 17, 0, 2];
        assert_eq!(c.decide(&to(routed, &tcp(6379, SYN), IPPROTO_TCP)), Pass);
        assert_eq!(
            c.decide(&to(routed, &[0; 8], 47)),
            Pass,
            "GRE to a routed address"
        );
        assert_eq!(
            c.decide(&to(HOST4, &tcp(6379, SYN), IPPROTO_TCP)),
            Drop(NoRule)
        );
        assert_eq!(
            c.decide(&to([224, 0, 0, 18], &[0; 8], 112)),
            Drop(NoRule),
            "multicast"
        );
        assert_eq!(
            c.decide(&to([255, 255, 255, 255], &udp(1, 9), IPPROTO_UDP)),
            Drop(NoRule)
        );
        // Malformed stays malformed wherever it goes.
        let cut = to(routed, &tcp(6379, SYN), IPPROTO_TCP);
        assert_eq!(c.decide(&cut[..cut.len() - 4]), Drop(Malformed));
        let v6 = |dst: [u8; 16]| {
            let mut f = ipv6(PEER6, IPPROTO_TCP, &tcp(6379, SYN));
            f[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&dst);
            f
        };
        assert_eq!(c.decide(&v6(INSIDE6)), Pass);
        assert_eq!(c.decide(&v6(HOST6)), Drop(NoRule));
        let mut ff02 = [0u8; 16];
        ff02[0] = 0xff;
        ff02[1] = 0x02;
        ff02[15] = 1;
        assert_eq!(c.decide(&v6(ff02)), Drop(NoRule));

        c.policy = Policy::parse(&format!("forwarded = \"judge\"\n{}", POLICY))?;
        assert_eq!(
            c.decide(&to(routed, &tcp(6379, SYN), IPPROTO_TCP)),
            Drop(NoRule)
        );
        assert_eq!(c.decide(&to(routed, &tcp(22, SYN), IPPROTO_TCP)), Pass);
        Ok(())
    }

    #[test]
    fn ipv4_ah_is_looked_through() -> TestResult {
        let mut c = Check::new()?;
        let ah = |next: u8| ext(EXT_AUTH, next, 1);
        let syn = |port| {
            ipv4(
                PEER4,
                EXT_AUTH,
                0,
                &[],
                &cat(&[&ah(IPPROTO_TCP), &tcp(port, SYN)]),
            )
        };
        assert_eq!(c.decide(&syn(22)), Pass);
        assert_eq!(c.decide(&syn(23)), Drop(NoRule));
        let cut = syn(22);
        // AH itself cut short: malformed; what it carries cut: TCP's call.
        assert_eq!(c.decide(&cut[..ETH_HLEN + 20 + 10]), Drop(Malformed));
        assert_eq!(c.decide(&cut[..ETH_HLEN + 20 + 12 + 10]), Drop(Malformed));
        assert_eq!(
            c.decide(&ipv4(PEER4, EXT_AUTH, 0, &[], &ah(50))),
            Drop(NoRule)
        );
        Ok(())
    }

    #[test]
    fn ipv6_extension_headers() -> TestResult {
        let mut c = Check::new()?;
        let syn = tcp(22, SYN);
        let chain = cat(&[
            &ext(EXT_HOP, EXT_DEST, 0),
            &ext(EXT_DEST, EXT_ROUTING, 1),
            &ext(EXT_ROUTING, EXT_FRAGMENT, 2),
            &frag6(EXT_AUTH, 0, false, 9),
            &ext(EXT_AUTH, IPPROTO_TCP, 4),
            &syn,
        ]);
        assert_eq!(c.decide(&ipv6(PEER6, EXT_HOP, &chain)), Pass);
        let to_8100 = chain.len() - syn.len() + 2;
        let mut denied = chain.clone();
        denied[to_8100..to_8100 + 2].copy_from_slice(&8100u16.to_be_bytes());
        assert_eq!(c.decide(&ipv6(PEER6, EXT_HOP, &denied)), Drop(NoRule));

        // Eight headers are fine, a ninth is malformed, whatever it is.
        let chain_of = |n: usize, last: &[u8]| {
            let mut out = Vec::new();
            for i in 0..n {
                let next = if i + 1 == n { last[0] } else { EXT_DEST };
                out.extend(ext(EXT_DEST, next, 0));
            }
            out.extend_from_slice(&last[1..]);
            out
        };
        let icmp = [IPPROTO_ICMPV6, 128, 0, 0, 0];
        assert_eq!(c.decide(&ipv6(PEER6, EXT_DEST, &chain_of(8, &icmp))), Pass);
        assert_eq!(
            c.decide(&ipv6(PEER6, EXT_DEST, &chain_of(9, &icmp))),
            Drop(Malformed)
        );
        let mut later = vec![EXT_FRAGMENT];
        later.extend(frag6(IPPROTO_UDP, 3, false, 1));
        assert_eq!(
            c.decide(&ipv6(PEER6, EXT_DEST, &chain_of(8, &later))),
            Drop(Malformed),
            "a ninth header that is a later fragment"
        );

        // A header longer than what is left of the frame, whatever follows.
        let mut long = ext(EXT_HOP, IPPROTO_ICMPV6, 1);
        long.truncate(15);
        assert_eq!(c.decide(&ipv6(PEER6, EXT_HOP, &long)), Drop(Malformed));
        let mut long_ah = ext(EXT_AUTH, IPPROTO_ICMPV6, 1);
        long_ah.truncate(11);
        assert_eq!(c.decide(&ipv6(PEER6, EXT_AUTH, &long_ah)), Drop(Malformed));
        assert_eq!(
            c.decide(&ipv6(
                PEER6,
                EXT_FRAGMENT,
                &[IPPROTO_ICMPV6, 0, 0, 0, 0, 0, 0]
            )),
            Drop(Malformed)
        );
        assert_eq!(
            c.decide(&ipv6(PEER6, EXT_HOP, &[IPPROTO_ICMPV6])),
            Drop(Malformed)
        );
        let v6 = ipv6(PEER6, IPPROTO_ICMPV6, &[]);
        assert_eq!(c.decide(&v6[..v6.len() - 1]), Drop(Malformed));
        let mut v4_in_v6 = v6.clone();
        v4_in_v6[ETH_HLEN] = 0x40;
        assert_eq!(c.decide(&v4_in_v6), Drop(Malformed));
        Ok(())
    }

    #[test]
    fn ipv4_fragments_follow_their_first() -> TestResult {
        let mut c = Check::new()?;
        const MF: u16 = 0x2000;
        let first = ipv4(PEER4, IPPROTO_UDP, MF, &[], &udp(40000, 53));
        let later = ipv4(PEER4, IPPROTO_UDP, 5, &[], &[0; 8]);
        assert_eq!(c.decide(&later), Drop(Fragment), "before its first");
        assert_eq!(c.decide(&first), Pass);
        assert_eq!(c.decide(&later), Pass);
        assert_eq!(c.decide(&ipv4(PEER4, IPPROTO_UDP, MF | 9, &[], &[])), Pass);
        // Another protocol or source is another datagram.
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_TCP, 5, &[], &[])),
            Drop(Fragment)
        );
        assert_eq!(
            c.decide(&ipv4(INSIDE4, IPPROTO_UDP, 5, &[], &[])),
            Drop(Fragment)
        );
        // A denied first fragment passes its reason on, malformed included.
        let first = ipv4(PEER4, IPPROTO_TCP, MF, &[], &tcp(5432, SYN));
        assert_eq!(c.decide(&first), Drop(Source));
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_TCP, 5, &[], &[])),
            Drop(Source)
        );
        let first = ipv4(PEER4, IPPROTO_TCP, MF, &[], &tcp(22, SYN)[..10]);
        assert_eq!(c.decide(&first), Drop(Malformed));
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_TCP, 5, &[], &[])),
            Drop(Malformed)
        );
        // Without MF, offset 0 is a whole datagram: nothing is recorded.
        let mut c = Check::new()?;
        assert_eq!(
            c.decide(&ipv4(PEER4, IPPROTO_UDP, 0x4000, &[], &udp(1, 53))),
            Pass
        );
        assert!(c.frags.is_empty());
        Ok(())
    }

    #[test]
    fn ipv6_fragments_follow_their_first() -> TestResult {
        let mut c = Check::new()?;
        let first = ipv6(
            PEER6,
            EXT_FRAGMENT,
            &cat(&[&frag6(IPPROTO_UDP, 0, true, 77), &udp(40000, 5353)]),
        );
        let later = |id, next| ipv6(PEER6, EXT_FRAGMENT, &frag6(next, 9, false, id));
        assert_eq!(c.decide(&later(77, IPPROTO_UDP)), Drop(Fragment));
        assert_eq!(c.decide(&first), Drop(NoRule));
        // IPv6 names the datagram without its protocol.
        assert_eq!(c.decide(&later(77, IPPROTO_TCP)), Drop(NoRule));
        assert_eq!(c.decide(&later(78, IPPROTO_UDP)), Drop(Fragment));
        // A first fragment whose later headers are malformed records that.
        let first = ipv6(
            PEER6,
            EXT_FRAGMENT,
            &cat(&[&frag6(EXT_HOP, 0, true, 80), &[IPPROTO_TCP, 3, 0]]),
        );
        assert_eq!(c.decide(&first), Drop(Malformed));
        assert_eq!(c.decide(&later(80, IPPROTO_TCP)), Drop(Malformed));
        // An atomic fragment (offset 0, no M) records nothing.
        let atomic = ipv6(
            PEER6,
            EXT_FRAGMENT,
            &cat(&[&frag6(IPPROTO_ICMPV6, 0, false, 81), &[128, 0]]),
        );
        assert_eq!(c.decide(&atomic), Pass);
        assert_eq!(c.decide(&later(81, IPPROTO_ICMPV6)), Drop(Fragment));
        assert_eq!(c.frags.len(), 2);
        Ok(())
    }

    #[test]
    fn audit_mode_passes_with_the_reason() -> TestResult {
        let policy = Policy::parse(POLICY)?;
        let flows = FlowState::new(0);
        let local = Host::of(&[Ipv4Addr::from(HOST4).into()]);
        let mut frags = FragState::new();
        let denied = ipv4(PEER4, IPPROTO_TCP, 0, &[], &tcp(23, SYN));
        let permitted = ipv4(PEER4, IPPROTO_TCP, 0, &[], &tcp(22, SYN));
        let audit = |frame: &[u8], frags: &mut FragState| {
            verdict(frame, &policy, Mode::Audit, &local, &flows, frags)
        };
        assert_eq!(
            audit(&denied, &mut frags),
            Outcome {
                action: Action::Pass,
                reason: Some(NoRule)
            }
        );
        assert_eq!(
            audit(&permitted, &mut frags),
            Outcome {
                action: Action::Pass,
                reason: None
            }
        );
        assert_eq!(
            verdict(&denied, &policy, Mode::Enforce, &local, &flows, &mut frags),
            Outcome {
                action: Action::Drop,
                reason: Some(NoRule)
            }
        );
        assert_eq!(
            audit(&denied[..20], &mut frags).to_string(),
            "pass (malformed)"
        );
        for reason in [NoRule, Source, Malformed, Fragment] {
            assert_eq!(Reason::from_name(reason.as_str()), Some(reason));
        }
        Ok(())
    }
}
