//! Followers of the stream (`watch` and `top` while a guard runs): each gets
//! every event rendered in its format into a bounded queue that the control
//! server copies to its socket.
//!
//! A follower whose queue is full is never waited for, and never dropped in
//! silence: the events it cannot take are counted, and once its queue has
//! room again it gets one `missed` line with the count, the listeners as
//! they are now (a fresh snapshot, so it can start over) and a `ready` line,
//! then the live events again.

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::{
    model::Event,
    sinks::{Format, SharedBuf, Sink, human::HumanSink, json::JsonSink},
};

/// Chunks of lines a follower may have queued before it counts as behind.
pub const QUEUE_LINES: usize = 4096;

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
    buf: SharedBuf,
    tx: mpsc::Sender<String>,
    /// Events it missed since it was last caught up, and since it came.
    missed: u64,
    missed_total: u64,
}

impl Subscriber {
    /// A follower in `format`, and the queue of its lines.
    pub fn new(
        format: Format,
        colour: bool,
        host_netns: Option<u64>,
    ) -> (Self, mpsc::Receiver<String>) {
        let buf = SharedBuf::default();
        let sink: Box<dyn Sink> = match format {
            Format::Json => Box::new(JsonSink::new(buf.clone())),
            Format::Human => Box::new(HumanSink::new(buf.clone(), colour, host_netns)),
        };
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        let subscriber = Self {
            sink,
            buf,
            tx,
            missed: 0,
            missed_total: 0,
        };
        (subscriber, rx)
    }

    /// Whether it missed events and waits for a fresh start.
    pub fn is_behind(&self) -> bool {
        self.missed > 0
    }

    /// Renders `events` as one chunk of its queue.
    fn render(&mut self, events: &[Event]) -> Option<String> {
        for event in events {
            if self.sink.event(event).is_err() {
                return None;
            }
        }
        Some(String::from_utf8_lossy(&self.buf.take()).into_owned())
    }

    /// A new follower's start (the listeners now and `ready`), as one
    /// chunk: its queue is empty, so it always fits.
    pub fn start(&mut self, events: &[Event]) -> Taken {
        match self.render(events).map(|text| self.tx.try_send(text)) {
            Some(Ok(())) => Taken::Queued,
            _ => Taken::Gone,
        }
    }

    /// Queues `event` for this follower, or counts it missed.
    pub fn send(&mut self, event: &Event) -> Taken {
        if self.tx.is_closed() {
            return Taken::Gone;
        }
        if self.is_behind() || self.tx.capacity() == 0 {
            return self.miss();
        }
        let Some(text) = self.render(std::slice::from_ref(event)) else {
            return Taken::Gone;
        };
        if text.is_empty() {
            return Taken::Queued;
        }
        match self.tx.try_send(text) {
            Ok(()) => Taken::Queued,
            Err(TrySendError::Full(_)) => self.miss(),
            Err(TrySendError::Closed(_)) => Taken::Gone,
        }
    }

    fn miss(&mut self) -> Taken {
        self.missed += 1;
        self.missed_total += 1;
        Taken::Missed
    }

    /// Once its queue has room: the `missed` line, then `fresh` (the
    /// listeners now and `ready`), as one chunk. False if it is gone.
    pub fn catch_up(&mut self, ts: std::time::SystemTime, fresh: &[Event]) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if !self.is_behind() || self.tx.capacity() == 0 {
            return true;
        }
        let mut events = Vec::with_capacity(fresh.len() + 1);
        events.push(Event::Missed {
            ts,
            count: self.missed,
            total: self.missed_total,
        });
        events.extend_from_slice(fresh);
        let Some(text) = self.render(&events) else {
            return false;
        };
        match self.tx.try_send(text) {
            Ok(()) => {
                self.missed = 0;
                true
            }
            Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// Every follower.
#[derive(Default)]
pub struct Subscribers {
    all: Vec<Subscriber>,
    /// Events followers missed, all of them since start.
    missed: u64,
}

impl Subscribers {
    pub fn add(&mut self, subscriber: Subscriber) {
        self.all.push(subscriber);
    }

    /// Sends `event` to each follower (counting what they cannot take),
    /// forgetting those that went away.
    pub fn send(&mut self, event: &Event) {
        let mut missed = 0;
        self.all.retain_mut(|s| match s.send(event) {
            Taken::Queued => true,
            Taken::Missed => {
                missed += 1;
                true
            }
            Taken::Gone => false,
        });
        self.missed += missed;
    }

    /// Whether a follower waits to catch up.
    pub fn any_behind(&self) -> bool {
        self.all.iter().any(Subscriber::is_behind)
    }

    /// Gives each follower that is behind and has room again its `missed`
    /// line and `fresh`.
    pub fn catch_up(&mut self, ts: std::time::SystemTime, fresh: &[Event]) {
        self.all.retain_mut(|s| s.catch_up(ts, fresh));
    }

    /// Events followers missed since start.
    pub fn missed(&self) -> u64 {
        self.missed
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
        for i in 0..QUEUE_LINES + 10 {
            all.send(&ready(i));
        }
        assert_eq!(all.missed(), 10);
        assert!(all.any_behind());
        // No room yet: still behind, and later events count too.
        all.catch_up(SystemTime::UNIX_EPOCH, &[ready(0)]);
        all.send(&ready(1));
        assert_eq!(all.missed(), 11);
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, QUEUE_LINES);
        all.catch_up(SystemTime::UNIX_EPOCH, &[ready(42)]);
        assert!(!all.any_behind());
        let chunk = rx.try_recv().expect("the catch-up chunk");
        let lines: Vec<&str> = chunk.lines().collect();
        assert_eq!(lines.len(), 2, "{chunk}");
        assert!(lines[0].contains("\"event\":\"missed\""), "{chunk}");
        assert!(lines[0].contains("\"count\":11"), "{chunk}");
        assert!(lines[1].contains("\"snapshot\":42"), "{chunk}");
        // Live again.
        all.send(&ready(7));
        assert!(rx.try_recv().is_ok_and(|l| l.contains("\"snapshot\":7")));
        assert_eq!(all.missed(), 11);
    }

    #[test]
    fn a_follower_that_went_away_is_forgotten() {
        let (s, rx) = Subscriber::new(Format::Human, false, None);
        let mut all = Subscribers::default();
        all.add(s);
        drop(rx);
        all.send(&ready(1));
        assert!(all.is_empty());
        assert_eq!(all.missed(), 0);
    }
}
