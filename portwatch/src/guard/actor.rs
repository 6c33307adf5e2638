//! The guard's state and its only owner: the policy in force, the mode, what
//! the kernel maps hold, the interfaces guarded. Every change — start-up,
//! `allow`, `deny`, `reload`, SIGHUP, an interface coming back — goes
//! through here; [`Guard::install`] is the one place a policy reaches the
//! kernel. A change is validated, written to the policy file (atomically)
//! unless it is a reload, applied to the maps, and announced in the stream.
//! If the file cannot be written, the maps are not touched.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use portwatch_common::GuardStat;

use super::{
    activation,
    binds::{self, BindHooks},
    confirm::{Pending, current_text, restore_text},
    gate::{self, Holder},
    lockout,
};
use crate::{
    control::{
        protocol::{
            ChangeResponse, DiffResponse, ExposureChange, ListenerStatus, OwnedPort, PolicyView,
            StatusResponse, Totals,
        },
        server::ControlRequest,
    },
    datapath::{
        Datapath,
        attach::{Attached, XdpMode},
        decode::{DecodeError, RawBind, RawDrop},
        maps::{GuardMaps, GuardSettings, MapImage},
        pins::PinDir,
        ring::RingReader,
    },
    iface::{
        table::Iface,
        watch::{LinkChange, LinkWatch},
    },
    metrics::{GuardSnapshot, OwnedSeries, PortLabel, VerifySeries},
    model::{
        DropEvent, Event, Listener, Mode, NotOwnerEvent, PolicyEvent, Proto, Requester, SockId,
    },
    pipeline::{Pipeline, exposure::ExposureView},
    policy::{
        Activation, Policy, PortRange, Rule, compile::compile, slots::CounterSlots,
        store::write_atomically,
    },
    procinfo,
};

/// What the guard was started with, for reloads.
#[derive(Clone, Debug)]
pub struct StartArgs {
    pub policy_path: PathBuf,
    /// `--allow` rules, added to the file's on every reload.
    pub allow: Vec<PortRange>,
    /// `--mode`, which wins over the file's on every reload.
    pub mode: Option<Mode>,
}

/// How a `shutdown` request asked the guard to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// The pinned datapath keeps enforcing.
    KeepEnforcing,
    /// Detach and unpin everything (`portwatch down`).
    Detach,
}

/// Who asks for a change, and what the lockout check needs to judge it.
pub struct Change<'a> {
    by: Requester,
    /// Apply it even if it cuts off an SSH session.
    force: bool,
    /// Revert it unless confirmed within so many seconds.
    confirm_within: Option<u64>,
    /// The listeners now, for the SSH daemons' ports.
    pipeline: &'a Pipeline,
}

impl<'a> Change<'a> {
    pub fn new(pipeline: &'a Pipeline, by: Requester, force: bool) -> Self {
        Self {
            by,
            force,
            confirm_within: None,
            pipeline,
        }
    }

    /// Reverts unless confirmed within `secs` seconds.
    pub fn confirm_within(mut self, secs: Option<u64>) -> Self {
        self.confirm_within = secs;
        self
    }
}

/// What the guard waits for besides the listener stream.
pub enum Input {
    Control(Box<ControlRequest>),
    Drops(Vec<Result<RawDrop, DecodeError>>),
    /// Binds of owned ports by others, as the post_bind hooks reported them.
    Binds(Vec<Result<RawBind, DecodeError>>),
    /// An owner's cgroup may have been made or removed (a unit started or
    /// stopped): the bind rules follow at once.
    CgroupsChanged,
    Links(Vec<LinkChange>),
    /// Every few seconds: room in the table of rate-limited sources.
    Housekeeping,
    /// A change was not confirmed in time.
    ConfirmExpired,
    /// Ports gave their counter slots back a while ago: lay them out.
    LayOutCounters,
    /// A policy file read and checked off the loop, to put in force.
    Loaded(Box<super::loading::Loaded>),
    /// The verify under way (automatic or requested) goes on by a chunk.
    VerifyMore,
}

/// A change in force that reverts unless confirmed in time.
pub(super) struct Awaiting {
    record: Pending,
    /// When it reverts.
    pub(super) at: tokio::time::Instant,
    /// What was in force before it.
    policy: Arc<Policy>,
    mode: Mode,
}

/// What a change writes to the policy file.
enum Persist {
    /// Nothing: the file is what is applied (reload).
    No,
    /// The new rules (allow, deny), keeping the file's mode and interfaces.
    Rules,
    /// This text, as it is (apply).
    Text(String),
}

/// How often housekeeping runs, and how many runs make a full sweep of
/// the rate-limited sources when the table never filled.
pub(super) const HOUSEKEEPING: std::time::Duration = std::time::Duration::from_secs(5);
const FULL_SWEEP_EVERY: u64 = 12;

/// How long the first drop report after a quiet spell waits for others
/// before the loop reads them. Under a flood the per-CPU report buckets
/// let through tens a second; read one at a time, each was a wake-up of
/// the daemon and a read of the counters, 20 ns of its CPU per packet
/// dropped (bench/results/veth-*.md). A drop line is at most this late.
pub(super) const DROPS_LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// The least time between two layouts of the counters made because ports
/// gave their slots back (see [`Guard::listeners_changed`]).
pub(super) const LAYOUT_SPACING: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Guard {
    /// Held for attaching interfaces that come back; dropping it detaches
    /// the monitor's hooks (the guard's links are pinned).
    pub(super) datapath: Datapath,
    pub(super) maps: GuardMaps,
    pub(super) drops: RingReader,
    /// Owned ports at bind(); none where the hooks could not attach.
    pub(super) binds: Option<BindHooks>,
    /// Which owners' units are socket-activated, and by whom.
    pub(super) activation: Activation,
    /// Listeners on owned ports that are not their owner, already said.
    squatting: BTreeSet<(PortRange, Option<u32>)>,
    /// The gate was seeded from the snapshot and not yet announced.
    gate_unannounced: bool,
    resolver: activation::Resolver,
    pub(super) policy: Arc<Policy>,
    /// The policy as the kernel has it: rules with an owner only while
    /// the owner listens.
    pub(super) gated: Arc<Policy>,
    /// Owned ports open now, and the owner process that opened each.
    pub(super) gate_open: BTreeMap<PortRange, Holder>,
    pub(super) mode: Mode,
    /// What the maps hold.
    image: MapImage,
    /// Which counter slot counts which ports.
    pub(super) slots: CounterSlots,
    /// Ports listened on in the guard's namespace: each gets a counter slot.
    pub(super) listened: BTreeSet<(Proto, u16)>,
    /// When the counters were last laid out, and whether a port with a
    /// slot of its own lost its last listener since (they are laid out
    /// again [`LAYOUT_SPACING`] after the last time).
    laid_out: Option<tokio::time::Instant>,
    slots_given_back: bool,
    report_rate: u32,
    pub(super) flow_timeout: Duration,
    pub(super) start: StartArgs,
    pins: PinDir,
    /// The interfaces to guard and the XDP mode asked for, to re-attach an
    /// interface that comes back.
    ifaces: Vec<String>,
    xdp_mode: XdpMode,
    pub(super) attached: Vec<Attached>,
    ifnames: HashMap<u32, String>,
    /// Every interface of the guard's namespace, for exposure.
    pub(super) ifaces_now: Arc<Vec<Iface>>,
    pub(super) netns: Option<u64>,
    pub(super) control: Option<tokio::sync::mpsc::Receiver<ControlRequest>>,
    pub(super) links: Option<LinkWatch>,
    pub(super) shutdown: Option<Shutdown>,
    pub(super) housekeeping: Option<tokio::time::Interval>,
    /// Housekeeping runs so far, and the table-full count at the last sweep.
    ticks: u64,
    table_full_seen: u64,
    /// The change in force that awaits confirmation.
    pub(super) awaiting: Option<Awaiting>,
    /// Policy files read off the loop (reloads) come back here.
    loaded_tx: tokio::sync::mpsc::UnboundedSender<super::loading::Loaded>,
    pub(super) loaded_rx: tokio::sync::mpsc::UnboundedReceiver<super::loading::Loaded>,
    /// The last drop reports, for `explain` (at most `RECENT_DROPS`).
    pub(super) recent_drops: std::collections::VecDeque<DropEvent>,
    /// The last verify's result, for `status`, `top` and the metrics.
    pub(super) last_verify: Option<crate::control::protocol::VerifySummary>,
    /// A `learn --for` records connection attempts until then.
    pub(super) recording_until: Option<tokio::time::Instant>,
    /// The kernel's policy changed without a policy change (an owned port
    /// opened or closed, an interface re-attached): verify at the next
    /// housekeeping, so that a burst of them costs one run. What caused it.
    pub(super) verify_due: Option<String>,
    /// The verify under way (automatic or requested), a chunk per turn of
    /// the loop.
    pub(super) verify_run: Option<super::inspect::VerifyRun>,
    /// `verify` requests that came while a requested one was under way:
    /// answered by the run after it, which sees the listeners as they are
    /// then.
    pub(super) verify_next: Vec<tokio::sync::oneshot::Sender<crate::control::server::Reply>>,
}

/// Everything `Guard::new` needs.
pub struct Parts {
    pub datapath: Datapath,
    pub maps: GuardMaps,
    pub drops: RingReader,
    pub binds: Option<BindHooks>,
    pub start: StartArgs,
    pub pins: PinDir,
    pub ifaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub report_rate: u32,
    pub flow_timeout: Duration,
    pub netns: Option<u64>,
    pub control: tokio::sync::mpsc::Receiver<ControlRequest>,
    pub links: Option<LinkWatch>,
}

impl Guard {
    /// The guard before it installs anything: `image` is what the maps
    /// hold now (empty, or what a previous guard left pinned).
    pub fn new(parts: Parts, image: MapImage) -> Self {
        let (loaded_tx, loaded_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            datapath: parts.datapath,
            maps: parts.maps,
            drops: parts.drops,
            binds: parts.binds,
            activation: Activation::default(),
            resolver: activation::Resolver::default(),
            squatting: BTreeSet::new(),
            gate_unannounced: false,
            policy: Arc::new(Policy::default()),
            gated: Arc::new(Policy::default()),
            gate_open: BTreeMap::new(),
            mode: Mode::Enforce,
            image,
            slots: CounterSlots::default(),
            listened: BTreeSet::new(),
            laid_out: None,
            slots_given_back: false,
            report_rate: parts.report_rate,
            flow_timeout: parts.flow_timeout,
            start: parts.start,
            pins: parts.pins,
            ifaces: parts.ifaces,
            xdp_mode: parts.xdp_mode,
            attached: Vec::new(),
            ifnames: HashMap::new(),
            ifaces_now: Arc::new(Vec::new()),
            netns: parts.netns,
            control: Some(parts.control),
            links: parts.links,
            shutdown: None,
            housekeeping: None,
            ticks: 0,
            table_full_seen: 0,
            awaiting: None,
            loaded_tx,
            loaded_rx,
            recent_drops: std::collections::VecDeque::with_capacity(super::inspect::RECENT_DROPS),
            last_verify: None,
            recording_until: None,
            verify_due: None,
            verify_run: None,
            verify_next: Vec::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// What the pipeline rates listeners by, under the policy in force.
    pub fn exposure_view(&self) -> ExposureView {
        let guarded = self.attached.iter().map(|a| a.iface.clone()).collect();
        // Exposure is what reaches the port: an owned port without its
        // owner is closed, whoever else listens there.
        ExposureView::new(
            Arc::clone(&self.gated),
            self.netns,
            Arc::clone(&self.ifaces_now),
            guarded,
        )
    }

    /// Reads the interfaces of the guard's namespace again, and puts
    /// their addresses where the XDP program tells the host's own frames
    /// from forwarded ones.
    pub fn refresh_ifaces(&mut self) {
        match crate::iface::table::dump() {
            Ok(table) => {
                let local = crate::iface::table::local_addresses(&table);
                if let Err(e) = self.maps.set_local_addresses(&local) {
                    log::warn!(
                        "cannot update the host's addresses in the kernel: {e}; frames to a \
                         new address may be taken for forwarded ones"
                    );
                }
                self.ifaces_now = Arc::new(table);
            }
            Err(e) => log::warn!(
                "cannot read the interfaces (rtnetlink): {e}; exposure and the host's \
                 addresses may be stale"
            ),
        }
    }

    /// Sweeps the buckets of rate-limited sources that filled up again out
    /// of the kernel's table: at once when new sources found it full, else
    /// once a minute while rules have limits.
    /// Resolves the owners' units and cgroups again: one that started or
    /// restarted has a cgroup of its own (a new id) whose binds must be let
    /// through, one that stopped leaves its port to nobody.
    pub fn owner_cgroups_changed(&mut self) {
        if self.policy.has_owners()
            && let Some(binds) = &mut self.binds
            && let Err(e) = {
                binds.cgroups().forget_units();
                binds.sync(&self.policy, self.mode, &self.activation)
            }
        {
            log::warn!("updating the owned ports' bind rules failed: {e}");
        }
    }

    pub fn housekeeping(&mut self) {
        self.ticks += 1;
        self.recording_expired();
        // A unit may gain or lose a socket unit: ask systemd again now and
        // then.
        if self.ticks.is_multiple_of(FULL_SWEEP_EVERY) && self.policy.has_owners() {
            self.resolver.forget();
            self.activation = self.resolver.resolve(&self.policy);
        }
        // Also without inotify, a new cgroup is seen within a tick.
        self.owner_cgroups_changed();
        let full = self.maps.stat(GuardStat::RateTableFull);
        let overflowed = full > self.table_full_seen;
        self.table_full_seen = full;
        if !overflowed
            && (self.image.limits.is_empty() || !self.ticks.is_multiple_of(FULL_SWEEP_EVERY))
        {
            return;
        }
        match self.maps.sweep_sources(&self.image.limits) {
            Ok(n) if overflowed => log::warn!(
                "the table of rate-limited sources was full ({} tracked at most): new sources \
                 shared their rule's bucket; {n} idle sources swept out",
                portwatch_common::MAX_RATE_SOURCES
            ),
            Ok(_) => {}
            Err(e) => log::warn!("cannot sweep the table of rate-limited sources: {e}"),
        }
    }

    /// Records the connected UDP sockets of the guard's namespace as flows,
    /// so that replies to flows opened before the guard keep passing.
    pub fn seed_flows(&mut self) {
        let flows = match crate::snapshot::connected(Proto::Udp, None) {
            Ok(flows) => flows,
            Err(e) => {
                log::warn!(
                    "cannot list the connected UDP sockets ({e}): replies to flows opened \
                     before the guard pass only once the host sends again"
                );
                return;
            }
        };
        match self.maps.seed_udp_flows(&flows, crate::sys::monotonic_ns()) {
            Ok(0) => {}
            Ok(n) => log::info!("{n} UDP flows opened before the guard: their replies pass"),
            Err(e) => log::warn!("cannot record the UDP flows opened before the guard: {e}"),
        }
    }

    /// Puts `policy` and `mode` into the kernel: the one place where a
    /// policy reaches the maps. On error the maps are moved back to what
    /// they held, as far as the kernel lets them.
    pub fn install(&mut self, policy: Policy, mode: Mode) -> Result<(), String> {
        let open = self.gate_open.keys().copied().collect();
        let gated = policy.gated(&open);
        let mut image = compile(&gated).map_err(|e| e.to_string())?;
        self.slots.stamp(&mut image, &gated, &self.listened);
        if self.slots.overflow() > 0 {
            log::warn!(
                "{} rules and listened ports have no counter slot of their own (all {} taken): \
                 their packets count under port \"other\"",
                self.slots.overflow(),
                portwatch_common::MAX_COUNTER_SLOTS
            );
        }
        // Bind rules first: if they cannot be written, nothing changed.
        let activation = self.resolver.resolve(&policy);
        if let Some(binds) = &mut self.binds {
            binds
                .sync(&policy, mode, &activation)
                .map_err(|e| format!("updating the owned ports' bind rules failed: {e}"))?;
        }
        // New owners start from zero, before any port points at them.
        let fresh = self.slots.take_fresh();
        self.maps.zero_slots(&fresh).map_err(|e| e.to_string())?;
        let settings = GuardSettings {
            mode,
            report_rate: self.report_rate,
            flow_timeout: self.flow_timeout,
            forwarded: policy.forwarded.unwrap_or_default(),
            limit_v6_prefix: policy
                .limit_ipv6_prefix
                .unwrap_or(crate::policy::limit::DEFAULT_IPV6_PREFIX),
            learn: self.learning(mode),
        };
        if let Err(e) = self.maps.install(&self.image, &image, &settings) {
            let back = GuardSettings {
                mode: self.mode,
                ..settings
            };
            // Best effort: the error above is what the caller hears.
            let _ = self.maps.install(&image, &self.image, &back);
            if let Some(binds) = &mut self.binds {
                let _ = binds.sync(&self.policy, self.mode, &self.activation);
            }
            return Err(format!("updating the kernel maps failed: {e}"));
        }
        self.image = image;
        // Every listened port is laid out now.
        self.laid_out = Some(tokio::time::Instant::now());
        self.slots_given_back = false;
        self.activation = activation;
        self.policy = Arc::new(policy);
        self.gated = Arc::new(gated);
        self.mode = mode;
        Ok(())
    }

    /// Whether listeners gained or lost on `touched` ports can change the
    /// gate: one of them is an owned port in the guard's namespace.
    pub fn gate_concerns(&self, touched: &[crate::pipeline::listeners::PortKey]) -> bool {
        touched.iter().any(|&(proto, port, netns)| {
            netns == self.netns && gate::is_owned(&self.policy, proto, port)
        })
    }

    /// Opens the owned ports whose owner now listens and closes those whose
    /// owner went, after listeners or the policy changed; the stream says
    /// which. On a failed update the gate stays as the kernel has it.
    pub fn regate(&mut self, pipeline: &mut Pipeline) -> std::io::Result<()> {
        if !self.policy.has_owners() && self.gate_open.is_empty() {
            self.squatting.clear();
            return Ok(());
        }
        self.say_squatters(pipeline)?;
        let now = gate::holders(
            &self.policy,
            pipeline.listeners(),
            self.netns,
            &self.activation,
        );
        // Ports opened at start from the snapshot are news the first time.
        let announced = if std::mem::take(&mut self.gate_unannounced) {
            BTreeMap::new()
        } else {
            self.gate_open.clone()
        };
        let events = gate::changes(&self.policy, &announced, &now, SystemTime::now());
        // The same ports open: nothing for the kernel; the holder may
        // have changed (a restart handed the port over), which is kept.
        if now.keys().eq(self.gate_open.keys()) {
            self.gate_open = now;
        } else {
            let before = std::mem::replace(&mut self.gate_open, now);
            let policy = Policy::clone(&self.policy);
            if let Err(e) = self.install(policy, self.mode) {
                log::warn!("opening or closing owned ports failed: {e}");
                self.gate_open = before;
                return Ok(());
            }
            pipeline.set_exposure(self.exposure_view());
            self.verify_due = Some("owned ports opened or closed".into());
        }
        for event in events {
            pipeline.emit(Event::Gate(event))?;
        }
        Ok(())
    }

    /// Works the gate out from the start-up snapshot before the first
    /// install: an owned port whose owner listens is open from the first
    /// moment (a guard adopting a pinned datapath does not close it while
    /// it reports the snapshot). The first `regate` announces it.
    pub fn seed_gate(&mut self, policy: &Policy, listeners: &[Listener]) {
        let activation = self.resolver.resolve(policy);
        self.gate_open = gate::holders(policy, listeners.iter(), self.netns, &activation);
        self.gate_unannounced = true;
    }

    /// Listeners on owned ports whose process is gone while their socket
    /// still listens (handed on by fd passing, or kept by a child after its
    /// parent exited): the process holding the socket now is the one behind
    /// them, and the gate follows who that is. Run on the housekeeping tick:
    /// no event says that a process went while its socket stayed.
    pub fn follow_handed_over(&mut self, pipeline: &mut Pipeline) {
        if !self.policy.has_owners() {
            return;
        }
        let owned: Vec<PortRange> = self
            .policy
            .rules
            .iter()
            .filter(|r| r.owner.is_some())
            .map(|r| r.ports)
            .collect();
        let gone = |pid: Option<u32>| {
            pid.is_none_or(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        };
        let stale: Vec<(Proto, SockId, std::net::IpAddr, u16)> = pipeline
            .listeners()
            .filter(|l| l.netns == self.netns)
            .filter(|l| owned.iter().any(|p| p.contains(l.proto, l.port)))
            .filter(|l| gone(l.process.pid))
            .map(|l| (l.proto, l.sock_id, l.addr, l.port))
            .collect();
        if stale.is_empty() {
            return;
        }
        let sockets = crate::snapshot::own_listening_sockets();
        let holders = procinfo::socket_owners();
        for (proto, sock_id, addr, port) in stale {
            let holder = sockets
                .iter()
                .find(|(p, a, po, _)| *p == proto && *a == addr && *po == port)
                .and_then(|(_, _, _, inode)| holders.get(inode))
                .copied();
            // No holder: the socket is closing, and its close event will say so.
            if let Some(pid) = holder {
                let process = Arc::new(procinfo::process_info(pid));
                pipeline.hand_over(proto, sock_id, process);
            }
        }
    }

    /// Says each listener on an owned port that is not its owner, once.
    fn say_squatters(&mut self, pipeline: &mut Pipeline) -> std::io::Result<()> {
        let now = gate::squatters(
            &self.policy,
            pipeline.listeners(),
            self.netns,
            &self.activation,
        );
        let ts = SystemTime::now();
        for (key, s) in &now {
            if self.squatting.contains(key) {
                continue;
            }
            let owner = self
                .policy
                .rules
                .iter()
                .find(|r| r.ports == key.0)
                .and_then(|r| r.owner.as_ref())
                .map(ToString::to_string)
                .unwrap_or_default();
            pipeline.emit(Event::NotOwner(NotOwnerEvent {
                ts,
                port: key.0.to_string(),
                pid: s.pid,
                comm: s.comm.clone(),
                exe: s.exe.clone(),
                owner,
            }))?;
        }
        self.squatting = now.into_keys().collect();
        Ok(())
    }

    /// Ports first listened on or last closed: a listened port gets a
    /// counter slot of its own, a port no longer listened on gives it back.
    /// The counters are laid out again only when that changes a slot: a
    /// layout is the whole policy's, and a burst of thousands of listeners
    /// (past the last free slot) made one per batch of them, ~5 us per
    /// listener.
    ///
    /// A port that gives its slot back waits up to [`LAYOUT_SPACING`] after
    /// the last layout: the next layout hands freed slots to listened ports
    /// that had none, which in a burst of closes are the next to close, so
    /// without the wait a burst made a layout per batch again.
    pub fn listeners_changed(&mut self, pipeline: &mut Pipeline) {
        let (mut taken, mut given_back) = (false, false);
        for (proto, port, netns) in pipeline.take_changed_ports() {
            if netns != self.netns {
                continue;
            }
            if pipeline.is_listened(proto, port, netns) {
                taken |= self.listened.insert((proto, port)) && self.slots.would_take(proto, port);
            } else {
                given_back |= self.listened.remove(&(proto, port)) && self.slots.owns(proto, port);
            }
        }
        self.slots_given_back |= given_back;
        if taken
            || self.slots_given_back
                && self
                    .layout_due()
                    .is_none_or(|due| due <= tokio::time::Instant::now())
        {
            self.lay_out_counters();
        }
    }

    /// When ports that gave their slots back get the counters laid out.
    pub fn layout_due(&self) -> Option<tokio::time::Instant> {
        self.slots_given_back
            .then(|| self.laid_out.map(|at| at + LAYOUT_SPACING))
            .flatten()
    }

    /// Lays the counters out again for the ports listened on now.
    pub fn lay_out_counters(&mut self) {
        // Also when it fails: the next listener change tries again, rather
        // than a due time in the past waking the loop at once, forever.
        self.slots_given_back = false;
        let policy = Policy::clone(&self.policy);
        if let Err(e) = self.install(policy, self.mode) {
            log::warn!("updating the per-port counters failed: {e}");
        }
    }

    /// Attaches the guard to every interface to guard (or adopts the links
    /// pinned there); returns how each one is guarded.
    pub fn attach_all(&mut self) -> crate::error::Result<&[Attached]> {
        for iface in self.ifaces.clone() {
            let attached = self.attach_one(&iface)?;
            self.ifnames
                .insert(attached.ifindex, attached.iface.clone());
            self.attached.push(attached);
        }
        Ok(&self.attached)
    }

    /// Attaches to `iface` in the mode asked for; `auto` looks at what the
    /// interface is first.
    fn attach_one(&mut self, iface: &str) -> crate::error::Result<Attached> {
        let (mode, why) = match self.xdp_mode {
            XdpMode::Auto => {
                let kind = self
                    .ifaces_now
                    .iter()
                    .find(|i| i.name == iface)
                    .and_then(|i| i.kind.as_deref());
                crate::datapath::attach::auto_mode(kind)
            }
            asked => (asked, None),
        };
        let mut attached = self.datapath.attach_guard(&self.pins, iface, mode)?;
        // An adopted link keeps the mode it was made with: the reason is
        // said only of the mode it was given for.
        if mode.attaches_as() == Some(attached.xdp_mode) {
            attached.why = why;
        } else if let Some(asked) = self.xdp_mode.attaches_as() {
            log::warn!(
                "{iface}: kept the guard's {} link a previous guard pinned, not {} as asked \
                 (`portwatch down`, then start the guard again, to change it)",
                attached.xdp_mode.hook(),
                asked.hook()
            );
        }
        Ok(attached)
    }

    /// Permits `rule` (persisted).
    pub fn allow(
        &mut self,
        rule: Rule,
        how: &Change<'_>,
    ) -> Result<(ChangeResponse, Event), String> {
        let mut policy = Policy::clone(&self.policy);
        let change = format!("allow {rule}");
        policy.add_rule(rule).map_err(|e| e.to_string())?;
        self.commit(policy, self.mode, change, how, Persist::Rules)
    }

    /// Stops permitting `ports` (persisted).
    pub fn deny(
        &mut self,
        ports: PortRange,
        how: &Change<'_>,
    ) -> Result<(ChangeResponse, Event), String> {
        let mut policy = Policy::clone(&self.policy);
        policy.remove_port(ports).map_err(|e| e.to_string())?;
        self.commit(
            policy,
            self.mode,
            format!("deny {ports}"),
            how,
            Persist::Rules,
        )
    }

    /// Reads the policy file again, with the start-up `--allow` and
    /// `--mode` on top.
    pub fn reload(&mut self, how: &Change<'_>) -> Result<(ChangeResponse, Event), String> {
        let policy = super::effective_policy(Some(&self.start.policy_path), &self.start.allow)
            .map_err(|e| format!("{e:#}; the policy in force is unchanged"))?;
        let mode = self.start.mode.or(policy.mode).unwrap_or(self.mode);
        self.reread_if_altered();
        self.commit(policy, mode, "reload".into(), how, Persist::No)
    }

    /// Starts a reload: the file is read and checked off the loop, and
    /// `finish_reload` puts it in force when it comes back.
    pub fn start_reload(
        &self,
        by: Requester,
        force: bool,
        reply: Option<tokio::sync::oneshot::Sender<crate::control::server::Reply>>,
    ) {
        super::loading::spawn(
            self.start.policy_path.clone(),
            self.start.allow.clone(),
            by,
            force,
            reply,
            self.loaded_tx.clone(),
        );
    }

    /// Puts a policy read off the loop in force, as `reload` would; if a
    /// change wrote the file since it was read, it is read again here.
    pub fn finish_reload(
        &mut self,
        text: Option<String>,
        policy: Result<Policy, String>,
        how: &Change<'_>,
    ) -> Result<(ChangeResponse, Event), String> {
        let policy = policy?;
        if current_text(&self.start.policy_path).ok() != Some(text) {
            return self.reload(how);
        }
        let mode = self.start.mode.or(policy.mode).unwrap_or(self.mode);
        self.reread_if_altered();
        self.commit(policy, mode, "reload".into(), how, Persist::No)
    }

    /// When the last verify found the maps not as written (altered behind
    /// the guard's back), a reload diffs against what they hold, not
    /// against what was written, so that it rewrites every entry that
    /// differs.
    fn reread_if_altered(&mut self) {
        if self.last_verify.as_ref().is_some_and(|v| !v.ok) {
            match self.maps.read_image() {
                Ok(image) => self.image = image,
                Err(e) => log::warn!("reload: reading the policy maps back failed: {e}"),
            }
        }
    }

    /// Makes `text` (which parsed as `policy`) the policy file and applies
    /// it as a reload would.
    pub fn apply(
        &mut self,
        text: String,
        policy: Policy,
        how: &Change<'_>,
    ) -> Result<(ChangeResponse, Event), String> {
        let (policy, mode) = self.as_loaded(policy)?;
        self.commit(policy, mode, "apply".into(), how, Persist::Text(text))
    }

    /// `policy` as the guard would run it: the start-up `--allow` rules
    /// added, `--mode` (else the file's, else the mode now) winning.
    fn as_loaded(&self, policy: Policy) -> Result<(Policy, Mode), String> {
        let policy = super::with_start_rules(policy, &self.start.allow)
            .map_err(|e| format!("{e:#}; the policy in force is unchanged"))?;
        let mode = self.start.mode.or(policy.mode).unwrap_or(self.mode);
        Ok((policy, mode))
    }

    /// Keeps the change that awaits confirmation.
    pub fn confirm(&mut self, by: Requester) -> Result<(ChangeResponse, Event), String> {
        let Some(awaiting) = &self.awaiting else {
            return Err("nothing awaits confirmation".into());
        };
        let change = format!("confirm {}", awaiting.record.change);
        Pending::clear(&self.start.policy_path).map_err(|e| {
            format!("cannot remove the record of the pending change ({e}); it is still pending")
        })?;
        self.awaiting = None;
        Ok(self.announce(change, by))
    }

    /// Undoes the change that awaits confirmation (time is up, or the
    /// guard stops): the file as it was, the policy that was in force.
    pub fn revert_unconfirmed(&mut self, why: &str) -> Option<Event> {
        let awaiting = self.awaiting.take()?;
        let path = self.start.policy_path.clone();
        if let Err(e) = awaiting.record.restore_file(&path) {
            log::error!(
                "cannot restore the policy file {} as it was before {:?}: {e}",
                path.display(),
                awaiting.record.change
            );
        }
        if let Err(e) = Pending::clear(&path) {
            log::error!("cannot remove the record of the pending change: {e}");
        }
        if let Err(e) = self.install(Policy::clone(&awaiting.policy), awaiting.mode) {
            log::error!("reverting {:?} failed: {e}", awaiting.record.change);
        }
        log::warn!(
            "{:?} was not confirmed {why}: reverted to the policy before it",
            awaiting.record.change
        );
        Some(
            self.announce(
                format!("revert {} (not confirmed)", awaiting.record.change),
                Requester::default(),
            )
            .1,
        )
    }

    /// What applying `policy` (as `apply` would) changes; nothing is applied.
    pub fn diff(
        &self,
        policy: Policy,
        pipeline: &Pipeline,
        by: Requester,
    ) -> Result<DiffResponse, String> {
        let (next, mode) = self.as_loaded(policy)?;
        compile(&next).map_err(|e| e.to_string())?;
        let names =
            |p: &Policy| -> BTreeSet<String> { p.rules.iter().map(ToString::to_string).collect() };
        let (now, then) = (names(&self.policy), names(&next));
        let mut settings = Vec::new();
        let mut setting = |name: &str, from: String, to: String| {
            if from != to {
                settings.push(format!("{name} {from} -> {to}"));
            }
        };
        setting("mode", self.mode.to_string(), mode.to_string());
        setting(
            "forwarded",
            self.policy.forwarded.unwrap_or_default().as_str().into(),
            next.forwarded.unwrap_or_default().as_str().into(),
        );
        let prefix = |p: &Policy| {
            format!(
                "/{}",
                p.limit_ipv6_prefix
                    .unwrap_or(crate::policy::limit::DEFAULT_IPV6_PREFIX)
            )
        };
        setting("limit_ipv6_prefix", prefix(&self.policy), prefix(&next));
        if self.policy.interfaces != next.interfaces {
            settings.push(format!(
                "interfaces [{}] -> [{}] (takes effect when the guard starts again)",
                self.policy.interfaces.join(", "),
                next.interfaces.join(", ")
            ));
        }
        let ssh = self
            .lockouts(&next, mode, by, pipeline)
            .iter()
            .map(ToString::to_string)
            .collect();
        let view = ExposureView::new(
            Arc::new(next),
            self.netns,
            Arc::clone(&self.ifaces_now),
            self.attached.iter().map(|a| a.iface.clone()).collect(),
        );
        let mut exposure: Vec<ExposureChange> = pipeline
            .listeners()
            .filter(|l| l.netns == self.netns)
            .filter_map(|l| {
                let from = pipeline.reach_of(l).map(|r| r.exposure);
                let to = view.of(l, None).map(|r| r.exposure);
                (from != to).then(|| ExposureChange {
                    proto: l.proto,
                    addr: l.addr,
                    port: l.port,
                    pid: l.process.pid,
                    comm: l.process.comm.clone(),
                    from,
                    to,
                })
            })
            .collect();
        exposure.sort_by(|a, b| {
            (a.proto, a.port, a.addr.to_string()).cmp(&(b.proto, b.port, b.addr.to_string()))
        });
        Ok(DiffResponse {
            added: then.difference(&now).cloned().collect(),
            removed: now.difference(&then).cloned().collect(),
            settings,
            exposure,
            ssh,
        })
    }

    /// The lockout check of start-up, for a change at run time: what the
    /// new policy would cut off that the one in force does not, judged
    /// against the requester's SSH session (found through its process
    /// tree) and every established session of an SSH daemon here.
    fn check_lockout(&self, next: &Policy, mode: Mode, how: &Change<'_>) -> Result<(), String> {
        if how.force {
            return Ok(());
        }
        let cut = self.lockouts(next, mode, how.by, how.pipeline);
        if cut.is_empty() {
            return Ok(());
        }
        let each: Vec<String> = cut.iter().map(ToString::to_string).collect();
        Err(format!(
            "refusing the change: {}; nothing changed (pass --force to apply it anyway)",
            each.join("; ")
        ))
    }

    /// The SSH sessions `next` in `mode` would cut off that the policy in
    /// force does not: the requester's (found through its process tree)
    /// and every established session of an SSH daemon here.
    fn lockouts(
        &self,
        next: &Policy,
        mode: Mode,
        by: Requester,
        pipeline: &Pipeline,
    ) -> Vec<lockout::Lockout> {
        if mode == Mode::Audit {
            return Vec::new();
        }
        let ssh = by.pid.and_then(procinfo::ssh_connection_of);
        let listeners: Vec<&Listener> = pipeline
            .listeners()
            .filter(|l| l.netns == self.netns)
            .collect();
        let current = (self.mode == Mode::Enforce).then_some(&*self.policy);
        lockout::new_problems(
            current,
            next,
            listeners.iter().copied(),
            ssh.as_deref(),
            &lockout::established_tcp(listeners.iter().copied(), ssh.as_deref()),
        )
    }

    /// Persists as `persist` says, installs, and describes the change;
    /// with `confirm_within`, it reverts unless confirmed in time.
    fn commit(
        &mut self,
        policy: Policy,
        mode: Mode,
        change: String,
        how: &Change<'_>,
        persist: Persist,
    ) -> Result<(ChangeResponse, Event), String> {
        if let Some(awaiting) = &self.awaiting {
            return Err(format!(
                "{:?} awaits confirmation (it reverts in {} s): `portwatch confirm` keeps it; \
                 nothing changed",
                awaiting.record.change,
                awaiting.record.remaining().as_secs()
            ));
        }
        // Checked before anything is written.
        compile(&policy).map_err(|e| e.to_string())?;
        self.check_lockout(&policy, mode, how)?;
        let path = self.start.policy_path.clone();
        let unwritten = |e: std::io::Error| {
            format!(
                "cannot write the policy file {}: {e}; nothing changed (neither the file nor \
                 the kernel maps)",
                path.display()
            )
        };
        // What the file said, to put back should this fail or be reverted.
        let before = current_text(&path).map_err(|e| {
            format!(
                "cannot read the policy file {}: {e}; nothing changed",
                path.display()
            )
        })?;
        let record = how.confirm_within.map(|within| {
            Pending::new(before.clone(), Duration::from_secs(within), change.clone())
        });
        // The record first: a guard that dies after writing the file still
        // finds it at its next start.
        if let Some(record) = &record {
            record
                .save(&path)
                .map_err(|e| format!("{:#}; nothing changed", anyhow::Error::new(e)))?;
        }
        let written = match persist {
            Persist::No => Ok(()),
            Persist::Rules => {
                // Keep the file's mode and interfaces: only the rules change here.
                let mut on_disk = policy.clone();
                on_disk.mode = self.policy.mode;
                on_disk.interfaces = self.policy.interfaces.clone();
                write_atomically(&path, &on_disk.to_toml())
            }
            Persist::Text(ref text) => write_atomically(&path, text),
        };
        let restore = |path: &std::path::Path| {
            let _ = Pending::clear(path);
            if !matches!(persist, Persist::No) {
                let _ = restore_text(path, before.as_deref());
            }
        };
        if let Err(e) = written {
            restore(&path);
            return Err(unwritten(e));
        }
        let (previous, previous_mode) = (Arc::clone(&self.policy), self.mode);
        if let Err(e) = self.install(policy, mode) {
            // The file goes back too, so that it says what is in force.
            restore(&path);
            return Err(format!("{e}; the previous policy stays in force"));
        }
        let mut change = change;
        if let Some(record) = record {
            let within = record.remaining();
            change = format!(
                "{change} (reverts in {} s unless confirmed: portwatch confirm)",
                within.as_secs()
            );
            self.awaiting = Some(Awaiting {
                record,
                at: tokio::time::Instant::now() + within,
                policy: previous,
                mode: previous_mode,
            });
        }
        Ok(self.announce(change, how.by))
    }

    /// The answer and the stream's event for a change now in force.
    fn announce(&self, change: String, by: Requester) -> (ChangeResponse, Event) {
        let event = Event::Policy(PolicyEvent {
            ts: SystemTime::now(),
            change: change.clone(),
            by,
            mode: self.mode,
            rules: self.policy.rules.len(),
        });
        let answer = ChangeResponse {
            change,
            policy: Some(self.policy_view()),
        };
        (answer, event)
    }

    pub fn policy_view(&self) -> PolicyView {
        PolicyView::of(&self.policy, self.mode, &self.start.policy_path)
    }

    /// Mode, interfaces, counters, and every listener of the guard's
    /// namespace with its exposure and its port's counters.
    pub fn status(&self, pipeline: &Pipeline) -> StatusResponse {
        let counters = self
            .maps
            .slot_counters(self.slots.owners().map(|(_, slot)| slot));
        let t = self.maps.totals();
        let owned_rules: Vec<(PortRange, &crate::policy::Owner)> = self
            .policy
            .rules
            .iter()
            .filter_map(|r| r.owner.as_ref().map(|o| (r.ports, o)))
            .collect();
        let mut listeners: Vec<ListenerStatus> = pipeline
            .listeners()
            .filter(|l| l.netns == self.netns)
            .map(|l| {
                let is_owner = owned_rules
                    .iter()
                    .find(|(ports, _)| ports.contains(l.proto, l.port))
                    .map(|(_, owner)| owner.holds(&l.process, &self.activation));
                let c = counters
                    .get(&self.slots.slot_of(l.proto, l.port))
                    .copied()
                    .unwrap_or_default();
                let p = &l.process;
                let reach = pipeline.reach_of(l);
                ListenerStatus {
                    proto: l.proto,
                    family: l.family(),
                    addr: l.addr,
                    port: l.port,
                    pid: p.pid,
                    comm: p.comm.clone(),
                    uid: p.uid,
                    exe: p.exe.clone(),
                    cmdline: p.cmdline.clone(),
                    netns: l.netns,
                    exposure: reach.as_ref().map(|r| r.exposure),
                    exposed_via: reach.map(|r| r.unguarded).unwrap_or_default(),
                    is_owner,
                    pass_packets: c.pass_packets,
                    pass_bytes: c.pass_bytes,
                    drop_packets: c.drop_packets,
                    drop_bytes: c.drop_bytes,
                }
            })
            .collect();
        // Numeric address order (IPv4 before IPv6): no string per comparison.
        listeners.sort_by_key(|l| (l.proto, l.port, l.addr));
        let owned = self.owned_ports(pipeline);
        StatusResponse {
            verify: self.last_verify.clone(),
            verifying: self
                .verify_run
                .as_ref()
                .map(super::inspect::VerifyRun::progress),
            mode: Some(self.mode),
            policy_file: Some(self.start.policy_path.display().to_string()),
            pinned: Some(self.pins.root.display().to_string()),
            interfaces: self.attached.clone(),
            totals: Totals {
                passed: t.get(GuardStat::Passed),
                drop_no_rule: t.get(GuardStat::DropNoRule),
                drop_source: t.get(GuardStat::DropSource),
                drop_malformed: t.get(GuardStat::DropMalformed),
                drop_fragment: t.get(GuardStat::DropFragment),
                drop_rate_limited: t.get(GuardStat::DropRateLimited),
                rate_table_full: t.get(GuardStat::RateTableFull),
                reports_suppressed: t.get(GuardStat::ReportsSuppressed),
                reports_lost: t.get(GuardStat::ReportsLost),
                flow_replies: t.get(GuardStat::FlowReplies),
                forwarded: t.get(GuardStat::Forwarded),
                events_lost: pipeline.summary().lost,
                binds_refused: t.get(GuardStat::BindsDenied),
                binds_audited: t.get(GuardStat::BindsAudited),
                follower_events_missed: pipeline.followers_missed(),
                other: Default::default(),
            },
            owned,
            listeners,
            listeners_follow: None,
        }
    }

    /// The ports whose rule names an owner: open or not, who holds each,
    /// and how many other listeners sit on it.
    pub fn owned_ports(&self, pipeline: &Pipeline) -> Vec<OwnedPort> {
        let mut owned: Vec<OwnedPort> = self
            .policy
            .rules
            .iter()
            .filter_map(|r| {
                let owner = r.owner.as_ref()?;
                let holder = self.gate_open.get(&r.ports);
                Some(OwnedPort {
                    port: r.ports,
                    owner: owner.to_string(),
                    open: holder.is_some(),
                    pid: holder.and_then(|h| h.pid),
                    comm: holder.and_then(|h| h.comm.clone()),
                    squatters: 0,
                })
            })
            .collect();
        if owned.is_empty() {
            return owned;
        }
        for l in pipeline.listeners().filter(|l| l.netns == self.netns) {
            let Some(o) = owned.iter_mut().find(|o| o.port.contains(l.proto, l.port)) else {
                continue;
            };
            let is_owner = self
                .policy
                .rules
                .iter()
                .find(|r| r.ports == o.port)
                .and_then(|r| r.owner.as_ref())
                .is_some_and(|owner| owner.holds(&l.process, &self.activation));
            if !is_owner {
                o.squatters += 1;
            }
        }
        owned
    }

    /// The guard's part of a metrics scrape: a series per counter slot
    /// (each rule, each listened port without a rule, and per protocol the
    /// `other` ports).
    pub fn metrics(&self, pipeline: &Pipeline) -> GuardSnapshot {
        let counters = self
            .maps
            .slot_counters(self.slots.owners().map(|(_, slot)| slot));
        let ports: BTreeMap<PortLabel, _> = self
            .slots
            .owners()
            .map(|(owner, slot)| {
                let label = PortLabel {
                    proto: owner.proto_label(),
                    port: owner.port_label(),
                };
                (label, counters.get(&slot).copied().unwrap_or_default())
            })
            .collect();
        GuardSnapshot {
            mode: self.mode,
            interfaces: self
                .attached
                .iter()
                .map(|a| (a.iface.clone(), a.xdp_mode))
                .collect(),
            ports,
            totals: self.maps.totals(),
            owned: self
                .owned_ports(pipeline)
                .into_iter()
                .map(|o| OwnedSeries {
                    proto: o.port.proto.to_string(),
                    port: o.port.lo.to_string(),
                    open: o.open,
                    squatters: o.squatters as u64,
                })
                .collect(),
            // A walk of the table (a syscall per source): only when a rule
            // has a limit.
            limited_sources: if self.image.limits.is_empty() {
                0
            } else {
                self.maps.source_buckets() as u64
            },
            verify: self.last_verify.as_ref().map(|v| VerifySeries {
                ok: v.ok,
                disagreements: v.disagreements.len() as u64,
                at: v.at,
            }),
        }
    }

    /// Refused (or audited) binds of owned ports, as events for the stream.
    pub fn bind_events(
        &self,
        pipeline: &mut Pipeline,
        batch: Vec<Result<RawBind, DecodeError>>,
    ) -> std::io::Result<()> {
        for record in batch {
            match record {
                Ok(raw) => {
                    let ts = pipeline.wall(raw.ts_ns);
                    let cgroups = self.binds.as_ref().map(BindHooks::cgroups);
                    let event = binds::event(&self.policy, raw, ts, cgroups);
                    pipeline.emit(Event::Bind(event))?;
                }
                Err(e) => pipeline.malformed(&e),
            }
        }
        Ok(())
    }

    /// Drop reports, as events for the stream.
    pub fn drop_events(
        &mut self,
        pipeline: &mut Pipeline,
        batch: Vec<Result<RawDrop, DecodeError>>,
    ) -> std::io::Result<()> {
        for record in batch {
            match record {
                Ok(raw) => {
                    let drop = DropEvent {
                        ts: pipeline.wall(raw.ts_ns),
                        iface: self.ifnames.get(&raw.ifindex).cloned(),
                        reason: raw.reason,
                        proto: raw.proto,
                        src: raw.src,
                        dst: raw.dst,
                        src_port: raw.src_port,
                        dst_port: raw.dst_port,
                        audit: raw.audit,
                    };
                    self.remember_drop(&drop);
                    pipeline.emit(Event::Drop(drop))?;
                }
                Err(e) => pipeline.malformed(&e),
            }
        }
        pipeline.report_suppressed(self.maps.stat(GuardStat::ReportsSuppressed))
    }

    /// Follows a guarded interface going away (its program went with it)
    /// and coming back (attach again, at once). Returns the event to
    /// announce, if any.
    pub fn on_link_change(&mut self, change: LinkChange) -> Option<Event> {
        let (name, index, up) = match &change {
            LinkChange::Up { name, index } => (name.clone(), *index, true),
            LinkChange::Gone { name, index } => (name.clone(), *index, false),
        };
        if !self.ifaces.contains(&name) {
            return None;
        }
        let attached_here = self
            .attached
            .iter()
            .any(|a| a.iface == name && a.ifindex == index);
        if up && attached_here {
            return None; // a flag change of an interface already guarded
        }
        let was_attached = self.attached.iter().any(|a| a.iface == name);
        if was_attached {
            // Gone, or back under a new index: the old links are defunct.
            self.pins.detach(&name);
            self.attached.retain(|a| a.iface != name);
            self.ifnames.retain(|_, n| *n != name);
            if !up {
                log::warn!("{name} was removed: the guard is off there until it comes back");
                return Some(Event::Interface {
                    ts: SystemTime::now(),
                    iface: name,
                    change: "removed".into(),
                    xdp_mode: None,
                });
            }
        }
        if !up {
            return None;
        }
        Some(match self.attach_one(&name) {
            Ok(attached) => {
                log::info!(
                    "{name} is back: guard re-attached ({})",
                    attached.xdp_mode.hook()
                );
                self.ifnames
                    .insert(attached.ifindex, attached.iface.clone());
                let xdp_mode = attached.xdp_mode;
                self.attached.push(attached);
                self.verify_due = Some(format!("{name} re-attached"));
                Event::Interface {
                    ts: SystemTime::now(),
                    iface: name,
                    change: "attached".into(),
                    xdp_mode: Some(xdp_mode),
                }
            }
            Err(e) => {
                log::error!("{name} is back but attaching the guard failed: {e}");
                Event::Interface {
                    ts: SystemTime::now(),
                    iface: name,
                    change: format!("attach failed: {e}"),
                    xdp_mode: None,
                }
            }
        })
    }
}
