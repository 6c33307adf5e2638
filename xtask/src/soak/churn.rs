//! Listener churn in the server namespace: one `listeners.py --churn`
//! process after another, each reporting its pid and how many listeners it
//! opened and closed (the events the guard's stream must account for).

use std::{
    fs::File,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, atomic::Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use portwatch_lab::{ChildGuard, find_in_path, line_reader, netns::nsenter, wait_line};
use serde_json::Value;

use super::{
    CHURN_EVERY, CHURN_PER_PROC, Progress,
    schedule::{next_tick, signalled, sleep_until},
};

/// One churn process: what it says it did.
#[derive(Debug)]
pub struct ChurnProc {
    pub pid: u64,
    pub proto: &'static str,
    pub opened: u64,
    pub closed: u64,
}

/// `listeners.py --churn` processes in the server namespace, one after
/// another, TCP and UDP in turn, until the run stops.
pub fn spawn_churn(
    netns: PathBuf,
    fixture: PathBuf,
    errors: PathBuf,
    progress: Arc<Progress>,
) -> JoinHandle<Result<Vec<ChurnProc>>> {
    std::thread::spawn(move || -> Result<Vec<ChurnProc>> {
        let python = find_in_path("python3").context("python3 not found")?;
        let mut done = Vec::new();
        let mut tick = Instant::now();
        let mut k = 0u64;
        while sleep_until(tick) {
            let proto = if k.is_multiple_of(2) { "tcp" } else { "udp" };
            k += 1;
            let err = File::options()
                .create(true)
                .append(true)
                .open(&errors)
                .with_context(|| format!("opening {}", errors.display()))?;
            let mut cmd = nsenter(&netns, &python);
            cmd.arg(&fixture)
                .args(["--churn", &CHURN_PER_PROC.to_string(), proto])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(err);
            let one = churn_once(&mut cmd, proto).with_context(|| {
                let text = std::fs::read_to_string(&errors).unwrap_or_default();
                format!("churn process {k} ({proto}); its stderr:\n{text}")
            });
            match one {
                Ok(p) => {
                    progress
                        .churn_listeners
                        .fetch_add(p.opened, Ordering::Relaxed);
                    done.push(p);
                }
                // A signal reaches the fixture too; that is no failure.
                Err(_) if signalled() => break,
                Err(e) => return Err(e),
            }
            tick = next_tick(tick, CHURN_EVERY);
        }
        Ok(done)
    })
}

fn churn_once(cmd: &mut Command, proto: &'static str) -> Result<ChurnProc> {
    let mut proc = ChildGuard::spawn(cmd)?;
    let mut stdin = proc.0.stdin.take().context("no stdin pipe")?;
    let lines = line_reader(proc.0.stdout.take().context("no stdout pipe")?);
    let limit = Duration::from_secs(60);
    let (_, hello) = wait_line(&lines, limit, |l| l.contains("\"pid\""))
        .context("no pid line from the fixture")?;
    let hello: Value = serde_json::from_str(&hello).context("parsing the fixture's pid line")?;
    let pid = hello["pid"].as_u64().context("no pid")?;
    stdin.write_all(b"go\n")?;
    stdin.flush()?;
    let (_, report) = wait_line(&lines, limit, |l| l.contains("\"closed\""))
        .context("no report from the fixture")?;
    let report: Value = serde_json::from_str(&report).context("parsing the fixture's report")?;
    stdin.write_all(b"exit\n")?;
    stdin.flush()?;
    let status = proc.wait_within(Duration::from_secs(30))?;
    ensure!(status.success(), "the fixture exited with {status}");
    Ok(ChurnProc {
        pid,
        proto,
        opened: report["opened"].as_u64().context("no opened count")?,
        closed: report["closed"].as_u64().context("no closed count")?,
    })
}
