//! `cargo xtask soak` (not in CI): a guard under steady load for N minutes.
//!
//! A lab of two namespaces joined by a veth pair; `portwatch guard --json`
//! (enforce mode, native XDP, pins and control socket in directories of the
//! soak's own) on the server veth. For the whole run:
//!
//! - listener churn in the server namespace: one `listeners.py --churn`
//!   process after another (TCP and UDP in turn), each reporting its pid and
//!   how many listeners it opened and closed;
//! - policy flips: `portwatch allow` / `deny` of one port through the
//!   control socket every 100 ms;
//! - bounded-rate traffic from the client namespace (sent by this process
//!   from threads that entered it) to permitted, denied and flipped ports,
//!   answered by servers this process runs in the server namespace;
//! - every 10 s the guard's RSS and CPU time.
//!
//! It fails when the guard's RSS grows past the bound, when a churn event is
//! missing from the stream without the stream counting it as lost, when a
//! policy change goes unannounced, or when traffic gets a wrong verdict.
//! Results go to `bench/results/soak.{json,md}`.

mod churn;
mod flips;
mod memory;
mod report;
mod run;
mod schedule;
mod servers;
mod stream;
mod traffic;

use std::{sync::atomic::AtomicU64, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use portwatch_lab::require_tools;

use self::schedule::{catch_signals, signalled};
use crate::{build, setup, util};

/// Permitted by the policy, a server answers "hi".
const TCP_OPEN: u16 = 7001;
/// Not permitted; a server listens (a connection would show a leak).
const TCP_DENIED: u16 = 7002;
/// Permitted by the policy, a server echoes.
const UDP_OPEN: u16 = 7003;
/// Not permitted; a server counts what reaches it (it must stay 0).
const UDP_DENIED: u16 = 7004;
/// Allowed and denied in turn through the control socket; a server answers.
const TCP_FLIP: u16 = 7005;
/// The policy file's rules: a few ports, not the denied or flipped ones.
const ALLOW: [&str; 3] = ["tcp/22", "tcp/7001", "udp/7003"];

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// RSS before this is start-up (caches filling); the start figure is the
/// first sample from here on.
const WARM_UP: Duration = Duration::from_secs(30);
const FLIP_EVERY: Duration = Duration::from_millis(100);
/// Listeners per churn process (each opened, then closed at once) and how
/// often a new process starts: ~200 listeners, 400 events, a second.
const CHURN_PER_PROC: u32 = 200;
const CHURN_EVERY: Duration = Duration::from_secs(1);
/// One probe of each kind per tick at most (20/s).
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long a probe to a port that should drop waits for the handshake.
const DROP_WAIT: Duration = Duration::from_millis(250);
/// How long a probe to a permitted port waits for its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// "Flat": end RSS at most this much above the start, or the fraction
/// below of the start if that is more.
const RSS_BOUND_KIB: f64 = 4096.0;
const RSS_BOUND_FRACTION: f64 = 0.10;

/// Counters the main loop prints while the run goes on.
#[derive(Default)]
struct Progress {
    churn_listeners: AtomicU64,
    flips: AtomicU64,
    probes: AtomicU64,
}

pub fn soak(minutes: u64) -> Result<()> {
    ensure!(minutes >= 1, "--minutes must be at least 1");
    ensure!(
        util::is_root()?,
        "the soak creates network namespaces and loads XDP programs: run it as root"
    );
    let root = util::workspace_root();
    setup::ensure()?;
    let portwatch = build::build_portwatch(true)?;
    require_tools(&["python3", "nsenter", "ip"])?;
    catch_signals()?;
    let duration = Duration::from_secs(minutes * 60);
    util::header(&format!("soak: {minutes} min"));
    let outcome = run::run(&root, &portwatch, duration);
    // Everything the run made is gone by now (dropped inside `run`).
    if signalled() {
        bail!("interrupted; the lab, the guard and its pins were removed");
    }
    let report = outcome?;
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("soak.json");
    let md_path = dir.join("soak.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report.json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, &report.markdown)
        .with_context(|| format!("writing {}", md_path.display()))?;
    println!("{}", report.markdown);
    println!("wrote {} and {}", json_path.display(), md_path.display());
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| what.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("soak failed: {}", failed.join("; "));
    }
    println!("soak passed");
    Ok(())
}
