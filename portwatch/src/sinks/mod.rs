//! Outputs. Every event goes through one `Sink`; the snapshot and the live
//! hooks produce the same event type, so no sink special-cases either.

pub mod human;
pub mod json;

use std::io;

use crate::model::Event;

/// Totals reported when the stream ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Listener events written (snapshot and live).
    pub events: u64,
    /// Events the kernel could not queue.
    pub lost: u64,
    /// Ring-buffer records that could not be decoded.
    pub malformed: u64,
    /// Listeners open when the stream ended.
    pub listening: usize,
    /// Drop reports received (guard).
    pub drops: u64,
    /// Drop reports the kernel's rate limit held back (guard).
    pub suppressed: u64,
}

pub trait Sink {
    fn event(&mut self, event: &Event) -> io::Result<()>;
    /// Called after each batch, so a reader on a pipe sees events at once.
    fn flush(&mut self) -> io::Result<()>;
    fn summary(&mut self, summary: &Summary) -> io::Result<()>;
    /// When the sink wants `tick` called (e.g. to close a window of summed
    /// drop reports). None: never, so an idle stream sleeps.
    fn next_tick(&self) -> Option<std::time::SystemTime> {
        None
    }
    fn tick(&mut self, _now: std::time::SystemTime) -> io::Result<()> {
        Ok(())
    }
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-25T01:02:03.456789Z`.
pub fn rfc3339_micros(ts: std::time::SystemTime) -> String {
    let dt = time::OffsetDateTime::from(ts);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_rfc3339_with_micros() {
        let ts = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        assert_eq!(super::rfc3339_micros(ts), "2026-11-18T11:06:40.123456Z");
    }
}

/// A writer whose bytes the owner takes out after each event: lets a sink
/// render into memory for a subscriber of the control socket.
#[derive(Clone, Default)]
pub struct SharedBuf(pub std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl SharedBuf {
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

impl io::Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
