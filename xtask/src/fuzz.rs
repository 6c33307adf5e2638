//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `portwatch/fuzz/`
//! and runs each for a bounded time, one after another.
//!
//! Everything it writes is under `target/fuzz/`: the build (`build/`), the
//! working corpus per target (`corpus/<target>`, grown from the committed
//! seeds in `portwatch/fuzz/seeds/<target>`), crash inputs
//! (`artifacts/<target>/`), libFuzzer's output (`logs/<target>.log`) and
//! `summary.json`.
//!
//! cargo-fuzz needs unstable compiler flags (`-Zsanitizer=address`): the
//! rustup `nightly` toolchain when it is installed, else the stable one
//! with `RUSTC_BOOTSTRAP=1`, which a machine without nightly (and without a
//! way to download it) still has.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::util;

/// The fuzz targets (`portwatch/fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["policy_file", "allow_spec", "control_request", "ring_event"];

/// The cargo-fuzz release installed when none is on PATH.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// libFuzzer's memory ceiling per target; the parsers need a few MB.
const RSS_LIMIT_MB: u32 = 2048;

/// One input taking longer than this is reported as a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;

/// The host triple cargo-fuzz builds for (its default; the directory name
/// under the target dir).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// What one target's run came to.
struct Outcome {
    target: &'static str,
    seconds: f64,
    /// From libFuzzer's final `stat::number_of_executed_units` (or `Done N
    /// runs`); `None` when it printed neither.
    execs: Option<u64>,
    corpus: usize,
    /// New crash, leak, timeout or OOM inputs from this run.
    crashes: Vec<PathBuf>,
    log: PathBuf,
}

pub fn fuzz(seconds: u64, only: Option<&str>) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let targets: Vec<&'static str> = match only {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|t| **t == name) {
            Some(t) => vec![*t],
            None => bail!(
                "unknown fuzz target {name:?} (expected one of {})",
                TARGETS.join(", ")
            ),
        },
    };
    let root = util::workspace_root();
    let fuzz_dir = root.join("portwatch").join("fuzz");
    let out = util::target_dir(&root)?.join("fuzz");

    util::header("cargo-fuzz");
    ensure_cargo_fuzz()?;
    let toolchain = Toolchain::pick();
    println!("toolchain: {}", toolchain.describe());

    util::header("build fuzz targets");
    let started = Instant::now();
    let mut build = toolchain.cargo_fuzz(&root);
    build
        .args(["build", "--fuzz-dir"])
        .arg(&fuzz_dir)
        .arg("--target-dir")
        .arg(out.join("build"));
    if let [one] = targets.as_slice() {
        build.arg(one);
    }
    util::run(&mut build)?;
    let build_secs = started.elapsed().as_secs_f64();
    println!("built in {build_secs:.0} s");

    let mut outcomes = Vec::new();
    for target in &targets {
        util::header(&format!("fuzz {target} for {seconds} s"));
        let outcome = run_target(target, seconds, &fuzz_dir, &out)?;
        println!("{}", line(&outcome));
        outcomes.push(outcome);
    }

    let summary = summary_json(&toolchain, build_secs, seconds, &outcomes);
    let summary_path = out.join("summary.json");
    std::fs::write(&summary_path, format!("{summary:#}\n"))
        .with_context(|| format!("writing {}", summary_path.display()))?;

    util::header("fuzz summary");
    for outcome in &outcomes {
        println!("{}", line(outcome));
    }
    println!("written to {}", summary_path.display());

    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.crashes.is_empty()).collect();
    if crashed.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("fuzzing found crashes:");
    for o in &crashed {
        for input in &o.crashes {
            let _ = write!(
                msg,
                "\n  {}: {} (minimise: cargo fuzz tmin --fuzz-dir portwatch/fuzz \
                 --target-dir target/fuzz/build {} {}; log: {})",
                o.target,
                input.display(),
                o.target,
                input.display(),
                o.log.display()
            );
        }
    }
    msg.push_str(
        "\nfix the bug, then add the minimised input to portwatch/fuzz/regressions/<target>/",
    );
    bail!(msg)
}

/// Installs the pinned cargo-fuzz when `cargo fuzz` is not available.
fn ensure_cargo_fuzz() -> Result<()> {
    let version = util::output(
        Command::new("cargo-fuzz")
            .arg("--version")
            .env("PATH", util::child_path()),
    );
    if let Ok(out) = &version
        && out.status.success()
    {
        print!("found {}", String::from_utf8_lossy(&out.stdout));
        return Ok(());
    }
    println!("installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .env("PATH", util::child_path());
    util::run(&mut install)
}

/// The toolchain cargo-fuzz builds with.
enum Toolchain {
    Nightly,
    /// Stable, with RUSTC_BOOTSTRAP=1 for the `-Z` flags.
    StableBootstrap,
}

impl Toolchain {
    fn pick() -> Self {
        let nightly = Command::new("rustup")
            .args(["run", "nightly", "rustc", "--version"])
            .env("PATH", util::child_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if matches!(nightly, Ok(status) if status.success()) {
            Toolchain::Nightly
        } else {
            Toolchain::StableBootstrap
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Toolchain::Nightly => "nightly",
            Toolchain::StableBootstrap => "stable",
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Toolchain::Nightly => "rustup nightly",
            Toolchain::StableBootstrap => {
                "rustup stable with RUSTC_BOOTSTRAP=1 (no nightly toolchain installed)"
            }
        }
    }

    /// `cargo fuzz` under this toolchain: `rustup run` so that the cargo
    /// cargo-fuzz starts, and the rustc that cargo starts, are this
    /// toolchain's whatever cargo PATH finds first.
    fn cargo_fuzz(&self, root: &Path) -> Command {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", self.name(), "cargo", "fuzz"])
            .current_dir(root)
            .env("PATH", util::child_path());
        if let Toolchain::StableBootstrap = self {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd
    }
}

/// Runs one target's binary directly (cargo-fuzz built it): the corpus
/// and artifact paths are then ours, and its output can be read.
fn run_target(target: &'static str, seconds: u64, fuzz_dir: &Path, out: &Path) -> Result<Outcome> {
    let binary = out.join("build").join(TRIPLE).join("release").join(target);
    let corpus = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    let logs = out.join("logs");
    let seeds = fuzz_dir.join("seeds").join(target);
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let before = list_files(&artifacts)?;
    let log = logs.join(format!("{target}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;

    // libFuzzer joins the prefix and the file name as strings.
    let mut prefix = artifacts.clone().into_os_string();
    prefix.push("/");
    let mut artifact_arg = std::ffi::OsString::from("-artifact_prefix=");
    artifact_arg.push(prefix);

    let mut cmd = Command::new(&binary);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .arg(artifact_arg)
        // New inputs go to the first directory; the seeds are only read.
        .arg(&corpus)
        .arg(&seeds)
        .stdout(Stdio::null())
        .stderr(log_file);
    let started = Instant::now();
    let status = util::status(&mut cmd)?;
    let elapsed = started.elapsed();

    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // libFuzzer also leaves `slow-unit-*` files, which are not failures.
    let crashes: Vec<PathBuf> = list_files(&artifacts)?
        .into_iter()
        .filter(|f| !before.contains(f) && is_failure(f))
        .collect();
    if !status.success() && crashes.is_empty() {
        print_tail(&text);
        bail!(
            "{target} stopped with {} and left no crash input (log: {})",
            util::describe(status),
            log.display()
        );
    }
    if !crashes.is_empty() {
        print_tail(&text);
    }
    Ok(Outcome {
        target,
        seconds: elapsed_secs(elapsed),
        execs: executions(&text),
        corpus: list_files(&corpus)?.len(),
        crashes,
        log,
    })
}

fn elapsed_secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn is_failure(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    ["crash-", "leak-", "timeout-", "oom-"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn print_tail(log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    for l in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("  | {l}");
    }
}

/// The run count libFuzzer reports last: `stat::number_of_executed_units: N`
/// (with -print_final_stats=1), else `Done N runs in S second(s)`.
fn executions(log: &str) -> Option<u64> {
    let stat = log.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("stat::number_of_executed_units:")
            .and_then(|n| n.trim().parse().ok())
    });
    stat.or_else(|| {
        log.lines().rev().find_map(|l| {
            l.trim()
                .strip_prefix("Done ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
    })
}

fn line(o: &Outcome) -> String {
    let execs = o.execs.map_or_else(|| "?".to_string(), |n| n.to_string());
    let rate = match o.execs {
        Some(n) if o.seconds > 0.0 => format!("{:.0}/s", n as f64 / o.seconds),
        _ => "?".to_string(),
    };
    let verdict = if o.crashes.is_empty() {
        "no crashes".to_string()
    } else {
        format!("{} CRASH INPUT(S)", o.crashes.len())
    };
    format!(
        "{:<16} {:>12} execs in {:>6.1} s ({rate}), corpus {}, {verdict}",
        o.target, execs, o.seconds, o.corpus
    )
}

fn summary_json(
    toolchain: &Toolchain,
    build_secs: f64,
    seconds: u64,
    outcomes: &[Outcome],
) -> serde_json::Value {
    let targets: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "target": o.target,
                "seconds": o.seconds,
                "executions": o.execs,
                "corpus_files": o.corpus,
                "crashes": o.crashes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "log": o.log.display().to_string(),
            })
        })
        .collect();
    serde_json::json!({
        "toolchain": toolchain.name(),
        "cargo_fuzz": CARGO_FUZZ_VERSION,
        "build_seconds": (build_secs * 10.0).round() / 10.0,
        "seconds_per_target": seconds,
        "targets": targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_execution_count() {
        let log = "#2\tINITED cov: 10\n#4096\tpulse\nDone 123456 runs in 61 second(s)\n\
                   stat::number_of_executed_units: 123457\nstat::average_exec_per_sec:     2023\n";
        assert_eq!(executions(log), Some(123_457));
        assert_eq!(executions("Done 99 runs in 1 second(s)\n"), Some(99));
        assert_eq!(executions("==1== ERROR: libFuzzer: deadly signal\n"), None);
    }

    #[test]
    fn targets_match_the_fuzz_crate() -> Result<()> {
        let dir = util::workspace_root().join("portwatch/fuzz/fuzz_targets");
        let mut found: Vec<String> = list_files(&dir)?
            .iter()
            .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .collect();
        found.sort();
        let mut want: Vec<&str> = TARGETS.to_vec();
        want.sort_unstable();
        assert_eq!(found, want);
        Ok(())
    }
}
