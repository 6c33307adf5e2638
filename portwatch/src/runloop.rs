//! The event loop of `watch` and `guard`: it waits on everything at once
//! (the listener ring buffer, the /proc worker, the sink's timer, metrics
//! scrapes, signals, and whatever the daemon adds) and hands each thing to
//! the part that owns it. It decides nothing itself.

use std::{future::Future, io, pin::Pin, time::SystemTime};

use anyhow::Context as _;
use portwatch_common::MonitorStat;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};

use crate::{
    datapath::{
        MonitorFeed,
        decode::{DecodeError, RawListen, decode_listen},
        ring::MAX_BATCH,
    },
    metrics::{GuardSnapshot, ScrapeRequest, Snapshot},
    pipeline::{Pipeline, Snapshot as Listening, enrich::Enricher},
};

/// Whether the loop goes on after an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// What a daemon adds to the loop besides the listener stream: its own
/// inputs (the guard's control requests, drop reports and interface
/// changes), SIGHUP, its part of the metrics, and what is left at exit.
pub trait Daemon {
    type Input;

    /// The next input; never completes when there is none to wait for.
    fn next(&mut self) -> impl Future<Output = io::Result<Self::Input>>;

    fn handle(&mut self, input: Self::Input, pipeline: &mut Pipeline) -> io::Result<Flow>;

    /// After listeners opened or closed: ports may have gained their
    /// first listener or lost their last (`Pipeline::take_changed_ports`).
    fn listeners_changed(&mut self, _pipeline: &mut Pipeline) -> io::Result<()> {
        Ok(())
    }

    /// SIGHUP.
    fn hangup(&mut self, _pipeline: &mut Pipeline) -> io::Result<()> {
        Ok(())
    }

    /// The daemon's part of a metrics scrape.
    fn metrics(&self, _pipeline: &Pipeline) -> Option<GuardSnapshot> {
        None
    }

    /// At exit: reports what is still queued.
    fn drain(&mut self, _pipeline: &mut Pipeline) -> io::Result<()> {
        Ok(())
    }
}

/// A daemon with nothing of its own: `watch`.
pub struct NoDaemon;

impl Daemon for NoDaemon {
    type Input = ();

    async fn next(&mut self) -> io::Result<()> {
        std::future::pending().await
    }

    fn handle(&mut self, (): (), _pipeline: &mut Pipeline) -> io::Result<Flow> {
        Ok(Flow::Continue)
    }
}

/// SIGINT and SIGTERM end the loop; SIGHUP goes to the daemon.
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
    /// Installs the handlers; from here on these signals no longer kill
    /// the process.
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

/// Runs until a signal (or the daemon) stops it, then reports what is still
/// queued. A closed output pipe ends the loop too, without an error.
pub async fn run<D: Daemon>(
    feed: &mut MonitorFeed,
    pipeline: &mut Pipeline,
    daemon: &mut D,
    signals: &mut Signals,
    scrapes: Option<mpsc::Receiver<ScrapeRequest>>,
) -> anyhow::Result<()> {
    let mut enricher = Enricher::start().context("starting the /proc worker thread")?;
    let result = event_loop(feed, pipeline, daemon, signals, scrapes, &mut enricher).await;
    let tail = drain(feed, pipeline, daemon, &mut enricher).await;
    let untracked = feed.stats.get(MonitorStat::UdpTableFull);
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

/// Decodes a batch; records that do not decode are counted and logged.
fn decoded(pipeline: &mut Pipeline, batch: Vec<Result<RawListen, DecodeError>>) -> Vec<RawListen> {
    let mut out = Vec::with_capacity(batch.len());
    for record in batch {
        match record {
            Ok(raw) => out.push(raw),
            Err(e) => pipeline.malformed(&e),
        }
    }
    out
}

async fn event_loop<D: Daemon>(
    feed: &mut MonitorFeed,
    pipeline: &mut Pipeline,
    daemon: &mut D,
    signals: &mut Signals,
    mut scrapes: Option<mpsc::Receiver<ScrapeRequest>>,
    enricher: &mut Enricher,
) -> io::Result<()> {
    // A re-read of the listeners after the kernel lost records: taken on a
    // blocking thread, then held until every record stamped before it began
    // is in (see `Pipeline::finish_rescan`).
    let mut rescan: Option<Pin<Box<dyn Future<Output = anyhow::Result<Listening>> + Send>>> = None;
    let mut rescanned: Option<anyhow::Result<Listening>> = None;
    loop {
        if rescan.is_none() && rescanned.is_none() && pipeline.start_rescan() {
            rescan = Some(Box::pin(Pipeline::collect_snapshot()));
        }
        let tick = pipeline.next_tick();
        let mut batch = Vec::new();
        tokio::select! {
            found = optional(rescan.as_mut()) => {
                rescan = None;
                rescanned = Some(found);
            }
            () = sleep_until_wall(tick) => pipeline.tick(SystemTime::now())?,
            read = feed.events.read_batch(|rec| batch.push(decode_listen(rec))), if enricher.has_room() => {
                read?;
                let records = decoded(pipeline, batch);
                enricher.submit(records);
                // The kernel counts what it could not queue; losses only
                // happen while records wait, so a check per batch suffices.
                pipeline.report_lost(feed.stats.get(MonitorStat::EventsLost))?;
            }
            done = enricher.next() => {
                pipeline.on_listens(done)?;
                daemon.listeners_changed(pipeline)?;
            }
            input = daemon.next() => {
                if daemon.handle(input?, pipeline)? == Flow::Stop {
                    return Ok(());
                }
            }
            req = recv_optional(scrapes.as_mut()) => match req {
                Some(req) => {
                    let snapshot = Snapshot {
                        listeners: pipeline.listeners_by_exposure(),
                        unguarded: pipeline.unguarded_listeners(),
                        events_lost: feed.stats.get(MonitorStat::EventsLost),
                        tally: pipeline.tally(),
                        guard: daemon.metrics(pipeline),
                    };
                    // A scrape that gave up waiting is no concern of ours.
                    let _ = req.reply.send(snapshot);
                }
                None => scrapes = None, // the server is gone
            },
            sig = signals.recv() => match sig {
                Sig::Stop => return Ok(()),
                Sig::Hup => daemon.hangup(pipeline)?,
            },
        }
        if rescanned.is_some() && enricher.is_idle() {
            // The ring may still hold older records; the re-read waits for
            // them.
            let mut batch = Vec::new();
            feed.events
                .read_now(MAX_BATCH, |rec| batch.push(decode_listen(rec)));
            if batch.is_empty() {
                if let Some(found) = rescanned.take() {
                    pipeline.finish_rescan(found)?;
                    daemon.listeners_changed(pipeline)?;
                }
            } else {
                let records = decoded(pipeline, batch);
                enricher.submit(records);
            }
        }
        pipeline.flush()?;
        if pipeline.followers_waiting() {
            // The followers' writers are tasks on this thread. In a burst
            // every turn finds the ring readable, and the loop would give
            // them the thread only when tokio's budget runs out: tens of
            // thousands of events later.
            tokio::task::yield_now().await;
        }
    }
}

/// `f`'s output; never, when there is no `f`.
async fn optional<F: Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// What is queued at exit: the ring's records (through the /proc worker,
/// so they read like the others), the daemon's, and the loss counters.
async fn drain<D: Daemon>(
    feed: &mut MonitorFeed,
    pipeline: &mut Pipeline,
    daemon: &mut D,
    enricher: &mut Enricher,
) -> io::Result<()> {
    // Everything out comes back first: the worker's queues are sized for
    // what the loop lets out, not for one more batch.
    while !enricher.is_idle() {
        let done = enricher.next().await;
        pipeline.on_listens(done)?;
    }
    daemon.listeners_changed(pipeline)?;
    let mut batch = Vec::new();
    feed.events.drain_now(|rec| batch.push(decode_listen(rec)));
    let records = decoded(pipeline, batch);
    enricher.submit(records);
    while !enricher.is_idle() {
        let done = enricher.next().await;
        pipeline.on_listens(done)?;
    }
    daemon.drain(pipeline)?;
    pipeline.report_lost(feed.stats.get(MonitorStat::EventsLost))?;
    pipeline.flush()
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

/// The next message when there is a channel; never completes otherwise.
pub async fn recv_optional<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
