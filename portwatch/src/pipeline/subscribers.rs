//! Followers of the stream (`watch` and `top` while a guard runs): each gets
//! every event rendered in its format into a bounded queue that the control
//! server copies to its socket.
//!
//! Events are rendered into the follower's pending chunk and queued a chunk
//! at a time (when the loop flushes, or when the chunk is full): a burst of
//! tens of thousands of events then costs the guard a few hundred queue
//! operations and socket writes, not one of each per event.
//!
//! A follower whose queue is full is never waited for, and never dropped in
//! silence: the events it cannot take are counted, and once its queue has
//! room again it gets one `missed` line with the count, the listeners as
//! they are now (a fresh snapshot, so it can start over) and a `ready` line,
//! then the live events again.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::mpsc;

use crate::{
    model::Event,
    sinks::{Format, SharedBuf, Sink, human::HumanSink, json::JsonSink},
};

/// Bytes a follower may have queued before it counts as behind: 32 MiB of
/// the guard's memory at most (its start chunk aside), about 70,000
/// listener lines: a follower that competes for the CPU with the burst
/// itself (45,000 listens in 0.07 s on two cores) gets all of it, later.
/// Counted in bytes, not chunks: a chunk holds what one turn of the loop
/// rendered, from one line to [`CHUNK_BYTES`].
pub const QUEUE_BYTES: usize = 32 << 20;

/// A pending chunk is queued once it holds this much.
pub const CHUNK_BYTES: usize = 64 << 10;

/// A follower's queue: chunks of lines, and what they hold in bytes. The
/// pipeline queues with [`FollowerTx`]; the control server copies them out.
pub fn follower_queue() -> (FollowerTx, FollowerQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        FollowerTx {
            tx,
            queued: Arc::clone(&queued),
        },
        FollowerQueue { rx, queued },
    )
}

/// The queuing end of [`follower_queue`].
pub struct FollowerTx {
    tx: mpsc::UnboundedSender<String>,
    queued: Arc<AtomicUsize>,
}

impl FollowerTx {
    /// Queues `chunk` whatever the room (the caller decides); false if the
    /// follower is gone.
    pub fn send(&self, chunk: String) -> bool {
        let len = chunk.len();
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.tx.send(chunk).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Bytes queued and not yet taken.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[derive(Debug)]
pub struct FollowerQueue {
    rx: mpsc::UnboundedReceiver<String>,
    queued: Arc<AtomicUsize>,
}

impl FollowerQueue {
    /// The next chunk; None once the guard let the follower go.
    pub async fn recv(&mut self) -> Option<String> {
        let chunk = self.rx.recv().await?;
        self.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
        Some(chunk)
    }

    /// The next chunk if one is queued.
    pub fn try_recv(&mut self) -> Option<String> {
        let chunk = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
        Some(chunk)
    }
}

/// How a follower took an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Queued,
    /// Its queue is full, or it is already behind: counted as missed.
    Missed,
    /// It went away.
    Gone,
}

/// A follower of the stream.
pub struct Subscriber {
    sink: Box<dyn Sink>,
    format: Format,
    /// The pending chunk, `pending` events rendered.
    buf: SharedBuf,
    pending: u64,
    tx: FollowerTx,
    /// Events it missed since it was last caught up, and since it came.
    missed: u64,
    missed_total: u64,
    /// The kernel losses (`lost` lines) in the pending chunk, and those in
    /// lines it missed: a `missed` count says how many lines, and these
    /// would otherwise go unsaid. (count, latest total)
    lost_pending: Option<(u64, u64)>,
    lost_unsaid: Option<(u64, u64)>,
}

impl Subscriber {
    /// A follower in `format`, and the queue of its chunks of lines.
    pub fn new(format: Format, colour: bool, host_netns: Option<u64>) -> (Self, FollowerQueue) {
        let buf = SharedBuf::default();
        let sink: Box<dyn Sink> = match format {
            Format::Json => Box::new(JsonSink::new(buf.clone())),
            Format::Human => Box::new(HumanSink::new(buf.clone(), colour, host_netns)),
        };
        let (tx, queue) = follower_queue();
        let subscriber = Self {
            sink,
            format,
            buf,
            pending: 0,
            tx,
            missed: 0,
            missed_total: 0,
            lost_pending: None,
            lost_unsaid: None,
        };
        (subscriber, queue)
    }

    /// Whether it missed events and waits for a fresh start.
    pub fn is_behind(&self) -> bool {
        self.missed > 0
    }

    /// Whether it is behind and has taken at least half of its queue: room
    /// for the fresh start.
    fn can_catch_up(&self) -> bool {
        self.is_behind() && self.queued() <= QUEUE_BYTES / 2
    }

    fn queued(&self) -> usize {
        self.tx.queued()
    }

    fn queue(&mut self, text: String) -> bool {
        self.tx.send(text)
    }

    /// Adds the kernel's losses in `event` to `into`.
    fn note_lost(into: &mut Option<(u64, u64)>, event: &Event) {
        if let Event::Lost { count, total, .. } = event {
            let (sum, _) = into.unwrap_or_default();
            *into = Some((sum + count, *total));
        }
    }

    /// Renders `events` into the pending chunk; false if the sink failed.
    fn render(&mut self, events: &[Event]) -> bool {
        for event in events {
            if self.sink.event(event).is_err() {
                return false;
            }
        }
        self.pending += events.len() as u64;
        true
    }

    /// The pending chunk as text (the sinks write UTF-8).
    fn take_chunk(&mut self) -> String {
        String::from_utf8(self.buf.take())
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// A new follower's start (the listeners now and `ready`), as one
    /// chunk: its queue is empty, so it always fits.
    pub fn start(&mut self, events: &[Event]) -> Taken {
        if !self.render(events) {
            return Taken::Gone;
        }
        self.pending = 0;
        let text = self.take_chunk();
        if self.queue(text) {
            Taken::Queued
        } else {
            Taken::Gone
        }
    }

    /// Renders `event` for this follower (queued with the chunk it ends up
    /// in), or counts it missed. `json`: its JSON line, if rendered already.
    pub fn send(&mut self, event: &Event, json: Option<&[u8]>) -> Taken {
        if self.tx.is_closed() {
            return Taken::Gone;
        }
        if self.is_behind() {
            self.miss(1);
            Self::note_lost(&mut self.lost_unsaid, event);
            return Taken::Missed;
        }
        match json {
            Some(line) if self.format == Format::Json => {
                self.buf.0.borrow_mut().extend_from_slice(line);
                self.pending += 1;
            }
            _ if !self.render(std::slice::from_ref(event)) => return Taken::Gone,
            _ => {}
        }
        Self::note_lost(&mut self.lost_pending, event);
        if self.buf.len() >= CHUNK_BYTES {
            return self.push();
        }
        Taken::Queued
    }

    /// Queues the pending chunk; if the queue is full, its events are
    /// missed.
    pub fn push(&mut self) -> Taken {
        if self.pending == 0 {
            return Taken::Queued;
        }
        let events = std::mem::take(&mut self.pending);
        let lost = self.lost_pending.take();
        let text = self.take_chunk();
        if text.is_empty() {
            return Taken::Queued;
        }
        if self.queued() + text.len() > QUEUE_BYTES {
            self.miss(events);
            if let Some((count, total)) = lost {
                let (sum, _) = self.lost_unsaid.unwrap_or_default();
                self.lost_unsaid = Some((sum + count, total));
            }
            return Taken::Missed;
        }
        if self.queue(text) {
            Taken::Queued
        } else {
            Taken::Gone
        }
    }

    fn miss(&mut self, events: u64) {
        self.missed += events;
        self.missed_total += events;
    }

    /// Once its queue has room: the `missed` line, then `fresh` (the
    /// listeners now and `ready`), as one chunk. False if it is gone.
    pub fn catch_up(&mut self, ts: std::time::SystemTime, fresh: &[Event]) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if !self.can_catch_up() {
            return true;
        }
        let mut events = Vec::with_capacity(fresh.len() + 2);
        // What the guard itself lost meanwhile, as the lines it missed
        // would have said.
        if let Some((count, total)) = self.lost_unsaid.take() {
            events.push(Event::Lost { ts, count, total });
        }
        events.push(Event::Missed {
            ts,
            count: self.missed,
            total: self.missed_total,
        });
        events.extend_from_slice(fresh);
        // Nothing is pending while behind: the chunk is this alone.
        if !self.render(&events) {
            return false;
        }
        self.pending = 0;
        let text = self.take_chunk();
        self.missed = 0;
        self.queue(text)
    }
}

/// Every follower.
#[derive(Default)]
pub struct Subscribers {
    all: Vec<Subscriber>,
    /// Events missed by followers that have gone since.
    missed_by_gone: u64,
}

impl Subscribers {
    pub fn add(&mut self, subscriber: Subscriber) {
        self.all.push(subscriber);
    }

    /// Keeps the followers `f` says are still there.
    fn keep(&mut self, mut f: impl FnMut(&mut Subscriber) -> bool) {
        let mut gone = 0;
        self.all.retain_mut(|s| {
            let kept = f(s);
            if !kept {
                gone += s.missed_total;
            }
            kept
        });
        self.missed_by_gone += gone;
    }

    /// Sends `event` to each follower (counting what they cannot take),
    /// forgetting those that went away. `json`: its JSON line, if rendered
    /// already.
    pub fn send(&mut self, event: &Event, json: Option<&[u8]>) {
        self.keep(|s| s.send(event, json) != Taken::Gone);
    }

    /// Followers that take JSON lines.
    pub fn json_followers(&self) -> usize {
        self.all.iter().filter(|s| s.format == Format::Json).count()
    }

    /// Queues each follower's pending chunk.
    pub fn flush(&mut self) {
        self.keep(|s| s.push() != Taken::Gone);
    }

    /// Whether a follower has lines queued that its writer has not taken.
    pub fn any_queued(&self) -> bool {
        self.all.iter().any(|s| s.queued() > 0)
    }

    /// Whether a follower waits to catch up.
    pub fn any_behind(&self) -> bool {
        self.all.iter().any(Subscriber::is_behind)
    }

    /// Whether a follower is behind and has room again: only then is a
    /// fresh start worth building (it holds every listener).
    pub fn any_can_catch_up(&self) -> bool {
        self.all.iter().any(Subscriber::can_catch_up)
    }

    /// Gives each follower that is behind and has room again its `missed`
    /// line and `fresh`.
    pub fn catch_up(&mut self, ts: std::time::SystemTime, fresh: &[Event]) {
        self.keep(|s| s.catch_up(ts, fresh));
    }

    /// Events followers missed since start.
    pub fn missed(&self) -> u64 {
        self.missed_by_gone + self.all.iter().map(|s| s.missed_total).sum::<u64>()
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn ready(n: usize) -> Event {
        Event::Ready {
            ts: SystemTime::UNIX_EPOCH,
            snapshot: n,
        }
    }

    #[test]
    fn a_follower_that_falls_behind_is_told_how_much_it_missed_and_starts_over() {
        let (s, mut rx) = Subscriber::new(Format::Json, false, None);
        let mut all = Subscribers::default();
        all.add(s);
        // A chunk of two events per flush, until the queue's bytes are
        // used up: the chunk that does not fit is missed whole.
        let mut chunks = 0;
        while all.missed() == 0 {
            all.send(&ready(chunks), None);
            all.send(&ready(chunks), None);
            all.flush();
            chunks += 1;
            assert!(chunks < QUEUE_BYTES, "never full");
        }
        assert_eq!(all.missed(), 2);
        assert!(all.any_behind());
        // Still full: no fresh start, and later events count too.
        all.catch_up(SystemTime::UNIX_EPOCH, &[ready(0)]);
        all.send(&ready(1), None);
        all.flush();
        assert_eq!(all.missed(), 3);
        let (mut lines, mut bytes) = (0, 0);
        while let Some(chunk) = rx.try_recv() {
            assert_eq!(chunk.lines().count(), 2, "{chunk}");
            lines += 2;
            bytes += chunk.len();
        }
        assert_eq!(lines, 2 * (chunks - 1));
        assert!(bytes <= QUEUE_BYTES && bytes > QUEUE_BYTES - 200, "{bytes}");
        all.catch_up(SystemTime::UNIX_EPOCH, &[ready(42)]);
        assert!(!all.any_behind());
        let chunk = rx.try_recv().expect("the catch-up chunk");
        let lines: Vec<&str> = chunk.lines().collect();
        assert_eq!(lines.len(), 2, "{chunk}");
        assert!(lines[0].contains("\"event\":\"missed\""), "{chunk}");
        assert!(lines[0].contains("\"count\":3"), "{chunk}");
        assert!(lines[1].contains("\"snapshot\":42"), "{chunk}");
        // Live again.
        all.send(&ready(7), None);
        assert!(rx.try_recv().is_none(), "queued before the flush");
        all.flush();
        assert!(rx.try_recv().is_some_and(|l| l.contains("\"snapshot\":7")));
        assert_eq!(all.missed(), 3);
    }

    #[test]
    fn a_full_chunk_is_queued_without_waiting_for_the_flush() {
        let (s, mut rx) = Subscriber::new(Format::Json, false, None);
        let mut all = Subscribers::default();
        all.add(s);
        let mut sent = 0;
        let first = loop {
            if let Some(chunk) = rx.try_recv() {
                break chunk;
            }
            all.send(&ready(sent), None);
            sent += 1;
            assert!(sent < CHUNK_BYTES, "no chunk after {sent} events");
        };
        assert!(first.len() >= CHUNK_BYTES, "{} bytes", first.len());
        assert_eq!(first.lines().count(), sent);
        all.send(&ready(sent), None);
        assert!(rx.try_recv().is_none(), "queued before the flush");
        all.flush();
        let rest = rx.try_recv().expect("the flush queued what followed");
        assert_eq!(rest.lines().count(), 1, "{rest}");
        assert_eq!(all.missed(), 0);
    }

    #[test]
    fn the_guards_losses_in_missed_lines_are_said_at_catch_up() {
        let (s, mut rx) = Subscriber::new(Format::Json, false, None);
        let mut all = Subscribers::default();
        all.add(s);
        let lost = |count, total| Event::Lost {
            ts: SystemTime::UNIX_EPOCH,
            count,
            total,
        };
        // Fill the queue; the chunk that does not fit carries a loss.
        while all.missed() == 0 {
            all.send(&lost(5, 5), None);
            all.flush();
        }
        // Another loss while behind.
        all.send(&lost(7, 12), None);
        while rx.try_recv().is_some() {}
        all.catch_up(SystemTime::UNIX_EPOCH, &[ready(0)]);
        let chunk = rx.try_recv().expect("the catch-up chunk");
        let lines: Vec<&str> = chunk.lines().collect();
        assert_eq!(lines.len(), 3, "{chunk}");
        assert!(lines[0].contains("\"event\":\"lost\""), "{chunk}");
        assert!(lines[0].contains("\"count\":12"), "{chunk}");
        assert!(lines[0].contains("\"total\":12"), "{chunk}");
        assert!(lines[1].contains("\"count\":2"), "{chunk}");
    }

    #[test]
    fn a_follower_that_went_away_is_forgotten() {
        let (s, rx) = Subscriber::new(Format::Human, false, None);
        let mut all = Subscribers::default();
        all.add(s);
        drop(rx);
        all.send(&ready(1), None);
        assert!(all.is_empty());
        assert_eq!(all.missed(), 0);
    }
}
