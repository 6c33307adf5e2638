//! `cargo xtask bench`: every figure is a ratio against a baseline measured
//! in the same run (these machines are noisy), written to
//! `bench/results/latest.json` and `bench/results/latest.md`.
//!
//! Each section is a module with `run(&Ctx) -> Result<Section>`; a section
//! that fails is recorded as failed (with the error) and the run goes on, so
//! one missing tool does not cost the other figures.

pub mod attach;
pub mod binds;
pub mod charts;
pub mod host;
pub mod monitor;
pub mod permitted;
pub mod policy;
pub mod stats;
pub mod verdict;
pub mod veth;

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::{build, setup, util};

/// What every section gets.
pub struct Ctx {
    pub root: PathBuf,
    /// The release portwatch binary.
    pub portwatch: PathBuf,
    /// `--quick`: fewer rounds and repetitions (a smoke run, for CI).
    pub quick: bool,
}

/// One section's results.
pub struct Section {
    /// Short key in latest.json, e.g. "verdict".
    pub key: &'static str,
    pub title: &'static str,
    pub json: Value,
    /// Markdown: a table (and a line or two on method and targets).
    pub markdown: String,
}

type Runner = fn(&Ctx) -> Result<Section>;

pub fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    let root = util::workspace_root();
    setup::ensure()?;
    // Another build to measure against in the same hour (an older commit
    // built in a worktree), as the integration tests take it.
    let portwatch = match std::env::var_os("PORTWATCH_BIN") {
        Some(bin) => {
            eprintln!("benchmarking {} (PORTWATCH_BIN)", bin.to_string_lossy());
            std::path::PathBuf::from(bin)
        }
        None => build::build_portwatch(true)?,
    };
    let ctx = Ctx {
        root: root.clone(),
        portwatch,
        quick,
    };
    let sections: [(&str, Runner); 7] = [
        ("verdict", verdict::run),
        ("veth", veth::run),
        ("permitted", permitted::run),
        ("monitor", monitor::run),
        ("host", host::run),
        ("binds", binds::run),
        ("policy", policy::run),
    ];
    let started = Instant::now();
    let mut json_out = serde_json::Map::new();
    let mut md = String::from("# portwatch benchmarks\n\n");
    md.push_str(&machine_line());
    for (key, run) in sections {
        if only.is_some_and(|o| o != key) {
            continue;
        }
        util::header(&format!("bench: {key}"));
        let t = Instant::now();
        match run(&ctx) {
            Ok(section) => {
                md.push_str(&format!("\n## {}\n\n{}\n", section.title, section.markdown));
                json_out.insert(section.key.into(), section.json);
            }
            Err(e) => {
                eprintln!("bench {key} failed: {e:#}");
                md.push_str(&format!("\n## {key}\n\nFAILED: {e:#}\n"));
                json_out.insert(key.into(), json!({"error": format!("{e:#}")}));
            }
        }
        eprintln!("bench {key}: {:.0} s", t.elapsed().as_secs_f64());
    }
    let meta = json!({
        "machine": machine(),
        "quick": quick,
        "seconds": started.elapsed().as_secs_f64(),
        "date": util::output(std::process::Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%M:%SZ"))
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
    });
    json_out.insert("meta".into(), meta);
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join(if quick { "quick.json" } else { "latest.json" });
    let md_path = dir.join(if quick { "quick.md" } else { "latest.md" });
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&Value::Object(json_out.clone()))?,
    )?;
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    println!("wrote {} and {}", json_path.display(), md_path.display());
    let stem = if quick { "quick" } else { "latest" };
    for chart in charts::write(&Value::Object(json_out), &dir, stem)? {
        println!("wrote {}", chart.display());
    }
    Ok(())
}

/// `cargo xtask charts FILE`: the charts of a saved run.
pub fn redraw(file: &std::path::Path, stem: Option<&str>) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let run: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let stem = match stem {
        Some(s) => s.to_string(),
        None => file
            .file_stem()
            .and_then(|s| s.to_str())
            .context("the file has no name to name the charts after")?
            .to_string(),
    };
    let dir = util::workspace_root().join("bench/results");
    let written = charts::write(&run, &dir, &stem)?;
    anyhow::ensure!(
        !written.is_empty(),
        "{} has no verdict or veth section to chart",
        file.display()
    );
    for chart in written {
        println!("wrote {}", chart.display());
    }
    Ok(())
}

pub(crate) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
    })
}

fn machine_line() -> String {
    let m = machine();
    format!(
        "Machine: {} ({} cores), Linux {}. Ratios are against baselines measured in the same run.\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?")
    )
}
