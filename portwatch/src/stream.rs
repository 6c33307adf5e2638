//! The event stream shared by `watch` and `guard`: the snapshot, then
//! kernel records turned into events, fanned out to one sink, until a signal.

use std::{collections::HashMap, io, time::SystemTime};

use anyhow::Context as _;
use portwatch_common::{GuardStat, MonitorStat};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

use crate::{
    control::server::{ControlRequest, Reply},
    events::{
        decode::{DecodeError, RawDrop, RawListen, decode_drop, decode_listen},
        reader::RingReader,
    },
    guard::owner::GuardState,
    listeners::Listeners,
    loader::Datapath,
    maps::GuardMaps,
    model::{DropEvent, Event, EventKind, Listener, ListenerEvent, Origin, Proto},
    policy::Policy,
    sinks::{Sink, Summary},
    snapshot,
    sys::Clock,
};

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

/// The guard's side of the stream: its policy (for exposure), its drop
/// reports and counters, and interface names for the reports.
pub struct GuardFeed {
    pub policy: Policy,
    pub drops: RingReader,
    pub maps: GuardMaps,
    pub ifnames: HashMap<u32, String>,
    /// The guard's network namespace: the policy says nothing about
    /// listeners in other namespaces.
    pub netns: Option<u64>,
    pub state: GuardState,
    /// Requests from the control socket; taken by the event loop.
    pub control: Option<mpsc::Receiver<ControlRequest>>,
    /// Changes of network interfaces; taken by the event loop.
    pub links: Option<crate::guard::links::LinkWatch>,
}

pub struct Stream {
    sink: Box<dyn Sink>,
    filter: Filter,
    pub listeners: Listeners,
    clock: Clock,
    pub summary: Summary,
    /// Monotonic time the snapshot finished; earlier live listens may repeat it.
    snapshot_ns: u64,
    pub guard: Option<GuardFeed>,
    /// Counts for `--metrics`.
    pub tally: crate::metrics::Tally,
    /// Scrapes of `--metrics`; taken by the event loop.
    pub metrics: Option<mpsc::Receiver<crate::metrics::ScrapeRequest>>,
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| std::time::Duration::from(t).as_nanos() as u64)
        .unwrap_or(0)
}

impl Stream {
    pub fn new(sink: Box<dyn Sink>, filter: Filter) -> Self {
        Self {
            sink,
            filter,
            listeners: Listeners::default(),
            clock: Clock::new(),
            summary: Summary::default(),
            snapshot_ns: 0,
            guard: None,
            tally: crate::metrics::Tally::default(),
            metrics: None,
        }
    }

    pub fn emit(&mut self, mut event: Event) -> io::Result<()> {
        match &mut event {
            Event::Listener(ev) => {
                if !self.filter.matches(&ev.listener) {
                    return Ok(());
                }
                if let Some(guard) = &self.guard
                    && ev.listener.netns == guard.netns
                {
                    ev.exposure = Some(crate::guard::exposure_of(&guard.policy, &ev.listener));
                }
                self.summary.events += 1;
                self.tally.count_listener(ev);
            }
            Event::Drop(_) => self.summary.drops += 1,
            Event::Policy(_) => self.tally.policy_changes += 1,
            _ => {}
        }
        if let Some(guard) = self.guard.as_mut() {
            guard.state.subscribers.retain_mut(|s| s.send(&event));
        }
        self.sink.event(&event)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }

    /// Reports the listeners that exist now.
    pub async fn take_snapshot(&mut self) -> anyhow::Result<()> {
        let found = Self::collect_snapshot().await?;
        self.emit_snapshot(found)
    }

    /// The listeners that exist now, not yet reported.
    pub async fn collect_snapshot() -> anyhow::Result<Vec<Listener>> {
        let found = tokio::task::spawn_blocking(snapshot::snapshot)
            .await
            .context("the snapshot task failed")?
            .context("taking the start-up snapshot of listeners")?;
        Ok(found)
    }

    /// Reports listeners found by `collect_snapshot`.
    pub fn emit_snapshot(&mut self, found: Vec<Listener>) -> anyhow::Result<()> {
        self.snapshot_ns = monotonic_ns();
        let ts = SystemTime::now();
        for listener in found {
            self.listeners.insert_snapshot(listener.clone());
            self.emit(Event::Listener(ListenerEvent {
                ts,
                kind: EventKind::Listen,
                origin: Origin::Snapshot,
                listener,
                exposure: None,
            }))?;
        }
        Ok(())
    }

    /// The `ready` line: everything is attached, what follows is live.
    pub fn announce_ready(&mut self) -> anyhow::Result<()> {
        let snapshot = self.summary.events as usize;
        self.emit(Event::Ready {
            ts: SystemTime::now(),
            snapshot,
        })?;
        self.flush()?;
        Ok(())
    }

    fn on_listen(&mut self, raw: RawListen) -> io::Result<()> {
        let ts = self.clock.wall(raw.ts_ns);
        let before_snapshot = raw.ts_ns <= self.snapshot_ns;
        match self.listeners.apply(raw, ts, before_snapshot) {
            Some(ev) => self.emit(Event::Listener(ev)),
            None => Ok(()),
        }
    }

    fn on_drop(&mut self, raw: RawDrop) -> io::Result<()> {
        let iface = self
            .guard
            .as_ref()
            .and_then(|g| g.ifnames.get(&raw.ifindex).cloned());
        self.emit(Event::Drop(DropEvent {
            ts: self.clock.wall(raw.ts_ns),
            iface,
            reason: raw.reason,
            proto: raw.proto,
            src: raw.src,
            dst: raw.dst,
            src_port: raw.src_port,
            dst_port: raw.dst_port,
            audit: raw.audit,
        }))
    }

    fn records<T>(
        &mut self,
        batch: Vec<Result<T, DecodeError>>,
        mut each: impl FnMut(&mut Self, T) -> io::Result<()>,
    ) -> io::Result<()> {
        for record in batch {
            match record {
                Ok(raw) => each(self, raw)?,
                Err(e) => {
                    self.summary.malformed += 1;
                    log::warn!("skipping a malformed kernel record: {e}");
                }
            }
        }
        Ok(())
    }

    pub fn report_lost(&mut self, total: u64) -> io::Result<()> {
        if total > self.summary.lost {
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

    /// Drop reports held back by the kernel's rate limit, since the last call.
    fn report_suppressed(&mut self) -> io::Result<()> {
        let Some(guard) = &self.guard else {
            return Ok(());
        };
        let total = guard.maps.totals().get(GuardStat::ReportsSuppressed);
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

/// SIGINT and SIGTERM end the stream; SIGHUP reloads the guard's policy.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

enum Sig {
    Stop,
    Hup,
}

impl Signals {
    pub fn install() -> anyhow::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn recv(&mut self) -> Sig {
        tokio::select! {
            _ = self.int.recv() => Sig::Stop,
            _ = self.term.recv() => Sig::Stop,
            _ = self.hup.recv() => Sig::Hup,
        }
    }
}

/// Runs until a signal, then reports what is still queued. A closed output
/// pipe ends the loop too.
pub async fn run(
    datapath: &mut Datapath,
    stream: &mut Stream,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let result = event_loop(datapath, stream, signals).await;
    let mut batch = Vec::new();
    datapath
        .events
        .drain_now(|rec| batch.push(decode_listen(rec)));
    let mut drops = Vec::new();
    if let Some(guard) = stream.guard.as_mut() {
        guard.drops.drain_now(|rec| drops.push(decode_drop(rec)));
    }
    let tail = stream
        .records(batch, Stream::on_listen)
        .and_then(|()| stream.records(drops, Stream::on_drop))
        .and_then(|()| stream.report_lost(datapath.stats.get(MonitorStat::EventsLost)))
        .and_then(|()| stream.report_suppressed());
    let untracked = datapath.stats.get(MonitorStat::UdpTableFull);
    if untracked > 0 {
        log::warn!(
            "{untracked} UDP binds were not tracked (table full): their closes were not reported"
        );
    }
    match result.and(tail) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing the event stream"),
    }
}

async fn event_loop(
    datapath: &mut Datapath,
    stream: &mut Stream,
    signals: &mut Signals,
) -> io::Result<()> {
    let mut control = stream.guard.as_mut().and_then(|g| g.control.take());
    let mut links = stream.guard.as_mut().and_then(|g| g.links.take());
    let mut metrics = stream.metrics.take();
    loop {
        let mut link_changes = Vec::new();
        let mut listens = Vec::new();
        let mut drops = Vec::new();
        let mut request = None;
        let mut scrape = None;
        let mut hangup = false;
        let drop_reader = stream.guard.as_mut().map(|g| &mut g.drops);
        let tick = stream.sink.next_tick();
        tokio::select! {
            () = sleep_until_wall(tick) => {
                stream.sink.tick(SystemTime::now())?;
            }
            read = datapath.events.read_batch(|rec| listens.push(decode_listen(rec))) => {
                read?;
            }
            read = read_optional(drop_reader, &mut drops) => {
                read?;
            }
            req = recv_optional(control.as_mut()) => request = req,
            req = recv_optional(metrics.as_mut()) => match req {
                Some(req) => scrape = Some(req),
                None => metrics = None, // the server is gone
            },
            changes = next_links(links.as_mut()) => link_changes = changes?,
            sig = signals.recv() => match sig {
                Sig::Stop => return Ok(()),
                Sig::Hup => hangup = true,
            },
        }
        if hangup
            && stream.guard.is_some()
            && let Reply::Once(v) = stream.reload_on_signal()
            && v["ok"] != true
        {
            log::warn!(
                "SIGHUP: reload failed: {}",
                v["error"].as_str().unwrap_or("?")
            );
        }
        if let Some(req) = scrape {
            let lost = datapath.stats.get(MonitorStat::EventsLost);
            let _ = req.reply.send(stream.metrics_snapshot(lost));
        }
        for change in link_changes {
            stream.on_link_change(datapath, change);
        }
        if let Some(req) = request {
            let lost = datapath.stats.get(MonitorStat::EventsLost);
            let reply = stream.handle_control(&req.peer, req.request, lost);
            let _ = req.reply.send(reply);
            if stream
                .guard
                .as_ref()
                .is_some_and(|g| g.state.shutdown.is_some())
            {
                return Ok(());
            }
        }
        stream.records(listens, Stream::on_listen)?;
        // The kernel counts what it could not queue; losses only happen
        // while records are waiting, so checking after each batch suffices.
        stream.report_lost(datapath.stats.get(MonitorStat::EventsLost))?;
        if !drops.is_empty() {
            stream.records(drops, Stream::on_drop)?;
            stream.report_suppressed()?;
        }
        stream.flush()?;
    }
}

/// Sleeps until wall-clock time `at`; forever when None.
async fn sleep_until_wall(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

/// The next link changes when the guard runs; never completes otherwise.
async fn next_links(
    links: Option<&mut crate::guard::links::LinkWatch>,
) -> io::Result<Vec<crate::guard::links::LinkChange>> {
    match links {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// The next request (control, scrape) when there is a channel; never
/// completes otherwise.
async fn recv_optional<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads drop reports when the guard runs; never completes otherwise.
async fn read_optional(
    reader: Option<&mut RingReader>,
    out: &mut Vec<Result<RawDrop, DecodeError>>,
) -> io::Result<usize> {
    match reader {
        Some(r) => r.read_batch(|rec| out.push(decode_drop(rec))).await,
        None => std::future::pending().await,
    }
}
