//! When to re-read the listeners after the kernel lost records: the view
//! then has listeners that closed unseen and lacks some that opened, and
//! only a fresh sock_diag snapshot can say which.
//!
//! Not at the first loss: a ring overflows in a burst, and a snapshot taken
//! mid-burst is stale at once and costs the burst CPU. It waits for a quiet
//! spell after the last loss, but no longer than a bound after the first, so
//! that a steady overflow still gets one.

/// Quiet time after the latest loss before re-reading.
pub const QUIET_NS: u64 = 500_000_000;
/// The longest a loss waits for its re-read.
pub const MAX_WAIT_NS: u64 = 5_000_000_000;

#[derive(Debug, Default)]
pub struct Rescan {
    /// Whether the view began from a snapshot (without one, as under
    /// `watch --no-snapshot`, a re-read would report every listener).
    enabled: bool,
    /// The first loss not yet re-read, and when the re-read is due
    /// (monotonic ns).
    pending: Option<(u64, u64)>,
    running: bool,
}

impl Rescan {
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    /// The kernel lost records at `now_ns`.
    pub fn lost(&mut self, now_ns: u64) {
        if !self.enabled {
            return;
        }
        let first = self.pending.map_or(now_ns, |(first, _)| first);
        let due = (now_ns + QUIET_NS).min(first + MAX_WAIT_NS);
        self.pending = Some((first, due));
    }

    /// When the next re-read is due (monotonic ns), if one is and none runs.
    pub fn due(&self) -> Option<u64> {
        if self.running {
            return None;
        }
        self.pending.map(|(_, due)| due)
    }

    /// Starts the re-read if it is due at `now_ns`: losses from here on
    /// call for another one.
    pub fn start(&mut self, now_ns: u64) -> bool {
        if self.due().is_none_or(|due| now_ns < due) {
            return false;
        }
        self.pending = None;
        self.running = true;
        true
    }

    pub fn finished(&mut self) {
        self.running = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_burst_of_losses_is_re_read_once_after_it_quiets_down() {
        let mut r = Rescan::default();
        r.lost(S);
        assert_eq!(r.due(), None, "no snapshot to start from");
        r.enable();
        r.lost(S);
        r.lost(S + S / 10);
        assert_eq!(r.due(), Some(S + S / 10 + QUIET_NS));
        assert!(!r.start(S + S / 5));
        assert!(r.start(2 * S));
        assert_eq!(r.due(), None);
        // A loss during the re-read calls for another, after it.
        r.lost(2 * S + 1);
        assert_eq!(r.due(), None);
        r.finished();
        assert_eq!(r.due(), Some(2 * S + 1 + QUIET_NS));
    }

    #[test]
    fn a_steady_overflow_is_re_read_within_the_bound() {
        let mut r = Rescan::default();
        r.enable();
        let mut t = S;
        while t < S + 2 * MAX_WAIT_NS {
            r.lost(t);
            if r.start(t) {
                break;
            }
            t += QUIET_NS / 2;
        }
        assert!(t <= S + MAX_WAIT_NS, "re-read at {t}");
    }
}
