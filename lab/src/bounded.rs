//! Commands that run for a bounded time: whatever happens, the caller gets
//! control back, and a command still running at its deadline is killed.

use std::{
    io::{Read, Write as _},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::process::{ChildGuard, command_line, describe_status};

/// How long [`run`] lets a command take.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// What a bounded command did.
#[derive(Debug)]
pub struct Outcome {
    /// `None`: still running at the deadline (or once `until` was seen), so
    /// it was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit status 3", "killed by signal 9", or "still running, killed".
    pub fn describe(&self) -> String {
        self.status
            .map_or_else(|| "still running, killed".to_string(), describe_status)
    }
}

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

/// Reads `from` on a thread until it closes; chunks arrive on `tx`.
fn pump(mut from: impl Read + Send + 'static, tx: mpsc::Sender<Chunk>, out: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = buf[..n].to_vec();
            let chunk = if out {
                Chunk::Out(chunk)
            } else {
                Chunk::Err(chunk)
            };
            if tx.send(chunk).is_err() {
                break;
            }
        }
    });
}

/// Runs `cmd` for at most `timeout`, writing `input` to its stdin (kept open
/// until the end, so that the command does not see EOF early). Stops early,
/// killing the command, once stdout contains `until`.
pub fn run_bounded(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
    until: Option<&str>,
) -> Result<Outcome> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = ChildGuard::spawn(cmd)?;
    let (tx, rx) = mpsc::channel();
    pump(
        child.0.stdout.take().context("no stdout pipe")?,
        tx.clone(),
        true,
    );
    pump(child.0.stderr.take().context("no stderr pipe")?, tx, false);
    let _stdin = match input {
        Some(bytes) => {
            let mut stdin = child.0.stdin.take().context("no stdin pipe")?;
            stdin.write_all(bytes)?;
            stdin.flush()?;
            Some(stdin)
        }
        None => None,
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let deadline = start + timeout;
    let mut status = None;
    let mut pipes_open = true;
    loop {
        if pipes_open {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(Chunk::Out(b)) => stdout.extend_from_slice(&b),
                Ok(Chunk::Err(b)) => stderr.extend_from_slice(&b),
                Err(mpsc::RecvTimeoutError::Disconnected) => pipes_open = false,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        } else {
            // The pipes close as it exits: look again soon (timings such
            // as the benchmarks' include this wait).
            std::thread::sleep(Duration::from_millis(1));
        }
        if until.is_some_and(|u| String::from_utf8_lossy(&stdout).contains(u)) {
            break;
        }
        if let Some(s) = child.0.try_wait()? {
            status = Some(s);
            // Whatever is still in the pipes, briefly (a grandchild may
            // hold them open).
            let drain_until = Instant::now() + Duration::from_millis(300);
            while let Ok(chunk) =
                rx.recv_timeout(drain_until.saturating_duration_since(Instant::now()))
            {
                match chunk {
                    Chunk::Out(b) => stdout.extend_from_slice(&b),
                    Chunk::Err(b) => stderr.extend_from_slice(&b),
                }
            }
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let elapsed = start.elapsed();
    drop(child); // kills it if it still runs
    Ok(Outcome {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
    })
}

/// Runs `cmd` (stdin closed) for at most `limit`; its stdout. Still running
/// at the limit (then killed) or a non-zero exit is an error naming the
/// command, with its stderr.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Result<String> {
    let out = run_bounded(cmd, None, limit, None)?;
    match out.status {
        None => bail!("`{}` timed out after {limit:?}; killed", command_line(cmd)),
        Some(status) if !status.success() => bail!(
            "`{}` failed ({}): {}",
            command_line(cmd),
            describe_status(status),
            out.stderr.trim()
        ),
        Some(_) => Ok(out.stdout),
    }
}

/// `program args...` for at most [`RUN_LIMIT`], failing unless it exits 0;
/// its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_within(Command::new(program).args(args), RUN_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    /// `sh -c SCRIPT`, bounded.
    fn bounded(script: &str, input: Option<&[u8]>, limit_ms: u64, until: Option<&str>) -> Outcome {
        let limit = Duration::from_millis(limit_ms);
        match run_bounded(&mut sh(script), input, limit, until) {
            Ok(out) => out,
            Err(e) => panic!("sh -c {script:?}: {e:#}"),
        }
    }

    #[test]
    fn output_and_status_are_kept() {
        let out = bounded("echo out; echo err >&2; exit 3", None, 10_000, None);
        assert_eq!((&*out.stdout, &*out.stderr), ("out\n", "err\n"));
        assert_eq!(out.describe(), "exit status 3");
        assert!(!out.success());
    }

    #[test]
    fn input_reaches_stdin() {
        assert_eq!(
            bounded("head -n 1", Some(b"ping\n"), 10_000, None).stdout,
            "ping\n"
        );
    }

    #[test]
    fn a_command_still_running_at_the_deadline_is_killed() {
        let out = bounded("sleep 30", None, 200, None);
        assert!(out.status.is_none());
        assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    }

    #[test]
    fn until_stops_early() {
        let out = bounded("echo ready; sleep 30", None, 20_000, Some("ready"));
        assert!(out.status.is_none());
        assert!(out.elapsed < Duration::from_secs(5), "{:?}", out.elapsed);
    }

    #[test]
    fn run_within_fails_with_the_command_and_its_stderr() {
        let err = run_within(&mut sh("echo no >&2; exit 1"), Duration::from_secs(10))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("`sh -c 'echo no >&2; exit 1'` failed (exit status 1): no")
        );
        let err = run_within(&mut sh("sleep 30"), Duration::from_millis(100)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("timed out")));
    }

    #[test]
    fn run_returns_stdout() -> Result<()> {
        assert_eq!(run("echo", &["hi"])?, "hi\n");
        Ok(())
    }
}
