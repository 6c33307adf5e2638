//! The typed events every part of portwatch speaks: the kernel decoder and the
//! start-up snapshot both produce them, every sink consumes them.

use std::{fmt, net::IpAddr, str::FromStr, sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The protocol of an IP protocol number, if it is one of these.
    pub fn of_number(number: u8) -> Option<Self> {
        match number {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

/// An IP protocol number (the IPv4 protocol field, the IPv6 next header
/// that reaches transport). What a policy rule is about: TCP, UDP and
/// SCTP carry ports; every other protocol is permitted as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpProto(pub u8);

/// Well-known protocol names, as /etc/protocols spells them (with the
/// aliases people type). The first name of a number is how it is shown.
const PROTOCOL_NAMES: &[(&str, u8)] = &[
    ("icmp", 1),
    ("igmp", 2),
    ("ipip", 4),
    ("ipencap", 4),
    ("tcp", 6),
    ("egp", 8),
    ("udp", 17),
    ("ipv6", 41),
    ("rsvp", 46),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("icmpv6", 58),
    ("ipv6-icmp", 58),
    ("eigrp", 88),
    ("ospf", 89),
    ("ospfigp", 89),
    ("etherip", 97),
    ("pim", 103),
    ("vrrp", 112),
    ("l2tp", 115),
    ("isis", 124),
    ("sctp", 132),
    ("udplite", 136),
    ("mpls-in-ip", 137),
];

impl IpProto {
    pub const ICMP: IpProto = IpProto(1);
    pub const IGMP: IpProto = IpProto(2);
    pub const TCP: IpProto = IpProto(6);
    pub const UDP: IpProto = IpProto(17);
    pub const ICMPV6: IpProto = IpProto(58);
    pub const SCTP: IpProto = IpProto(132);

    /// Whether its header starts with source and destination ports that a
    /// rule can name.
    pub fn has_ports(self) -> bool {
        matches!(self, IpProto::TCP | IpProto::UDP | IpProto::SCTP)
    }

    /// The well-known name, if it has one.
    pub fn name(self) -> Option<&'static str> {
        PROTOCOL_NAMES
            .iter()
            .find(|(_, n)| *n == self.0)
            .map(|(name, _)| *name)
    }

    /// A name (any case) or a number 0-255.
    pub fn from_name_or_number(text: &str) -> Option<IpProto> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text.parse().ok().map(IpProto);
        }
        let lower = text.to_ascii_lowercase();
        PROTOCOL_NAMES
            .iter()
            .find(|(name, _)| *name == lower)
            .map(|(_, n)| IpProto(*n))
    }

    /// The protocol of a listener, if this is one.
    pub fn as_listener_proto(self) -> Option<Proto> {
        Proto::of_number(self.0)
    }
}

/// The name, or the number when it has none.
impl fmt::Display for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{}", self.0),
        }
    }
}

impl From<Proto> for IpProto {
    fn from(p: Proto) -> Self {
        IpProto(p.number())
    }
}

/// What the guard does with what its policy does not permit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop what the policy does not permit.
    Enforce,
    /// Pass everything, report what would have been dropped.
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?} (expected \"enforce\" or \"audit\")")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "audit" => Ok(Mode::Audit),
            _ => Err(UnknownMode(s.to_owned())),
        }
    }
}

/// What the guard does with frames the host routes or bridges elsewhere
/// (not addressed to one of its addresses, a broadcast or a multicast).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarded {
    /// Pass them: a host firewall protects the host's own sockets.
    #[default]
    Pass,
    /// Judge them by the policy as if they were the host's.
    Judge,
}

impl Forwarded {
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarded::Pass => "pass",
            Forwarded::Judge => "judge",
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown value {0:?} for forwarded (expected \"pass\" or \"judge\")")]
pub struct UnknownForwarded(pub String);

impl FromStr for Forwarded {
    type Err = UnknownForwarded;

    fn from_str(s: &str) -> Result<Self, UnknownForwarded> {
        match s {
            "pass" => Ok(Forwarded::Pass),
            "judge" => Ok(Forwarded::Judge),
            _ => Err(UnknownForwarded(s.to_owned())),
        }
    }
}

/// Whether the network can reach a port under the policy, whoever the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exposure {
    /// Reachable from anywhere.
    Exposed,
    /// Reachable only from the rule's `from` networks.
    Partial,
    /// No rule permits it.
    Blocked,
}

impl Exposure {
    pub fn as_str(self) -> &'static str {
        match self {
            Exposure::Exposed => "exposed",
            Exposure::Partial => "partial",
            Exposure::Blocked => "blocked",
        }
    }

    /// The wider of two: what a listener reached both ways is exposed to.
    pub fn widest(self, other: Self) -> Self {
        let rank = |e| match e {
            Exposure::Blocked => 0,
            Exposure::Partial => 1,
            Exposure::Exposed => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// Who can reach a listener, over every way into its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    /// Over every way in: the guard's policy where it is attached, nothing
    /// where it is not.
    pub exposure: Exposure,
    /// What the policy alone says (where the guard stands).
    pub policy: Exposure,
    /// Ways in that no guard covers, by interface name.
    pub unguarded: Vec<String>,
}

impl Reach {
    /// A listener every way into which the guard covers.
    pub fn guarded(policy: Exposure) -> Self {
        Self {
            exposure: policy,
            policy,
            unguarded: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Listen,
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Snapshot,
    Live,
    /// A close whose kernel record was lost in a ring overflow (and counted
    /// in a `lost` line), known now because a new listener took its socket.
    Inferred,
}

/// How a socket is identified, for matching a close to its listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SockId {
    /// The socket cookie (sock_diag, and the UDP hooks).
    Cookie(u64),
    /// The kernel address of the socket (the TCP tracepoint).
    KernelAddr(u64),
    /// Not known here: a listener read back from the event stream.
    Unknown,
}

/// The process behind a socket, as far as it could be read. Every field is
/// optional: a process may exit before user space looks at /proc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: Option<u32>,
    // Shared by every listener of a process (a burst of 45,000 from three
    // processes holds three copies of each, not 45,000).
    pub comm: Option<Arc<str>>,
    pub uid: Option<u32>,
    pub exe: Option<Arc<str>>,
    pub cmdline: Option<Arc<str>>,
    pub cgroup: Option<Arc<str>>,
}

/// A listening socket: TCP in LISTEN, or a bound UDP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub sock_id: SockId,
    /// Network namespace inode, where known.
    pub netns: Option<u64>,
    pub process: Arc<ProcessInfo>,
}

impl Listener {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

/// A listener opened or closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerEvent {
    pub ts: SystemTime,
    pub kind: EventKind,
    pub origin: Origin,
    pub listener: Listener,
    /// Whether the network can reach it (guard only; None where that
    /// cannot be said).
    pub reach: Option<Reach>,
}

/// Why the guard dropped a packet (or would have, in audit mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// No rule permits the destination port.
    NoRule,
    /// The port is permitted, but not from this source.
    SourceNotAllowed,
    /// Truncated or over-long headers.
    Malformed,
    /// A later fragment whose first fragment was not seen.
    Fragment,
    /// The source is over its rule's limit.
    RateLimited,
}

impl DropReason {
    /// The name in the JSON stream and the metrics: `no_rule`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRule => "no_rule",
            DropReason::SourceNotAllowed => "source_not_allowed",
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// Why the guard passed a packet, as its program says when asked
/// (`explain`, `verify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassReason {
    /// A rule permits the port from this source (within its limit).
    Rule,
    /// TCP with ACK or RST: part of a connection, whatever the port.
    Connection,
    /// A reply to a flow the host opened.
    OwnFlow,
    /// Not IP (ARP, ...).
    NotIp,
    /// ICMP, ICMPv6 or IGMP.
    Control,
    /// A DHCP reply to the host's client.
    Dhcp,
    /// A later fragment of a datagram whose first fragment passed.
    Fragment,
    /// Not addressed to the host: routed or bridged on.
    Forwarded,
}

impl PassReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PassReason::Rule => "rule",
            PassReason::Connection => "connection",
            PassReason::OwnFlow => "own_flow",
            PassReason::NotIp => "not_ip",
            PassReason::Control => "control",
            PassReason::Dhcp => "dhcp",
            PassReason::Fragment => "fragment",
            PassReason::Forwarded => "forwarded",
        }
    }
}

/// An inbound packet the guard dropped (or in audit mode would have).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    pub ts: SystemTime,
    pub iface: Option<String>,
    pub reason: DropReason,
    /// IP protocol number (6 TCP, 17 UDP, others as the packet had them).
    pub proto: u8,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    /// The packet was passed because the guard is in audit mode.
    pub audit: bool,
}

/// Who asked for a change: the control socket peer's uid and pid; neither
/// for SIGHUP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requester {
    pub uid: Option<u32>,
    pub pid: Option<u32>,
}

/// The guard's policy changed at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEvent {
    pub ts: SystemTime,
    /// What changed, e.g. `allow tcp/8080 from anywhere`, `reload`.
    pub change: String,
    pub by: Requester,
    pub mode: Mode,
    pub rules: usize,
}

/// An owned port opened or closed at XDP as its owner came or went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateEvent {
    pub ts: SystemTime,
    /// `tcp/6379`.
    pub port: String,
    pub open: bool,
    /// The listening process that opened it (none when it closed).
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
    /// The owner the rule names, e.g. `unit redis-server.service`.
    pub owner: String,
}

/// A bind() of an owned port by a process that is not its owner: refused
/// by the kernel (enforce), or let through and reported (audit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindEvent {
    pub ts: SystemTime,
    /// `tcp/6379`.
    pub port: String,
    /// The address the process asked for.
    pub addr: IpAddr,
    pub pid: u32,
    pub comm: Arc<str>,
    pub uid: u32,
    /// The process's cgroup v2 path, when it could still be read.
    pub cgroup: Option<Arc<str>>,
    /// The owner the rule names, e.g. `unit redis-server.service`.
    pub owner: String,
    /// Let through because the guard audits; otherwise the bind failed
    /// with EPERM.
    pub audit: bool,
}

/// A process listening on an owned port that is not its owner (another
/// user, command, executable or digest): the port stays closed for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotOwnerEvent {
    pub ts: SystemTime,
    /// `tcp/6379`.
    pub port: String,
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
    pub exe: Option<Arc<str>>,
    /// The owner the rule names.
    pub owner: String,
}

/// How the guard's verdict runs on an interface: XDP in the driver
/// (native) or on the skb (generic), or at tc ingress on the skb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
    Generic,
    Tc,
}

impl AttachedMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Tc => "tc",
        }
    }

    /// The hook in words: "native XDP", "generic XDP", "tc ingress".
    pub fn hook(self) -> &'static str {
        match self {
            AttachedMode::Native => "native XDP",
            AttachedMode::Generic => "generic XDP",
            AttachedMode::Tc => "tc ingress",
        }
    }
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that flows to the sinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Listener(ListenerEvent),
    /// The kernel could not queue `count` events since the last report
    /// (`total` since start).
    Lost {
        ts: SystemTime,
        count: u64,
        total: u64,
    },
    /// The hooks are attached and the snapshot (`snapshot` listeners) is
    /// out: everything after this is live.
    Ready {
        ts: SystemTime,
        snapshot: usize,
    },
    /// A packet the guard dropped.
    Drop(DropEvent),
    /// The policy in force changed.
    Policy(PolicyEvent),
    /// An owned port opened or closed with its owner.
    Gate(GateEvent),
    /// A bind of an owned port by another process.
    Bind(BindEvent),
    /// A listener on an owned port that is not its owner.
    NotOwner(NotOwnerEvent),
    /// A guarded interface went away or came back.
    Interface {
        ts: SystemTime,
        iface: String,
        /// `removed`, `attached`, or `attach failed: WHY`.
        change: String,
        xdp_mode: Option<AttachedMode>,
    },
    /// Events this follower of a guard's stream did not get (it could not
    /// keep up) since the last report; `total` for this follower since it
    /// subscribed. The listeners now follow as a fresh snapshot.
    Missed {
        ts: SystemTime,
        count: u64,
        total: u64,
    },
    /// Drop reports the kernel's rate limit held back since the last report.
    Suppressed {
        ts: SystemTime,
        count: u64,
        total: u64,
    },
}
