//! Steering a running guard: runtime allow/deny over the control socket, a
//! persisted policy, and a pinned datapath that survives restarts and
//! `kill -9`. The guard runs in the lab's server network namespace but in
//! the host's mount namespace (`nsenter --net`), so its pins are on the
//! host's bpffs and outlive the process, as they would on a server.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use portwatch_tests::{
    ChildGuard, Result,
    net::{
        GuardPaths, Lab, TempFile, path_str, pinned_guard, run_bounded, succeeded, tcp_reachable,
        tcp_server,
    },
    portwatch_bin, run,
};
use serde_json::Value;

/// Polls `probe` until it returns `want`, for at most `within`.
fn eventually(
    within: Duration,
    want: bool,
    mut probe: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if probe()? == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("still {} after {within:?}", !want);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the guard's verdict is attached (XDP, or tc ingress).
fn guard_attached(lab: &Lab) -> Result<bool> {
    Ok(lab.server_guard_mode()?.is_some())
}

#[test]
fn runtime_allow_and_deny_apply_at_once_persist_and_survive_a_restart() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("steer", "allow = [\"tcp/8080\"]\n")?;
    let _a = tcp_server(&lab.server, 8080)?;
    let _b = tcp_server(&lab.server, 9090)?;
    let server = lab.server_v4();
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    assert!(!tcp_reachable(&lab.client, server, 9090)?);

    succeeded(&paths.client(&["allow", "tcp/9090"])?)?;
    let took = eventually(Duration::from_secs(1), true, || {
        tcp_reachable(&lab.client, server, 9090)
    })?;
    assert!(took <= Duration::from_secs(1), "{took:?}");
    let change = pw.wait_for(Duration::from_secs(5), |v| v["event"] == "policy")?;
    assert!(
        change["change"]
            .as_str()
            .is_some_and(|c| c.contains("tcp/9090")),
        "{change}"
    );
    assert_eq!(change["by_uid"], 0);
    let file = std::fs::read_to_string(policy.as_str()?)?;
    assert!(
        file.contains("tcp/9090") && file.contains("tcp/8080"),
        "{file}"
    );

    succeeded(&paths.client(&["deny", "tcp/8080"])?)?;
    eventually(Duration::from_secs(1), false, || {
        tcp_reachable(&lab.client, server, 8080)
    })?;
    assert!(!std::fs::read_to_string(policy.as_str()?)?.contains("tcp/8080"));

    // The daemon stops: enforcement stays, with the changed policy.
    pw.stop()?;
    assert!(pw.stderr().contains("enforcement stays"), "{}", pw.stderr());
    assert!(
        guard_attached(&lab)?,
        "the pinned guard link went with the daemon"
    );
    assert!(tcp_reachable(&lab.client, server, 9090)?);
    assert!(!tcp_reachable(&lab.client, server, 8080)?);

    // A new guard adopts it and keeps the persisted policy. Asked for
    // another mode, it keeps the pinned link (never a moment without a
    // verdict) and says so.
    let mut pw = pinned_guard(
        &lab,
        &paths,
        Path::new(policy.as_str()?),
        &["--xdp-mode", "tc"],
    )?;
    assert!(
        pw.stderr().contains("adopted the pinned datapath"),
        "{}",
        pw.stderr()
    );
    assert!(
        pw.stderr()
            .contains("kept the guard's generic XDP link a previous guard pinned, not tc ingress"),
        "{}",
        pw.stderr()
    );
    assert_eq!(lab.server_guard_mode()?, Some("generic"));
    assert!(tcp_reachable(&lab.client, server, 9090)?);
    assert!(!tcp_reachable(&lab.client, server, 8080)?);
    pw.stop()?;

    // `down` removes everything.
    succeeded(&paths.client(&["down", "--pin-dir", path_str(&paths.pins)?])?)?;
    assert!(!guard_attached(&lab)?);
    assert!(!paths.pins.exists(), "{:?} still exists", paths.pins);
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    Ok(())
}

/// A UDP sink in the server namespace that counts datagrams on `port`.
fn udp_counter(lab: &Lab, port: u16) -> Result<(ChildGuard, BufReader<std::process::ChildStdout>)> {
    let script = format!(
        "import socket,sys\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0',{port}))\n\
         s.settimeout(0.2)\n\
         n=0\n\
         print('ready',flush=True)\n\
         while True:\n\
         \x20   try:\n\
         \x20       s.recv(2048); n+=1\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n\
         \x20   import select\n\
         \x20   if select.select([sys.stdin],[],[],0)[0]:\n\
         \x20       sys.stdin.readline(); print(n,flush=True)\n"
    );
    let mut cmd = lab.server.command("python3");
    cmd.args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let mut out = BufReader::new(child.0.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    ensure!(line.trim() == "ready", "counter said {line:?}");
    Ok((child, out))
}

fn count(counter: &mut (ChildGuard, BufReader<std::process::ChildStdout>)) -> Result<u64> {
    let stdin = counter.0.0.stdin.as_mut().context("stdin")?;
    stdin.write_all(b"count\n")?;
    stdin.flush()?;
    let mut line = String::new();
    counter.1.read_line(&mut line)?;
    Ok(line.trim().parse()?)
}

/// Sends `n` datagrams from the client namespace, one per `gap`.
fn udp_sender(
    lab: &Lab,
    addr: std::net::IpAddr,
    port: u16,
    n: u32,
    gap_ms: u32,
) -> Result<ChildGuard> {
    let script = format!(
        "import socket,time\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         for i in range({n}):\n\
         \x20   s.sendto(b'x',('{addr}',{port})); time.sleep({gap})\n",
        gap = f64::from(gap_ms) / 1000.0
    );
    ChildGuard::spawn(lab.client.command("python3").args(["-c", &script]))
}

#[test]
fn kill_9_under_traffic_leaves_enforcement_in_place_and_a_restart_adopts_it() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("kill", "allow = [\"tcp/8080\", \"udp/5001\"]\n")?;
    let _web = tcp_server(&lab.server, 8080)?;
    let mut denied = udp_counter(&lab, 5002)?;
    let mut permitted = udp_counter(&lab, 5001)?;
    let server = lab.server_v4();
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;

    // 3 s of traffic to both ports; the daemon dies in the middle.
    let mut to_denied = udp_sender(&lab, server, 5002, 1500, 2)?;
    let mut to_permitted = udp_sender(&lab, server, 5001, 1500, 2)?;
    std::thread::sleep(Duration::from_millis(800));
    portwatch_tests::signal(pw.pid(), libc::SIGKILL)?;
    let _ = pw.stop();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        guard_attached(&lab)?,
        "kill -9 took the guard's program with it"
    );
    assert!(
        tcp_reachable(&lab.client, server, 8080)?,
        "the permitted port stopped working"
    );
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    assert!(
        pw.stderr().contains("adopted the pinned datapath"),
        "{}",
        pw.stderr()
    );
    to_denied.0.wait()?;
    to_permitted.0.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count(&mut denied)?,
        0,
        "datagrams to the denied port were delivered"
    );
    assert_eq!(
        count(&mut permitted)?,
        1500,
        "datagrams to the permitted port were lost"
    );
    pw.stop()?;
    Ok(())
}

/// One control connection speaking the JSON protocol directly.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    fn connect(paths: &GuardPaths) -> Result<Self> {
        let stream = UnixStream::connect(paths.socket())?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn raw(&mut self, line: &[u8]) -> Result<Value> {
        self.writer.write_all(line)?;
        self.writer.write_all(b"\n")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        serde_json::from_str(&reply).with_context(|| format!("reply {reply:?}"))
    }
}

#[test]
fn a_thousand_allow_deny_flips_never_drop_a_packet_to_a_port_that_stays_permitted() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("flip", "allow = [\"udp/5001\"]\n")?;
    let mut permitted = udp_counter(&lab, 5001)?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let mut control = Control::connect(&paths)?;
    let mut sender = udp_sender(&lab, lab.server_v4(), 5001, 4000, 1)?;
    for i in 0..1000 {
        let allow = control.raw(br#"{"cmd":"allow","spec":"tcp/9090"}"#)?;
        ensure!(allow["ok"] == true, "flip {i}: {allow}");
        let deny = control.raw(br#"{"cmd":"deny","spec":"tcp/9090"}"#)?;
        ensure!(deny["ok"] == true, "flip {i}: {deny}");
    }
    sender.0.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count(&mut permitted)?,
        4000,
        "the permitted port lost datagrams during the flips"
    );
    pw.stop()?;
    let policies = pw.seen.iter().filter(|v| v["event"] == "policy").count();
    assert_eq!(policies, 2000, "every change is announced");
    Ok(())
}

#[test]
fn malformed_requests_get_errors_and_change_nothing() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("junk", "allow = [\"tcp/8080\"]\n")?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let before = std::fs::read_to_string(policy.as_str()?)?;
    let mut control = Control::connect(&paths)?;
    let junk: [&[u8]; 10] = [
        b"",
        b"{",
        b"null",
        b"[1,2,3]",
        br#"{"cmd":"frobnicate"}"#,
        br#"{"cmd":"allow"}"#,
        br#"{"cmd":"allow","spec":"tcp/0"}"#,
        br#"{"cmd":"allow","spec":"tcp/22","from":["10.0.0.1/8"]}"#,
        br#"{"cmd":"deny","spec":"udp/7"}"#,
        b"\xff\xfe\x00binary",
    ];
    for i in 0..1000 {
        let reply = control.raw(junk[i % junk.len()])?;
        ensure!(
            reply["ok"] == false && reply["error"].is_string(),
            "request {i}: {reply}"
        );
    }
    // An oversized request is answered, and that connection is closed.
    let mut big = Control::connect(&paths)?;
    let reply = big.raw(&vec![b'x'; 70 * 1024])?;
    assert_eq!(reply["ok"], false);
    let policy_now = Control::connect(&paths)?.raw(br#"{"cmd":"policy"}"#)?;
    assert_eq!(policy_now["ok"], true);
    assert_eq!(
        policy_now["rules"].as_array().map(Vec::len),
        Some(1),
        "{policy_now}"
    );
    assert_eq!(std::fs::read_to_string(policy.as_str()?)?, before);
    assert!(!pw.seen.iter().any(|v| v["event"] == "policy"));
    pw.stop()?;
    Ok(())
}

#[test]
fn an_unprivileged_user_cannot_change_the_policy() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("nobody", "allow = [\"tcp/8080\"]\n")?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    // Let nobody reach the socket at all, so the daemon's own check decides.
    run("chmod", &["0755", path_str(&paths.run)?])?;
    run("chmod", &["0666", path_str(&paths.socket())?])?;
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(portwatch_bin())
        .args(["allow", "tcp/9090", "--socket", path_str(&paths.socket())?])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    let now = Control::connect(&paths)?.raw(br#"{"cmd":"policy"}"#)?;
    assert_eq!(now["rules"].as_array().map(Vec::len), Some(1), "{now}");
    assert!(!std::fs::read_to_string(policy.as_str()?)?.contains("9090"));
    pw.stop()?;
    Ok(())
}

#[test]
fn a_read_only_policy_file_makes_allow_fail_and_changes_nothing() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let dir = paths.run.join("etc");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("policy.toml");
    std::fs::write(&file, "allow = [\"tcp/8080\"]\n")?;
    let _b = tcp_server(&lab.server, 9090)?;
    let mut pw = pinned_guard(&lab, &paths, &file, &[])?;
    // Root ignores file modes: make the directory a read-only mount instead.
    run("mount", &["--bind", path_str(&dir)?, path_str(&dir)?])?;
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    run("mount", &["-o", "remount,ro,bind", path_str(&dir)?])?;
    let out = paths.client(&["allow", "tcp/9090"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot write the policy file") && stderr.contains("nothing changed"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&file)?, "allow = [\"tcp/8080\"]\n");
    assert!(
        !tcp_reachable(&lab.client, lab.server_v4(), 9090)?,
        "the maps changed"
    );
    assert!(!pw.seen.iter().any(|v| v["event"] == "policy"));
    pw.stop()?;
    Ok(())
}

#[test]
fn status_policy_reload_and_watch_talk_to_the_running_guard() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("status", "allow = [\"tcp/8080\"]\n")?;
    let _web = tcp_server(&lab.server, 8080)?;
    let mut pw = pinned_guard(
        &lab,
        &paths,
        Path::new(policy.as_str()?),
        &["--mode", "audit"],
    )?;

    let out = paths.client(&["status", "--json"])?;
    succeeded(&out)?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["mode"], "audit");
    assert_eq!(status["interfaces"][0]["iface"], lab.server_if.as_str());
    let web = status["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["port"] == 8080))
        .with_context(|| format!("no tcp/8080 listener in {status}"))?;
    assert_eq!(web["exposure"], "exposed");
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 8080)?);
    let out = paths.client(&["status", "--json"])?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    let web = status["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["port"] == 8080))
        .context("tcp/8080")?;
    assert!(web["pass_packets"].as_u64().is_some_and(|n| n > 0), "{web}");
    let human = paths.client(&["status"])?;
    succeeded(&human)?;
    assert!(String::from_utf8_lossy(&human.stdout).contains("8080"));

    // `watch` follows the guard's stream instead of loading its own programs.
    let mut cmd = Command::new(portwatch_bin());
    cmd.args(["watch", "--json", "--socket", path_str(&paths.socket())?]);
    let mut follower = run_bounded_until_policy(cmd)?;

    // SIGHUP re-reads the file.
    std::fs::write(policy.as_str()?, "allow = [\"tcp/8080\", \"udp/53\"]\n")?;
    portwatch_tests::signal(pw.pid(), libc::SIGHUP)?;
    let reload = pw.wait_for(Duration::from_secs(5), |v| {
        v["event"] == "policy" && v["change"] == "reload"
    })?;
    assert_eq!(reload["rules"], 2);
    let seen = follower.wait()?;
    assert!(
        seen.contains("\"policy\""),
        "the follower did not see the change: {seen}"
    );
    let out = paths.client(&["policy"])?;
    succeeded(&out)?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("udp/53"));
    pw.stop()?;
    Ok(())
}

/// `portwatch watch` as a follower, read in the background.
struct Follower {
    child: ChildGuard,
    rx: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    /// Lines until a policy event (or 10 s).
    fn wait(&mut self) -> Result<String> {
        let mut all = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(line) = self.rx.recv_timeout(Duration::from_millis(100)) {
                all.push_str(&line);
                all.push('\n');
                if line.contains("\"policy\"") {
                    break;
                }
            }
        }
        let _ = self.child.0.kill();
        Ok(all)
    }
}

fn run_bounded_until_policy(mut cmd: Command) -> Result<Follower> {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let out = child.0.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give it a moment to subscribe before the change happens.
    std::thread::sleep(Duration::from_millis(500));
    let _ = run_bounded;
    Ok(Follower { child, rx })
}

#[test]
fn a_second_guard_refuses_while_one_runs() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("two", "allow = [\"tcp/8080\"]\n")?;
    let mut first = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.server.name))
        .arg(portwatch_bin())
        .args([
            "guard",
            "--iface",
            &lab.server_if,
            "--policy",
            policy.as_str()?,
        ])
        .args([
            "--pin-dir",
            path_str(&paths.pins)?,
            "--socket",
            path_str(&paths.socket())?,
        ]);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(20), None)?;
    assert!(out.status.is_some_and(|s| !s.success()), "{out:?}");
    assert!(
        out.stderr.contains("another portwatch guard is running")
            && out.stderr.contains(&first.pid().to_string()),
        "{out:?}"
    );
    first.stop()?;
    Ok(())
}

#[test]
fn a_guarded_interface_that_is_deleted_and_re_created_is_guarded_again() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("relink", "allow = [\"tcp/8080\"]\n")?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    // Deleting one end of a veth pair deletes both.
    run(
        "ip",
        &["-n", &lab.server.name, "link", "del", &lab.server_if],
    )?;
    let gone = pw.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "interface" && v["change"] == "removed"
    })?;
    assert_eq!(gone["iface"], lab.server_if.as_str());
    lab.connect()?;
    let back = pw.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "interface" && v["change"] == "attached"
    })?;
    assert_eq!(back["iface"], lab.server_if.as_str());
    assert!(
        guard_attached(&lab)?,
        "no guard program on the re-created interface"
    );
    let _web = tcp_server(&lab.server, 8080)?;
    let _db = tcp_server(&lab.server, 5432)?;
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 8080)?);
    assert!(
        !tcp_reachable(&lab.client, lab.server_v4(), 5432)?,
        "the re-created interface is not enforced"
    );
    pw.stop()?;
    Ok(())
}

#[test]
fn a_broken_policy_file_on_reload_is_refused_and_the_policy_in_force_stays() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("broken", "allow = [\"tcp/8080\"]\n")?;
    let _web = tcp_server(&lab.server, 8080)?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    std::fs::write(
        policy.as_str()?,
        "allow = [\n  \"tcp/8080\",\n  \"tcp/99999\",\n]\n",
    )?;
    let out = paths.client(&["reload"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("99999"),
        "{stderr}"
    );
    assert!(stderr.contains("unchanged"), "{stderr}");
    // Unreadable: a directory where the file was.
    std::fs::remove_file(policy.as_str()?)?;
    std::fs::create_dir(policy.as_str()?)?;
    let out = paths.client(&["reload"])?;
    assert!(!out.status.success());
    std::fs::remove_dir(policy.as_str()?)?;
    assert!(
        tcp_reachable(&lab.client, lab.server_v4(), 8080)?,
        "the policy in force changed"
    );
    assert!(!pw.seen.iter().any(|v| v["event"] == "policy"));
    let now = Control::connect(&paths)?.raw(br#"{"cmd":"policy"}"#)?;
    assert_eq!(now["rules"].as_array().map(Vec::len), Some(1), "{now}");
    pw.stop()?;
    Ok(())
}

#[test]
fn twenty_restarts_under_traffic_never_open_a_gap() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("st")?;
    let policy = TempFile::new("restarts", "allow = [\"udp/5001\"]\n")?;
    let mut denied = udp_counter(&lab, 5002)?;
    let mut permitted = udp_counter(&lab, 5001)?;
    let server = lab.server_v4();
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    // ~8 s of traffic to both ports while the guard restarts 20 times,
    // alternately stopped cleanly and killed.
    let mut to_denied = udp_sender(&lab, server, 5002, 4000, 2)?;
    let mut to_permitted = udp_sender(&lab, server, 5001, 4000, 2)?;
    for round in 0..20 {
        if round % 2 == 0 {
            pw.stop()?;
        } else {
            portwatch_tests::signal(pw.pid(), libc::SIGKILL)?;
            let _ = pw.stop();
        }
        pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
        ensure!(
            pw.stderr().contains("adopted the pinned datapath"),
            "round {round}: {}",
            pw.stderr()
        );
    }
    to_denied.0.wait()?;
    to_permitted.0.wait()?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count(&mut denied)?,
        0,
        "datagrams to the denied port were delivered"
    );
    assert_eq!(
        count(&mut permitted)?,
        4000,
        "datagrams to the permitted port were dropped"
    );
    // Nothing pinned twice: one XDP and one tc link for the one interface,
    // and one link per monitor hook.
    let mut links: Vec<String> = std::fs::read_dir(paths.pins.join("links"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    links.sort();
    let iface = &lab.server_if;
    let mut want = vec![
        format!("tc-{iface}"),
        format!("xdp-generic-{iface}"),
        "hook-inet_sock_set_state".to_owned(),
        "hook-post_bind4".to_owned(),
        "hook-post_bind6".to_owned(),
        "hook-sock_release".to_owned(),
    ];
    want.sort();
    assert_eq!(links, want);
    pw.stop()?;
    Ok(())
}

/// The kernel's view of a pinned map: (key size, value size, entries).
fn pinned_map_layout(path: &Path) -> Result<(u64, u64, u64)> {
    let out = run("bpftool", &["-j", "map", "show", "pinned", path_str(path)?])?;
    let v: Value = serde_json::from_str(&out)?;
    let field = |name: &str| {
        v[name]
            .as_u64()
            .with_context(|| format!("no {name} in {v}"))
    };
    Ok((
        field("bytes_key")?,
        field("bytes_value")?,
        field("max_entries")?,
    ))
}

/// A map pinned by a build with another layout (here: the policy table
/// before SCTP and whole-protocol rules, 2 x 65536 slots) is not reused
/// as it is: the guard replaces it, says so, and its rules work.
#[test]
fn pinned_maps_of_another_layout_are_replaced() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("ly")?;
    std::fs::create_dir_all(&paths.pins)?;
    let stale = paths.pins.join("POLICY_PORTS");
    run(
        "bpftool",
        &[
            "map",
            "create",
            path_str(&stale)?,
            "type",
            "array",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "131072",
            "name",
            "POLICY_PORTS",
        ],
    )?;
    assert_eq!(pinned_map_layout(&stale)?, (4, 4, 131_072));
    let policy = TempFile::new("layout", "allow = [\"tcp/22\", \"sctp/3868\"]\n")?;
    let _web = tcp_server(&lab.server, 22)?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    assert!(
        pw.stderr().contains("made by a build with another layout"),
        "{}",
        pw.stderr()
    );
    assert_eq!(
        pinned_map_layout(&stale)?,
        (4, 4, u64::from(portwatch_common::POLICY_PORT_SLOTS))
    );
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 22)?);
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// The text of a file, or None when it does not exist.
fn text_of(path: &str) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[test]
fn diff_shows_a_change_and_apply_reverts_it_unless_confirmed() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("cf")?;
    let before = "# web only\nallow = [\"tcp/8080\"]\n";
    let policy = TempFile::new("confirm", before)?;
    let next = TempFile::new(
        "confirm-next",
        "allow = [\"tcp/9090\"]\nmode = \"enforce\"\n",
    )?;
    let pending = format!("{}.pending", policy.as_str()?);
    let _a = tcp_server(&lab.server, 8080)?;
    let _b = tcp_server(&lab.server, 9090)?;
    let server = lab.server_v4();
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    pw.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "listen" && v["port"] == 9090
    })?;

    // diff: rules, and the listeners whose exposure the file changes.
    let out = paths.client(&["diff", next.as_str()?])?;
    succeeded(&out)?;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("+ tcp/9090") && shown.contains("- tcp/8080"),
        "{shown}"
    );
    assert!(
        shown.contains(":9090") && shown.contains("blocked -> exposed"),
        "{shown}"
    );
    assert!(shown.contains("exposed -> blocked"), "{shown}");
    let out = paths.client(&["diff", next.as_str()?, "--json", "--exit-code"])?;
    assert_eq!(out.status.code(), Some(1), "a diff with changes exits 1");
    let json: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["added"], serde_json::json!(["tcp/9090"]), "{json}");
    let out = paths.client(&["diff", policy.as_str()?, "--exit-code"])?;
    succeeded(&out)?;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("no change"));
    // Nothing was applied.
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    assert!(!tcp_reachable(&lab.client, server, 9090)?);

    // apply, unconfirmed: in force at once, back as it was when time is up.
    succeeded(&paths.client(&["apply", next.as_str()?, "--confirm-within", "3"])?)?;
    assert!(tcp_reachable(&lab.client, server, 9090)?);
    assert!(!tcp_reachable(&lab.client, server, 8080)?);
    assert_eq!(text_of(policy.as_str()?)?, text_of(next.as_str()?)?);
    assert!(
        Path::new(&pending).exists(),
        "no record of the pending change"
    );
    let out = paths.client(&["allow", "tcp/7070"])?;
    assert!(
        !out.status.success(),
        "a change went through while one awaited confirmation"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("awaits confirmation"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revert = pw.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "policy"
            && v["change"]
                .as_str()
                .is_some_and(|c| c.starts_with("revert"))
    })?;
    assert!(
        revert["change"]
            .as_str()
            .is_some_and(|c| c.contains("apply")),
        "{revert}"
    );
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    assert!(!tcp_reachable(&lab.client, server, 9090)?);
    assert_eq!(
        text_of(policy.as_str()?)?.as_deref(),
        Some(before),
        "the file was not restored"
    );
    assert!(!Path::new(&pending).exists());

    // Confirmed in time: it stays.
    succeeded(&paths.client(&["allow", "tcp/9090", "--confirm-within", "2"])?)?;
    let out = paths.client(&["confirm"])?;
    succeeded(&out)?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("confirm allow tcp/9090"));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        tcp_reachable(&lab.client, server, 9090)?,
        "a confirmed change reverted"
    );
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    assert!(text_of(policy.as_str()?)?.is_some_and(|t| t.contains("tcp/9090")));
    assert!(!Path::new(&pending).exists());
    let out = paths.client(&["confirm"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing awaits confirmation"));
    pw.stop()?;
    succeeded(&paths.client(&["down", "--pin-dir", path_str(&paths.pins)?])?)?;
    Ok(())
}

#[test]
fn an_unconfirmed_change_does_not_outlive_the_guard() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("cg")?;
    let before = "allow = [\"tcp/8080\"]\n";
    let policy = TempFile::new("outlive", before)?;
    let next = TempFile::new("outlive-next", "allow = [\"tcp/9090\"]\n")?;
    let _a = tcp_server(&lab.server, 8080)?;
    let _b = tcp_server(&lab.server, 9090)?;
    let server = lab.server_v4();

    // The guard stops while the change waits: the pinned maps keep
    // enforcing the policy before it, not the unconfirmed one.
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    succeeded(&paths.client(&["apply", next.as_str()?, "--confirm-within", "300"])?)?;
    assert!(tcp_reachable(&lab.client, server, 9090)?);
    pw.stop()?;
    assert!(pw.stderr().contains("was not confirmed"), "{}", pw.stderr());
    assert!(guard_attached(&lab)?);
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    assert!(!tcp_reachable(&lab.client, server, 9090)?);
    assert_eq!(text_of(policy.as_str()?)?.as_deref(), Some(before));

    // Killed while it waits: the next guard finds the record and reverts.
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    succeeded(&paths.client(&["apply", next.as_str()?, "--confirm-within", "300"])?)?;
    portwatch_tests::signal(pw.pid(), libc::SIGKILL)?;
    let _ = pw.stop();
    assert!(
        tcp_reachable(&lab.client, server, 9090)?,
        "kill -9 took the change with it"
    );
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    assert!(
        pw.stderr()
            .contains("was not confirmed before the guard stopped"),
        "{}",
        pw.stderr()
    );
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    assert!(!tcp_reachable(&lab.client, server, 9090)?);
    assert_eq!(text_of(policy.as_str()?)?.as_deref(), Some(before));
    assert!(!Path::new(&format!("{}.pending", policy.as_str()?)).exists());
    pw.stop()?;
    succeeded(&paths.client(&["down", "--pin-dir", path_str(&paths.pins)?])?)?;
    Ok(())
}

/// Opens and closes `rounds` × `batch` TCP listeners on loopback, then
/// opens one more; prints its pid and that last listener's port.
const BURST: &str = r#"
import os, socket, sys
rounds, batch = int(sys.argv[1]), int(sys.argv[2])
for _ in range(rounds):
    socks = []
    for _ in range(batch):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        socks.append(s)
    for s in socks:
        s.close()
# The last event of the burst: a listener whose port the test waits for.
m = socket.socket()
m.bind(("127.0.0.1", 0))
m.listen(1)
print(os.getpid(), m.getsockname()[1])
"#;

#[test]
fn a_follower_that_cannot_keep_up_is_told_what_it_missed_and_starts_over() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("fl")?;
    let policy = TempFile::new("follow", "allow = [\"tcp/8080\"]\n")?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;

    // A follower whose output nobody reads during the burst: its pipe, its
    // socket and then its queue at the guard fill up.
    let mut cmd = Command::new(portwatch_bin());
    cmd.args(["watch", "--json", "--socket", path_str(&paths.socket())?])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut follower = ChildGuard::spawn(&mut cmd)?;
    std::thread::sleep(Duration::from_millis(500));

    // 300,000 events: more than the guard queues for a follower (32 MiB),
    // also when a debug build's own kernel ring overflows on the way (it
    // lost a fifth of 120,000 once the follower took its lines during the
    // burst, and the rest then fitted in the queue).
    let (rounds, batch) = (150u64, 1000u64);
    let burst = lab
        .server
        .command("python3")
        .args(["-c", BURST, &rounds.to_string(), &batch.to_string()])
        .output()?;
    ensure!(
        burst.status.success(),
        "{}",
        String::from_utf8_lossy(&burst.stderr)
    );
    let printed = String::from_utf8_lossy(&burst.stdout).into_owned();
    let mut fields = printed.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(last_port))) = (fields.next(), fields.next()) else {
        bail!("the burst printed {printed:?}");
    };
    let events = 2 * rounds * batch;
    // The guard itself got through the whole burst (its last listener is
    // the last event). A debug build on a loaded machine has taken more
    // than a minute for 120,000 events (300 s for these).
    pw.wait_for(Duration::from_secs(300), |v| {
        v["event"] == "listen" && v["pid"] == pid && v["port"] == last_port
    })?;

    // Now read it all: until every event of the burst is either delivered
    // or counted in a `missed` line, and the last `missed` line's fresh
    // start has ended in `ready` (the follower may fall behind and catch up
    // more than once). 180 s at most: a loaded machine may be slow to get
    // there (a debug-build guard whose own kernel ring overflowed in the
    // burst has taken more than 60 s), which is no reason to stop reading.
    let out = follower.0.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<Value> = Vec::new();
    let (mut accounted, mut awaiting_ready) = (0u64, false);
    let deadline = Instant::now() + Duration::from_secs(180);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        let v: Value = serde_json::from_str(&line).with_context(|| line.clone())?;
        if v["event"] == "missed" {
            accounted += v["count"].as_u64().unwrap_or(0);
            awaiting_ready = true;
        } else if v["event"] == "lost" {
            // The guard's own kernel ring overflowed (a debug build under
            // 300,000 events): it says so to every follower.
            accounted += v["count"].as_u64().unwrap_or(0);
        } else if v["event"] == "ready" {
            awaiting_ready = false;
        } else if v["pid"] == pid && v["origin"] == "live" {
            accounted += 1;
        }
        lines.push(v);
        if accounted >= events && !awaiting_ready {
            break;
        }
    }
    let live = lines
        .iter()
        .filter(|v| v["pid"] == pid && v["origin"] == "live")
        .count() as u64;
    let missed: Vec<&Value> = lines.iter().filter(|v| v["event"] == "missed").collect();
    let missed_sum: u64 = missed.iter().filter_map(|v| v["count"].as_u64()).sum();
    if missed.is_empty() {
        // Its stderr ends only when it does.
        let _ = follower.0.kill();
        let status = follower.0.wait()?;
        let mut e = String::new();
        if let Some(mut err) = follower.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut e);
        }
        bail!(
            "the follower kept up with {events} events unread? ({live} seen of {} lines; \
             follower {status}: {e})",
            lines.len()
        );
    }
    let lost_sum: u64 = lines
        .iter()
        .filter(|v| v["event"] == "lost")
        .filter_map(|v| v["count"].as_u64())
        .sum();
    assert!(
        live + missed_sum + lost_sum >= events,
        "{events} events: {live} delivered, {missed_sum} counted missed, {lost_sum} lost by \
         the guard: some vanished (reading stopped {})",
        if Instant::now() >= deadline {
            "at the deadline"
        } else {
            "when the stream ended"
        }
    );
    // After the last `missed` line: the listeners as they were when it
    // caught up, then `ready`.
    let last = lines
        .iter()
        .rposition(|v| v["event"] == "missed")
        .context("a missed line")?;
    let after = &lines[last + 1..];
    let ready = after
        .iter()
        .position(|v| v["event"] == "ready")
        .context("no ready line after the missed one")?;
    // A fresh start is the listeners as they were then, nothing live.
    let fresh = &after[..ready];
    assert!(
        fresh.iter().all(|v| v["origin"] == "snapshot"),
        "a fresh start holds live events: {fresh:?}"
    );
    // The guard counts it.
    let status: Value = serde_json::from_slice(&paths.client(&["status", "--json"])?.stdout)?;
    assert_eq!(
        status["totals"]["follower_events_missed"].as_u64(),
        Some(missed_sum),
        "{}",
        status["totals"]
    );

    // The guard goes away: the follower says so and fails.
    pw.stop()?;
    let status = follower.0.wait()?;
    let mut stderr = String::new();
    if let Some(mut e) = follower.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    assert!(
        !status.success(),
        "a follower whose guard went away exited 0"
    );
    assert!(stderr.contains("ended its stream"), "{stderr}");
    succeeded(&paths.client(&["down", "--pin-dir", path_str(&paths.pins)?])?)?;
    Ok(())
}
