//! Reads a ring buffer without polling: the task sleeps in epoll until the
//! kernel has written a record.

use std::{io, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, time::Instant};

pub struct RingReader {
    fd: AsyncFd<RingBuf<MapData>>,
    /// When `read_gathered` reads what woke it.
    due: Option<Instant>,
}

impl RingReader {
    /// Registers the ring buffer with the runtime. Call this before the hooks
    /// attach so that nothing they emit is missed.
    pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same until the AsyncFd (which owns the ring buffer) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd, due: None })
    }

    /// Waits until records are available, then hands each to `f`, at most
    /// [`MAX_BATCH`] of them. Returns the number of records read.
    pub async fn read_batch(&mut self, mut f: impl FnMut(&[u8])) -> io::Result<usize> {
        let mut guard = self.fd.readable_mut().await?;
        let (n, more) = drain(guard.get_inner_mut(), &mut f, MAX_BATCH);
        // Records left behind keep the ring readable: the next call takes
        // them at once. Otherwise this is safe against lost wake-ups: tokio
        // keeps the readiness if a new notification arrived after this
        // guard was taken.
        if !more {
            guard.clear_ready();
        }
        Ok(n)
    }

    /// Like [`RingReader::read_batch`], but reads `linger` after the first
    /// record arrived, so that a stream of records is taken in batches.
    /// The kernel wakes a reader only for a record it finds the reader
    /// caught up to: the records that come meanwhile cost no wake-up.
    /// Cancel-safe: dropped while it lingers, the next call waits out the
    /// same deadline.
    pub async fn read_gathered(
        &mut self,
        linger: Duration,
        f: impl FnMut(&[u8]),
    ) -> io::Result<usize> {
        let due = match self.due {
            Some(due) => due,
            None => {
                // Dropped without clearing: the readiness stays for the read.
                drop(self.fd.readable_mut().await?);
                *self.due.insert(Instant::now() + linger)
            }
        };
        tokio::time::sleep_until(due).await;
        self.due = None;
        self.read_batch(f).await
    }

    /// Reads whatever is queued now, without waiting.
    pub fn drain_now(&mut self, f: impl FnMut(&[u8])) -> usize {
        self.read_now(usize::MAX, f)
    }

    /// Reads up to `max` of the records queued now, without waiting.
    pub fn read_now(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        drain(self.fd.get_mut(), &mut f, max).0
    }
}

/// Records taken per read: a whole drain in a burst is tens of thousands
/// of records handled in one turn of the event loop, during which control
/// requests and ticks wait; bounded reads keep the loop turning. (It does
/// not shorten the burst's listen-to-line latency, which is the stream's
/// throughput: bench/results/monitor-memory.md.)
pub const MAX_BATCH: usize = 256;

/// Up to `max` records; whether it stopped at `max`.
fn drain(ring: &mut RingBuf<MapData>, f: &mut impl FnMut(&[u8]), max: usize) -> (usize, bool) {
    let mut n = 0;
    while n < max {
        let Some(item) = ring.next() else {
            return (n, false);
        };
        f(&item);
        n += 1;
    }
    (n, true)
}
