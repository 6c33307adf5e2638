//! Policy scale: how long validating and reloading a policy takes as its
//! sources grow (1k, 4k and 16k CIDRs in one rule, 16k being the kernel
//! trie's size), the growth exponent, and how long a `status` sent during
//! a 16k reload waits for its answer.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use portwatch_lab::{Guard, Lab, TempDir, run_within};
use serde_json::json;

use super::{
    Ctx, Section,
    stats::{median, spread, stats_json, verdict},
};

const SIZES: [usize; 3] = [1_000, 4_000, 16_000];
/// Targets (#15): 16k sources check in 100 ms; `status` answers within
/// 50 ms during a 16k reload.
const MAX_CHECK_16K_MS: f64 = 100.0;
const MAX_STATUS_WAIT_MS: f64 = 50.0;
const LIMIT: Duration = Duration::from_secs(120);

/// One rule with `n` distinct /24 sources.
fn policy_text(n: usize) -> String {
    let mut text =
        String::from("mode = \"enforce\"\nallow = [\"tcp/22\", { port = \"tcp/5432\", from = [\n");
    for i in 0..n {
        let _ = writeln!(text, "  \"10.{}.{}.0/24\",", i >> 8, i & 0xff);
    }
    text.push_str("] }]\n");
    text
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    run_within(cmd, LIMIT)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn status_ms(portwatch: &Path, socket: &Path) -> Result<f64> {
    timed(
        Command::new(portwatch)
            .args(["status", "--json", "--socket"])
            .arg(socket),
    )
}

/// Growth exponent k of t ~ n^k between the smallest and largest size.
fn exponent(small: f64, large: f64) -> f64 {
    let n_ratio = SIZES[SIZES.len() - 1] as f64 / SIZES[0] as f64;
    (large.max(1e-3) / small.max(1e-3)).ln() / n_ratio.ln()
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let rounds = if ctx.quick { 1 } else { 3 };
    let dir = TempDir::new("pol")?;
    let mut check = Vec::new();
    for n in SIZES {
        let file = dir.join(format!("policy-{n}.toml"));
        std::fs::write(&file, policy_text(n))?;
        let mut times = Vec::new();
        for _ in 0..rounds {
            times.push(timed(
                Command::new(&ctx.portwatch).arg("check-policy").arg(&file),
            )?);
        }
        check.push(times);
    }

    // Reloads on a running guard: small -> n -> small, with a prober
    // sending `status` meanwhile.
    let lab = Lab::new()?;
    let guard = Guard::start(
        &ctx.portwatch,
        &lab.server,
        &lab.server_if,
        &["tcp/22"],
        &[],
    )?;
    let socket = guard.socket();
    let policy = guard.policy_path();
    let small = std::fs::read_to_string(&policy)?;
    let idle: Vec<f64> = (0..5)
        .map(|_| status_ms(&ctx.portwatch, &socket))
        .collect::<Result<_>>()?;
    let mut reload = Vec::new();
    let mut during = Vec::new();
    for n in SIZES {
        let mut times = Vec::new();
        for _ in 0..rounds {
            std::fs::write(&policy, policy_text(n))?;
            let stop = Arc::new(AtomicBool::new(false));
            let prober = {
                let (stop, portwatch, socket) =
                    (stop.clone(), ctx.portwatch.clone(), socket.clone());
                std::thread::spawn(move || -> Result<Vec<f64>> {
                    let mut waits = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        waits.push(status_ms(&portwatch, &socket)?);
                    }
                    Ok(waits)
                })
            };
            let t = timed(
                Command::new(&ctx.portwatch)
                    .args(["reload", "--socket"])
                    .arg(&socket),
            );
            stop.store(true, Ordering::Relaxed);
            let waits = prober
                .join()
                .map_err(|_| anyhow::anyhow!("the status prober panicked"))??;
            times.push(t.with_context(|| format!("reloading {n} sources"))?);
            if n == SIZES[SIZES.len() - 1] {
                during.extend(waits);
            }
            std::fs::write(&policy, &small)?;
            run_within(
                Command::new(&ctx.portwatch)
                    .args(["reload", "--socket"])
                    .arg(&socket),
                LIMIT,
            )?;
        }
        reload.push(times);
    }
    drop(guard);
    ensure!(
        !during.is_empty(),
        "no status answered during the 16k reloads"
    );

    let check_med: Vec<f64> = check.iter().map(|t| median(t)).collect();
    let reload_med: Vec<f64> = reload.iter().map(|t| median(t)).collect();
    let check_k = exponent(check_med[0], check_med[2]);
    let reload_k = exponent(reload_med[0], reload_med[2]);
    let idle_med = median(&idle);
    let worst = during.iter().copied().fold(0.0, f64::max);
    let check_met = check_med[2] <= MAX_CHECK_16K_MS;
    let status_met = worst - idle_med <= MAX_STATUS_WAIT_MS;

    let mut md = String::from(
        "| sources | check-policy ms: median (min–max) | reload ms: median (min–max) |\n|---|---|---|\n",
    );
    for (i, n) in SIZES.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {n} | {} | {} |",
            spread(&check[i], 1),
            spread(&reload[i], 1)
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: {rounds} rounds; one rule `tcp/5432` with N distinct /24 sources, plus \
         `tcp/22`. check-policy: the release binary on the file, process start included. \
         reload: a guard on the lab's server veth, the file rewritten, `portwatch reload` \
         timed (client start, parse, check, compile, map diff and writes, the answer), then \
         back to the small policy. Meanwhile a prober sends `portwatch status --json` back to \
         back; an idle `status` takes {idle_med:.1} ms (process start included).\n"
    );
    let _ = writeln!(
        md,
        "- growth exponent (t ~ n^k, 1k → 16k): check-policy k = {check_k:.2}, reload k = \
         {reload_k:.2}"
    );
    let _ = writeln!(
        md,
        "- check-policy of 16k sources ≤ {MAX_CHECK_16K_MS} ms: {:.1} ms — {}",
        check_med[2],
        verdict(check_met)
    );
    let _ = writeln!(
        md,
        "- `status` during a 16k reload answers within {MAX_STATUS_WAIT_MS} ms of an idle one: \
         worst {worst:.1} ms against {idle_med:.1} ms idle ({} answered) — {}",
        during.len(),
        verdict(status_met)
    );
    Ok(Section {
        key: "policy",
        title: "Policy scale",
        json: json!({
            "rounds": rounds,
            "sizes": SIZES,
            "check_ms": check.iter().map(|t| stats_json(t)).collect::<Vec<_>>(),
            "reload_ms": reload.iter().map(|t| stats_json(t)).collect::<Vec<_>>(),
            "check_exponent": check_k,
            "reload_exponent": reload_k,
            "status_idle_ms": stats_json(&idle),
            "status_during_16k_reload_ms": stats_json(&during),
            "targets": [
                {"target": "check-policy of 16k sources ≤ 100 ms", "value_ms": check_med[2], "met": check_met},
                {"target": "status during a 16k reload within 50 ms of idle", "worst_ms": worst, "idle_ms": idle_med, "met": status_met},
            ],
        }),
        markdown: md,
    })
}
