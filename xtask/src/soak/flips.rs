//! Policy flips through the guard's control socket: `portwatch allow` and
//! `deny` of one port in turn, each of which the stream must announce.

use std::{
    path::PathBuf,
    process::Command,
    sync::{Arc, atomic::Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use portwatch_lab::run_bounded;

use super::{
    FLIP_EVERY, Progress, TCP_FLIP,
    schedule::{next_tick, sleep_until},
};

#[derive(Default, Debug)]
pub struct Flips {
    pub allow: u64,
    pub deny: u64,
    pub failed: u64,
    pub failure_example: Option<String>,
}

/// `portwatch allow|deny tcp/TCP_FLIP --socket S` every FLIP_EVERY, in turn.
pub fn spawn_flips(
    portwatch: PathBuf,
    socket: PathBuf,
    progress: Arc<Progress>,
) -> JoinHandle<Flips> {
    std::thread::spawn(move || {
        let mut flips = Flips::default();
        let spec = format!("tcp/{TCP_FLIP}");
        // The policy file does not permit it: the first flip allows.
        let mut allowed = false;
        let mut tick = Instant::now();
        while sleep_until(tick) {
            let verb = if allowed { "deny" } else { "allow" };
            let mut cmd = Command::new(&portwatch);
            cmd.args([verb, &spec]).arg("--socket").arg(&socket);
            match run_bounded(&mut cmd, None, Duration::from_secs(10), None) {
                Ok(out) if out.success() => {
                    allowed = !allowed;
                    if allowed {
                        flips.allow += 1;
                    } else {
                        flips.deny += 1;
                    }
                    progress.flips.fetch_add(1, Ordering::Relaxed);
                }
                Ok(out) => {
                    flips.failed += 1;
                    flips.failure_example.get_or_insert_with(|| {
                        format!(
                            "`portwatch {verb} {spec}`: {}: {}",
                            out.describe(),
                            out.stderr.trim()
                        )
                    });
                }
                Err(e) => {
                    flips.failed += 1;
                    flips
                        .failure_example
                        .get_or_insert_with(|| format!("{e:#}"));
                }
            }
            tick = next_tick(tick, FLIP_EVERY);
        }
        flips
    })
}
