//! The owner check of owned ports (in the monitor's post_bind hooks): what it adds to bind(), against what
//! the monitor's own hooks add. Per-call latency from the `kernel_worker`
//! (`calls --port P`) in a namespace of the bench's own, alternating
//! within each round: no portwatch; `portwatch watch` (the monitor's hooks:
//! post_bind, sock_release, the tracepoint); a guard in the namespace whose
//! policy owns tcp/P and udp/P (owner: the worker's uid and cgroup, so
//! every kernel check runs), binding P (the owner's bind, checked and let
//! through) and P+1 (a port nobody owns: one map lookup).

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use portwatch_lab::{Guard, Netns, run_within};
use serde_json::{Value, json};

use super::{
    Ctx, Section,
    stats::{column, median, spread, stats_json, verdict},
    verdict::{kernel_worker, worker_json},
};

const PORT: u16 = 47_000;

/// The conditions, in the order of the table.
const CONDITIONS: [(&str, &str); 4] = [
    ("bare", "no portwatch"),
    ("monitor", "`portwatch watch` (monitor hooks)"),
    ("owned", "guard, bind of an owned port by its owner"),
    ("other", "guard, bind of a port nobody owns"),
];

/// The calls whose cost is compared: (worker key, label).
const CALLS: [(&str, &str); 2] = [("tcp_bind", "bind() TCP"), ("udp_bind", "bind() UDP")];

fn calls(worker: &Path, ns: &Netns, port: u16, cycles: u32) -> Result<Value> {
    let mut cmd = ns.nsenter(worker);
    cmd.args([
        "calls",
        "--cycles",
        &cycles.to_string(),
        "--port",
        &port.to_string(),
    ]);
    worker_json(&run_within(&mut cmd, Duration::from_secs(300))?)
}

/// This process's cgroup v2 path (the worker it starts inherits it).
fn own_cgroup() -> Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .context("no cgroup v2 line in /proc/self/cgroup")
}

/// One round: every condition once, starting at `first` (rounds rotate so
/// that no condition always runs first).
fn round(ctx: &Ctx, worker: &Path, ns: &Netns, cycles: u32, first: usize) -> Result<[Value; 4]> {
    let cgroup = own_cgroup()?;
    let policy = format!(
        "allow = [\n  {{ port = \"tcp/{PORT}\", owner = {{ user = \"root\", cgroup = \"{cgroup}\" }} }},\n  \
         {{ port = \"udp/{PORT}\", owner = {{ user = \"root\", cgroup = \"{cgroup}\" }} }},\n]\n"
    );
    let mut out: [Value; 4] = Default::default();
    for k in 0..3 {
        match (first + k) % 3 {
            0 => out[0] = calls(worker, ns, PORT, cycles)?,
            1 => {
                let _watch = super::host::Monitor::start(&ctx.portwatch)?;
                out[1] = calls(worker, ns, PORT, cycles)?;
            }
            _ => {
                let mut guard = Guard::start_with_policy(&ctx.portwatch, ns, "lo", &policy, &[])?;
                out[2] = calls(worker, ns, PORT, cycles)?;
                out[3] = calls(worker, ns, PORT + 1, cycles)?;
                guard.stop(Duration::from_secs(10));
            }
        }
    }
    Ok(out)
}

fn figure(calls: &Value, key: &str) -> f64 {
    calls[key]["median"].as_f64().unwrap_or(f64::NAN)
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let (rounds, cycles) = if ctx.quick { (2, 2_000) } else { (5, 20_000) };
    let worker = kernel_worker(&ctx.root)?;
    let ns = Netns::new("bind")?;
    let mut samples: Vec<[Value; 4]> = Vec::new();
    for r in 0..rounds {
        let s =
            round(ctx, &worker, &ns, cycles, r % 3).with_context(|| format!("round {}", r + 1))?;
        eprintln!(
            "binds round {}/{rounds}: UDP bind {:.0} / {:.0} / {:.0} / {:.0} ns (bare / monitor / owned / other)",
            r + 1,
            figure(&s[0], "udp_bind"),
            figure(&s[1], "udp_bind"),
            figure(&s[2], "udp_bind"),
            figure(&s[3], "udp_bind"),
        );
        samples.push(s);
    }

    let mut md = String::from("| call | ");
    md.push_str(
        &CONDITIONS
            .iter()
            .map(|(_, label)| format!("{label}, ns"))
            .collect::<Vec<_>>()
            .join(" | "),
    );
    md.push_str(" | monitor adds | bind hook adds (owned) | bind hook / monitor |\n|---|---|---|---|---|---|---|---|\n");
    let mut json_calls = serde_json::Map::new();
    let mut all_met = true;
    for (key, label) in CALLS {
        let cols: Vec<Vec<f64>> = (0..4)
            .map(|c| column(&samples, |s| figure(&s[c], key)))
            .collect();
        let m: Vec<f64> = cols.iter().map(|c| median(c)).collect();
        let monitor_adds = m[1] - m[0];
        // The guard runs the monitor's hooks too: the bind hook is the rest.
        let hook_adds = m[2] - m[1];
        let ratio = hook_adds / monitor_adds;
        let met = hook_adds <= monitor_adds.max(0.0);
        all_met &= met;
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {monitor_adds:+.0} | {hook_adds:+.0} | {ratio:.2} ({}) |",
            spread(&cols[0], 0),
            spread(&cols[1], 0),
            spread(&cols[2], 0),
            spread(&cols[3], 0),
            verdict(met)
        );
        json_calls.insert(
            key.into(),
            json!({
                "bare_ns": stats_json(&cols[0]),
                "monitor_ns": stats_json(&cols[1]),
                "owned_ns": stats_json(&cols[2]),
                "other_ns": stats_json(&cols[3]),
                "monitor_adds_ns": monitor_adds,
                "bind_hook_adds_ns": hook_adds,
                "ratio": ratio,
                "met": met,
            }),
        );
    }
    let _ = writeln!(
        md,
        "\n{rounds} rounds of {cycles} calls per condition (median of each round's median; \
         range over rounds), conditions rotated within rounds. Target: the bind hook adds no \
         more to a bind() than the monitor's own hooks do: {}.",
        verdict(all_met)
    );
    Ok(Section {
        key: "binds",
        title: "Bind hooks of owned ports: cost per bind()",
        json: json!({
            "rounds": rounds,
            "cycles": cycles,
            "port": PORT,
            "calls": json_calls,
            "target": {"what": "bind hook adds ≤ monitor hooks add, per bind()", "met": all_met},
        }),
        markdown: md,
    })
}
