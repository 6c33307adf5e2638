//! Types shared by the kernel programs (`portwatch-ebpf`) and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree
//! on the byte layout. User space never transmutes ring-buffer bytes into these
//! types: it decodes them field by field using the offsets published below.
#![no_std]

/// The names of the maps in the kernel object. The eBPF side declares its
/// statics under these names; user space opens and pins maps only through
/// them (a test of the built object checks that the two agree).
pub mod map {
    pub const EVENTS: &str = "EVENTS";
    pub const MONITOR_STATS: &str = "MONITOR_STATS";
    pub const UDP_SOCKS: &str = "UDP_SOCKS";
    pub const GUARD_CONFIG: &str = "GUARD_CONFIG";
    pub const POLICY_PORTS: &str = "POLICY_PORTS";
    pub const POLICY_SRC4: &str = "POLICY_SRC4";
    pub const POLICY_SRC6: &str = "POLICY_SRC6";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOWS4: &str = "FLOWS4";
    pub const FLOW_PORTS: &str = "FLOW_PORTS";
    pub const FRAGS: &str = "FRAGS";
    pub const FRAGS4: &str = "FRAGS4";
    pub const COUNTERS: &str = "COUNTERS";
    pub const GUARD_STATS: &str = "GUARD_STATS";
    pub const REPORT_BUCKET: &str = "REPORT_BUCKET";
    pub const DROPS: &str = "DROPS";
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    pub const LOCAL_LIST: &str = "LOCAL_LIST";
    pub const LIMITS: &str = "LIMITS";
    pub const RATE_STATE: &str = "RATE_STATE";
    pub const RATE_OVERFLOW: &str = "RATE_OVERFLOW";
    pub const OWNERS: &str = "OWNERS";
    pub const OWNER_COUNT: &str = "OWNER_COUNT";
    pub const BINDS: &str = "BINDS";
    pub const LEARN: &str = "LEARN";
    /// tc's scratch buffer for header bytes past an skb's linear part.
    pub const SKB_SCRATCH: &str = "SKB_SCRATCH";

    /// Every map of the shipped object.
    pub const ALL: &[&str] = &[
        EVENTS,
        MONITOR_STATS,
        UDP_SOCKS,
        GUARD_CONFIG,
        POLICY_PORTS,
        POLICY_SRC4,
        POLICY_SRC6,
        FLOWS,
        FLOWS4,
        FLOW_PORTS,
        FRAGS,
        FRAGS4,
        COUNTERS,
        GUARD_STATS,
        REPORT_BUCKET,
        DROPS,
        LOCAL_ADDRS,
        LOCAL_LIST,
        LIMITS,
        RATE_STATE,
        RATE_OVERFLOW,
        OWNERS,
        OWNER_COUNT,
        BINDS,
        LEARN,
        SKB_SCRATCH,
    ];
}

/// The names of the programs in the kernel object (their functions' names).
pub mod prog {
    pub const INET_SOCK_SET_STATE: &str = "inet_sock_set_state";
    pub const POST_BIND4: &str = "post_bind4";
    pub const POST_BIND6: &str = "post_bind6";
    pub const SOCK_RELEASE: &str = "sock_release";
    pub const XDP_GUARD: &str = "xdp_guard";
    /// The guard's read-only twin, test-run by `explain` and `verify`.
    pub const XDP_PROBE: &str = "xdp_probe";
    pub const TC_EGRESS: &str = "tc_egress";
    /// The guard's verdict at tc ingress (software devices such as veth).
    pub const TC_GUARD: &str = "tc_guard";

    /// Every program of the shipped object.
    pub const ALL: &[&str] = &[
        INET_SOCK_SET_STATE,
        POST_BIND4,
        POST_BIND6,
        SOCK_RELEASE,
        XDP_GUARD,
        XDP_PROBE,
        TC_EGRESS,
        TC_GUARD,
    ];

    /// Benchmark baselines, in the separate benchmark object only.
    pub const BENCH_XDP_DROP: &str = "bench_xdp_drop";
    pub const BENCH_PARSE_DROP: &str = "bench_parse_drop";
}

/// Size of the listener event ring buffer in bytes (a power of two, page aligned).
/// 4 MiB holds about 58,000 events, enough to absorb a burst while user space
/// catches up.
pub const EVENTS_RING_BYTES: u32 = 4 << 20;

/// Maximum number of bound UDP sockets tracked for close matching.
pub const MAX_UDP_SOCKETS: u32 = 1 << 18;

/// A bound UDP socket in `UDP_SOCKS` (by socket cookie): the address and
/// port it holds, which `sock_release` cannot read. The bind hook writes
/// these; user space writes those bound before the hooks were attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpBind {
    /// The first 4 bytes for IPv4, all 16 for IPv6, network order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    pub _pad: u32,
}

/// Linux socket states and address families used on both sides.
pub const TCP_LISTEN: i32 = 10;
pub const TCP_CLOSE: i32 = 7;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// What happened to a listening socket.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenKind {
    /// A TCP socket entered LISTEN, or a UDP socket was bound.
    Listen = 1,
    /// A TCP socket left LISTEN, or a bound UDP socket was released.
    Close = 2,
}

impl ListenKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Listen),
            2 => Some(Self::Close),
            _ => None,
        }
    }
}

/// One listener event as the kernel writes it into the `EVENTS` ring buffer.
///
/// `sock_id` identifies the socket for matching a close to its open: the
/// kernel address of the `struct sock` for TCP (all the tracepoint offers) and
/// the socket cookie for UDP (the same cookie sock_diag reports).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ListenEvent {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
    pub sock_id: u64,
    /// Process id (tgid) and thread id of the task in whose context it happened.
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// Local port in host byte order.
    pub port: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// A `ListenKind` value.
    pub kind: u8,
    pub _pad: [u8; 6],
    /// Local address: the first 4 bytes for IPv4, all 16 for IPv6, network order.
    pub addr: [u8; 16],
    /// Task command name, NUL padded.
    pub comm: [u8; 16],
}

impl ListenEvent {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Byte offsets of `ListenEvent` fields, for the length-checked decoder.
pub mod listen_event_offsets {
    use super::ListenEvent;
    use core::mem::offset_of;
    pub const TS_NS: usize = offset_of!(ListenEvent, ts_ns);
    pub const SOCK_ID: usize = offset_of!(ListenEvent, sock_id);
    pub const TGID: usize = offset_of!(ListenEvent, tgid);
    pub const TID: usize = offset_of!(ListenEvent, tid);
    pub const UID: usize = offset_of!(ListenEvent, uid);
    pub const PORT: usize = offset_of!(ListenEvent, port);
    pub const FAMILY: usize = offset_of!(ListenEvent, family);
    pub const PROTO: usize = offset_of!(ListenEvent, proto);
    pub const KIND: usize = offset_of!(ListenEvent, kind);
    pub const ADDR: usize = offset_of!(ListenEvent, addr);
    pub const COMM: usize = offset_of!(ListenEvent, comm);
}

/// Indexes into the per-CPU `MONITOR_STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorStat {
    /// Events that could not be queued because the ring buffer was full.
    EventsLost = 0,
    /// UDP binds whose cookie could not be remembered (table full): their
    /// close will not be reported.
    UdpTableFull = 1,
}

pub const MONITOR_STATS_LEN: u32 = 2;

// ---------------------------------------------------------------------------
// The guard (XDP ingress filter, tc egress flow recorder).

/// Slots in `POLICY_PORTS`: one per port of TCP, UDP and SCTP, then one
/// per IP protocol for the protocols without ports.
pub const POLICY_PORT_SLOTS: u32 = 3 * 65536 + 256;
/// Where the protocols without ports start in `POLICY_PORTS`.
pub const WHOLE_PROTOCOL_SLOTS: u32 = 3 * 65536;
/// `POLICY_PORTS` value bits (the low half; the high half is the port's
/// counter slot, see [`port_entry`]).
pub const RULE_ANY: u32 = 1;
/// The port is permitted only from the sources in the `POLICY_SRC*` tries.
pub const RULE_CIDR: u32 = 2;
/// Each source is limited by the rule's `LIMITS` entry (indexed by the
/// counter slot, which is the rule's own).
pub const RULE_LIMIT: u32 = 4;
/// The rule bits of a `POLICY_PORTS` value.
pub const RULE_MASK: u32 = 0xffff;

/// A `POLICY_PORTS` value: what the rule permits, and the `COUNTERS` slot
/// the port's packets are counted in (0: the protocol's `other` slot).
#[inline(always)]
pub const fn port_entry(rule_bits: u32, counter_slot: u32) -> u32 {
    (rule_bits & RULE_MASK) | (counter_slot << 16)
}

/// The counter slot of a `POLICY_PORTS` value; 0 when it has none.
#[inline(always)]
pub const fn entry_slot(entry: u32) -> u32 {
    entry >> 16
}

/// Slots of the per-CPU `COUNTERS` array. User space gives one to each
/// rule and to each port that has a listener but no rule; packets to any
/// other port add to its protocol's `other` slot. An outsider therefore
/// cannot make the guard keep (or export) anything per port it picks.
pub const MAX_COUNTER_SLOTS: u32 = 2048;
/// TCP, UDP and SCTP packets to ports with neither a rule nor a listener.
pub const SLOT_OTHER_TCP: u32 = 0;
pub const SLOT_OTHER_UDP: u32 = 1;
pub const SLOT_OTHER_SCTP: u32 = 2;
/// Packets of every protocol without ports and without a rule (ICMP too).
pub const SLOT_OTHER_IP: u32 = 3;
/// The first slot user space hands out.
pub const FIRST_COUNTER_SLOT: u32 = 4;

/// Whether the protocol's header starts with the two ports a rule names.
#[inline(always)]
pub const fn has_ports(proto: u8) -> bool {
    proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP
}

/// Index of (protocol, port) in `POLICY_PORTS`: TCP, UDP and SCTP ports,
/// then one slot per other protocol (whose packets have no port).
#[inline(always)]
pub const fn port_slot(proto: u8, port: u16) -> u32 {
    match proto {
        IPPROTO_TCP => port as u32,
        IPPROTO_UDP => 65536 + port as u32,
        IPPROTO_SCTP => 2 * 65536 + port as u32,
        other => WHOLE_PROTOCOL_SLOTS + other as u32,
    }
}

/// The `COUNTERS` slot of a protocol's packets that no rule or listener
/// has a slot for.
#[inline(always)]
pub const fn other_slot(proto: u8) -> u32 {
    match proto {
        IPPROTO_TCP => SLOT_OTHER_TCP,
        IPPROTO_UDP => SLOT_OTHER_UDP,
        IPPROTO_SCTP => SLOT_OTHER_SCTP,
        _ => SLOT_OTHER_IP,
    }
}

/// Key data of the IPv4 source trie: protocol, port (big endian), address.
/// The prefix length counts 24 bits of protocol and port, then the CIDR bits.
pub const SRC4_KEY_LEN: usize = 8;
/// Key data of the IPv6 source trie: protocol, port, address, one pad byte.
pub const SRC6_KEY_LEN: usize = 20;
/// Bits of protocol and port in front of the address in a source key.
pub const SRC_KEY_PORT_BITS: u32 = 24;
pub const MAX_SRC_RULES: u32 = 16384;

/// The IPv4 source trie's key data for (protocol, port, address): the
/// policy's entries (with a CIDR's network address) and the XDP program's
/// lookups (with the packet's source) are built alike here.
#[inline(always)]
pub const fn src4_key(proto: u8, port: u16, addr: [u8; 4]) -> [u8; SRC4_KEY_LEN] {
    let [hi, lo] = port.to_be_bytes();
    [proto, hi, lo, addr[0], addr[1], addr[2], addr[3], 0]
}

/// The IPv6 source trie's key data for (protocol, port, address).
#[inline(always)]
pub fn src6_key(proto: u8, port: u16, addr: &[u8; 16]) -> [u8; SRC6_KEY_LEN] {
    let [hi, lo] = port.to_be_bytes();
    let mut data = [0u8; SRC6_KEY_LEN];
    data[0] = proto;
    data[1] = hi;
    data[2] = lo;
    data[3..19].copy_from_slice(addr);
    data
}

/// A source key's prefix length for a CIDR of `cidr_bits` (32 or 128 for
/// a single address, as the XDP program looks them up).
#[inline(always)]
pub const fn src_prefix_len(cidr_bits: u8) -> u32 {
    SRC_KEY_PORT_BITS + cidr_bits as u32
}

/// `GuardConfig.flags`: pass everything, count and report what would drop.
pub const GUARD_AUDIT: u32 = 1;
/// `GuardConfig.flags`: judge frames the host routes or bridges elsewhere
/// too (without it, a frame that would be dropped passes when it is not
/// addressed to the host: not a local address, broadcast or multicast).
pub const GUARD_FORWARD_JUDGE: u32 = 2;
/// `GuardConfig.flags`: record who sends what to which port in `LEARN`
/// (audit mode, and while `portwatch learn --for` runs).
pub const GUARD_LEARN: u32 = 4;

/// A `LEARN` key: inbound traffic to (protocol, port) from one source.
/// Port in host order (0 for a protocol without ports); IPv4 sources in
/// the first 4 address bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnKey {
    pub family: u8,
    pub proto: u8,
    pub port: u16,
    pub src: [u8; 16],
}

/// What `LEARN` knows of a (protocol, port, source): connection attempts
/// (TCP SYNs; every packet of other protocols) passed and dropped (audit
/// mode: would-be drops), first and last seen (CLOCK_MONOTONIC ns, coarse).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnStats {
    pub first_ns: u64,
    pub last_ns: u64,
    pub passed: u64,
    pub dropped: u64,
}

/// `LEARN`'s size: an LRU table, the least recently seen pair goes first.
pub const MAX_LEARNED: u32 = 16384;

/// A key of `LOCAL_ADDRS`: an address of the guard's namespace (unicast
/// or an IPv4 subnet broadcast). IPv4 uses the first 4 address bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalKey {
    pub family: u8,
    // Padding as a byte and a half-word, not `[u8; 3]`: the BPF backend
    // zeroes a 3-byte array with a call to a byte-loop memset.
    pub _pad: u8,
    pub _pad2: u16,
    pub addr: [u8; 16],
}

pub const MAX_LOCAL_ADDRS: u32 = 4096;

/// Addresses `LocalList` holds inline, per family.
pub const LOCAL_INLINE_V4: usize = 16;
pub const LOCAL_INLINE_V6: usize = 8;

/// The host's first addresses, in the single entry of `LOCAL_LIST`: a
/// drop-path check compares against these in place, which costs a few ns
/// where a hash lookup costs ~20; `LOCAL_ADDRS` is looked up only when
/// the host has more addresses of the family than fit here.
/// IPv4 addresses are their 4 bytes read as a native-endian u32, IPv6 ones
/// their 16 bytes as two native-endian u64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalList {
    pub v4: [u32; LOCAL_INLINE_V4],
    pub v6: [[u64; 2]; LOCAL_INLINE_V6],
    pub n4: u32,
    pub n6: u32,
    /// Non-zero: more addresses of the family than fit; look up the rest.
    pub more4: u32,
    pub more6: u32,
}

/// A rule's per-source limit, in `LIMITS[counter slot]`, as a token bucket
/// counted in nanoseconds: a packet (a TCP connection attempt) costs
/// `cost_ns`; a source's bucket holds at most `cap_ns` (the burst), and
/// refills by one nanosecond per nanosecond. `cost_ns == 0`: no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub cost_ns: u64,
    pub cap_ns: u64,
}

/// A source of a limited rule: the rule's counter slot, and the source
/// address (IPv6 cut to the configured prefix). IPv4 uses 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateKey {
    pub slot: u16,
    pub family: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
}

/// A source's bucket: what it held at `last_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub tokens_ns: u64,
    pub last_ns: u64,
}

/// Sources tracked at once. The table is not LRU: a flood of new sources
/// cannot evict the buckets of sources already there. When it is full, new
/// sources share their rule's overflow bucket (`RATE_OVERFLOW[slot]`)
/// until user space sweeps out buckets that are full again.
pub const MAX_RATE_SOURCES: u32 = 65536;

/// Runtime settings of the XDP program, in `GUARD_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    pub flags: u32,
    /// Drop reports per second per CPU; `report_burst` may come at once.
    pub report_rate: u32,
    pub report_burst: u32,
    /// IPv6 sources of a limited rule are grouped by this prefix length
    /// (1-128): one bucket per /64 by default.
    pub limit_v6_prefix: u32,
    /// A recorded outbound UDP flow admits replies for this long after its
    /// last outbound packet.
    pub flow_timeout_ns: u64,
    /// The kernel's clock as jiffies read it: now (CLOCK_MONOTONIC ns, at
    /// the start of the current tick) is `jiffies * tick_ns +
    /// clock_offset_ns` (wrapping). jiffies64 is a load once the verifier
    /// inlines it; the coarse clock is a helper call, about 14 ns a packet
    /// (bench/results). 0: not calibrated, the program asks the coarse
    /// clock.
    pub tick_ns: u64,
    pub clock_offset_ns: u64,
}

/// An outbound flow of the host, as the tc egress program saw it: UDP or
/// SCTP with ports, any other protocol but TCP and ICMP with ports 0.
/// Ports in host byte order, addresses in network order; IPv4 uses the
/// first 4 address bytes. 8-aligned (no larger for it) so that the
/// programs' stack copies stay aligned (see portwatch-ebpf's `aligned`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub local: [u8; 16],
    pub remote: [u8; 16],
}

pub const MAX_FLOWS: u32 = 65536;

/// An IPv4 flow in `FLOWS4`; `FLOWS` keeps the IPv6 ones. A hash table
/// hashes and compares its whole key on every lookup, and an IPv4
/// `FlowKey` is 24 bytes of zeros: 16 bytes cost a UDP reply's lookup
/// less than 40. 8-aligned so the programs' stack copy stays aligned.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow4Key {
    pub proto: u8,
    pub _pad: u8,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad2: u16,
    pub local: [u8; 4],
    pub remote: [u8; 4],
}

impl Flow4Key {
    /// The key of an IPv4 flow; the programs build it straight from the
    /// parsed headers, without a 40-byte `FlowKey` first.
    #[inline(always)]
    pub fn new(
        proto: u8,
        local_port: u16,
        remote_port: u16,
        local: [u8; 4],
        remote: [u8; 4],
    ) -> Self {
        Self {
            proto,
            _pad: 0,
            local_port,
            remote_port,
            _pad2: 0,
            local,
            remote,
        }
    }
}

impl FlowKey {
    /// The `FLOWS4` key of an IPv4 flow; None for IPv6 (a `FLOWS` key).
    #[inline(always)]
    pub fn compact(&self) -> Option<Flow4Key> {
        if self.family != AF_INET as u8 {
            return None;
        }
        Some(Flow4Key::new(
            self.proto,
            self.local_port,
            self.remote_port,
            [self.local[0], self.local[1], self.local[2], self.local[3]],
            [
                self.remote[0],
                self.remote[1],
                self.remote[2],
                self.remote[3],
            ],
        ))
    }
}

/// `FLOW_PORTS`: one byte per `port_slot`, set (non-zero) for every local
/// port (or port-less protocol) the host has sent a recorded flow from. A
/// packet to a port whose byte is clear cannot be a reply, so it skips the
/// `FLOWS` lookup. Bytes, not bits: each port's mark is a plain store, with
/// no read-modify-write for CPUs to race on. Marks are only ever set while
/// the guard runs (a port stays marked after its flows expire, which costs
/// that port the lookup, never a reply).
pub const FLOW_PORTS_PER_ENTRY: u32 = 64;
pub const FLOW_PORT_ENTRIES: u32 = POLICY_PORT_SLOTS.div_ceil(FLOW_PORTS_PER_ENTRY);

/// The `FLOW_PORTS` entry and byte of a `port_slot`.
#[inline(always)]
pub const fn flow_port_byte(slot: u32) -> (u32, usize) {
    (
        slot / FLOW_PORTS_PER_ENTRY,
        (slot % FLOW_PORTS_PER_ENTRY) as usize,
    )
}

/// A fragmented datagram, for later fragments to follow the first one.
/// 8-aligned, as `FlowKey`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub family: u8,
    pub proto: u8,
    pub _pad: u16,
    pub id: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// An IPv4 datagram in `FRAGS4` (`FRAGS` keeps the IPv6 ones): 16 bytes
/// to hash instead of 40, as for `Flow4Key`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag4Key {
    pub proto: u8,
    // As in `LocalKey`: no 3-byte array to zero.
    pub _pad: u8,
    pub _pad2: u16,
    pub id: u32,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// What the first fragment decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragVerdict {
    /// 0: pass, else the `DropReason`.
    pub reason: u8,
    pub proto: u8,
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: u32,
}

pub const MAX_FRAGS: u32 = 8192;

/// Why a packet was (or in audit mode would have been) dropped.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// No rule permits the destination port.
    NoRule = 1,
    /// The port is permitted, but not from this source.
    Source = 2,
    /// Truncated or over-long headers.
    Malformed = 3,
    /// A later fragment whose first fragment was not seen.
    Fragment = 4,
    /// The source is over the rule's limit.
    RateLimited = 5,
}

impl DropReason {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::NoRule),
            2 => Some(Self::Source),
            3 => Some(Self::Malformed),
            4 => Some(Self::Fragment),
            5 => Some(Self::RateLimited),
            _ => None,
        }
    }
}

/// Why a packet passed; a probe's answer (`XdpProbe.pass`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// A rule permits the port from this source (within its limit).
    Rule = 1,
    /// TCP with ACK or RST: part of a connection, whatever the port.
    Connection = 2,
    /// A reply to a flow the host opened (tc egress recorded it).
    OwnFlow = 3,
    /// Not IP (ARP, ...): the host needs it.
    NotIp = 4,
    /// ICMP, ICMPv6, IGMP: the network's control traffic.
    Control = 5,
    /// A DHCP reply to the host's own client.
    Dhcp = 6,
    /// A later fragment of a datagram whose first fragment passed.
    Fragment = 7,
    /// Not addressed to the host: routed or bridged on, judged there.
    Forwarded = 8,
}

impl PassReason {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Rule),
            2 => Some(Self::Connection),
            3 => Some(Self::OwnFlow),
            4 => Some(Self::NotIp),
            5 => Some(Self::Control),
            6 => Some(Self::Dhcp),
            7 => Some(Self::Fragment),
            8 => Some(Self::Forwarded),
            _ => None,
        }
    }
}

/// `XdpProbe.magic`: the frame is a probe from user space.
pub const PROBE_MAGIC: u32 = 0x7077_7072; // "pwpr"

/// The XDP metadata of a probe: a frame that `explain` and `verify` test-run
/// (BPF_PROG_TEST_RUN) through `xdp_probe`, the guard's code compiled
/// without its side effects (no counter, report, rate-limit token, fragment
/// record), against the guard's maps. It writes its verdict back here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpProbe {
    pub magic: u32,
    /// The `PassReason`, or 0 when dropped.
    pub pass: u8,
    /// The `DropReason`, or 0 when passed (set with `pass` 0 in audit mode:
    /// the frame would drop in enforce mode).
    pub drop: u8,
    pub _pad: u16,
    /// The kernel's jiffies and CLOCK_MONOTONIC (ns) as the probe ran: how
    /// user space calibrates `GuardConfig`'s clock.
    pub jiffies: u64,
    pub now_ns: u64,
}

/// `GuardConfig.flags`, set only in the program's own copy for a probe:
/// decide without side effects. User space never sets it in the map.
pub const GUARD_PROBE: u32 = 1 << 31;

/// Packets and bytes per counter slot, per CPU. In audit mode the drop
/// counters hold what enforce mode would have dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub pass_packets: u64,
    pub pass_bytes: u64,
    pub drop_packets: u64,
    pub drop_bytes: u64,
}

/// Indexes into the per-CPU `GUARD_STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardStat {
    /// Packets passed. The kernel's slot leaves out replies to the host's
    /// own flows (`FlowReplies`): user space adds them.
    Passed = 0,
    DropNoRule = 1,
    DropSource = 2,
    DropMalformed = 3,
    DropFragment = 4,
    /// Drop reports not sent because of the rate limit. The kernel no
    /// longer writes this slot: it counts them in `ReportBucket::suppressed`
    /// (a flood's every drop would otherwise pay for a second per-CPU
    /// lookup), and user space fills this index from there.
    ReportsSuppressed = 5,
    /// Drop reports not sent because the ring buffer was full.
    ReportsLost = 6,
    /// Outbound UDP packets recorded as flows by tc egress.
    FlowsRecorded = 7,
    /// Packets passed as replies to a flow the host opened (UDP, SCTP,
    /// port-less protocols: what tc egress records). Their only count in
    /// the kernel (one a packet); user space adds them to `Passed`.
    FlowReplies = 8,
    /// Frames not addressed to the host that would have been dropped and
    /// passed on instead (`forwarded = "pass"`).
    Forwarded = 9,
    DropRateLimited = 10,
    /// Limited packets from a new source judged by the overflow bucket
    /// because the source table was full.
    RateTableFull = 11,
    /// Binds of owned ports by others, refused (enforce mode).
    BindsDenied = 12,
    /// Binds of owned ports by others, let through in audit mode.
    BindsAudited = 13,
    /// Bind reports not sent because their ring buffer was full.
    BindReportsLost = 14,
}

pub const GUARD_STATS_LEN: u32 = 15;

/// `GUARD_STATS`'s size: one slot more than there are counters, so that a
/// map pinned by a build from before the flow replies were counted alone
/// (its `Passed` holds them too) is not adopted, which would count those
/// replies twice; a map of another size is made afresh.
pub const GUARD_STATS_ENTRIES: u32 = GUARD_STATS_LEN + 1;

pub const DROPS_RING_BYTES: u32 = 256 << 10;

/// One dropped (or in audit mode, would-be dropped) packet, for user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropReport {
    pub ts_ns: u64,
    pub ifindex: u32,
    /// A `DropReason` value.
    pub reason: u8,
    /// IPPROTO_TCP, IPPROTO_UDP, or another IP protocol number.
    pub proto: u8,
    /// AF_INET or AF_INET6 (as u8).
    pub family: u8,
    /// 1 when the packet was passed because the guard audits.
    pub audit: u8,
    /// Ports in host byte order (0 when unknown).
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl DropReport {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Byte offsets of `DropReport` fields, for the length-checked decoder.
pub mod drop_report_offsets {
    use super::DropReport;
    use core::mem::offset_of;
    pub const TS_NS: usize = offset_of!(DropReport, ts_ns);
    pub const IFINDEX: usize = offset_of!(DropReport, ifindex);
    pub const REASON: usize = offset_of!(DropReport, reason);
    pub const PROTO: usize = offset_of!(DropReport, proto);
    pub const FAMILY: usize = offset_of!(DropReport, family);
    pub const AUDIT: usize = offset_of!(DropReport, audit);
    pub const SRC_PORT: usize = offset_of!(DropReport, src_port);
    pub const DST_PORT: usize = offset_of!(DropReport, dst_port);
    pub const SRC: usize = offset_of!(DropReport, src);
    pub const DST: usize = offset_of!(DropReport, dst);
}

/// Token bucket of the drop report rate limit, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReportBucket {
    /// Tokens times 1e9 (so refills in nanoseconds stay integers).
    pub tokens: u64,
    pub last_ns: u64,
    /// jiffies when `last_ns` was read: the coarse clock only moves with
    /// jiffies, so an empty bucket in the same tick needs no clock read.
    pub last_jiffies: u64,
    /// Reports held back by the rate limit: here, where the dropping
    /// program already holds the bucket, rather than in `GUARD_STATS`.
    pub suppressed: u64,
}

// ---------------------------------------------------------------------------
// Bind-time enforcement of owned ports (in the monitor's post_bind hooks at
// the cgroup v2 root).

/// An owned port: the `OWNERS` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerKey {
    /// Host byte order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub _pad: u8,
}

/// `OwnerRule::flags`: refuse the bind (else only report it).
pub const OWNER_ENFORCE: u32 = 1;
/// `OwnerRule::flags`: the owner names a cgroup (`cgroup_id`).
pub const OWNER_CGROUP: u32 = 2;
/// `OwnerRule::flags`: the owner names a uid.
pub const OWNER_UID: u32 = 4;
/// `OwnerRule::flags`: the owner names a command.
pub const OWNER_COMM: u32 = 8;
/// `OwnerRule::flags`: the owner is a socket-activated unit: the service
/// manager (a task in `manager_cgroup_id`) binds for it, or its helper: a
/// root task named [`SYSTEMD_LISTEN_HELPER`] within the socket unit's slice
/// (`helper_slice_id`), which systemd forks into the socket unit's cgroup
/// to make the socket there.
pub const OWNER_MANAGER: u32 = 16;
/// The command name of systemd's socket-making helper, NUL padded.
pub const SYSTEMD_LISTEN_HELPER: [u8; 16] = *b"(sd-listen)\0\0\0\0\0";
/// How deep below the root a binding task's cgroup is looked at: "within
/// cgroup X" walks the task's ancestors up to this depth. Cgroup ids are
/// the same in every cgroup namespace, depths are not (a container's root
/// is deep in the host's tree), so a cgroup is matched by id at any depth.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// Who may bind an owned port: the kernel-checkable keys of its owner.
/// Every key flagged must match. A cgroup the owner names that does not
/// exist now (its unit is stopped) has id 0: no task is in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRule {
    /// Binds in other network namespaces are not judged.
    pub netns_cookie: u64,
    /// The owner's cgroup: a task matches when it is in it or below it.
    pub cgroup_id: u64,
    pub manager_cgroup_id: u64,
    pub helper_slice_id: u64,
    pub uid: u32,
    pub flags: u32,
    /// NUL padded, compared whole.
    pub comm: [u8; 16],
}

/// Owned ports at most: one per owner rule.
pub const MAX_OWNED_PORTS: u32 = 4096;

/// `BindReport::verdict`.
pub const BIND_DENIED: u8 = 1;
/// Audit mode: the bind went through, and would have been refused.
pub const BIND_AUDITED: u8 = 2;

/// A bind of an owned port by a task that is not its owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BindReport {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub uid: u32,
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub proto: u8,
    pub verdict: u8,
    pub _pad: [u8; 2],
    /// The address asked for: 4 bytes for IPv4, 16 for IPv6, network order.
    pub addr: [u8; 16],
    pub comm: [u8; 16],
}

impl BindReport {
    pub const SIZE: usize = core::mem::size_of::<Self>();
}

/// Byte offsets of `BindReport` fields, for the length-checked decoder.
pub mod bind_report_offsets {
    use super::BindReport;
    use core::mem::offset_of;
    pub const TS_NS: usize = offset_of!(BindReport, ts_ns);
    pub const CGROUP_ID: usize = offset_of!(BindReport, cgroup_id);
    pub const TGID: usize = offset_of!(BindReport, tgid);
    pub const UID: usize = offset_of!(BindReport, uid);
    pub const PORT: usize = offset_of!(BindReport, port);
    pub const FAMILY: usize = offset_of!(BindReport, family);
    pub const PROTO: usize = offset_of!(BindReport, proto);
    pub const VERDICT: usize = offset_of!(BindReport, verdict);
    pub const ADDR: usize = offset_of!(BindReport, addr);
    pub const COMM: usize = offset_of!(BindReport, comm);
}

/// Bind reports in flight: binds are rare, a refused one rarer.
pub const BINDS_RING_BYTES: u32 = 64 << 10;

#[cfg(feature = "user")]
mod user {
    // SAFETY: ListenEvent is repr(C), made only of integers and byte arrays,
    // with explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::ListenEvent {}
    // SAFETY: repr(C), plain integers and arrays, explicit padding.
    unsafe impl aya::Pod for super::UdpBind {}
    // SAFETY: repr(C), integers and byte arrays only, explicit padding:
    // every bit pattern is a valid value. The same holds for those below.
    unsafe impl aya::Pod for super::GuardConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Flow4Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Frag4Key {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LocalKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LocalList {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RateLimit {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RateKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RateState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FragVerdict {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::PortCounters {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::DropReport {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ReportBucket {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OwnerKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OwnerRule {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LearnKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LearnStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_flow_compacts_field_for_field_and_an_ipv6_one_does_not() {
        let mut key = FlowKey {
            family: AF_INET as u8,
            proto: IPPROTO_UDP,
            _pad: 0,
            local_port: 45000,
            remote_port: 53,
            local: [0; 16],
            remote: [0; 16],
        };
        key.local[..4].copy_from_slice(&[192, 0, 2, 1]);
        key.remote[..4].copy_from_slice(&[198, 51, 100, 7]);
        let v4 = key.compact().expect("an IPv4 key compacts");
        assert_eq!(
            (v4.proto, v4.local_port, v4.remote_port),
            (IPPROTO_UDP, 45000, 53)
        );
        assert_eq!((v4.local, v4.remote), ([192, 0, 2, 1], [198, 51, 100, 7]));
        key.family = AF_INET6 as u8;
        assert_eq!(key.compact(), None);
    }

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(ListenEvent::SIZE, 72);
        assert_eq!(listen_event_offsets::ADDR, 40);
        assert_eq!(listen_event_offsets::COMM, 56);
        assert_eq!(DropReport::SIZE, 56);
        assert_eq!(core::mem::size_of::<UdpBind>(), 24);
        assert_eq!(core::mem::offset_of!(UdpBind, family), 18);
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<FragKey>(), 40);
        assert_eq!(core::mem::size_of::<Flow4Key>(), 16);
        assert_eq!(core::mem::size_of::<Frag4Key>(), 16);
        assert_eq!(core::mem::size_of::<LocalKey>(), 20);
        assert_eq!(core::mem::offset_of!(Frag4Key, id), 4);
        assert_eq!(core::mem::offset_of!(LocalKey, addr), 4);
        assert_eq!(core::mem::size_of::<LocalList>(), 64 + 128 + 16);
        assert_eq!(core::mem::size_of::<RateKey>(), 20);
        assert_eq!(core::mem::size_of::<RateLimit>(), 16);
        assert_eq!(core::mem::size_of::<RateState>(), 16);
        assert_eq!(core::mem::size_of::<ReportBucket>(), 32);
        assert_eq!(flow_port_byte(port_slot(IPPROTO_UDP, 53)), (1024, 53));
        const { assert!(FLOW_PORT_ENTRIES * FLOW_PORTS_PER_ENTRY >= POLICY_PORT_SLOTS) };
        assert_eq!(core::mem::size_of::<GuardConfig>(), 40);
        assert_eq!(core::mem::size_of::<XdpProbe>(), 24);
        assert_eq!(core::mem::offset_of!(XdpProbe, jiffies), 8);
        assert_eq!(core::mem::offset_of!(XdpProbe, now_ns), 16);
        assert_eq!(core::mem::size_of::<LearnKey>(), 20);
        assert_eq!(core::mem::size_of::<LearnStats>(), 32);
        assert_eq!(core::mem::size_of::<OwnerKey>(), 4);
        assert_eq!(core::mem::size_of::<OwnerRule>(), 56);
        assert_eq!(&SYSTEMD_LISTEN_HELPER[..11], b"(sd-listen)");
        assert_eq!(BindReport::SIZE, 64);
        assert_eq!(bind_report_offsets::ADDR, 32);
        assert_eq!(bind_report_offsets::COMM, 48);
    }

    #[test]
    fn source_keys_put_protocol_and_port_before_the_address() {
        assert_eq!(
            src4_key(IPPROTO_TCP, 5432, [10, 1, 2, 3]),
            [IPPROTO_TCP, 0x15, 0x38, 10, 1, 2, 3, 0]
        );
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        v6[15] = 9;
        let key = src6_key(IPPROTO_UDP, 53, &v6);
        assert_eq!(key[..4], [IPPROTO_UDP, 0, 53, 0xfd]);
        assert_eq!(key[18], 9);
        assert_eq!(key[19], 0);
        assert_eq!(src_prefix_len(8), 32);
    }

    #[test]
    fn slots_and_counter_keys_do_not_collide() {
        assert_eq!(port_slot(IPPROTO_TCP, 65535), 65535);
        assert_eq!(port_slot(IPPROTO_UDP, 0), 65536);
        assert_eq!(port_slot(IPPROTO_UDP, 65535), 2 * 65536 - 1);
        assert_eq!(port_slot(IPPROTO_SCTP, 0), 2 * 65536);
        assert_eq!(port_slot(IPPROTO_SCTP, 65535), WHOLE_PROTOCOL_SLOTS - 1);
        // A port-less protocol has one slot, whatever the port.
        assert_eq!(port_slot(112, 0), WHOLE_PROTOCOL_SLOTS + 112);
        assert_eq!(port_slot(112, 9), port_slot(112, 0));
        assert_eq!(port_slot(255, 0), POLICY_PORT_SLOTS - 1);
        assert_eq!(other_slot(IPPROTO_SCTP), SLOT_OTHER_SCTP);
        assert_eq!(other_slot(47), SLOT_OTHER_IP);
        let entry = port_entry(RULE_CIDR, 77);
        assert_eq!((entry & RULE_MASK, entry_slot(entry)), (RULE_CIDR, 77));
        assert_eq!(entry_slot(port_entry(RULE_ANY, 0)), 0);
        const { assert!(MAX_COUNTER_SLOTS <= 1 << 16, "a slot fits the high half") };
    }
}
