//! The monitor's cost to the host: per-call latency of bind(), listen() and
//! close() with `portwatch watch` running and without it, alternating
//! within each round; and the monitor's memory and CPU time, idle and
//! under the burst of listeners the calls make.
//!
//! The calls come from portwatch's `kernel_worker` bench binary (`calls`):
//! per cycle a TCP socket is bound to 127.0.0.1:0, listens and is closed,
//! then a UDP socket is bound and closed; each call timed alone.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use portwatch_lab::{ChildGuard, Lines, line_reader, run_bounded, run_within};
use serde_json::{Value, json};

use super::{
    Ctx, Section,
    stats::{column, median, spread, stats_json, verdict},
    verdict::{kernel_worker, worker_json},
};
use crate::procstat::{memory_mb, proc_cpu_seconds};

/// Idle targets.
const MAX_IDLE_RSS_MB: f64 = 20.0;
/// Per-call figures: (worker key, statistic, label).
const CALLS: [(&str, &str, &str); 7] = [
    ("tcp_bind", "median", "bind() TCP"),
    ("tcp_listen", "median", "listen() TCP"),
    ("tcp_close", "median", "close() TCP listener"),
    ("udp_bind", "median", "bind() UDP"),
    ("udp_close", "median", "close() bound UDP"),
    ("tcp_cycle", "mean", "socket+bind+listen+close, mean"),
    ("udp_cycle", "mean", "socket+bind+close UDP, mean"),
];
/// The monitor's hooks, by program name.
const HOOKS: [&str; 4] = [
    "inet_sock_set_state",
    "post_bind4",
    "post_bind6",
    "sock_release",
];

/// `portwatch watch --json --no-snapshot --local`, its lines drained.
pub(super) struct Monitor {
    proc: ChildGuard,
    lines: Lines,
}

impl Monitor {
    pub(super) fn start(portwatch: &Path) -> Result<Self> {
        let mut cmd = Command::new(portwatch);
        cmd.args(["watch", "--json", "--no-snapshot", "--local"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = ChildGuard::spawn(&mut cmd)?;
        let stdout = proc.0.stdout.take().context("no stdout pipe")?;
        let lines = line_reader(stdout);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok((_, line)) if line.contains(r#""event":"ready""#) => break,
                Ok(_) => {}
                Err(_) => bail!("`portwatch watch` printed no ready line within 30 s"),
            }
        }
        Ok(Self { proc, lines })
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Drains lines until none came for `quiet`; the listener events among them.
    fn drain(&self, quiet: Duration) -> u64 {
        let mut events = 0;
        while let Ok((_, line)) = self.lines.recv_timeout(quiet) {
            events += u64::from(is_event(&line));
        }
        events
    }

    /// Stops it (SIGINT by pid) and reads to the end: its summary line.
    fn stop(mut self) -> Result<Value> {
        let status = self.proc.interrupt(Duration::from_secs(10));
        let mut summary = Value::Null;
        while let Ok((_, line)) = self.lines.recv_timeout(Duration::from_secs(5)) {
            if line.contains(r#""event":"summary""#) {
                summary = serde_json::from_str(&line).unwrap_or(Value::Null);
            }
        }
        match status {
            Some(s) if s.success() => Ok(summary),
            Some(s) => bail!(
                "`portwatch watch` exited with {}",
                portwatch_lab::describe_status(s)
            ),
            None => bail!("`portwatch watch` did not stop on SIGINT within 10 s; killed"),
        }
    }
}

fn is_event(line: &str) -> bool {
    line.contains(r#""event":"listen""#) || line.contains(r#""event":"close""#)
}

/// Monitor hooks attached by anyone (links to programs named as
/// portwatch's); None when bpftool cannot tell.
fn attached_hooks() -> Option<usize> {
    let json = |args: &[&str]| -> Option<Value> {
        let out = run_bounded(
            Command::new("bpftool").args(args),
            None,
            Duration::from_secs(20),
            None,
        )
        .ok()?;
        serde_json::from_str(&out.stdout).ok()
    };
    let progs = json(&["-j", "prog", "show"])?;
    let links = json(&["-j", "link", "show"])?;
    let hook_ids: Vec<u64> = progs
        .as_array()?
        .iter()
        .filter(|p| HOOKS.iter().any(|h| p["name"] == *h))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    Some(
        links
            .as_array()?
            .iter()
            .filter(|l| {
                l["prog_id"]
                    .as_u64()
                    .is_some_and(|id| hook_ids.contains(&id))
            })
            .count(),
    )
}

fn calls(worker: &Path, cycles: u32) -> Result<Value> {
    let mut cmd = Command::new(worker);
    cmd.args(["calls", "--cycles", &cycles.to_string()]);
    worker_json(&run_within(&mut cmd, Duration::from_secs(300))?)
}

/// One burst with the monitor running.
struct Burst {
    calls: Value,
    cpu_s: f64,
    events: u64,
    rss_mb: f64,
    hwm_mb: f64,
    summary: Value,
}

fn burst(
    ctx: &Ctx,
    worker: &Path,
    cycles: u32,
    idle: Option<Duration>,
) -> Result<(Burst, Option<Value>)> {
    let monitor = Monitor::start(&ctx.portwatch)?;
    let pid = monitor.pid();
    let idle_json = match idle {
        Some(span) => {
            // Settle after start-up, then nothing to do for `span`.
            monitor.drain(Duration::from_millis(500));
            let cpu0 = proc_cpu_seconds(pid)?;
            let start = Instant::now();
            let mut events = 0;
            while start.elapsed() < span {
                events += monitor.drain(span.saturating_sub(start.elapsed()));
            }
            let cpu = proc_cpu_seconds(pid)? - cpu0;
            let (rss, hwm) = memory_mb(pid)?;
            Some(json!({
                "seconds": span.as_secs_f64(),
                "cpu_s": cpu,
                "rss_mb": rss,
                "hwm_mb": hwm,
                "events_seen": events,
            }))
        }
        None => None,
    };
    let cpu0 = proc_cpu_seconds(pid)?;
    let calls = calls(worker, cycles)?;
    // Until it has written out everything the burst caused.
    let events = monitor.drain(Duration::from_millis(500));
    let cpu_s = proc_cpu_seconds(pid)? - cpu0;
    let (rss_mb, hwm_mb) = memory_mb(pid)?;
    let summary = monitor.stop()?;
    Ok((
        Burst {
            calls,
            cpu_s,
            events,
            rss_mb,
            hwm_mb,
            summary,
        },
        idle_json,
    ))
}

fn figure(calls: &Value, key: &str, stat: &str) -> f64 {
    calls[key][stat].as_f64().unwrap_or(0.0)
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let (rounds, cycles, idle) = if ctx.quick {
        (2usize, 2_000u32, Duration::from_secs(3))
    } else {
        (5, 20_000, Duration::from_secs(10))
    };
    let worker = kernel_worker(&ctx.root)?;
    let mut without: Vec<Value> = Vec::new();
    let mut with: Vec<Burst> = Vec::new();
    let mut idle_json = Value::Null;
    // Hooks attached while "without" ran (another monitor or guard).
    let mut foreign = 0usize;
    for round in 0..rounds {
        // Alternate which goes first.
        for monitored in [round % 2 == 1, round % 2 == 0] {
            if monitored {
                let (b, idle_sample) = burst(ctx, &worker, cycles, (round == 0).then_some(idle))
                    .with_context(|| format!("round {}: with the monitor", round + 1))?;
                if let Some(sample) = idle_sample {
                    idle_json = sample;
                }
                eprintln!(
                    "host round {}/{rounds}: with monitor: bind {:.0} ns, listen {:.0} ns; \
                     monitor {:.2} s CPU for {} events",
                    round + 1,
                    figure(&b.calls, "tcp_bind", "median"),
                    figure(&b.calls, "tcp_listen", "median"),
                    b.cpu_s,
                    b.events
                );
                with.push(b);
            } else {
                foreign = foreign.max(attached_hooks().unwrap_or(0));
                let c = calls(&worker, cycles)
                    .with_context(|| format!("round {}: without the monitor", round + 1))?;
                eprintln!(
                    "host round {}/{rounds}: without:      bind {:.0} ns, listen {:.0} ns",
                    round + 1,
                    figure(&c, "tcp_bind", "median"),
                    figure(&c, "tcp_listen", "median"),
                );
                without.push(c);
            }
        }
    }

    let mut md = String::from(
        "| call | without monitor, ns | with monitor, ns | added ns | with / without |\n\
         |---|---|---|---|---|\n",
    );
    let mut calls_json = serde_json::Map::new();
    for (key, stat, label) in CALLS {
        let off = column(&without, |c| figure(c, key, stat));
        let on = column(&with, |b| figure(&b.calls, key, stat));
        let (m_off, m_on) = (median(&off), median(&on));
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {:+.0} | {:.2}× |",
            spread(&off, 0),
            spread(&on, 0),
            m_on - m_off,
            m_on / m_off
        );
        calls_json.insert(
            key.into(),
            json!({
                "statistic": stat,
                "without_ns": stats_json(&off),
                "with_ns": stats_json(&on),
                "added_ns": m_on - m_off,
                "ratio": m_on / m_off,
            }),
        );
    }

    let cpu = column(&with, |b| b.cpu_s);
    let events = column(&with, |b| b.events as f64);
    let us_per_event = column(&with, |b| b.cpu_s * 1e6 / (b.events.max(1) as f64));
    let rss = column(&with, |b| b.rss_mb);
    let hwm = column(&with, |b| b.hwm_mb);
    let lost = column(&with, |b| b.summary["lost"].as_f64().unwrap_or(0.0));
    let idle_cpu = idle_json["cpu_s"].as_f64().unwrap_or(f64::NAN);
    let idle_rss = idle_json["rss_mb"].as_f64().unwrap_or(f64::NAN);
    let idle_cpu_met = idle_cpu == 0.0;
    let idle_rss_met = idle_rss < MAX_IDLE_RSS_MB;

    let _ = writeln!(
        md,
        "\n| monitor | CPU time, s | CPU per event, µs | RSS, MB | peak RSS, MB | events written | lost |\n\
         |---|---|---|---|---|---|---|\n\
         | idle {:.0} s | {:.2} | – | {:.1} | {:.1} | {} | – |\n\
         | burst of {cycles} cycles ({} listener events) | {} | {} | {} | {} | {} | {} |",
        idle.as_secs_f64(),
        idle_cpu,
        idle_rss,
        idle_json["hwm_mb"].as_f64().unwrap_or(f64::NAN),
        idle_json["events_seen"],
        4 * cycles,
        spread(&cpu, 2),
        spread(&us_per_event, 1),
        spread(&rss, 1),
        spread(&hwm, 1),
        spread(&events, 0),
        spread(&lost, 0),
    );
    let _ = writeln!(
        md,
        "\nMethod: {rounds} rounds; in each, {cycles} cycles without and with `portwatch watch \
         --json --no-snapshot --local` (started, ready line awaited, stopped by SIGINT to its \
         pid; its output read and discarded), the order alternating. A cycle: TCP socket, \
         bind 127.0.0.1:0, listen, close; UDP socket, bind, close; each call timed alone \
         (monotonic clock around the syscall, so ~20 ns of timer overhead in every figure). \
         Per-call rows: median over rounds of each round's median, (min–max) over rounds. \
         Monitor CPU: utime+stime from /proc/PID/stat (10 ms ticks) from before the burst until \
         its output was quiet for 0.5 s; RSS/peak: VmRSS/VmHWM from /proc/PID/status (the idle \
         row's peak is start-up: loading the programs)."
    );
    if foreign > 0 {
        let _ = writeln!(
            md,
            "Caveat: {foreign} monitor hooks of another process were attached during the \
             runs without portwatch (another monitor or guard): those figures include their cost."
        );
    }
    let _ = writeln!(
        md,
        "\nTargets, idle: no CPU — {} ({idle_cpu:.2} s in {:.0} s); RSS < {MAX_IDLE_RSS_MB:.0} MB \
         — {} ({idle_rss:.1} MB).",
        verdict(idle_cpu_met),
        idle.as_secs_f64(),
        verdict(idle_rss_met),
    );

    Ok(Section {
        key: "host",
        title: "Cost to the host (monitor hooks)",
        json: json!({
            "rounds": rounds,
            "cycles": cycles,
            "calls": calls_json,
            "idle": idle_json,
            "burst": {
                "listener_events": 4 * cycles,
                "cpu_s": stats_json(&cpu),
                "cpu_us_per_event": stats_json(&us_per_event),
                "events_written": stats_json(&events),
                "lost": stats_json(&lost),
                "rss_mb": stats_json(&rss),
                "hwm_mb": stats_json(&hwm),
            },
            "foreign_hooks_attached": foreign,
            "targets": {
                "idle_cpu_s": {"max": 0.0, "value": idle_cpu, "met": idle_cpu_met},
                "idle_rss_mb": {"max": MAX_IDLE_RSS_MB, "value": idle_rss, "met": idle_rss_met},
            },
        }),
        markdown: md,
    })
}
