//! `--log-format json`: stderr carries one JSON object per line, events
//! and log records alike, and stdout carries nothing.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use portwatch_tests::{
    ChildGuard, Netns, Result,
    net::{GuardPaths, Lab, TempFile, path_str, tcp_server},
    portwatch_bin, signal,
};
use serde_json::Value;

/// portwatch with its stderr read line by line and its stdout kept whole.
struct Running {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Result<Self> {
        cmd.env("RUST_LOG", "info")
            .env_remove("SSH_CONNECTION")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let mut out = child.0.stdout.take().context("stdout")?;
        let err = child.0.stderr.take().context("stderr")?;
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = out.read_to_string(&mut all);
            all
        });
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                eprintln!("[portwatch] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            stdout,
            seen: Vec::new(),
        })
    }

    /// Waits for a stderr line that is JSON and matches `pred`.
    fn wait_for(&mut self, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => bail!("no matching line; seen:\n{}", self.seen.join("\n")),
            };
            self.seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && pred(&v)
            {
                return Ok(v);
            }
        }
    }

    /// SIGINT; every stderr line and the whole stdout once it exits.
    fn stop(mut self) -> Result<(Vec<String>, String)> {
        signal(self.child.pid(), libc::SIGINT)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("portwatch did not exit within 20 s of SIGINT")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        let status = self.child.0.wait()?;
        ensure!(status.success(), "portwatch exited with {status}");
        let stdout = self
            .stdout
            .join()
            .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
        Ok((self.seen, stdout))
    }
}

/// Every line parses as a JSON object; log records have exactly the four
/// fields, events an `event`. Returns them parsed.
fn all_json(lines: &[String]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for line in lines {
        let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        let obj = v
            .as_object()
            .with_context(|| format!("not an object: {line}"))?;
        if obj.contains_key("event") {
            out.push(v);
            continue;
        }
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        ensure!(
            keys == ["level", "message", "target", "ts"],
            "a log record with fields {keys:?}: {line}"
        );
        ensure!(
            ["error", "warn", "info", "debug", "trace"]
                .contains(&v["level"].as_str().unwrap_or("")),
            "level in {line}"
        );
        ensure!(
            v["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
            "ts in {line}"
        );
        out.push(v);
    }
    Ok(out)
}

#[test]
fn guard_json_logs_put_events_and_records_on_stderr_only() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("lg")?;
    let policy = TempFile::new("logs", "allow = [\"tcp/8080\"]\n")?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.server.name))
        .arg(portwatch_bin())
        .args(["guard", "--iface", &lab.server_if])
        .args(["--policy", policy.as_str()?])
        .args(["--pin-dir", path_str(&paths.pins)?])
        .args(["--socket", path_str(&paths.socket())?])
        .args(["--log-format", "json", "--detach-on-exit"]);
    let mut pw = Running::start(cmd)?;
    pw.wait_for(|v| v["event"] == "ready")?;
    let blocked = tcp_server(&lab.server, 9091)?;
    pw.wait_for(|v| v["event"] == "listen" && v["pid"] == blocked.pid())?;
    let (lines, stdout) = pw.stop()?;
    assert_eq!(stdout, "", "stdout carries nothing with --log-format json");
    let values = all_json(&lines)?;
    let listen = values
        .iter()
        .find(|v| v["event"] == "listen" && v["pid"] == blocked.pid())
        .context("the listen event")?;
    assert_eq!(listen["port"], 9091);
    assert_eq!(listen["exposure"], "blocked");
    assert!(
        values.iter().any(|v| v["level"] == "info"
            && v["target"] == "portwatch::guard"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("guarding {}", lab.server_if)))),
        "no `guarding` record in {lines:?}"
    );
    assert!(values.iter().any(|v| v["event"] == "ready"));
    assert!(
        values.last().is_some_and(|v| v["event"] == "summary"),
        "{lines:?}"
    );
    Ok(())
}

#[test]
fn watch_json_logs_put_events_and_records_on_stderr_only() -> Result {
    let ns = Netns::new("lw")?;
    let mut cmd = ns.command(&portwatch_bin().to_string_lossy());
    cmd.args(["watch", "--log-format", "json", "--port", "7072"]);
    let mut pw = Running::start(cmd)?;
    pw.wait_for(|v| v["event"] == "ready")?;
    let mut server = ns.command("socat");
    server
        .args(["-u", "UDP4-RECV:7072", "/dev/null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = ChildGuard::spawn(&mut server)?;
    pw.wait_for(|v| v["event"] == "listen" && v["pid"] == server.pid())?;
    drop(server);
    let (lines, stdout) = pw.stop()?;
    assert_eq!(stdout, "");
    let values = all_json(&lines)?;
    let listen = values
        .iter()
        .find(|v| v["event"] == "listen" && v["port"] == 7072)
        .context("the listen event")?;
    assert_eq!(listen["proto"], "udp");
    assert_eq!(listen["netns"], ns.inode()?);
    assert!(
        values
            .iter()
            .any(|v| v["level"] == "info" && v["target"] == "portwatch::watch"),
        "no record from portwatch::watch in {lines:?}"
    );
    assert!(values.last().is_some_and(|v| v["event"] == "summary"));
    // The close came too, on the same stream.
    assert!(
        values
            .iter()
            .any(|v| v["event"] == "close" && v["port"] == 7072),
        "{lines:?}"
    );
    Ok(())
}
