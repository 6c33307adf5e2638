//! Helpers for portwatch's integration tests: they run the real binary
//! against the real kernel, with network namespaces and processes that each
//! test creates and that are removed even when the test panics.

pub mod frames;
pub mod net;
pub mod nmap;
pub mod reference;

// The lab (namespaces, processes, commands) is shared with xtask.
pub use portwatch_lab::{ChildGuard, Netns, run, signal, unique_name};

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub type Result<T = ()> = anyhow::Result<T>;

/// The portwatch binary under test: `PORTWATCH_BIN` (set by `cargo xtask
/// test`), else the workspace's debug build.
pub fn portwatch_bin() -> PathBuf {
    std::env::var_os("PORTWATCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/debug/portwatch"
            ))
        })
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns and of recorded flows.
pub fn monotonic_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which is valid
    // and exclusively borrowed for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    anyhow::ensure!(
        rc == 0,
        "clock_gettime(CLOCK_MONOTONIC): {}",
        std::io::Error::last_os_error()
    );
    Ok(u64::try_from(ts.tv_sec)? * 1_000_000_000 + u64::try_from(ts.tv_nsec)?)
}

/// `portwatch ARGS --json` running in the background; its JSON lines arrive
/// on a channel. Stopped with SIGINT (`stop`) or killed on drop.
pub struct Portwatch {
    child: ChildGuard,
    lines: mpsc::Receiver<Value>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Every line received so far, for failure messages and later searches.
    pub seen: Vec<Value>,
}

impl Portwatch {
    /// Starts portwatch and waits for its `ready` line.
    pub fn start(args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(portwatch_bin());
        cmd.args(args);
        Self::start_command(cmd)
    }

    /// Starts portwatch inside `netns` (`ip netns exec NAME portwatch ARGS
    /// --json`) and waits for its `ready` line. `ip` execs into portwatch,
    /// so the child's pid is portwatch's and `stop` signals it directly.
    /// `SSH_CONNECTION` is not passed on: it describes a session of the
    /// host's namespace, which nothing in `netns` can cut off.
    pub fn start_in(netns: &Netns, args: &[&str]) -> Result<Self> {
        let mut cmd = netns.command(&portwatch_bin().to_string_lossy());
        cmd.args(args).env_remove("SSH_CONNECTION");
        Self::start_command(cmd)
    }

    /// Runs `cmd` (portwatch and its arguments, possibly behind a wrapper
    /// that execs it) with `--json` appended, and waits for `ready`.
    pub fn start_command(mut cmd: Command) -> Result<Self> {
        cmd.arg("--json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let stdout = child.0.stdout.take().context("no stdout pipe")?;
        let stderr = child.0.stderr.take().context("no stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                // A line that is not JSON is itself a failure: keep it visible.
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| serde_json::json!({"event": "unparsable", "line": line, "error": e.to_string()}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                eprintln!("[portwatch] {line}");
                if let Ok(mut buf) = log_writer.lock() {
                    buf.push_str(&line);
                    buf.push('\n');
                }
            }
        });
        let mut pw = Self {
            child,
            lines: rx,
            stderr: log,
            seen: Vec::new(),
        };
        pw.wait_for(Duration::from_secs(30), |v| v["event"] == "ready")
            .context("portwatch did not become ready")?;
        Ok(pw)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// What portwatch wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for a line matching `pred`; earlier lines are kept in `seen`.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return Ok(v.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return Ok(v);
                    }
                }
                Err(_) => bail!(
                    "no matching line within {timeout:?}; {} lines seen, last: {:?}\nstderr:\n{}",
                    self.seen.len(),
                    self.seen.iter().rev().take(5).collect::<Vec<_>>(),
                    self.stderr()
                ),
            }
        }
    }

    /// SIGINT, then every remaining line until exit; returns the exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        signal(self.pid(), libc::SIGINT)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(v) => self.seen.push(v),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("portwatch did not exit within 20 s of SIGINT")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        Ok(self.child.0.wait()?)
    }

    /// Lines for listener events of `pid` with the given `event` kind.
    pub fn events_of(&self, pid: u32, event: &str) -> Vec<&Value> {
        self.seen
            .iter()
            .filter(|v| v["event"] == event && v["pid"] == pid)
            .collect()
    }
}

/// IDs of loaded BPF programs whose name starts with one of `names`
/// (bpftool truncates names to 15 characters).
pub fn loaded_programs(names: &[&str]) -> Result<Vec<u64>> {
    let out = run("bpftool", &["--json", "prog", "show"])?;
    let progs: Vec<Value> = serde_json::from_str(&out).context("parsing bpftool's JSON")?;
    Ok(progs
        .iter()
        .filter(|p| {
            p["name"].as_str().is_some_and(|n| {
                names
                    .iter()
                    .any(|want| want.starts_with(n) && !n.is_empty())
            })
        })
        .filter_map(|p| p["id"].as_u64())
        .collect())
}
