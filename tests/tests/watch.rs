//! `portwatch watch` against the real kernel: listeners opened by real
//! processes, in this and other network namespaces, before and after start.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use portwatch_tests::{ChildGuard, Netns, Portwatch, Result, loaded_programs, run};
use serde_json::Value;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/listeners.py");
const WAIT: Duration = Duration::from_secs(10);
const OUR_PROGRAMS: &[&str] = &[
    "inet_sock_set_state",
    "post_bind4",
    "post_bind6",
    "sock_release",
];

/// The Python fixture: opens sockets, reports them, closes them on request.
struct Fixture {
    child: ChildGuard,
    out: BufReader<std::process::ChildStdout>,
    report: Value,
}

impl Fixture {
    fn start(cmd: &mut Command) -> Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = ChildGuard::spawn(cmd)?;
        let mut out = BufReader::new(child.0.stdout.take().context("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let report =
            serde_json::from_str(&line).with_context(|| format!("fixture said {line:?}"))?;
        Ok(Self { child, out, report })
    }

    fn python(args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new("python3");
        cmd.arg(FIXTURE).args(args);
        Self::start(&mut cmd)
    }

    /// The listeners the fixture opened, as it reported them.
    fn listeners(&self) -> Result<Vec<Value>> {
        Ok(self.report["listeners"]
            .as_array()
            .context("listeners")?
            .clone())
    }

    fn pid(&self) -> u64 {
        self.report["pid"].as_u64().unwrap_or(0)
    }

    /// Asks the fixture to close everything and waits until it has.
    fn close_all(&mut self) -> Result {
        let stdin = self.child.0.stdin.as_mut().context("no stdin")?;
        stdin.write_all(b"close\n")?;
        stdin.flush()?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        anyhow::ensure!(line.contains("closed"), "fixture said {line:?}");
        Ok(())
    }
}

/// A process stopped (SIGSTOP) until this is dropped (SIGCONT), also when
/// the test fails in between.
struct Paused(u32);

impl Paused {
    fn stop(pid: u32) -> Result<Self> {
        portwatch_tests::signal(pid, libc::SIGSTOP)?;
        Ok(Self(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = portwatch_tests::signal(self.0, libc::SIGCONT);
    }
}

/// Waits until `pw` has reported `n` listens of `pid`.
fn wait_for_listens(pw: &mut Portwatch, pid: u64, n: u64, timeout: Duration) -> Result {
    let seen = std::cell::Cell::new(0u64);
    pw.wait_for(timeout, |v| {
        if v["event"] == "listen" && v["pid"] == pid {
            seen.set(seen.get() + 1);
        }
        seen.get() >= n
    })
    .with_context(|| format!("{} of {n} listens of pid {pid}", seen.get()))?;
    Ok(())
}

fn matches_listener(v: &Value, pid: u64, want: &Value, event: &str) -> bool {
    v["event"] == event
        && v["pid"] == pid
        && v["proto"] == want["proto"]
        && v["family"] == want["family"]
        && v["addr"] == want["addr"]
        && v["port"] == want["port"]
}

#[test]
fn live_tcp_and_udp_listeners_on_ipv4_and_ipv6_open_and_close() -> Result {
    let mut pw = Portwatch::start(&["watch", "--no-snapshot"])?;
    // Every socket binds port 0: the events must carry the port the kernel chose.
    let mut fx = Fixture::python(&["tcp4", "tcp6", "udp4", "udp6"])?;
    let pid = fx.pid();
    let wanted = fx.listeners()?;
    assert_eq!(wanted.len(), 4);
    for want in &wanted {
        assert_ne!(want["port"], 0, "the fixture reports the chosen port");
        let ev = pw.wait_for(WAIT, |v| matches_listener(v, pid, want, "listen"))?;
        assert_eq!(ev["comm"], "python3", "{ev}");
        assert_eq!(ev["origin"], "live");
        assert!(
            ev["exe"].as_str().is_some_and(|e| e.contains("python3")),
            "{ev}"
        );
        assert!(
            ev["cmdline"]
                .as_str()
                .is_some_and(|c| c.contains("listeners.py")),
            "{ev}"
        );
        assert!(ev["netns"].is_u64(), "{ev}");
        assert_eq!(ev["uid"], 0);
    }
    // Accepted connections are cloned from the listener in the kernel; they
    // must not look like the listener closing.
    let tcp4 = wanted
        .iter()
        .find(|w| w["proto"] == "tcp" && w["family"] == "ipv4")
        .context("tcp4")?;
    let port = tcp4["port"].as_u64().context("port")? as u16;
    for _ in 0..3 {
        let conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
        drop(conn);
    }
    fx.close_all()?;
    for want in &wanted {
        pw.wait_for(WAIT, |v| matches_listener(v, pid, want, "close"))?;
    }
    let closes = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "close" && v["port"] == port)
        .count();
    assert_eq!(
        closes, 1,
        "one close for the listener, none for its connections"
    );
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn listen_without_bind_reports_the_port_the_kernel_picked() -> Result {
    let mut pw = Portwatch::start(&["watch", "--no-snapshot", "--proto", "tcp"])?;
    let mut fx = Fixture::python(&["tcp4auto", "tcp4auto"])?;
    let pid = fx.pid();
    for want in fx.report["listeners"].as_array().context("listeners")? {
        assert_eq!(want["addr"], "0.0.0.0");
        pw.wait_for(WAIT, |v| matches_listener(v, pid, want, "listen"))?;
    }
    fx.close_all()?;
    for want in fx.report["listeners"].as_array().context("listeners")? {
        pw.wait_for(WAIT, |v| matches_listener(v, pid, want, "close"))?;
    }
    pw.stop()?;
    Ok(())
}

#[test]
fn snapshot_reports_existing_listeners_with_their_process() -> Result {
    let fx = Fixture::python(&["tcp4", "udp6"])?;
    let pid = fx.pid();
    let mut pw = Portwatch::start(&["watch"])?;
    let ready = pw.wait_for(WAIT, |v| v["event"] == "ready")?;
    for want in fx.report["listeners"].as_array().context("listeners")? {
        let ev = pw
            .seen
            .iter()
            .find(|v| matches_listener(v, pid, want, "listen"))
            .with_context(|| format!("{want} missing from the snapshot"))?;
        assert_eq!(ev["origin"], "snapshot", "{ev}");
        assert_eq!(ev["comm"], "python3", "{ev}");
    }
    // The ready line counts what the snapshot reported.
    let snapshot_lines = pw.seen.iter().filter(|v| v["origin"] == "snapshot").count();
    assert_eq!(ready["snapshot"].as_u64(), Some(snapshot_lines as u64));
    pw.stop()?;
    Ok(())
}

#[test]
fn listeners_open_before_the_start_are_reported_closing() -> Result {
    // UDP too: the release hook knows only the binds it saw, so the ones
    // before the start are handed to it from the snapshot.
    let mut fx = Fixture::python(&["tcp4", "tcp6", "udp4", "udp6"])?;
    let pid = fx.pid();
    let wanted = fx.listeners()?;
    let mut pw = Portwatch::start(&["watch"])?;
    pw.wait_for(WAIT, |v| v["event"] == "ready")?;
    fx.close_all()?;
    for want in &wanted {
        let ev = pw
            .wait_for(WAIT, |v| matches_listener(v, pid, want, "close"))
            .with_context(|| format!("no close of {want}"))?;
        assert_eq!(ev["origin"], "live", "{ev}");
        assert_eq!(ev["comm"], "python3", "{ev}");
    }
    pw.stop()?;
    Ok(())
}

#[test]
fn every_listener_ss_shows_is_in_the_snapshot() -> Result {
    let _fx = Fixture::python(&["tcp4", "tcp6", "udp4"])?;
    let mut pw = Portwatch::start(&["watch"])?;
    let ss = run("ss", &["-ltnupH"])?;
    for line in ss.lines().filter(|l| l.contains("pid=")) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let proto = cols[0];
        let local = cols[4];
        let port: u64 = local
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("port")?;
        let pid: u64 = line
            .split("pid=")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|p| p.parse().ok())
            .context("pid")?;
        let found = pw.seen.iter().any(|v| {
            v["origin"] == "snapshot" && v["proto"] == proto && v["port"] == port && v["pid"] == pid
        });
        assert!(
            found,
            "ss shows {line:?} but the snapshot has no {proto}/{port} with pid {pid}"
        );
    }
    pw.stop()?;
    Ok(())
}

#[test]
fn listeners_in_another_network_namespace_carry_its_inode() -> Result {
    let ns = Netns::new("w")?;
    let inode = ns.inode()?;
    // One listener before start (snapshot), one after (live).
    let mut cmd = ns.command("python3");
    cmd.arg(FIXTURE).arg("tcp4");
    let before = Fixture::start(&mut cmd)?;
    let mut pw = Portwatch::start(&["watch"])?;
    let want = &before.report["listeners"][0];
    let snap = pw
        .seen
        .iter()
        .find(|v| matches_listener(v, before.pid(), want, "listen"))
        .context("the namespaced listener is missing from the snapshot")?;
    assert_eq!(snap["origin"], "snapshot");
    assert_eq!(snap["netns"], inode, "{snap}");

    let mut cmd = ns.command("python3");
    cmd.arg(FIXTURE).arg("udp4");
    let after = Fixture::start(&mut cmd)?;
    let want = &after.report["listeners"][0];
    let live = pw.wait_for(WAIT, |v| matches_listener(v, after.pid(), want, "listen"))?;
    assert_eq!(live["netns"], inode, "{live}");
    let host = pw
        .seen
        .iter()
        .find(|v| v["origin"] == "snapshot" && v["netns"] != inode);
    if let Some(host) = host {
        assert_ne!(host["netns"], live["netns"]);
    }
    pw.stop()?;
    Ok(())
}

#[test]
fn a_burst_of_10000_listeners_is_seen_or_counted_as_lost() -> Result {
    const N: u64 = 10_000;
    let mut pw = Portwatch::start(&["watch", "--no-snapshot", "--proto", "tcp"])?;
    let mut fx = Fixture::python(&["--burst", &N.to_string()])?;
    assert_eq!(fx.report["count"], N);
    let pid = fx.pid();
    fx.close_all()?;
    drop(fx);
    // Wait until every event is accounted for (seen or announced lost).
    let accounted = std::cell::Cell::new(0u64);
    let _ = pw.wait_for(Duration::from_secs(30), |v| {
        if v["pid"] == pid && (v["event"] == "listen" || v["event"] == "close") {
            accounted.set(accounted.get() + 1);
        } else if v["event"] == "lost" {
            accounted.set(accounted.get() + v["count"].as_u64().unwrap_or(0));
        }
        accounted.get() >= 2 * N
    });
    let status = pw.stop()?;
    assert!(status.success());
    let listens = pw.events_of(pid as u32, "listen").len() as u64;
    let closes = pw.events_of(pid as u32, "close").len() as u64;
    let summary = pw
        .seen
        .iter()
        .find(|v| v["event"] == "summary")
        .context("no summary line")?;
    let lost = summary["lost"].as_u64().context("lost")?;
    assert_eq!(
        listens + closes + lost,
        2 * N,
        "listens {listens} closes {closes} lost {lost}"
    );
    // Lost events are also announced in the stream as they happen.
    let announced: u64 = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "lost")
        .filter_map(|v| v["count"].as_u64())
        .sum();
    assert_eq!(announced, lost);
    Ok(())
}

#[test]
fn stopping_detaches_every_hook() -> Result {
    let before = loaded_programs(OUR_PROGRAMS)?;
    let mut pw = Portwatch::start(&["watch", "--no-snapshot"])?;
    let during = loaded_programs(OUR_PROGRAMS)?;
    assert!(
        during.len() >= before.len() + 4,
        "before {before:?}, during {during:?}"
    );
    let status = pw.stop()?;
    assert!(status.success());
    let summary = pw.seen.last().context("no lines")?;
    assert_eq!(summary["event"], "summary", "the last line is the summary");
    // Program fds close with the process; the kernel frees them shortly after.
    let mut after = loaded_programs(OUR_PROGRAMS)?;
    for _ in 0..50 {
        if after.len() == before.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = loaded_programs(OUR_PROGRAMS)?;
    }
    assert_eq!(after, before, "programs left loaded after exit");
    Ok(())
}

/// The time slice of each thread of `pid` (or of this process, for
/// "self").
fn thread_slices(pid: &str) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid = task?.file_name().to_string_lossy().parse()?;
        match portwatch::sys::slice_of(tid) {
            Ok(slice) => out.push(slice),
            // A thread that ended meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The nice value of each thread of `pid` (or of this process, for
/// "self"), by thread name.
fn thread_nices(pid: &str) -> Result<Vec<(String, i32)>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = match std::fs::read_to_string(task?.path().join("stat")) {
            Ok(stat) => stat,
            // A thread that ended meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        // The name is in parentheses and may hold spaces; nice is the
        // 19th field, the 17th after them.
        let (name, rest) = stat
            .split_once(" (")
            .and_then(|(_, r)| r.rsplit_once(") "))
            .context("stat")?;
        let nice = rest
            .split_whitespace()
            .nth(16)
            .context("no nice field")?
            .parse()?;
        out.push((name.to_string(), nice));
    }
    Ok(out)
}

#[test]
fn the_stream_runs_at_a_raised_priority_and_a_short_slice_unless_told_otherwise() -> Result {
    let ours = thread_nices("self")?
        .first()
        .map(|(_, n)| *n)
        .context("no thread")?;
    // A positive nice value (a run under `nice`) is chosen, and left.
    let boosted = |to: i32| if ours > 0 { ours } else { ours.min(to) };
    // The shortest slice the kernel grants, unless the boost is off (or a
    // low priority was chosen); ours is the kernel's default.
    let our_slice = thread_slices("self")?
        .first()
        .copied()
        .context("no thread")?;
    let short = if ours > 0 || !portwatch::sys::kernel_has_custom_slices() {
        our_slice
    } else {
        portwatch::sys::STREAM_SLICE
    };
    for (args, want, want_slice) in [
        (&["watch", "--no-snapshot"][..], boosted(-5), short),
        (
            &["watch", "--no-snapshot", "--priority-boost", "12"][..],
            boosted(-12),
            short,
        ),
        (
            &["watch", "--no-snapshot", "--priority-boost", "0"][..],
            ours,
            our_slice,
        ),
    ] {
        let mut pw = Portwatch::start(args)?;
        // The loop's thread and the /proc worker it starts (after the
        // `ready` line).
        let mut nices = thread_nices(&pw.pid().to_string())?;
        for _ in 0..50 {
            if nices.iter().any(|(name, _)| name == "portwatch-proc") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            nices = thread_nices(&pw.pid().to_string())?;
        }
        assert!(
            nices.iter().any(|(name, _)| name == "portwatch-proc"),
            "{nices:?}"
        );
        assert!(nices.iter().all(|(_, n)| *n == want), "{args:?}: {nices:?}");
        let slices = thread_slices(&pw.pid().to_string())?;
        assert!(
            !slices.is_empty() && slices.iter().all(|s| *s == want_slice),
            "{args:?}: slices {slices:?}, want {want_slice:?}"
        );
        assert!(pw.stop()?.success());
    }
    Ok(())
}

#[test]
fn unprivileged_user_gets_a_clear_error() -> Result {
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(portwatch_tests::portwatch_bin())
        .args(["watch", "--json"])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("sudo"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

#[test]
fn a_held_back_consumer_loses_events_that_are_counted_exactly_and_it_recovers() -> Result {
    // 2 x 40,000 events of 80 bytes overflow the 4 MiB ring buffer while
    // portwatch is stopped.
    const N: u64 = 40_000;
    let mut pw = Portwatch::start(&["watch", "--no-snapshot", "--proto", "tcp"])?;
    let resume = Paused::stop(pw.pid())?;
    let mut fx = Fixture::python(&["--churn", &N.to_string()])?;
    let pid = fx.pid();
    fx.close_all()?; // runs the churn and waits until it is done
    drop(fx);
    drop(resume); // SIGCONT: the consumer catches up
    let lost_seen = pw.wait_for(Duration::from_secs(30), |v| v["event"] == "lost")?;
    assert!(
        lost_seen["count"].as_u64().is_some_and(|n| n > 0),
        "{lost_seen}"
    );
    // It recovers: a listener opened now is reported.
    let mut after = Fixture::python(&["tcp4"])?;
    let want = after.report["listeners"][0].clone();
    pw.wait_for(Duration::from_secs(30), |v| {
        matches_listener(v, after.pid(), &want, "listen")
    })?;
    after.close_all()?;
    let status = pw.stop()?;
    assert!(status.success());
    let listens = pw.events_of(pid as u32, "listen").len() as u64;
    // A close said late (its socket taken by the listener opened after) is
    // one of the lost.
    let closes = pw
        .events_of(pid as u32, "close")
        .iter()
        .filter(|v| v["origin"] == "live")
        .count() as u64;
    let summary = pw
        .seen
        .iter()
        .find(|v| v["event"] == "summary")
        .context("no summary")?;
    let lost = summary["lost"].as_u64().context("lost")?;
    assert!(
        lost > 0,
        "nothing was lost: the test did not overflow the buffer"
    );
    assert_eq!(
        listens + closes + lost,
        2 * N,
        "listens {listens} closes {closes} lost {lost}"
    );
    let announced: u64 = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "lost")
        .filter_map(|v| v["count"].as_u64())
        .sum();
    assert_eq!(announced, lost, "every loss is announced in the stream");
    Ok(())
}

#[test]
fn a_listener_in_the_socket_of_one_whose_close_was_lost_is_reported() -> Result {
    const N: u64 = 1_000;
    let mut pw = Portwatch::start(&["watch", "--no-snapshot", "--proto", "tcp"])?;
    let mut old = Fixture::python(&["--burst", &N.to_string()])?;
    wait_for_listens(&mut pw, old.pid(), N, Duration::from_secs(30))?;
    // Held back, the watcher's ring fills with a churn; the old listeners'
    // closes then find it full.
    let resume = Paused::stop(pw.pid())?;
    let mut churn = Fixture::python(&["--churn", "40000"])?;
    churn.close_all()?;
    old.close_all()?;
    let old_pid = old.pid();
    drop(old);
    drop(resume);
    pw.wait_for(Duration::from_secs(30), |v| v["event"] == "lost")?;
    // New listeners, many of them in the old ones' freed sockets: each is
    // reported, not taken for the old listener it replaces.
    let mut new = Fixture::python(&["--burst", &N.to_string()])?;
    let new_pid = new.pid();
    wait_for_listens(&mut pw, new_pid, N, Duration::from_secs(30))?;
    new.close_all()?;
    let status = pw.stop()?;
    assert!(status.success());
    let new_ports: std::collections::HashSet<&Value> = pw
        .events_of(new_pid as u32, "listen")
        .iter()
        .map(|v| &v["port"])
        .collect();
    assert_eq!(new_ports.len() as u64, N, "a port reported twice");
    // The old listeners whose sockets were taken are said closed, late.
    let old_closes = pw.events_of(old_pid as u32, "close");
    let inferred = old_closes
        .iter()
        .filter(|v| v["origin"] == "inferred")
        .count();
    assert!(
        inferred > 0,
        "no new listener took an old one's socket: the test did not exercise the reuse"
    );
    assert!(
        old_closes.len() as u64 <= N,
        "{} closes of {N} old listeners",
        old_closes.len()
    );
    let lost = pw
        .seen
        .iter()
        .find(|v| v["event"] == "summary")
        .and_then(|v| v["lost"].as_u64())
        .context("no summary")?;
    assert!(inferred as u64 <= lost, "{inferred} inferred, {lost} lost");
    Ok(())
}

#[test]
fn after_a_loss_the_listeners_are_re_read_and_what_was_lost_is_said() -> Result {
    const N: u64 = 300;
    let mut pw = Portwatch::start(&["watch", "--proto", "tcp"])?;
    let tally = |pw: &Portwatch, pid: u64, event: &str, origin: Option<&str>| {
        pw.events_of(pid as u32, event)
            .iter()
            .filter(|v| origin.is_none_or(|o| v["origin"] == o))
            .count() as u64
    };
    let mut old = Fixture::python(&["--burst", &N.to_string()])?;
    let old_pid = old.pid();
    wait_for_listens(&mut pw, old_pid, N, WAIT)?;
    // Held back, the watcher's ring fills with a churn; then the old
    // listeners close and new ones open, all of it lost.
    let resume = Paused::stop(pw.pid())?;
    let mut churn = Fixture::python(&["--churn", "40000"])?;
    let churn_pid = churn.pid();
    churn.close_all()?;
    old.close_all()?;
    drop(old);
    let mut new = Fixture::python(&["--burst", &N.to_string()])?;
    let new_pid = new.pid();
    drop(resume);
    pw.wait_for(Duration::from_secs(30), |v| v["event"] == "lost")?;
    // The re-read says it all, once.
    let (closed, opened) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    pw.wait_for(Duration::from_secs(30), |v| {
        if v["origin"] == "inferred" && v["pid"] == old_pid && v["event"] == "close" {
            closed.set(closed.get() + 1);
        }
        if v["origin"] == "inferred" && v["pid"] == new_pid && v["event"] == "listen" {
            opened.set(opened.get() + 1);
        }
        closed.get() >= N && opened.get() >= N
    })
    .with_context(|| format!("{} closes, {} listens inferred", closed.get(), opened.get()))?;
    // They close live, matched to what the re-read found.
    new.close_all()?;
    let closes = std::cell::Cell::new(0u64);
    pw.wait_for(WAIT, |v| {
        if v["event"] == "close" && v["pid"] == new_pid {
            closes.set(closes.get() + 1);
        }
        closes.get() >= N
    })?;
    let status = pw.stop()?;
    assert!(status.success());
    assert_eq!(
        tally(&pw, old_pid, "close", None),
        N,
        "old listeners closed once"
    );
    assert_eq!(
        tally(&pw, new_pid, "listen", None),
        N,
        "new listeners opened once"
    );
    assert_eq!(tally(&pw, new_pid, "close", Some("live")), N);
    // No listener of the churn is left open in the stream's account.
    let churn_open =
        tally(&pw, churn_pid, "listen", None) as i64 - tally(&pw, churn_pid, "close", None) as i64;
    assert_eq!(churn_open, 0, "churn listeners left open or closed twice");
    let summary = pw.seen.last().context("no lines")?;
    assert_eq!(summary["event"], "summary");
    // The summary says how many events stood in for lost ones.
    let inferred = pw.seen.iter().filter(|v| v["origin"] == "inferred").count() as u64;
    assert!(inferred >= 2 * N, "{inferred} inferred lines");
    assert_eq!(summary["inferred"].as_u64(), Some(inferred), "{summary}");
    Ok(())
}
