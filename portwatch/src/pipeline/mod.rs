//! The event pipeline shared by `watch` and `guard`: kernel records are
//! decoded ([`crate::datapath::decode`]), enriched off the event loop
//! ([`enrich`]), matched against the listeners known ([`listeners`]),
//! given their exposure under the guard's policy ([`exposure`]), and fanned
//! out to the output sink and every follower ([`subscribers`]). The start-up
//! snapshot produces the same events as the live hooks.
//!
//! The pipeline owns no kernel object and no guard state: the event loop
//! ([`crate::runloop`]) feeds it, and the guard hands it a new exposure view
//! after each policy change.

pub mod enrich;
pub mod exposure;
pub mod listeners;
pub mod rescan;
pub mod subscribers;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::Arc,
    time::SystemTime,
};

/// How soon a follower that fell behind is looked at again when nothing
/// else wakes the loop.
const CATCH_UP_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

use anyhow::Context as _;

use self::{
    enrich::Enriched,
    exposure::ExposureView,
    listeners::Listeners,
    rescan::Rescan,
    subscribers::{Subscriber, Subscribers, Taken},
};
use crate::{
    datapath::maps::UdpBinds,
    iface::table::Iface,
    metrics::Tally,
    model::{Event, EventKind, Exposure, Listener, ListenerEvent, Origin, Proto, Reach, SockId},
    sinks::{Format, Sink, Summary, json::JsonSink},
    snapshot,
    sys::{Clock, monotonic_ns},
};

/// What listens at start, and the interfaces of the other namespaces it
/// listens in.
pub struct Snapshot {
    pub listeners: Vec<Listener>,
    pub netns_ifaces: HashMap<u64, Arc<Vec<Iface>>>,
}

/// Which listeners the user asked to see.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub proto: Option<Proto>,
}

impl Filter {
    pub fn matches(&self, l: &Listener) -> bool {
        (self.ports.is_empty() || self.ports.contains(&l.port))
            && self.proto.is_none_or(|p| p == l.proto)
    }
}

pub struct Pipeline {
    sink: Box<dyn Sink>,
    filter: Filter,
    listeners: Listeners,
    clock: Clock,
    summary: Summary,
    /// Monotonic time the snapshot finished; earlier live listens may repeat it.
    snapshot_ns: u64,
    /// The guard's policy, for exposure; None under `watch`.
    exposure: Option<ExposureView>,
    /// Other network namespaces' interfaces, by namespace inode: the ways
    /// into their listeners.
    netns_ifaces: HashMap<u64, Arc<Vec<Iface>>>,
    subscribers: Subscribers,
    /// Counts for the metrics.
    tally: Tally,
    /// Re-reading the listeners after the kernel lost records.
    rescan: Rescan,
    /// Renders an event's JSON line once when more than one output takes
    /// JSON (the guard's own `--json` stream and its JSON followers).
    json: JsonSink<Vec<u8>>,
}

impl Pipeline {
    pub fn new(sink: Box<dyn Sink>, filter: Filter) -> Self {
        Self {
            sink,
            filter,
            listeners: Listeners::default(),
            clock: Clock::new(),
            summary: Summary::default(),
            snapshot_ns: 0,
            exposure: None,
            netns_ifaces: HashMap::new(),
            subscribers: Subscribers::default(),
            json: JsonSink::new(Vec::new()),
            tally: Tally::default(),
            rescan: Rescan::default(),
        }
    }

    /// From now on, listeners get their exposure under this view.
    pub fn set_exposure(&mut self, view: ExposureView) {
        self.exposure = Some(view);
    }

    pub fn exposure(&self) -> Option<&ExposureView> {
        self.exposure.as_ref()
    }

    /// The interfaces of another network namespace (from the snapshot, or
    /// looked up when one of its listeners showed).
    pub fn set_netns_ifaces(&mut self, netns: u64, ifaces: Arc<Vec<Iface>>) {
        self.netns_ifaces.insert(netns, ifaces);
    }

    /// Who can reach `listener`, under the guard's view; None under
    /// `watch`, or for a namespace whose interfaces are not known.
    pub fn reach_of(&self, listener: &Listener) -> Option<Reach> {
        let view = self.exposure.as_ref()?;
        let theirs = listener
            .netns
            .and_then(|ns| self.netns_ifaces.get(&ns))
            .map(|t| t.as_slice());
        view.of(listener, theirs)
    }

    /// Wall-clock time of a kernel timestamp (CLOCK_MONOTONIC ns).
    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.clock.wall(monotonic_ns)
    }

    /// The listeners open now.
    pub fn listeners(&self) -> impl Iterator<Item = &Listener> {
        self.listeners.iter()
    }

    /// Whether anything listens on `proto/port` in `netns`.
    /// The process now behind a listener whose socket was handed on (its
    /// first process is gone); false when no such listener is open.
    pub fn hand_over(
        &mut self,
        proto: Proto,
        sock_id: crate::model::SockId,
        process: Arc<crate::model::ProcessInfo>,
    ) -> bool {
        self.listeners.set_process(proto, sock_id, process)
    }

    /// Counts listeners per port from now on, for [`Self::is_listened`] and
    /// [`Self::take_changed_ports`] (the guard's owned ports; `watch` has
    /// no use for them).
    pub fn track_ports(&mut self) {
        self.listeners.track_ports();
    }

    /// Whether anything listens on the port; false unless ports are
    /// tracked.
    pub fn is_listened(&self, proto: Proto, port: u16, netns: Option<u64>) -> bool {
        self.listeners.is_listened(&(proto, port, netns))
    }

    /// Ports first listened on or last closed since the last call.
    pub fn take_changed_ports(&mut self) -> Vec<listeners::PortKey> {
        self.listeners.take_changed()
    }

    /// Ports that gained or lost any listener since the last call.
    pub fn take_touched_ports(&mut self) -> Vec<listeners::PortKey> {
        self.listeners.take_touched()
    }

    pub fn tally(&self) -> Tally {
        Tally {
            follower_events_missed: self.subscribers.missed(),
            ..self.tally
        }
    }

    pub fn summary(&self) -> Summary {
        self.summary
    }

    /// Sends one event to the sink and every follower.
    pub fn emit(&mut self, mut event: Event) -> io::Result<()> {
        match &mut event {
            Event::Listener(ev) => {
                if !self.filter.matches(&ev.listener) {
                    return Ok(());
                }
                if self.exposure.is_some() {
                    ev.reach = self.reach_of(&ev.listener);
                }
                self.summary.events += 1;
                self.summary.inferred += u64::from(ev.origin == Origin::Inferred);
                self.tally.count_listener(ev);
            }
            Event::Drop(_) => self.summary.drops += 1,
            Event::Policy(_) => self.tally.policy_changes += 1,
            _ => {}
        }
        let json_outputs = usize::from(self.sink.writes_json()) + self.subscribers.json_followers();
        if json_outputs < 2 {
            self.subscribers.send(&event, None);
            return self.sink.event(&event);
        }
        self.json.out_mut().clear();
        self.json.event(&event)?;
        let line = self.json.out_mut().as_slice();
        self.subscribers.send(&event, Some(line));
        self.sink.event_as_json(&event, line)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.subscribers.flush();
        self.catch_up_followers();
        self.sink.flush()
    }

    /// Whether a follower's writer has lines to take: the loop then lets
    /// the writers run before its next turn.
    pub fn followers_waiting(&self) -> bool {
        self.subscribers.any_queued()
    }

    /// When the sink wants `tick` called; None: never.
    pub fn next_tick(&self) -> Option<SystemTime> {
        let now = SystemTime::now();
        let earliest = |a: Option<SystemTime>, b: SystemTime| Some(a.map_or(b, |a| a.min(b)));
        let mut tick = self.sink.next_tick();
        if self.subscribers.any_behind() {
            // A follower behind is looked at again soon, even in a lull.
            tick = earliest(tick, now + CATCH_UP_EVERY);
        }
        if let Some(due) = self.rescan.due() {
            let wait = due.saturating_sub(monotonic_ns());
            tick = earliest(tick, now + std::time::Duration::from_nanos(wait));
        }
        tick
    }

    pub fn tick(&mut self, now: SystemTime) -> io::Result<()> {
        self.catch_up_followers();
        self.sink.tick(now)
    }

    /// Followers that fell behind and have room again get their `missed`
    /// line and the listeners now.
    pub fn catch_up_followers(&mut self) {
        // Not on every turn of the loop while one is behind: the fresh
        // start holds every listener, and building it each time made a
        // burst quadratic.
        if self.subscribers.any_can_catch_up() {
            let now = SystemTime::now();
            let fresh = self.fresh_start(now);
            self.subscribers.catch_up(now, &fresh);
        }
    }

    /// Events followers of the stream missed since start.
    pub fn followers_missed(&self) -> u64 {
        self.subscribers.missed()
    }

    /// What a follower starts from: the listeners now, then `ready`.
    fn fresh_start(&self, now: SystemTime) -> Vec<Event> {
        let mut events: Vec<Event> = self
            .listeners
            .iter()
            .map(|l| {
                Event::Listener(ListenerEvent {
                    ts: now,
                    kind: EventKind::Listen,
                    origin: Origin::Snapshot,
                    listener: l.clone(),
                    reach: self.reach_of(l),
                })
            })
            .collect();
        let snapshot = events.len();
        events.push(Event::Ready { ts: now, snapshot });
        events
    }

    /// The listeners that exist now (sock_diag, every namespace), not yet
    /// reported, with the interfaces of the other namespaces they are in;
    /// taken on a blocking thread.
    pub async fn collect_snapshot() -> anyhow::Result<Snapshot> {
        tokio::task::spawn_blocking(|| {
            let listeners = snapshot::snapshot()?;
            let own = crate::procinfo::netns_of(std::process::id());
            let mut netns_ifaces = HashMap::new();
            for l in &listeners {
                let (Some(ns), Some(pid)) = (l.netns, l.process.pid) else {
                    continue;
                };
                if Some(ns) == own || netns_ifaces.contains_key(&ns) {
                    continue;
                }
                let file = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
                match crate::iface::table::dump_in(&file, ns) {
                    Ok(ifaces) => {
                        netns_ifaces.insert(ns, Arc::new(ifaces));
                    }
                    Err(e) => log::debug!("cannot read the interfaces of netns {ns}: {e}"),
                }
            }
            Ok::<_, snapshot::SnapshotError>(Snapshot {
                listeners,
                netns_ifaces,
            })
        })
        .await
        .context("the snapshot task failed")?
        .context("taking a snapshot of listeners (sock_diag)")
    }

    /// Reports listeners found by `collect_snapshot`.
    pub fn emit_snapshot(&mut self, found: Snapshot) -> io::Result<()> {
        self.rescan.enable();
        self.netns_ifaces.extend(found.netns_ifaces);
        let found = found.listeners;
        self.snapshot_ns = monotonic_ns();
        let ts = SystemTime::now();
        for listener in found {
            self.listeners.insert_snapshot(listener.clone());
            self.emit(Event::Listener(ListenerEvent {
                ts,
                kind: EventKind::Listen,
                origin: Origin::Snapshot,
                listener,
                reach: None,
            }))?;
        }
        Ok(())
    }

    /// Hands the UDP sockets the snapshot found to the release hook's
    /// table (`binds`), which knows only the binds it saw: without this a
    /// UDP listener open before the hooks were attached was never reported
    /// closed. Only sockets a process holds: the kernel's own (a VXLAN or
    /// WireGuard port) never pass through the hook. One that closed before
    /// it was handed over would then stay listed for good: a second look
    /// (sock_diag) finds those, in the namespaces it could read, and their
    /// closes are said now; the kernel's records of them still in the ring
    /// are then stale. Returns how many were handed over; an error after
    /// some were still checks those.
    pub async fn adopt_udp_binds(&mut self, binds: &mut UdpBinds) -> anyhow::Result<usize> {
        let found: Vec<(u64, std::net::IpAddr, u16, Option<u64>)> = self
            .listeners
            .iter()
            .filter(|l| l.process.pid.is_some())
            .filter_map(|l| match (l.proto, l.sock_id) {
                (Proto::Udp, SockId::Cookie(c)) => Some((c, l.addr, l.port, l.netns)),
                _ => None,
            })
            .collect();
        let mut adopted = Vec::new();
        let mut failed = None;
        for (cookie, addr, port, netns) in found {
            match binds.adopt(cookie, addr, port) {
                Ok(true) => adopted.push((cookie, netns)),
                Ok(false) => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if !adopted.is_empty() {
            let open = tokio::task::spawn_blocking(snapshot::udp_cookies)
                .await
                .context("the UDP socket dump task failed")?
                .context("listing the UDP sockets open now (sock_diag)")?;
            let ts = SystemTime::now();
            let closed = adopted.iter().filter(|(cookie, netns)| {
                open.namespaces.contains(netns) && !open.cookies.contains(&(*netns, *cookie))
            });
            for &(cookie, _) in closed {
                // Still in the table: the hook saw it go before it was
                // there, so say it here.
                if binds.forget(cookie)?
                    && let Some(listener) = self.listeners.closed_unseen(cookie)
                {
                    self.emit(Event::Listener(ListenerEvent {
                        ts,
                        kind: EventKind::Close,
                        origin: Origin::Inferred,
                        listener,
                        reach: None,
                    }))?;
                }
            }
        }
        match failed {
            Some(e) => Err(anyhow::Error::new(e).context(format!(
                "adding the UDP sockets found at start to the kernel's table ({} added)",
                adopted.len()
            ))),
            None => Ok(adopted.len()),
        }
    }

    /// Whether it is time to re-read the listeners (the kernel lost
    /// records); if so, the re-read is taken to begin now.
    pub fn start_rescan(&mut self) -> bool {
        let now = monotonic_ns();
        if !self.rescan.start(now) {
            return false;
        }
        self.listeners.begin_rescan(now);
        true
    }

    /// The listeners re-read after a loss (begun at [`Self::start_rescan`]),
    /// once every record stamped before it began has been applied: the
    /// closes and listens the lost records would have reported, said now.
    pub fn finish_rescan(&mut self, found: anyhow::Result<Snapshot>) -> io::Result<()> {
        self.rescan.finished();
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                self.listeners.end_rescan();
                log::warn!("cannot re-read the listeners after a loss: {e:#}");
                return Ok(());
            }
        };
        self.netns_ifaces.extend(found.netns_ifaces);
        // A process with no /proc entry has exited.
        let gone = |pid: u32| !std::path::Path::new(&format!("/proc/{pid}")).exists();
        let events = self
            .listeners
            .reconcile(found.listeners, SystemTime::now(), gone);
        let closed = events.iter().filter(|e| e.kind == EventKind::Close).count();
        log::info!(
            "re-read the listeners after the kernel lost records: {closed} closed and {} \
             opened unseen",
            events.len() - closed
        );
        for ev in events {
            self.emit(Event::Listener(ev))?;
        }
        Ok(())
    }

    /// The `ready` line: everything is attached, what follows is live.
    pub fn announce_ready(&mut self) -> io::Result<()> {
        let snapshot = usize::try_from(self.summary.events).unwrap_or(usize::MAX);
        self.emit(Event::Ready {
            ts: SystemTime::now(),
            snapshot,
        })?;
        self.flush()
    }

    /// Enriched kernel records, in the order the kernel wrote them.
    pub fn on_listens(&mut self, batch: Vec<Enriched>) -> io::Result<()> {
        // What the last batch kept per process (also one cut short).
        self.listeners.end_batch();
        for mut rec in batch {
            if let Some((ns, ifaces)) = rec.netns_ifaces.take() {
                self.set_netns_ifaces(ns, ifaces);
            }
            let ts = self.clock.wall(rec.ts_ns);
            let before_snapshot = rec.ts_ns <= self.snapshot_ns;
            for ev in self.listeners.apply(rec, ts, before_snapshot) {
                self.emit(Event::Listener(ev))?;
            }
        }
        Ok(())
    }

    /// A ring-buffer record that could not be decoded.
    pub fn malformed(&mut self, error: &dyn std::fmt::Display) {
        self.summary.malformed += 1;
        log::warn!("skipping a malformed kernel record: {error}");
    }

    /// Reports the events the kernel could not queue since the last call;
    /// `total` is its count since start.
    pub fn report_lost(&mut self, total: u64) -> io::Result<()> {
        if total > self.summary.lost {
            self.rescan.lost(monotonic_ns());
            let count = total - self.summary.lost;
            self.summary.lost = total;
            self.emit(Event::Lost {
                ts: SystemTime::now(),
                count,
                total,
            })?;
        }
        Ok(())
    }

    /// Reports the drop reports the kernel's rate limit held back since the
    /// last call; `total` is its count since start.
    pub fn report_suppressed(&mut self, total: u64) -> io::Result<()> {
        if total > self.summary.suppressed {
            let count = total - self.summary.suppressed;
            self.summary.suppressed = total;
            self.emit(Event::Suppressed {
                ts: SystemTime::now(),
                count,
                total,
            })?;
        }
        Ok(())
    }

    /// A new follower: it starts, like `watch`, with what listens now, then
    /// the `ready` line, then every event from here on.
    pub fn subscribe(&mut self, format: Format, colour: bool) -> subscribers::FollowerQueue {
        let host_netns = self.exposure.as_ref().and_then(ExposureView::netns);
        let (mut subscriber, rx) = Subscriber::new(format, colour, host_netns);
        if subscriber.start(&self.fresh_start(SystemTime::now())) != Taken::Gone {
            self.subscribers.add(subscriber);
        }
        rx
    }

    /// Listeners per exposure, for the metrics: "unknown" for other
    /// namespaces (or when no guard runs).
    pub fn listeners_by_exposure(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        if self.exposure.is_some() {
            for e in [Exposure::Exposed, Exposure::Partial, Exposure::Blocked] {
                counts.insert(e.as_str(), 0);
            }
        }
        counts.insert("unknown", 0);
        for l in self.listeners.iter() {
            let name = self.reach_of(l).map_or("unknown", |r| r.exposure.as_str());
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    }

    /// Per interface of the guard's namespace that has addresses and no
    /// guard: how many of its listeners are reachable through it. Bounded
    /// by the interfaces, whatever the listeners.
    pub fn unguarded_listeners(&self) -> BTreeMap<String, u64> {
        let Some(view) = &self.exposure else {
            return BTreeMap::new();
        };
        let mut counts: BTreeMap<String, u64> = view
            .unguarded()
            .into_iter()
            .map(|i| (i.name.clone(), 0))
            .collect();
        for l in self.listeners.iter().filter(|l| l.netns == view.netns()) {
            for iface in self.reach_of(l).map(|r| r.unguarded).unwrap_or_default() {
                *counts.entry(iface).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Writes the summary; a closed pipe (e.g. `| head`) is not an error.
    pub fn finish(&mut self) -> anyhow::Result<Summary> {
        self.summary.listening = self.listeners.len();
        let summary = self.summary;
        match self.sink.summary(&summary) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(summary),
            other => other.map(|()| summary).context("writing the event stream"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{ProcessInfo, SockId},
        sinks::SharedBuf,
    };

    fn listen() -> Event {
        Event::Listener(ListenerEvent {
            ts: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_765_000_000_123_456),
            kind: EventKind::Listen,
            origin: Origin::Live,
            listener: Listener {
                proto: Proto::Tcp,
                addr: std::net::IpAddr::from([127, 0, 0, 1]),
                port: 8443,
                sock_id: SockId::KernelAddr(1),
                netns: Some(1),
                process: ProcessInfo {
                    pid: Some(42),
                    comm: Some("nginx \"x\"".into()),
                    ..ProcessInfo::default()
                }
                .into(),
            },
            reach: None,
        })
    }

    fn queued(rx: &mut subscribers::FollowerQueue) -> String {
        std::iter::from_fn(|| rx.try_recv()).collect()
    }

    #[test]
    fn json_outputs_share_one_rendering_and_others_render_their_own() -> io::Result<()> {
        let own = SharedBuf::default();
        let mut pipeline = Pipeline::new(Box::new(JsonSink::new(own.clone())), Filter::default());
        let mut json = pipeline.subscribe(Format::Json, false);
        let mut human = pipeline.subscribe(Format::Human, false);
        let (_, _) = (queued(&mut json), queued(&mut human));
        pipeline.emit(listen())?;
        pipeline.flush()?;
        let mut alone = JsonSink::new(Vec::new());
        alone.event(&listen())?;
        let want = String::from_utf8_lossy(alone.out_mut()).into_owned();
        assert!(want.contains("\"port\":8443"), "{want}");
        assert_eq!(String::from_utf8_lossy(&own.take()), want);
        assert_eq!(queued(&mut json), want);
        let text = queued(&mut human);
        assert!(text.contains("8443") && !text.starts_with('{'), "{text}");
        Ok(())
    }
}
