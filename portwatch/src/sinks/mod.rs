//! Outputs. Every event goes through one `Sink`; the snapshot and the live
//! hooks produce the same event type, so no sink special-cases either.

pub mod human;
pub mod json;

use std::io;

use crate::model::Event;

/// How events are written: JSON Lines (as `--json` prints) or aligned
/// text (as on a terminal).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Json,
    Human,
}

/// Totals reported when the stream ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Listener events written (snapshot and live).
    pub events: u64,
    /// Events the kernel could not queue.
    pub lost: u64,
    /// Of `events`, closes and listens said in place of lost ones (a re-read
    /// of the listeners, a socket taken by a new listener).
    pub inferred: u64,
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
    /// Whether it writes JSON lines: then [`Self::event_as_json`] can be
    /// given a line rendered once for it and the stream's followers.
    fn writes_json(&self) -> bool {
        false
    }
    /// `event`, whose JSON line (newline included) is `line`.
    fn event_as_json(&mut self, event: &Event, _line: &[u8]) -> io::Result<()> {
        self.event(event)
    }
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

/// A writer whose bytes the owner takes out after each event: lets a sink
/// render into memory for a subscriber of the control socket.
#[derive(Clone, Default)]
pub struct SharedBuf(pub std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl SharedBuf {
    /// Bytes written and not yet taken.
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

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

/// A writer that passes on whole lines only, each batch in one call: on
/// stderr, where env_logger writes too, a line cut in two by a log record
/// would no longer be JSON.
pub struct WholeLines<W: io::Write> {
    out: W,
    pending: Vec<u8>,
}

impl<W: io::Write> WholeLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            pending: Vec::new(),
        }
    }

    fn pass_on(&mut self, upto: usize) -> io::Result<()> {
        let lines: Vec<u8> = self.pending.drain(..upto).collect();
        // `Stderr::write_all` holds the stderr lock for the whole batch.
        self.out.write_all(&lines)
    }
}

impl<W: io::Write> io::Write for WholeLines<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(data);
        if let Some(last) = self.pending.iter().rposition(|b| *b == b'\n') {
            self.pass_on(last + 1)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.pass_on(self.pending.len())?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn whole_lines_only() -> io::Result<()> {
        let mut w = WholeLines::new(Vec::new());
        w.write_all(b"{\"a\":")?;
        assert!(w.out.is_empty());
        w.write_all(b"1}\n{\"b\"")?;
        assert_eq!(w.out, b"{\"a\":1}\n");
        w.write_all(b":2}\n{\"c\":3}\n")?;
        assert_eq!(w.out, b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
        assert!(w.pending.is_empty());
        Ok(())
    }
}
