//! One run: the lab and the guard, the load for the whole duration, the
//! guard sampled meanwhile, then everything stopped and accounted for.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use portwatch_lab::Lab;

use super::{
    ALLOW, Progress, SAMPLE_EVERY,
    churn::{ChurnProc, spawn_churn},
    flips::spawn_flips,
    memory::{Sample, sample},
    report::{Inputs, Report, report},
    schedule::{signalled, stop_workers},
    servers::Servers,
    stream::{read_stream, spawn_capture},
    traffic::{join_traffic, spawn_traffic},
};
use crate::{bench::attach::start_guard, procstat::proc_cpu_seconds};

pub fn run(root: &Path, portwatch: &Path, duration: Duration) -> Result<Report> {
    // Declared first, dropped last: the namespaces go after everything
    // that runs in them.
    let lab = Lab::new().context("creating the lab")?;
    lab.pin_neighbours()?;
    let netns = lab.server.inode()?;
    // Pins under a unique /sys/fs/bpf directory, socket and policy in a
    // temporary directory: the host's guard paths are never touched.
    let mut guard = start_guard(portwatch, &lab, "native", &ALLOW).context("starting the guard")?;
    let pid = guard.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(
        comm.trim() == "portwatch",
        "pid {pid} is {comm:?}, not the guard"
    );
    let stream_path = lab.dir.join("guard.jsonl");
    let lines = std::mem::replace(&mut guard.lines, mpsc::channel().1);
    let capture = spawn_capture(lines, stream_path.clone());
    let mut servers = Servers::start(&lab.server.path())?;

    let progress = Arc::new(Progress::default());
    let t0 = Instant::now();
    let churn = spawn_churn(
        lab.server.path(),
        root.join("tests/fixtures/listeners.py"),
        lab.dir.join("churn.err"),
        progress.clone(),
    );
    let flips = spawn_flips(portwatch.to_path_buf(), guard.socket(), progress.clone());
    let traffic = spawn_traffic(&lab.client.path(), lab.server_v4(), &progress);
    let cpu0 = proc_cpu_seconds(pid)?;

    let mut samples = Vec::new();
    let load_ended =
        || churn.is_finished() || flips.is_finished() || traffic.iter().any(|t| t.is_finished());
    let looped = sample_until(
        t0 + duration,
        pid,
        t0,
        cpu0,
        &progress,
        load_ended,
        &mut samples,
    );
    let elapsed = t0.elapsed().as_secs_f64();
    stop_workers();

    // Stop the load, then the servers (so no probe in flight loses its
    // answer), then let the guard drain its ring buffer and stop it.
    let churned = churn
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"));
    let flipped = flips
        .join()
        .map_err(|_| anyhow::anyhow!("the flip thread panicked"));
    let probes = join_traffic(traffic);
    servers.stop();
    looped?;
    if signalled() {
        // The caller says so; the drops clean up.
        bail!("interrupted");
    }
    let churned = churned??;
    let flipped = flipped?;
    let probes = probes.context("sending traffic")?;
    std::thread::sleep(Duration::from_secs(3));
    let guard_cpu = proc_cpu_seconds(pid)? - cpu0;
    let exit = guard.stop(Duration::from_secs(15));
    let captured = capture
        .join()
        .map_err(|_| anyhow::anyhow!("the capture thread panicked"))??;

    let by_pid: HashMap<u64, &ChurnProc> = churned.iter().map(|p| (p.pid, p)).collect();
    ensure!(
        by_pid.len() == churned.len(),
        "a churn pid came twice (pid reuse): the per-pid accounting would be wrong"
    );
    let stream = read_stream(&stream_path, &by_pid, netns)?;
    ensure!(
        stream.lines == captured,
        "read {} lines back, captured {captured}",
        stream.lines
    );
    Ok(report(&Inputs {
        duration,
        elapsed,
        samples: &samples,
        guard_cpu,
        exit_ok: exit.is_some_and(|s| s.success()),
        churned: &churned,
        stream: &stream,
        flips: &flipped,
        probes: &probes,
        servers: &servers.counts,
    }))
}

/// Samples the guard (pid `pid`) every [`SAMPLE_EVERY`] and once at `end`,
/// printing the progress, until `end` or a signal; fails when the load
/// ended early (`load_ended`) or the guard cannot be sampled.
fn sample_until(
    end: Instant,
    pid: u32,
    t0: Instant,
    cpu0: f64,
    progress: &Progress,
    load_ended: impl Fn() -> bool,
    samples: &mut Vec<Sample>,
) -> Result<()> {
    let mut next_sample = t0;
    loop {
        if signalled() {
            return Ok(());
        }
        if load_ended() {
            bail!("a load thread stopped early");
        }
        let now = Instant::now();
        if now >= next_sample || now >= end {
            let s = sample(pid, t0).context("sampling the guard (is it still running?)")?;
            println!(
                "soak {:>4.0} s: guard RSS {:>6.1} MiB, CPU {:>6.2} s; {} churn listeners, {} flips, \
                 {} probes; load {:.1}",
                s.t,
                s.rss_kib / 1024.0,
                s.cpu_s - cpu0,
                progress.churn_listeners.load(Ordering::Relaxed),
                progress.flips.load(Ordering::Relaxed),
                progress.probes.load(Ordering::Relaxed),
                s.load1,
            );
            samples.push(s);
            next_sample += SAMPLE_EVERY;
            if now >= end {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
