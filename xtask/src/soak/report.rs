//! What a run gave, checked and written up: the pass/fail checks,
//! soak.md and soak.json.

use std::{
    fmt::Write as _,
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde_json::{Value, json};

use super::{
    ALLOW, ANSWER_WAIT, CHURN_PER_PROC, DROP_WAIT, FLIP_EVERY, RSS_BOUND_FRACTION, RSS_BOUND_KIB,
    SAMPLE_EVERY, TCP_DENIED, TCP_FLIP, TCP_OPEN, UDP_DENIED, UDP_OPEN, WARM_UP,
    churn::ChurnProc,
    flips::Flips,
    memory::{Sample, slope_kib_per_min},
    servers::ServerCounts,
    stream::Stream,
    traffic::Traffic,
};
use crate::{bench::machine, util};

/// The run's results: what soak.json and soak.md hold, and each check.
pub struct Report {
    pub json: Value,
    pub markdown: String,
    pub checks: Vec<(String, bool)>,
}

/// What one run gave.
pub struct Inputs<'a> {
    pub duration: Duration,
    pub elapsed: f64,
    pub samples: &'a [Sample],
    pub guard_cpu: f64,
    pub exit_ok: bool,
    pub churned: &'a [ChurnProc],
    pub stream: &'a Stream,
    pub flips: &'a Flips,
    pub probes: &'a Traffic,
    pub servers: &'a ServerCounts,
}

/// The checks, soak.md and soak.json of a run.
pub fn report(i: &Inputs<'_>) -> Report {
    let mut checks: Vec<(String, bool)> = Vec::new();

    // Memory.
    let warm = WARM_UP.as_secs_f64();
    let after: Vec<Sample> = i.samples.iter().copied().filter(|s| s.t >= warm).collect();
    let first = i.samples.first().copied();
    let start = after.first().copied();
    let last = after.last().copied();
    let (start_kib, end_kib) = (
        start.map_or(0.0, |s| s.rss_kib),
        last.map_or(0.0, |s| s.rss_kib),
    );
    let max_kib = i.samples.iter().map(|s| s.rss_kib).fold(0.0, f64::max);
    let hwm_kib = last.map_or(0.0, |s| s.hwm_kib);
    let slope = slope_kib_per_min(&after);
    let bound_kib = RSS_BOUND_KIB.max(start_kib * RSS_BOUND_FRACTION);
    let growth = end_kib - start_kib;
    checks.push((
        format!(
            "RSS flat: end {:.1} MiB within +{:.1} MiB of start {:.1} MiB (grew {:+.0} KiB)",
            end_kib / 1024.0,
            bound_kib / 1024.0,
            start_kib / 1024.0,
            growth
        ),
        after.len() >= 2 && growth <= bound_kib,
    ));

    // Events.
    let made_listens: u64 = i.churned.iter().map(|p| p.opened).sum();
    let made_closes: u64 = i.churned.iter().map(|p| p.closed).sum();
    let seen_listens: u64 = i.stream.listens.values().sum();
    let seen_closes: u64 = i.stream.closes.values().sum();
    let over = i.churned.iter().filter(|p| {
        i.stream.listens.get(&p.pid).copied().unwrap_or(0) > p.opened
            || i.stream.closes.get(&p.pid).copied().unwrap_or(0) > p.closed
    });
    let over_pids = over.count();
    // Which fixtures came up short, with their place in the sequence.
    let short: Vec<Value> = i
        .churned
        .iter()
        .enumerate()
        .filter_map(|(k, p)| {
            let l = i.stream.listens.get(&p.pid).copied().unwrap_or(0);
            let c = i.stream.closes.get(&p.pid).copied().unwrap_or(0);
            (l < p.opened || c < p.closed).then(|| {
                json!({"index": k, "pid": p.pid, "proto": p.proto, "opened": p.opened,
                       "closed": p.closed, "listens_seen": l, "closes_seen": c})
            })
        })
        .take(20)
        .collect();
    let summary = i.stream.summary.as_ref();
    let field = |k: &str| summary.and_then(|s| s[k].as_u64()).unwrap_or(0);
    let (lost, malformed) = (field("lost"), field("malformed"));
    let missing = (made_listens + made_closes).saturating_sub(seen_listens + seen_closes);
    let tcp_procs = i.churned.iter().filter(|p| p.proto == "tcp").count();
    checks.push((
        format!(
            "guard stopped cleanly with a summary line (exit ok: {}, summary: {})",
            i.exit_ok,
            summary.is_some()
        ),
        i.exit_ok && summary.is_some(),
    ));
    checks.push((
        format!("no churn pid has more events than it made ({over_pids} pids over)"),
        over_pids == 0,
    ));
    checks.push((
        format!(
            "nothing lost silently: {missing} churn events missing <= {lost} lost + {malformed} \
             malformed counted by the guard"
        ),
        summary.is_some() && missing <= lost + malformed,
    ));
    checks.push((
        format!(
            "every loss announced: lost lines sum {} = summary lost {lost}",
            i.stream.lost_announced
        ),
        i.stream.lost_announced == lost,
    ));
    checks.push((
        format!(
            "the stream is JSON Lines ({} unparsable lines)",
            i.stream.unparsable
        ),
        i.stream.unparsable == 0,
    ));

    // Policy.
    let flips_made = i.flips.allow + i.flips.deny;
    checks.push((
        format!(
            "every flip succeeded and was announced: {flips_made} made, {} failed, {} policy \
             events for tcp/{TCP_FLIP}",
            i.flips.failed, i.stream.policy_flip
        ),
        flips_made > 0 && i.flips.failed == 0 && i.stream.policy_flip == flips_made,
    ));

    // Traffic.
    let p = i.probes;
    let srv = |c: &AtomicU64| c.load(Ordering::Relaxed);
    checks.push((
        format!(
            "permitted tcp/{TCP_OPEN}: {} of {} connections answered",
            p.tcp_open.answered, p.tcp_open.attempts
        ),
        p.tcp_open.attempts > 0 && p.tcp_open.answered == p.tcp_open.attempts,
    ));
    checks.push((
        format!(
            "permitted udp/{UDP_OPEN}: {} of {} datagrams echoed",
            p.udp_open.answered, p.udp_open.attempts
        ),
        p.udp_open.attempts > 0 && p.udp_open.answered == p.udp_open.attempts,
    ));
    checks.push((
        format!(
            "denied tcp/{TCP_DENIED}: {} of {} SYNs got through, server accepted {}",
            p.tcp_denied.through(),
            p.tcp_denied.attempts,
            srv(&i.servers.tcp_denied)
        ),
        p.tcp_denied.attempts > 0 && p.tcp_denied.through() == 0 && srv(&i.servers.tcp_denied) == 0,
    ));
    checks.push((
        format!(
            "denied udp/{UDP_DENIED}: {} of {} datagrams reached the server ({} echoes back)",
            srv(&i.servers.udp_denied),
            p.udp_denied.attempts,
            p.udp_denied.answered
        ),
        p.udp_denied.attempts > 0 && srv(&i.servers.udp_denied) == 0 && p.udp_denied.answered == 0,
    ));
    checks.push((
        format!(
            "flipped tcp/{TCP_FLIP} sees both verdicts: {} answered, {} dropped of {}",
            p.tcp_flip.answered, p.tcp_flip.timed_out, p.tcp_flip.attempts
        ),
        p.tcp_flip.answered > 0 && p.tcp_flip.timed_out > 0,
    ));

    let all_ok = checks.iter().all(|(_, ok)| *ok);
    let minutes = i.duration.as_secs_f64() / 60.0;
    let load: Vec<f64> = i.samples.iter().map(|s| s.load1).collect();
    let load_mean = if load.is_empty() {
        0.0
    } else {
        load.iter().sum::<f64>() / load.len() as f64
    };
    let m = machine();
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let events_total = field("events");

    let mut md = String::from("# portwatch soak\n\n");
    let _ = writeln!(
        md,
        "{date}: {minutes:.0} min ({:.0} s) on {} ({} cores), Linux {}; machine load average \
         (1 min) {load_mean:.1} on average over the run (the machine was shared).\n",
        i.elapsed,
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "Result: **{}**\n",
        if all_ok { "passed" } else { "FAILED" }
    );
    let _ = writeln!(md, "| check | result |\n|---|---|");
    for (what, ok) in &checks {
        let _ = writeln!(md, "| {what} | {} |", if *ok { "ok" } else { "FAILED" });
    }
    let _ = writeln!(
        md,
        "\n## Guard memory and CPU\n\n\
         | RSS at {:.0} s (start, after warm-up) | RSS at end | max | slope after warm-up | \
         VmHWM at end | RSS at first sample | guard CPU over the run |\n\
         |---|---|---|---|---|---|---|\n\
         | {:.1} MiB | {:.1} MiB | {:.1} MiB | {slope:+.1} KiB/min | {:.1} MiB | {:.1} MiB | \
         {:.2} s ({:.2}% of one core) |\n",
        start.map_or(0.0, |s| s.t),
        start_kib / 1024.0,
        end_kib / 1024.0,
        max_kib / 1024.0,
        hwm_kib / 1024.0,
        first.map_or(0.0, |s| s.rss_kib / 1024.0),
        i.guard_cpu,
        100.0 * i.guard_cpu / i.elapsed.max(1.0),
    );
    let _ = writeln!(
        md,
        "| t (s) | RSS (MiB) | guard CPU (s) | load (1 min) |\n|---|---|---|---|"
    );
    for s in i.samples {
        let _ = writeln!(
            md,
            "| {:.0} | {:.2} | {:.2} | {:.1} |",
            s.t,
            s.rss_kib / 1024.0,
            s.cpu_s - i.samples.first().map_or(0.0, |f| f.cpu_s),
            s.load1
        );
    }
    let _ = writeln!(
        md,
        "\n## Events\n\n\
         | | made (fixture's counts) | seen in the guard's stream |\n|---|---|---|\n\
         | churn processes | {} ({tcp_procs} TCP, {} UDP) | |\n\
         | listens | {made_listens} | {seen_listens} |\n\
         | closes | {made_closes} | {seen_closes} |\n\
         | policy changes of tcp/{TCP_FLIP} | {flips_made} ({} allow, {} deny; {} failed) | {} |\n\n\
         The guard's summary: {events_total} events, {lost} lost, {malformed} malformed, {} drops \
         reported, {} suppressed; {} stream lines in all. Churn events without a namespace (read \
         after the fixture exited, so no /proc details): {}; of a churn pid in another \
         namespace: {}; fixtures with fewer events seen than made: {}.\n",
        i.churned.len(),
        i.churned.len() - tcp_procs,
        i.flips.allow,
        i.flips.deny,
        i.flips.failed,
        i.stream.policy_flip,
        field("drops"),
        field("suppressed"),
        i.stream.lines,
        i.stream.without_netns,
        i.stream.elsewhere,
        short.len(),
    );
    let _ = writeln!(
        md,
        "## Traffic (client namespace → server veth)\n\n\
         | probe | verdict wanted | attempts | answered | connected, no answer | refused | \
         timed out | other errors | reached the server |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (name, want, t, server) in [
        (
            format!("tcp/{TCP_OPEN}"),
            "pass",
            &p.tcp_open,
            &i.servers.tcp_open,
        ),
        (
            format!("udp/{UDP_OPEN}"),
            "pass",
            &p.udp_open,
            &i.servers.udp_open,
        ),
        (
            format!("tcp/{TCP_DENIED}"),
            "drop",
            &p.tcp_denied,
            &i.servers.tcp_denied,
        ),
        (
            format!("udp/{UDP_DENIED}"),
            "drop",
            &p.udp_denied,
            &i.servers.udp_denied,
        ),
        (
            format!("tcp/{TCP_FLIP}"),
            "flips",
            &p.tcp_flip,
            &i.servers.tcp_flip,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {want} | {} | {} | {} | {} | {} | {} | {} |",
            t.attempts,
            t.answered,
            t.connected,
            t.refused,
            t.timed_out,
            t.other,
            srv(server)
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: a lab of two namespaces and a veth pair; `portwatch guard --json` (enforce, \
         native XDP, policy {ALLOW:?}) on the server veth with its own pin directory, control \
         socket and policy file. Churn: one `tests/fixtures/listeners.py --churn {CHURN_PER_PROC} \
         tcp|udp` process a second (TCP and UDP in turn) in the server namespace, each reporting \
         its pid and the listeners it opened and closed; its events are the live listen/close \
         lines with that pid and the server namespace's inode, or no namespace (comm python3): \
         portwatch reads the namespace from /proc, too late for a fixture that already exited. Flips: `portwatch allow|deny \
         tcp/{TCP_FLIP} --socket ...` in turn every {} ms. Traffic: at most 20 probes a second of \
         each kind from the client namespace (TCP connects waiting {} ms for a handshake on \
         dropped ports and {} s for the answer on permitted ones; UDP datagrams, echoed on the \
         permitted port). Memory: VmRSS of the guard every {} s; start = the first sample at or \
         after {} s; flat = end ≤ start + max({} MiB, {:.0}% of start); slope = least squares \
         over the samples from the start on.",
        FLIP_EVERY.as_millis(),
        DROP_WAIT.as_millis(),
        ANSWER_WAIT.as_secs(),
        SAMPLE_EVERY.as_secs(),
        WARM_UP.as_secs(),
        RSS_BOUND_KIB / 1024.0,
        RSS_BOUND_FRACTION * 100.0,
    );

    let samples_json: Vec<Value> = i
        .samples
        .iter()
        .map(|s| json!({"t_s": s.t, "rss_kib": s.rss_kib, "hwm_kib": s.hwm_kib, "cpu_s": s.cpu_s, "load1": s.load1}))
        .collect();
    let mut drops: Vec<(u64, u64)> = i.stream.drops.iter().map(|(k, v)| (*k, *v)).collect();
    drops.sort_unstable();
    let json = json!({
        "date": date,
        "machine": m,
        "minutes": minutes,
        "elapsed_s": i.elapsed,
        "load1_mean": load_mean,
        "passed": all_ok,
        "checks": checks.iter().map(|(what, ok)| json!({"check": what, "ok": ok})).collect::<Vec<_>>(),
        "rss": {
            "warm_up_s": WARM_UP.as_secs(),
            "start_t_s": start.map(|s| s.t),
            "start_kib": start_kib,
            "end_kib": end_kib,
            "max_kib": max_kib,
            "hwm_end_kib": hwm_kib,
            "first_sample_kib": first.map(|s| s.rss_kib),
            "slope_kib_per_min": slope,
            "bound_kib": bound_kib,
            "growth_kib": growth,
        },
        "guard_cpu_s": i.guard_cpu,
        "samples": samples_json,
        "events": {
            "churn_processes": i.churned.len(),
            "churn_tcp_processes": tcp_procs,
            "listens_made": made_listens,
            "listens_seen": seen_listens,
            "closes_made": made_closes,
            "closes_seen": seen_closes,
            "missing": missing,
            "pids_with_more_seen_than_made": over_pids,
            "pids_with_fewer_seen_than_made": short,
            "seen_without_netns": i.stream.without_netns,
            "churn_pid_in_other_netns": i.stream.elsewhere,
            "lost_announced": i.stream.lost_announced,
            "suppressed_announced": i.stream.suppressed_announced,
            "summary": summary,
            "stream_lines": i.stream.lines,
            "unparsable_lines": i.stream.unparsable,
        },
        "policy": {
            "flips_allow": i.flips.allow,
            "flips_deny": i.flips.deny,
            "flips_failed": i.flips.failed,
            "failure_example": i.flips.failure_example,
            "policy_events_flip_port": i.stream.policy_flip,
            "policy_events_other": i.stream.policy_other,
        },
        "traffic": {
            "tcp_open": p.tcp_open.json(),
            "udp_open": p.udp_open.json(),
            "tcp_denied": p.tcp_denied.json(),
            "udp_denied": p.udp_denied.json(),
            "tcp_flip": p.tcp_flip.json(),
            "server_received": {
                "tcp_open": srv(&i.servers.tcp_open),
                "udp_open": srv(&i.servers.udp_open),
                "tcp_denied": srv(&i.servers.tcp_denied),
                "udp_denied": srv(&i.servers.udp_denied),
                "tcp_flip": srv(&i.servers.tcp_flip),
            },
            "drop_reports_by_port": drops.iter().map(|(port, n)| json!({"port": port, "reports": n})).collect::<Vec<_>>(),
        },
    });
    Report {
        json,
        markdown: md,
        checks,
    }
}
