//! When the soak's workers act and when they stop: fixed ticks, the end of
//! the run, and Ctrl-C / SIGTERM.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};

/// Set by SIGINT/SIGTERM.
static SIGNALLED: AtomicBool = AtomicBool::new(false);
/// Set when the run ends (time is up, a signal, an error): workers stop.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT or SIGTERM came.
pub fn signalled() -> bool {
    SIGNALLED.load(Ordering::SeqCst)
}

/// Ends the run for every worker.
pub fn stop_workers() {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst) || signalled()
}

/// Ctrl-C and SIGTERM end the run through the normal path, so everything
/// is cleaned up (children in the terminal's process group get the signal
/// too and stop by themselves).
pub fn catch_signals() -> Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` touches no memory of ours.
        let old = unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        ensure!(
            old != libc::SIG_ERR,
            "installing a handler for signal {signal}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sleeps until `at` in short steps; false if the run is stopping.
pub fn sleep_until(at: Instant) -> bool {
    loop {
        if stopping() {
            return false;
        }
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The next tick after `prev` that is not already past (no catch-up bursts
/// after a stall).
pub fn next_tick(prev: Instant, every: Duration) -> Instant {
    (prev + every).max(Instant::now())
}
