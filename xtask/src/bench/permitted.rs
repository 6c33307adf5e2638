//! The permitted path: TCP throughput (iperf3) and request/response latency
//! (a one-byte TCP ping-pong, like netperf's TCP_RR) through ports the
//! policy permits, with nothing, then portwatch's guard (native and generic
//! XDP, as an operator starts it, and at tc ingress) on the receiving veth.
//! Configurations alternate within each round.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result, ensure};
use portwatch_lab::{Lab, require_tools, run_within, spawn_server};
use serde_json::{Value, json};

use super::{
    Ctx, Section,
    attach::{BareMode, attach_bare, bare_program, start_guard, start_guard_default},
    stats::{column, config_table, median, rotated, spread, stats_json, verdict},
};

const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
const ALLOW: [&str; 2] = ["tcp/5201", "tcp/5202"];

/// Echoes whatever each connection sends, one connection at a time.
const RR_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(64)
        if not b:
            break
        c.sendall(b)
    c.close()
"#;

/// N one-byte transactions on one connection; prints their latency summary.
const RR_CLIENT: &str = r#"
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=5)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def once():
    c.sendall(b"x")
    if not c.recv(64):
        raise SystemExit("connection closed")
for _ in range(500):
    once()
lat = []
t0 = time.perf_counter_ns()
for _ in range(n):
    a = time.perf_counter_ns()
    once()
    lat.append(time.perf_counter_ns() - a)
total = time.perf_counter_ns() - t0
lat.sort()
print(json.dumps({"per_s": n / (total / 1e9), "p50_us": lat[n // 2] / 1e3,
                  "p99_us": lat[max(0, -(-n * 99 // 100) - 1)] / 1e3}))
"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    None,
    BarePass,
    /// The same two instructions in generic mode: what generic XDP costs
    /// by itself (it copies every non-linear skb before the program runs).
    BarePassGeneric,
    Native,
    Generic,
    /// No `--xdp-mode`: what an operator gets.
    Default,
    /// `--xdp-mode tc`: the verdict at tc ingress, on the skb as it is.
    Tc,
}

const CONFIGS: [Config; 7] = [
    Config::None,
    Config::BarePass,
    Config::BarePassGeneric,
    Config::Native,
    Config::Generic,
    Config::Default,
    Config::Tc,
];

impl Config {
    fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::BarePass => "bare_xdp_pass_native",
            Config::BarePassGeneric => "bare_xdp_pass_generic",
            Config::Native => "portwatch_native",
            Config::Generic => "portwatch_generic",
            Config::Default => "portwatch_default",
            Config::Tc => "portwatch_tc",
        }
    }

    /// Where this configuration's samples are (CONFIGS lists the variants
    /// in their declared order).
    fn at(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            Config::None => "no filter",
            Config::BarePass => "bare XDP_PASS (native): veth's XDP mode alone",
            Config::BarePassGeneric => "bare XDP_PASS (generic): generic XDP alone",
            Config::Native => "portwatch guard (native XDP)",
            Config::Generic => "portwatch guard (generic XDP)",
            Config::Default => "portwatch guard (default: --xdp-mode auto)",
            Config::Tc => "portwatch guard (tc ingress: --xdp-mode tc)",
        }
    }
}

struct Sample {
    gbit: f64,
    retrans: f64,
    rr_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn measure(lab: &Lab, seconds: u64, transactions: u64) -> Result<Sample> {
    let server_ip = lab.server_v4().to_string();
    let mut iperf = lab.client.command("iperf3");
    iperf.args([
        "-c",
        &server_ip,
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    let out = run_within(&mut iperf, Duration::from_secs(seconds + 20))?;
    let v: Value = serde_json::from_str(&out).context("parsing iperf3 -J")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3's output: {out}"))?;
    let retrans = v["end"]["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0);

    let mut rr = lab.client.command("python3");
    rr.args([
        "-c",
        RR_CLIENT,
        &server_ip,
        &RR_PORT.to_string(),
        &transactions.to_string(),
    ]);
    // Python manages well over 5,000 transactions/s here.
    let limit = Duration::from_secs(20 + transactions / 5_000);
    let out = run_within(&mut rr, limit)?;
    let v: Value = serde_json::from_str(out.trim()).context("parsing the ping-pong's output")?;
    let field = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {out}"));
    Ok(Sample {
        gbit: bps / 1e9,
        retrans,
        rr_per_s: field("per_s")?,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let (rounds, seconds, transactions) = if ctx.quick {
        (1, 1, 2_000)
    } else {
        (5, 3, 20_000)
    };
    require_tools(&["iperf3", "python3", "nsenter"])?;
    let lab = Lab::new()?;
    lab.pin_neighbours()?;
    let pass = bare_program(&lab.dir, "bench_xdp_pass", 2)?;
    let server_ip = lab.server_v4().to_string();
    let _iperf = spawn_server(
        &lab.server,
        "tcp",
        IPERF_PORT,
        "iperf3",
        &["-s", "-B", &server_ip, "-p", &IPERF_PORT.to_string()],
    )
    .context("starting iperf3")?;
    let _rr = spawn_server(
        &lab.server,
        "tcp",
        RR_PORT,
        "python3",
        &["-c", RR_SERVER, &server_ip, &RR_PORT.to_string()],
    )
    .context("starting python3")?;
    // Once through, unmeasured: the first connections warm caches.
    measure(&lab, 1, 1_000).context("warm-up")?;

    // What auto chose on this veth, as ip link showed it.
    let mut default_mode = None;
    let samples = rotated(rounds, CONFIGS.len(), |round, i| {
        let config = CONFIGS[i];
        let (guard, bare) = match config {
            Config::None => (None, None),
            Config::BarePass => (None, Some(attach_bare(&lab, &pass, BareMode::Native)?)),
            Config::BarePassGeneric => (None, Some(attach_bare(&lab, &pass, BareMode::Generic)?)),
            Config::Native => (
                Some(start_guard(&ctx.portwatch, &lab, "native", &ALLOW)?),
                None,
            ),
            Config::Generic => (
                Some(start_guard(&ctx.portwatch, &lab, "generic", &ALLOW)?),
                None,
            ),
            Config::Default => {
                let (guard, mode) = start_guard_default(&ctx.portwatch, &lab, &ALLOW)?;
                default_mode = Some(mode);
                (Some(guard), None)
            }
            Config::Tc => (Some(start_guard(&ctx.portwatch, &lab, "tc", &ALLOW)?), None),
        };
        let s = measure(&lab, seconds, transactions)
            .with_context(|| format!("measuring {}", config.label()))?;
        drop((guard, bare));
        eprintln!(
            "permitted round {}/{rounds}: {:<30} {:>6.2} Gbit/s, {:>7.0} transactions/s, p50 {:.1} µs, p99 {:.1} µs",
            round + 1,
            config.label(),
            s.gbit,
            s.rr_per_s,
            s.p50_us,
            s.p99_us
        );
        Ok(s)
    })?;
    // Leave the lab with nothing attached.
    let link = lab.server_link()?;
    ensure!(!link.contains("prog/xdp"), "XDP still attached: {link}");
    ensure!(
        lab.server_guard_mode()?.is_none(),
        "the guard is still attached after the last round"
    );

    let col = |i: usize, f: fn(&Sample) -> f64| -> Vec<f64> { column(&samples[i], f) };
    let (none, bare, bare_generic, native, generic, default, tc) = (
        Config::None.at(),
        Config::BarePass.at(),
        Config::BarePassGeneric.at(),
        Config::Native.at(),
        Config::Generic.at(),
        Config::Default.at(),
        Config::Tc.at(),
    );
    let gbit = |i| col(i, |s| s.gbit);
    let rate = |i| col(i, |s| s.rr_per_s);
    let p50 = |i| col(i, |s| s.p50_us);
    let p99 = |i| col(i, |s| s.p99_us);
    let base_gbit = median(&gbit(none));
    let base_rate = median(&rate(none));
    let native_ratio = median(&gbit(native)) / base_gbit;

    let (mut md, json_configs) = config_table(
        "| configuration | TCP Gbit/s: median (min–max) | vs none | transactions/s: median (min–max) | vs none | p50 µs | p50 vs none | p99 µs |\n\
         |---|---|---|---|---|---|---|---|\n",
        CONFIGS.iter().enumerate().map(|(i, config)| {
            let row = format!(
                "| {} | {} | {:.3}× | {} | {:.3}× | {:.1} | {:.3}× | {:.1} |",
                config.label(),
                spread(&gbit(i), 2),
                median(&gbit(i)) / base_gbit,
                spread(&rate(i), 0),
                median(&rate(i)) / base_rate,
                median(&p50(i)),
                median(&p50(i)) / median(&p50(none)),
                median(&p99(i)),
            );
            let json = json!({
                "label": config.label(),
                "tcp_gbit_per_s": stats_json(&gbit(i)),
                "tcp_retransmits": stats_json(&col(i, |s| s.retrans)),
                "rr_transactions_per_s": stats_json(&rate(i)),
                "rr_p50_us": stats_json(&p50(i)),
                "rr_p99_us": stats_json(&p99(i)),
            });
            (config.key(), row, json)
        }),
    );
    let met = native_ratio >= 0.98;
    let default_ratio = median(&gbit(default)) / base_gbit;
    let default_met = default_ratio >= 0.95;
    let _ = writeln!(
        md,
        "\nMethod: {rounds} rounds; each runs iperf3 (one TCP stream, {seconds} s) to \
         tcp/{IPERF_PORT} and {transactions} one-byte request/response transactions \
         (Python, TCP_NODELAY, one connection) to tcp/{RR_PORT}, client namespace → server \
         namespace over a veth pair; the guard (policy: {}) is on the server's veth and is \
         started afresh for each measurement. Bare XDP_PASS is a two-instruction program \
         assembled at run time, attached native: what native XDP on a veth costs by itself \
         (the veth then hands every skb to XDP as a frame, copying large GSO packets), and \
         generic: what generic XDP costs by itself. \
         Configurations alternate within each round. transactions/s counts every stall, so \
         it swings with other load on the machine; p50 latency is the steadier comparison.\n",
        ALLOW.join(", ")
    );
    let _ = writeln!(
        md,
        "- throughput loss ≤ 2% with portwatch (native XDP / none): {native_ratio:.3} — {}",
        verdict(met)
    );
    let generic_floor = median(&gbit(bare_generic)) / base_gbit;
    let _ = writeln!(
        md,
        "- permitted TCP throughput with the default mode ≥ 0.95× no filter (auto chose \
         {} on this veth): {default_ratio:.3} — {}",
        default_mode.unwrap_or("?"),
        verdict(default_met)
    );
    let _ = writeln!(
        md,
        "- the floor of generic XDP, a bare XDP_PASS in generic mode: {generic_floor:.3}× no \
         filter's throughput (the kernel copies every non-linear skb into pages of its own \
         before any generic program runs); portwatch generic / that floor: {:.3}",
        median(&gbit(generic)) / median(&gbit(bare_generic))
    );
    let _ = writeln!(
        md,
        "- for reference, portwatch native / bare XDP_PASS native (the program's own share): \
         {:.3} throughput, {:.3} transactions/s",
        median(&gbit(native)) / median(&gbit(bare)),
        median(&rate(native)) / median(&rate(bare))
    );
    let _ = writeln!(
        md,
        "- for reference, tc ingress (`--xdp-mode tc`): {:.3}× no filter's throughput, {:.3}× \
         generic XDP's",
        median(&gbit(tc)) / base_gbit,
        median(&gbit(tc)) / median(&gbit(generic))
    );
    Ok(Section {
        key: "permitted",
        title: "The permitted path",
        json: json!({
            "rounds": rounds,
            "iperf_seconds": seconds,
            "rr_transactions": transactions,
            "configs": json_configs,
            "ratios": {
                "native_gbit_vs_none": native_ratio,
                "native_gbit_vs_bare_pass": median(&gbit(native)) / median(&gbit(bare)),
                "generic_gbit_vs_none": median(&gbit(generic)) / base_gbit,
                "bare_pass_generic_gbit_vs_none": generic_floor,
                "generic_gbit_vs_bare_pass_generic": median(&gbit(generic)) / median(&gbit(bare_generic)),
                "native_rr_vs_none": median(&rate(native)) / base_rate,
                "native_rr_vs_bare_pass": median(&rate(native)) / median(&rate(bare)),
                "native_rr_p50_vs_none": median(&p50(native)) / median(&p50(none)),
                "generic_rr_p50_vs_none": median(&p50(generic)) / median(&p50(none)),
                "generic_rr_vs_none": median(&rate(generic)) / base_rate,
                "default_gbit_vs_none": default_ratio,
                "tc_gbit_vs_none": median(&gbit(tc)) / base_gbit,
                "tc_gbit_vs_generic": median(&gbit(tc)) / median(&gbit(generic)),
                "tc_rr_p50_vs_none": median(&p50(tc)) / median(&p50(none)),
            },
            "default_xdp_mode": default_mode,
            "targets": [
                {"target": "throughput loss ≤ 2% (native / none ≥ 0.98)", "ratio": native_ratio, "met": met},
                {"target": "default XDP mode on a veth ≥ 0.95× no filter", "ratio": default_ratio, "met": default_met},
            ],
        }),
        markdown: md,
    })
}
