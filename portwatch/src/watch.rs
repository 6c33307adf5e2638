//! `portwatch watch`: the snapshot, then the live stream, until Ctrl-C or SIGTERM.

use std::{io, time::SystemTime};

use anyhow::Context as _;
use portwatch_common::MonitorStat;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::{WatchArgs, colour_wanted},
    events::decode::{RawListen, decode_listen},
    listeners::Listeners,
    loader::Monitor,
    model::{Event, EventKind, Listener, ListenerEvent, Origin, Proto},
    procinfo,
    sinks::{Sink, Summary, human::HumanSink, json::JsonSink},
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

/// Where the stream stands; owned by the event loop.
struct Stream {
    sink: Box<dyn Sink>,
    filter: Filter,
    listeners: Listeners,
    clock: Clock,
    summary: Summary,
    /// Monotonic time the snapshot finished; earlier live listens may repeat it.
    snapshot_ns: u64,
}

impl Stream {
    fn emit(&mut self, event: Event) -> io::Result<()> {
        if let Event::Listener(ev) = &event {
            if !self.filter.matches(&ev.listener) {
                return Ok(());
            }
            self.summary.events += 1;
        }
        self.sink.event(&event)
    }

    fn on_record(&mut self, raw: RawListen) -> io::Result<()> {
        let ts = self.clock.wall(raw.ts_ns);
        let before_snapshot = raw.ts_ns <= self.snapshot_ns;
        match self.listeners.apply(raw, ts, before_snapshot) {
            Some(ev) => self.emit(Event::Listener(ev)),
            None => Ok(()),
        }
    }

    fn report_lost(&mut self, total: u64) -> io::Result<()> {
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
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| std::time::Duration::from(t).as_nanos() as u64)
        .unwrap_or(0)
}

pub async fn run(args: WatchArgs) -> anyhow::Result<Summary> {
    let stdout = io::BufWriter::new(io::stdout());
    let sink: Box<dyn Sink> = if args.json {
        Box::new(JsonSink::new(stdout))
    } else {
        Box::new(HumanSink::new(
            stdout,
            colour_wanted(),
            procinfo::netns_of(std::process::id()),
        ))
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    // The reader exists before the hooks attach, so nothing is missed.
    let mut monitor = Monitor::load()?;
    monitor.attach()?;
    log::info!("watching listeners (TCP listen, UDP bind; IPv4 and IPv6); Ctrl-C to stop");

    let mut stream = Stream {
        sink,
        filter: Filter {
            ports: args.ports.clone(),
            proto: args.proto.map(Proto::from),
        },
        listeners: Listeners::default(),
        clock: Clock::new(),
        summary: Summary::default(),
        snapshot_ns: 0,
    };

    if !args.no_snapshot {
        let found = tokio::task::spawn_blocking(snapshot::snapshot)
            .await
            .context("the snapshot task failed")?
            .context("taking the start-up snapshot of listeners")?;
        stream.snapshot_ns = monotonic_ns();
        let ts = SystemTime::now();
        for listener in found {
            stream.listeners.insert_snapshot(listener.clone());
            stream.emit(Event::Listener(ListenerEvent {
                ts,
                kind: EventKind::Listen,
                origin: Origin::Snapshot,
                listener,
            }))?;
        }
    }
    let snapshot = stream.summary.events as usize;
    stream.emit(Event::Ready {
        ts: SystemTime::now(),
        snapshot,
    })?;
    stream.sink.flush()?;

    let result = event_loop(&mut monitor, &mut stream, &mut sigint, &mut sigterm).await;
    // Whatever ended the loop, report what is still queued and the totals.
    let mut batch = Vec::new();
    monitor
        .events
        .drain_now(|rec| batch.push(decode_listen(rec)));
    let finish = process_batch(&mut stream, batch)
        .and_then(|()| stream.report_lost(monitor.stats.get(MonitorStat::EventsLost)));
    let untracked = monitor.stats.get(MonitorStat::UdpTableFull);
    if untracked > 0 {
        log::warn!(
            "{untracked} UDP binds were not tracked (table full): their closes were not reported"
        );
    }
    drop(monitor); // detaches every hook
    stream.summary.listening = stream.listeners.len();
    let summary = stream.summary;
    let outcome = result
        .and(finish)
        .and_then(|()| stream.sink.summary(&summary));
    match outcome {
        // A closed pipe (e.g. `| head`) ends the stream; it is not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(summary),
        other => other.map(|()| summary).context("writing the event stream"),
    }
}

fn process_batch(
    stream: &mut Stream,
    batch: Vec<Result<RawListen, crate::events::decode::DecodeError>>,
) -> io::Result<()> {
    for record in batch {
        match record {
            Ok(raw) => stream.on_record(raw)?,
            Err(e) => {
                stream.summary.malformed += 1;
                log::warn!("skipping a malformed kernel record: {e}");
            }
        }
    }
    Ok(())
}

async fn event_loop(
    monitor: &mut Monitor,
    stream: &mut Stream,
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) -> io::Result<()> {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            read = monitor.events.read_batch(|rec| batch.push(decode_listen(rec))) => {
                read?;
                process_batch(stream, std::mem::take(&mut batch))?;
                // The kernel counts what it could not queue; losses only
                // happen while records are waiting, so checking here suffices.
                stream.report_lost(monitor.stats.get(MonitorStat::EventsLost))?;
                stream.sink.flush()?;
            }
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}
