//! Maps shared by the kernel programs.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use portwatch_common::{
    EVENTS_RING_BYTES, MAX_UDP_SOCKETS, MONITOR_STATS_LEN, MonitorStat, UdpBind,
};

/// Listener events for user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Per-CPU counters indexed by `MonitorStat`.
#[map]
pub static MONITOR_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MONITOR_STATS_LEN, 0);

/// Bound UDP sockets by socket cookie.
#[map]
pub static UDP_SOCKS: HashMap<u64, UdpBind> = HashMap::with_max_entries(MAX_UDP_SOCKETS, 0);

#[inline(always)]
pub fn count(stat: MonitorStat) {
    if let Some(slot) = MONITOR_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the slot is this CPU's own copy and programs do not preempt
        // each other on one CPU, so a plain add cannot race.
        unsafe { *slot += 1 };
    }
}

// ---------------------------------------------------------------------------
// The guard's maps. User space writes the policy ones; the programs only read.

use aya_ebpf::maps::{Array, LpmTrie, LruHashMap};
use portwatch_common::{BINDS_RING_BYTES, MAX_OWNED_PORTS, OwnerKey, OwnerRule};
use portwatch_common::{
    DROPS_RING_BYTES, FLOW_PORT_ENTRIES, FLOW_PORTS_PER_ENTRY, Flow4Key, FlowKey, Frag4Key,
    FragKey, FragVerdict, GUARD_STATS_ENTRIES, GuardConfig, GuardStat, LocalKey, LocalList,
    MAX_COUNTER_SLOTS, MAX_FLOWS, MAX_FRAGS, MAX_LOCAL_ADDRS, MAX_RATE_SOURCES, MAX_SRC_RULES,
    POLICY_PORT_SLOTS, PortCounters, RateKey, RateLimit, RateState, ReportBucket, SRC4_KEY_LEN,
    SRC6_KEY_LEN,
};

/// Who sent what to which port, while the guard learns (`GUARD_LEARN`):
/// bounded, the least recently seen (port, source) forgotten first.
#[map]
pub static LEARN: LruHashMap<portwatch_common::LearnKey, portwatch_common::LearnStats> =
    LruHashMap::with_max_entries(portwatch_common::MAX_LEARNED, 0);

/// BPF_F_NO_PREALLOC: LPM tries must be created with it.
const NO_PREALLOC: u32 = 1;

#[map]
pub static GUARD_CONFIG: Array<GuardConfig> = Array::with_max_entries(1, 0);

/// `port_entry(RULE_* bits, counter slot)` per (protocol, port), indexed
/// by `port_slot`.
#[map]
pub static POLICY_PORTS: Array<u32> = Array::with_max_entries(POLICY_PORT_SLOTS, 0);

/// Permitted sources of CIDR-restricted ports.
#[map]
pub static POLICY_SRC4: LpmTrie<[u8; SRC4_KEY_LEN], u8> =
    LpmTrie::with_max_entries(MAX_SRC_RULES, NO_PREALLOC);
#[map]
pub static POLICY_SRC6: LpmTrie<[u8; SRC6_KEY_LEN], u8> =
    LpmTrie::with_max_entries(MAX_SRC_RULES, NO_PREALLOC);

/// The addresses of the guard's namespace, as user space follows them
/// (rtnetlink): what "addressed to the host" means.
#[map]
pub static LOCAL_ADDRS: HashMap<LocalKey, u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// The first of those addresses, inline (see `LocalList`).
#[map]
pub static LOCAL_LIST: Array<LocalList> = Array::with_max_entries(1, 0);

/// Per-source limits of rules, by the rule's counter slot.
#[map]
pub static LIMITS: Array<RateLimit> = Array::with_max_entries(MAX_COUNTER_SLOTS, 0);

/// The buckets of the sources of limited rules (see `RateKey`).
#[map]
pub static RATE_STATE: HashMap<RateKey, RateState> = HashMap::with_max_entries(MAX_RATE_SOURCES, 0);

/// Per limited rule (by counter slot): the bucket that new sources share
/// while `RATE_STATE` is full.
#[map]
pub static RATE_OVERFLOW: Array<RateState> = Array::with_max_entries(MAX_COUNTER_SLOTS, 0);

/// The host's outbound IPv6 flows -> last outbound packet (monotonic ns).
#[map]
pub static FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// The same for IPv4, with a 16-byte key.
#[map]
pub static FLOWS4: LruHashMap<Flow4Key, u64> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// Local ports with recorded flows, a byte per `port_slot` (see
/// `FLOW_PORTS_PER_ENTRY`).
#[map]
pub static FLOW_PORTS: Array<[u8; FLOW_PORTS_PER_ENTRY as usize]> =
    Array::with_max_entries(FLOW_PORT_ENTRIES, 0);

/// First-fragment verdicts for the later fragments of the same IPv6
/// datagram.
#[map]
pub static FRAGS: LruHashMap<FragKey, FragVerdict> = LruHashMap::with_max_entries(MAX_FRAGS, 0);

/// The same for IPv4, with a 16-byte key.
#[map]
pub static FRAGS4: LruHashMap<Frag4Key, FragVerdict> = LruHashMap::with_max_entries(MAX_FRAGS, 0);

/// Packets and bytes per counter slot (a rule, a listened port, or a
/// protocol's `other`); `POLICY_PORTS` says a port's slot.
#[map]
pub static COUNTERS: PerCpuArray<PortCounters> =
    PerCpuArray::with_max_entries(MAX_COUNTER_SLOTS, 0);

#[map]
pub static GUARD_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GUARD_STATS_ENTRIES, 0);

/// Where tc's header walk loads bytes that lie past an skb's linear part
/// (`bpf_skb_load_bytes` needs memory to write to): here rather than on
/// the stack, which the verifier caps at 512 bytes for the whole call
/// chain, and where each inlined read would take a slot of its own.
#[map]
pub static SKB_SCRATCH: PerCpuArray<[u64; 8]> = PerCpuArray::with_max_entries(1, 0);

/// Rate limit state of drop reports.
#[map]
pub static REPORT_BUCKET: PerCpuArray<ReportBucket> = PerCpuArray::with_max_entries(1, 0);

/// Dropped-packet reports for user space.
#[map]
pub static DROPS: RingBuf = RingBuf::with_byte_size(DROPS_RING_BYTES, 0);

/// How many ports are owned (entries in `OWNERS`): 0 spares every bind
/// the lookup.
#[map]
pub static OWNER_COUNT: Array<u32> = Array::with_max_entries(1, 0);

/// Owned ports and who may bind them (post_bind's policy).
#[map]
pub static OWNERS: HashMap<OwnerKey, OwnerRule> = HashMap::with_max_entries(MAX_OWNED_PORTS, 0);

/// Binds of owned ports by others, for user space.
#[map]
pub static BINDS: RingBuf = RingBuf::with_byte_size(BINDS_RING_BYTES, 0);

#[inline(always)]
pub fn guard_count(stat: GuardStat) {
    if let Some(slot) = GUARD_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's own slot; programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}
