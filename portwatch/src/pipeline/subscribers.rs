//! Followers of the stream (`watch` and `top` while a guard runs): each gets
//! every event rendered in its format into a bounded queue that the control
//! server copies to its socket.

use tokio::sync::mpsc;

use crate::{
    model::Event,
    sinks::{Format, SharedBuf, Sink, human::HumanSink, json::JsonSink},
};

/// Lines a follower may have queued before it counts as too slow.
pub const QUEUE_LINES: usize = 4096;

/// A follower of the stream.
pub struct Subscriber {
    sink: Box<dyn Sink>,
    buf: SharedBuf,
    tx: mpsc::Sender<String>,
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
        (Self { sink, buf, tx }, rx)
    }

    /// Renders `event` for this follower; false once it is gone or too
    /// slow (its queue full), so the pipeline drops it rather than wait.
    pub fn send(&mut self, event: &Event) -> bool {
        if self.sink.event(event).is_err() {
            return false;
        }
        let bytes = self.buf.take();
        if bytes.is_empty() {
            return true;
        }
        self.tx
            .try_send(String::from_utf8_lossy(&bytes).into_owned())
            .is_ok()
    }
}

/// Every follower.
#[derive(Default)]
pub struct Subscribers(Vec<Subscriber>);

impl Subscribers {
    pub fn add(&mut self, subscriber: Subscriber) {
        self.0.push(subscriber);
    }

    /// Sends `event` to each follower, dropping those that cannot take it.
    pub fn send(&mut self, event: &Event) {
        self.0.retain_mut(|s| s.send(event));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
