//! Typed wrappers over the kernel maps: nothing else touches raw aya maps,
//! and only this module writes them (its writers are `pub(crate)`, used by
//! the guard's actor alone, and by the test helpers behind `test-helpers`).

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use portwatch_common::{MonitorStat, map};

use crate::error::{Error, Result};

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(Error::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// A ring buffer by name.
pub(crate) fn ring(ebpf: &mut Ebpf, name: &'static str) -> Result<RingBuf<MapData>> {
    take(ebpf, name)
}

/// Kernel-side counters of the monitor, summed over CPUs.
pub struct MonitorStats {
    map: PerCpuArray<MapData, u64>,
}

impl MonitorStats {
    pub fn open(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            map: take(ebpf, map::MONITOR_STATS)?,
        })
    }

    pub fn get(&self, stat: MonitorStat) -> u64 {
        self.map
            .get(&(stat as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// The guard's maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use aya::maps::HashMap as BpfHashMap;
use aya::maps::{
    Array, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
#[cfg(feature = "test-helpers")]
use portwatch_common::{FLOW_PORT_ENTRIES, Frag4Key, FragKey, FragVerdict};
use portwatch_common::{
    FLOW_PORTS_PER_ENTRY, Flow4Key, FlowKey, GUARD_AUDIT, GUARD_FORWARD_JUDGE, GUARD_LEARN,
    GUARD_STATS_LEN, GuardConfig, GuardStat, IPPROTO_UDP, LOCAL_INLINE_V4, LOCAL_INLINE_V6,
    LearnKey, LearnStats, LocalKey, LocalList, MAX_COUNTER_SLOTS, PortCounters, RateKey, RateLimit,
    RateState, ReportBucket, SRC4_KEY_LEN, SRC6_KEY_LEN, flow_port_byte, port_slot,
};

use super::probe::KernelClock;
use crate::model::{Forwarded, Mode};

/// The first addresses of each family inline, and whether there are more.
fn local_list(addrs: &BTreeSet<std::net::IpAddr>) -> LocalList {
    let mut list = LocalList::default();
    for addr in addrs {
        match addr {
            std::net::IpAddr::V4(a) => match list.v4.get_mut(list.n4 as usize) {
                Some(slot) => {
                    *slot = u32::from_ne_bytes(a.octets());
                    list.n4 += 1;
                }
                None => list.more4 = 1,
            },
            std::net::IpAddr::V6(a) => match list.v6.get_mut(list.n6 as usize) {
                Some(slot) => {
                    let o = a.octets();
                    let half = |h: &[u8]| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(h);
                        u64::from_ne_bytes(b)
                    };
                    *slot = [half(&o[..8]), half(&o[8..])];
                    list.n6 += 1;
                }
                None => list.more6 = 1,
            },
        }
    }
    debug_assert!(list.n4 as usize <= LOCAL_INLINE_V4 && list.n6 as usize <= LOCAL_INLINE_V6);
    list
}

/// The `LOCAL_ADDRS` key of an address.
fn local_key(addr: &std::net::IpAddr) -> LocalKey {
    let (family, addr) = super::decode::kernel_addr(addr);
    LocalKey {
        family,
        _pad: 0,
        _pad2: 0,
        addr,
    }
}

/// The flow-table key of the host's flow from `local` to `remote` (ports 0
/// for a protocol without ports).
fn flow_key(proto: u8, local: SocketAddr, remote: SocketAddr) -> FlowKey {
    let (family, local_addr) = super::decode::kernel_addr(&local.ip());
    let (_, remote_addr) = super::decode::kernel_addr(&remote.ip());
    FlowKey {
        family,
        proto,
        _pad: 0,
        local_port: local.port(),
        remote_port: remote.port(),
        local: local_addr,
        remote: remote_addr,
    }
}

/// The host's flows: `FLOWS4` holds the IPv4 ones under a 16-byte key,
/// `FLOWS` the IPv6 ones (see `Flow4Key`).
struct FlowTable {
    v4: BpfHashMap<MapData, Flow4Key, u64>,
    v6: BpfHashMap<MapData, FlowKey, u64>,
}

impl FlowTable {
    fn insert(&mut self, key: FlowKey, monotonic_ns: u64) -> Result<()> {
        match key.compact() {
            Some(v4) => self
                .v4
                .insert(v4, monotonic_ns, 0)
                .map_err(map_err(map::FLOWS4)),
            None => self
                .v6
                .insert(key, monotonic_ns, 0)
                .map_err(map_err(map::FLOWS)),
        }
    }

    fn get(&self, key: &FlowKey) -> Option<u64> {
        match key.compact() {
            Some(v4) => self.v4.get(&v4, 0).ok(),
            None => self.v6.get(key, 0).ok(),
        }
    }

    #[cfg(feature = "test-helpers")]
    fn clear(&mut self) {
        empty(&mut self.v4);
        empty(&mut self.v6);
    }
}

/// Removes every entry of `table` (tests that start from empty state).
#[cfg(feature = "test-helpers")]
fn empty<K: aya::Pod, V: aya::Pod>(table: &mut BpfHashMap<MapData, K, V>) {
    let keys: Vec<K> = table.keys().filter_map(|k| k.ok()).collect();
    for key in keys {
        let _ = table.remove(&key);
    }
}

/// Everything the policy puts into the kernel, as plain values: what
/// `install` writes, and what a diff compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapImage {
    /// `port_slot` -> `RULE_*` bits (absent = 0, no rule).
    pub ports: BTreeMap<u32, u32>,
    pub src4: BTreeSet<(u32, [u8; SRC4_KEY_LEN])>,
    pub src6: BTreeSet<(u32, [u8; SRC6_KEY_LEN])>,
    /// Counter slot (a limited rule's) -> its per-source bucket.
    pub limits: BTreeMap<u32, RateLimit>,
}

/// Guard-wide counters summed over CPUs, indexed like `GuardStat`, as
/// user space puts them together (`GuardMaps::totals`): `Passed` includes
/// the flow replies and `ReportsSuppressed` comes from the report bucket,
/// unlike the kernel's slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardTotals(pub [u64; GUARD_STATS_LEN as usize]);

impl GuardTotals {
    pub fn get(&self, stat: GuardStat) -> u64 {
        self.0[stat as usize]
    }
}

/// The guard's runtime settings, as `GUARD_CONFIG` holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardSettings {
    pub mode: Mode,
    /// Drop reports per second per CPU; twice as many may come at once.
    pub report_rate: u32,
    /// How long an outbound UDP flow admits replies after its last packet.
    pub flow_timeout: Duration,
    /// Frames the host routes or bridges elsewhere.
    pub forwarded: Forwarded,
    /// IPv6 sources of limited rules share a bucket per this prefix.
    pub limit_v6_prefix: u8,
    /// Record connection attempts per port and source in `LEARN`.
    pub learn: bool,
}

impl GuardSettings {
    /// The one place the mode becomes the kernel's flags.
    pub fn config(&self) -> GuardConfig {
        GuardConfig {
            flags: (if self.mode == Mode::Audit {
                GUARD_AUDIT
            } else {
                0
            }) | (if self.forwarded == Forwarded::Judge {
                GUARD_FORWARD_JUDGE
            } else {
                0
            }) | (if self.learn { GUARD_LEARN } else { 0 }),
            report_rate: self.report_rate,
            report_burst: self.report_rate.max(1).saturating_mul(2),
            limit_v6_prefix: u32::from(self.limit_v6_prefix),
            flow_timeout_ns: u64::try_from(self.flow_timeout.as_nanos()).unwrap_or(u64::MAX),
            // The maps add the kernel's clock (`GuardMaps::set_config`).
            tick_ns: 0,
            clock_offset_ns: 0,
        }
    }
}

pub struct GuardMaps {
    config: Array<MapData, GuardConfig>,
    ports: Array<MapData, u32>,
    src4: LpmTrie<MapData, [u8; SRC4_KEY_LEN], u8>,
    src6: LpmTrie<MapData, [u8; SRC6_KEY_LEN], u8>,
    /// Seeded at start with the host's connected UDP sockets; written
    /// otherwise by tc egress (and by tests).
    flows: FlowTable,
    /// Which local ports have flows (see `FLOW_PORTS_PER_ENTRY`).
    flow_ports: Array<MapData, [u8; FLOW_PORTS_PER_ENTRY as usize]>,
    /// Written only by tests (crafted fragment state).
    #[cfg(feature = "test-helpers")]
    frags: BpfHashMap<MapData, FragKey, FragVerdict>,
    #[cfg(feature = "test-helpers")]
    frags4: BpfHashMap<MapData, Frag4Key, FragVerdict>,
    counters: PerCpuArray<MapData, PortCounters>,
    stats: PerCpuArray<MapData, u64>,
    /// The drop reports' rate limit, which also counts the reports it
    /// held back (`ReportsSuppressed`).
    reports: PerCpuArray<MapData, ReportBucket>,
    local: BpfHashMap<MapData, LocalKey, u8>,
    local_list: Array<MapData, LocalList>,
    limits: Array<MapData, RateLimit>,
    rate: BpfHashMap<MapData, RateKey, RateState>,
    overflow: Array<MapData, RateState>,
    learn: BpfHashMap<MapData, LearnKey, LearnStats>,
    /// jiffies against the monotonic clock, for the config; None: the
    /// programs read the coarse clock.
    clock: Option<KernelClock>,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

impl GuardMaps {
    pub(crate) fn open(ebpf: &mut Ebpf) -> Result<Self> {
        // The per-packet clock: worth a helper call a packet, so measured
        // here once; without it the programs still work, a little slower.
        let clock = match super::probe::twin(ebpf).and_then(|xdp| super::probe::clock(xdp)) {
            Ok(Some(clock)) => {
                log::debug!(
                    "kernel tick: {} ns (HZ {}); the guard's clock is jiffies",
                    clock.tick_ns,
                    1_000_000_000 / clock.tick_ns.max(1)
                );
                Some(clock)
            }
            Ok(None) => {
                log::warn!(
                    "could not time the kernel's ticks: the guard reads the coarse clock per \
                     packet instead (about 14 ns more for a UDP reply or a rate limit)"
                );
                None
            }
            Err(e) => {
                log::warn!(
                    "could not time the kernel's ticks ({e}): the guard reads the coarse clock per packet instead"
                );
                None
            }
        };
        Ok(Self {
            clock,
            config: take(ebpf, map::GUARD_CONFIG)?,
            ports: take(ebpf, map::POLICY_PORTS)?,
            src4: take(ebpf, map::POLICY_SRC4)?,
            src6: take(ebpf, map::POLICY_SRC6)?,
            flows: FlowTable {
                v4: take(ebpf, map::FLOWS4)?,
                v6: take(ebpf, map::FLOWS)?,
            },
            flow_ports: take(ebpf, map::FLOW_PORTS)?,
            #[cfg(feature = "test-helpers")]
            frags: take(ebpf, map::FRAGS)?,
            #[cfg(feature = "test-helpers")]
            frags4: take(ebpf, map::FRAGS4)?,
            counters: take(ebpf, map::COUNTERS)?,
            stats: take(ebpf, map::GUARD_STATS)?,
            reports: take(ebpf, map::REPORT_BUCKET)?,
            local: take(ebpf, map::LOCAL_ADDRS)?,
            local_list: take(ebpf, map::LOCAL_LIST)?,
            limits: take(ebpf, map::LIMITS)?,
            rate: take(ebpf, map::RATE_STATE)?,
            overflow: take(ebpf, map::RATE_OVERFLOW)?,
            learn: take(ebpf, map::LEARN)?,
        })
    }

    /// Turns the recording of connection attempts on or off, leaving the
    /// rest of the configuration as it is.
    pub(crate) fn set_learning(&mut self, on: bool) -> Result<()> {
        let mut config = self.config.get(&0, 0).map_err(map_err(map::GUARD_CONFIG))?;
        if on {
            config.flags |= GUARD_LEARN;
        } else {
            config.flags &= !GUARD_LEARN;
        }
        self.set_config(config)
    }

    /// What `LEARN` holds: (protocol, port, source) and what was seen.
    pub fn learned(&self) -> Vec<(LearnKey, LearnStats)> {
        self.learn.iter().filter_map(|entry| entry.ok()).collect()
    }

    /// Forgets everything learned (`portwatch learn --forget`, tests).
    pub(crate) fn forget_learned(&mut self) -> Result<usize> {
        let keys: Vec<LearnKey> = self.learn.keys().filter_map(|k| k.ok()).collect();
        for key in &keys {
            let _ = self.learn.remove(key);
        }
        Ok(keys.len())
    }

    /// The kernel's clock as the programs read it from jiffies; None when
    /// it could not be timed (they read the coarse clock).
    pub fn clock(&self) -> Option<KernelClock> {
        self.clock
    }

    fn set_config(&mut self, mut config: GuardConfig) -> Result<()> {
        if let Some(clock) = self.clock {
            config.tick_ns = clock.tick_ns;
            config.clock_offset_ns = clock.offset_ns;
        }
        self.config
            .set(0, config, 0)
            .map_err(map_err(map::GUARD_CONFIG))
    }

    /// Moves the guard from `old` (what the maps hold) to `new` under
    /// `settings`, so that nothing both permit is dropped in between: into
    /// audit mode the flag goes first (nothing drops while ports change),
    /// into enforce mode last (everything permitted is in place before
    /// anything drops). The only path by which a policy reaches the kernel.
    pub(crate) fn install(
        &mut self,
        old: &MapImage,
        new: &MapImage,
        settings: &GuardSettings,
    ) -> Result<()> {
        let config = settings.config();
        if settings.mode == Mode::Audit {
            self.set_config(config)?;
            self.apply(old, new)
        } else {
            self.apply(old, new)?;
            self.set_config(config)
        }
    }

    /// Moves the maps from `old` to `new` so that no packet the two have in
    /// common to permit is ever dropped in between: sources are added before
    /// a port starts to rely on them, ports are opened before anything is
    /// closed, and sources go last.
    fn apply(&mut self, old: &MapImage, new: &MapImage) -> Result<()> {
        // Limits before the ports that point at them; a slot whose limit
        // changed or went forgets its sources' buckets.
        for (slot, limit) in &new.limits {
            if old.limits.get(slot) != Some(limit) {
                self.limits
                    .set(*slot, *limit, 0)
                    .map_err(map_err(map::LIMITS))?;
            }
        }
        let changed: BTreeSet<u32> = old
            .limits
            .iter()
            .filter(|(slot, limit)| new.limits.get(slot) != Some(limit))
            .map(|(slot, _)| *slot)
            .collect();
        for (prefix, data) in new.src4.difference(&old.src4) {
            self.src4
                .insert(&Key::new(*prefix, *data), 1, 0)
                .map_err(map_err(map::POLICY_SRC4))?;
        }
        for (prefix, data) in new.src6.difference(&old.src6) {
            self.src6
                .insert(&Key::new(*prefix, *data), 1, 0)
                .map_err(map_err(map::POLICY_SRC6))?;
        }
        for (slot, bits) in &new.ports {
            if old.ports.get(slot) != Some(bits) {
                self.ports
                    .set(*slot, *bits, 0)
                    .map_err(map_err(map::POLICY_PORTS))?;
            }
        }
        for slot in old.ports.keys().filter(|s| !new.ports.contains_key(s)) {
            self.ports
                .set(*slot, 0, 0)
                .map_err(map_err(map::POLICY_PORTS))?;
        }
        for (prefix, data) in old.src4.difference(&new.src4) {
            self.src4
                .remove(&Key::new(*prefix, *data))
                .map_err(map_err(map::POLICY_SRC4))?;
        }
        for (prefix, data) in old.src6.difference(&new.src6) {
            self.src6
                .remove(&Key::new(*prefix, *data))
                .map_err(map_err(map::POLICY_SRC6))?;
        }
        for slot in changed.iter().filter(|s| !new.limits.contains_key(s)) {
            self.limits
                .set(*slot, RateLimit::default(), 0)
                .map_err(map_err(map::LIMITS))?;
        }
        if !changed.is_empty() {
            self.forget_sources(|key, _| changed.contains(&u32::from(key.slot)))?;
            for slot in &changed {
                self.overflow
                    .set(*slot, RateState::default(), 0)
                    .map_err(map_err(map::RATE_OVERFLOW))?;
            }
        }
        Ok(())
    }

    /// Removes the source buckets `gone` picks. Returns how many went.
    fn forget_sources(&mut self, gone: impl Fn(&RateKey, &RateState) -> bool) -> Result<usize> {
        let doomed: Vec<RateKey> = self
            .rate
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, state)| gone(key, state))
            .map(|(key, _)| key)
            .collect();
        for key in &doomed {
            // Gone already (the program does not delete): nothing to do.
            let _ = self.rate.remove(key);
        }
        Ok(doomed.len())
    }

    /// Removes the buckets that have filled up again (a source idle for
    /// its rule's whole burst is one the program would start afresh) and
    /// those of slots without a limit: room for new sources when the
    /// table filled. Returns how many went.
    pub(crate) fn sweep_sources(&mut self, limits: &BTreeMap<u32, RateLimit>) -> Result<usize> {
        let now = crate::sys::monotonic_ns();
        self.forget_sources(|key, state| match limits.get(&u32::from(key.slot)) {
            None => true,
            Some(limit) => {
                let refill = limit.cap_ns.saturating_sub(state.tokens_ns);
                now.saturating_sub(state.last_ns) >= refill
            }
        })
    }

    /// Source buckets held now (tests, status).
    pub fn source_buckets(&self) -> usize {
        self.rate.keys().filter(|k| k.is_ok()).count()
    }

    /// What the maps hold now (for a diff against a policy, e.g. when
    /// adopting a datapath another process set up).
    pub fn read_image(&self) -> Result<MapImage> {
        let mut image = MapImage::default();
        for (slot, bits) in self.ports.iter().enumerate() {
            let bits = bits.map_err(map_err(map::POLICY_PORTS))?;
            if bits != 0 {
                image.ports.insert(slot as u32, bits);
            }
        }
        for key in self.src4.keys() {
            let key = key.map_err(map_err(map::POLICY_SRC4))?;
            image.src4.insert((key.prefix_len(), key.data()));
        }
        for key in self.src6.keys() {
            let key = key.map_err(map_err(map::POLICY_SRC6))?;
            image.src6.insert((key.prefix_len(), key.data()));
        }
        for slot in 0..MAX_COUNTER_SLOTS {
            let limit = self.limits.get(&slot, 0).map_err(map_err(map::LIMITS))?;
            if limit != RateLimit::default() {
                image.limits.insert(slot, limit);
            }
        }
        Ok(image)
    }

    /// Makes `LOCAL_ADDRS` hold `addrs`: new ones first, gone ones last,
    /// so an address kept throughout is never missing. Whatever the map
    /// held before (a previous guard's pins) is read back and diffed.
    pub(crate) fn set_local_addresses(&mut self, addrs: &BTreeSet<std::net::IpAddr>) -> Result<()> {
        let want: BTreeSet<LocalKey> = addrs.iter().map(local_key).collect();
        let have: BTreeSet<LocalKey> = self.local.keys().filter_map(|k| k.ok()).collect();
        for key in want.difference(&have) {
            self.local
                .insert(key, 1, 0)
                .map_err(map_err(map::LOCAL_ADDRS))?;
        }
        // The inline list after the table has the new ones and before it
        // loses the old ones: either way every address is found somewhere.
        self.local_list
            .set(0, local_list(addrs), 0)
            .map_err(map_err(map::LOCAL_LIST))?;
        for key in have.difference(&want) {
            self.local.remove(key).map_err(map_err(map::LOCAL_ADDRS))?;
        }
        Ok(())
    }

    /// Records the host's connected UDP sockets as flows last used at
    /// `monotonic_ns`, as tc egress would have had they sent through the
    /// guard: replies to flows that predate it keep passing. Returns how
    /// many were recorded.
    pub(crate) fn seed_udp_flows(
        &mut self,
        flows: &[crate::snapshot::Connected],
        monotonic_ns: u64,
    ) -> Result<usize> {
        for flow in flows {
            self.flows
                .insert(flow_key(IPPROTO_UDP, flow.local, flow.remote), monotonic_ns)?;
        }
        self.mark_flow_ports(flows.iter().map(|f| port_slot(IPPROTO_UDP, f.local.port())))?;
        Ok(flows.len())
    }

    /// Marks the local ports of flows recorded from user space in
    /// `FLOW_PORTS`, as tc egress marks its own: after the flows, so that a
    /// reply that sees the mark finds its flow. A user-space write replaces
    /// a whole entry; tc egress marking another port of it in between loses
    /// that mark until that port's next outbound packet marks it again.
    fn mark_flow_ports(&mut self, slots: impl Iterator<Item = u32>) -> Result<()> {
        let mut by_entry: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for slot in slots {
            let (entry, byte) = flow_port_byte(slot);
            by_entry.entry(entry).or_default().push(byte);
        }
        for (entry, bytes) in by_entry {
            let mut marks = self
                .flow_ports
                .get(&entry, 0)
                .map_err(map_err(map::FLOW_PORTS))?;
            if bytes.iter().all(|&b| marks[b] != 0) {
                continue;
            }
            for b in bytes {
                marks[b] = 1;
            }
            self.flow_ports
                .set(entry, marks, 0)
                .map_err(map_err(map::FLOW_PORTS))?;
        }
        Ok(())
    }

    /// Forgets every rate-limited source's bucket, and the overflow
    /// buckets of `slots` (tests that want each case to start from empty
    /// state).
    #[cfg(feature = "test-helpers")]
    pub fn clear_rate_state(&mut self, slots: impl Iterator<Item = u32>) -> Result<()> {
        self.forget_sources(|_, _| true)?;
        for slot in slots {
            self.overflow
                .set(slot, RateState::default(), 0)
                .map_err(map_err(map::RATE_OVERFLOW))?;
        }
        Ok(())
    }

    /// When the host last sent from `local` to `remote` (CLOCK_MONOTONIC
    /// ns), if the tc program recorded the flow.
    pub fn flow_last_sent(&self, proto: u8, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
        self.flows.get(&flow_key(proto, local, remote))
    }

    /// Records an outbound flow as the tc program would (tests, benches).
    #[cfg(feature = "test-helpers")]
    pub fn record_flow(&mut self, key: FlowKey, monotonic_ns: u64) -> Result<()> {
        self.flows.insert(key, monotonic_ns)?;
        self.mark_flow_ports(std::iter::once(port_slot(key.proto, key.local_port)))
    }

    /// Forgets every recorded flow and first fragment (tests that want each
    /// case to start from empty state).
    #[cfg(feature = "test-helpers")]
    pub fn clear_flows_and_fragments(&mut self) -> Result<()> {
        self.flows.clear();
        empty(&mut self.frags);
        empty(&mut self.frags4);
        for entry in 0..FLOW_PORT_ENTRIES {
            self.flow_ports
                .set(entry, [0; FLOW_PORTS_PER_ENTRY as usize], 0)
                .map_err(map_err(map::FLOW_PORTS))?;
        }
        Ok(())
    }

    /// Sets counter slots to zero on every CPU: a slot handed to a new
    /// owner must not start with its previous owner's counts.
    pub(crate) fn zero_slots(&mut self, slots: &[u32]) -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| Error::Io {
            what: "reading the number of possible CPUs".into(),
            source,
        })?;
        for slot in slots {
            let zero =
                PerCpuValues::try_from(vec![PortCounters::default(); cpus]).map_err(|source| {
                    Error::Io {
                        what: "sizing the per-CPU counters".into(),
                        source,
                    }
                })?;
            self.counters
                .set(*slot, zero, 0)
                .map_err(map_err(map::COUNTERS))?;
        }
        Ok(())
    }

    /// Packets and bytes of each slot, summed over CPUs.
    pub fn slot_counters(&self, slots: impl Iterator<Item = u32>) -> BTreeMap<u32, PortCounters> {
        let mut out = BTreeMap::new();
        for slot in slots {
            let Ok(per_cpu) = self.counters.get(&slot, 0) else {
                continue;
            };
            let total = per_cpu.iter().fold(PortCounters::default(), |mut acc, c| {
                acc.pass_packets += c.pass_packets;
                acc.pass_bytes += c.pass_bytes;
                acc.drop_packets += c.drop_packets;
                acc.drop_bytes += c.drop_bytes;
                acc
            });
            out.insert(slot, total);
        }
        out
    }

    pub fn totals(&self) -> GuardTotals {
        let mut totals = GuardTotals::default();
        for (i, slot) in totals.0.iter_mut().enumerate() {
            *slot = self.total_at(i as u32);
        }
        totals
    }

    /// One guard-wide counter, summed over CPUs: one or two map reads
    /// where `totals` makes `GUARD_STATS_LEN` (a drop report asks for one
    /// on every wake-up of a flood).
    pub fn stat(&self, stat: GuardStat) -> u64 {
        self.total_at(stat as u32)
    }

    /// The counter at `index` as user space tells it. The programs count a
    /// packet once: a reply to an own flow only as that, a held-back report
    /// only in the report bucket; the totals are put together here.
    fn total_at(&self, index: u32) -> u64 {
        const PASSED: u32 = GuardStat::Passed as u32;
        const SUPPRESSED: u32 = GuardStat::ReportsSuppressed as u32;
        match index {
            PASSED => self.stat_at(PASSED) + self.stat_at(GuardStat::FlowReplies as u32),
            SUPPRESSED => self.suppressed(),
            index => self.stat_at(index),
        }
    }

    fn suppressed(&self) -> u64 {
        self.reports
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().map(|b| b.suppressed).sum())
            .unwrap_or(0)
    }

    fn stat_at(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------
// Owned ports at bind time.

use portwatch_common::{OwnerKey, OwnerRule};

/// `OWNERS`: who may bind each owned port, and `OWNER_COUNT`, how many
/// there are. Written by the guard alone.
pub struct OwnerMap {
    map: BpfHashMap<MapData, OwnerKey, OwnerRule>,
    count: Array<MapData, u32>,
}

impl OwnerMap {
    pub(crate) fn open(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            map: take(ebpf, map::OWNERS)?,
            count: take(ebpf, map::OWNER_COUNT)?,
        })
    }

    /// What the map holds (what a previous guard left pinned).
    pub(crate) fn entries(&self) -> BTreeMap<OwnerKey, OwnerRule> {
        self.map.iter().flatten().collect()
    }

    /// Moves the map from `old` (what it holds) to `new`: entries that
    /// stay are replaced in place (an update is atomic per key, so a bind
    /// never sees a port unowned in between), the rest added or removed.
    pub(crate) fn apply(
        &mut self,
        old: &BTreeMap<OwnerKey, OwnerRule>,
        new: &BTreeMap<OwnerKey, OwnerRule>,
    ) -> Result<()> {
        for (key, rule) in new {
            if old.get(key) != Some(rule) {
                self.map
                    .insert(key, rule, 0)
                    .map_err(map_err(map::OWNERS))?;
            }
        }
        for key in old.keys().filter(|k| !new.contains_key(k)) {
            self.map.remove(key).map_err(map_err(map::OWNERS))?;
        }
        // Last: a bind looks the map up only while the count says so.
        let n = u32::try_from(new.len()).unwrap_or(u32::MAX);
        self.count.set(0, n, 0).map_err(map_err(map::OWNER_COUNT))
    }
}

// ---------------------------------------------------------------------------
// The monitor's table of bound UDP sockets.

use portwatch_common::UdpBind;

/// `UDP_SOCKS`: bound UDP sockets by cookie, which the release hook reads
/// to report a close. The bind hook fills it; user space adds the sockets
/// bound before the hooks were attached.
pub struct UdpBinds {
    map: BpfHashMap<MapData, u64, UdpBind>,
}

/// bpf_map_update_elem's "only if absent".
const BPF_NOEXIST: u64 = 1;

impl UdpBinds {
    pub(crate) fn open(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            map: take(ebpf, map::UDP_SOCKS)?,
        })
    }

    /// Adds a socket bound to `addr`:`port`, unless the table has it (the
    /// bind hook's entry stays). Whether it was added.
    pub(crate) fn adopt(&mut self, cookie: u64, addr: std::net::IpAddr, port: u16) -> Result<bool> {
        let (family, addr) = super::decode::kernel_addr(&addr);
        let bind = UdpBind {
            addr,
            port,
            family: u16::from(family),
            _pad: 0,
        };
        match self.map.insert(cookie, bind, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(map_err(map::UDP_SOCKS)(e)),
        }
    }

    /// Removes a socket's entry. Whether it was there: if not, the release
    /// hook took it (and reported the close).
    pub(crate) fn forget(&mut self, cookie: u64) -> Result<bool> {
        match self.map.remove(&cookie) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(map_err(map::UDP_SOCKS)(e)),
        }
    }
}

/// The errno of a failed map syscall.
fn errno(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}
