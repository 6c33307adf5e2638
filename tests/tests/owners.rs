//! Owned ports (#16): a rule's owner is enforced at bind() by the kernel
//! (the monitor's post_bind hooks) in the guarded namespace, and its port opens
//! at XDP only while the owner listens. Real cgroups made by the tests,
//! real processes moved into them (socat as the owner, python3 as the
//! stranger), real packets from the lab's client namespace.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use portwatch_lab::{TempDir, TestCgroup, spawn_server};
use portwatch_tests::{
    Netns, Result,
    net::{
        GuardPaths, Lab, TRY_BIND, TempFile, assert_silently_dropped, http_server, pinned_guard,
        run_bounded, start_guard, status_json, status_listener, tcp_probe, tcp_reachable,
        tcp_server,
    },
    portwatch_bin,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// Runs [`TRY_BIND`] with `cmd` (python3, wherever it runs) and returns
/// what it printed.
fn try_bind(
    mut cmd: Command,
    proto: &str,
    host: &str,
    port: u16,
    reuseport: bool,
) -> Result<String> {
    cmd.args(["-c", TRY_BIND, proto, host, &port.to_string()]);
    if reuseport {
        cmd.arg("reuseport");
    }
    let out = run_bounded(&mut cmd, None, WAIT, None)?;
    ensure!(out.success(), "python3 failed: {}", out.stderr);
    Ok(out.stdout.trim().to_owned())
}

/// The guard's one owned port from `status --json`.
fn status_owned(lab: &Lab) -> Result<Value> {
    let status = status_json(lab)?;
    match status["owned"].as_array().map(Vec::as_slice) {
        Some([one]) => Ok(one.clone()),
        _ => anyhow::bail!("not one owned port in {status}"),
    }
}

/// The guard's metrics, scraped from inside its namespace.
fn metrics(ns: &Netns, listen: &str) -> Result<String> {
    let out = run_bounded(
        ns.command("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{listen}/metrics"),
        ]),
        None,
        WAIT,
        None,
    )?;
    ensure!(out.success(), "curl: {}", out.stderr);
    Ok(out.stdout)
}

/// Whether `text` has the sample line `want`.
fn has_sample(text: &str, want: &str) -> bool {
    text.lines().any(|l| l == want)
}

/// A port with an owner is open at XDP only while its owner listens. A
/// stranger that held the port before the guard started squats on it: it
/// stays unreachable, and status and metrics name it. Under the guard a
/// stranger's bind is refused (EPERM) and reported. The owner (socat)
/// opens the port to the generator namespace; when it goes the port closes
/// within a second; the stream says when and why.
#[test]
fn an_owned_port_opens_only_while_its_owner_listens() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new(
        "owned",
        "allow = [\n  { port = \"tcp/6379\", owner = { comm = \"socat\", user = \"root\" } },\n]\n",
    )?;
    // Bound before the guard: nothing at bind() could stop it.
    let stranger = http_server(&lab.server, 6379, "/tmp")?;
    let mut pw = start_guard(&lab, &policy, &["--metrics", "127.0.0.1:9464"])?;
    let addr = lab.server_v4();
    let metric = |open: u8, squatters: u8| -> Result<()> {
        let text = metrics(&lab.server, "127.0.0.1:9464")?;
        for want in [
            format!("portwatch_owned_port_open{{proto=\"tcp\",port=\"6379\"}} {open}"),
            format!("portwatch_owned_port_squatters{{proto=\"tcp\",port=\"6379\"}} {squatters}"),
        ] {
            ensure!(has_sample(&text, &want), "no {want:?} in\n{text}");
        }
        Ok(())
    };

    // A stranger on the owned port: closed to the network.
    assert_silently_dropped(
        &tcp_probe(&lab.client, addr, 6379, None)?,
        "a stranger listens",
    );
    let line = status_listener(&lab, 6379)?;
    assert_eq!(line["exposure"], "blocked", "{line}");
    assert_eq!(line["is_owner"], false, "{line}");
    let owned = status_owned(&lab)?;
    assert_eq!(owned["port"], "tcp/6379", "{owned}");
    assert_eq!(owned["open"], false, "{owned}");
    assert_eq!(owned["squatters"], 1, "{owned}");
    metric(0, 1)?;
    let squat = pw.wait_for(WAIT, |v| v["event"] == "not_owner")?;
    assert_eq!(
        (&squat["port"], &squat["comm"]),
        (&Value::from("tcp/6379"), &Value::from("python3")),
        "{squat}"
    );
    assert_eq!(squat["owner"], "user root, comm socat", "{squat}");
    drop(stranger);
    pw.wait_for(WAIT, |v| v["event"] == "close" && v["port"] == 6379)?;

    // Nothing listens: dropped, not refused.
    assert_silently_dropped(&tcp_probe(&lab.client, addr, 6379, None)?, "no owner");
    metric(0, 0)?;

    // Under the guard, a stranger cannot take the port at all.
    let got = try_bind(lab.server.command("python3"), "tcp", "::", 6379, false)?;
    assert_eq!(got, "EPERM", "a stranger's bind");
    let denied = pw.wait_for(WAIT, |v| v["event"] == "bind_denied")?;
    assert_eq!(denied["port"], "tcp/6379", "{denied}");
    assert_eq!(denied["comm"], "python3", "{denied}");
    assert_eq!(denied["addr"], "::", "{denied}");
    assert_eq!(denied["audit"], false, "{denied}");
    assert_eq!(denied["owner"], "user root, comm socat", "{denied}");
    assert!(
        !pw.seen.iter().any(|v| v["event"] == "gate"),
        "no gate event for a stranger: {:?}",
        pw.seen
    );

    // The owner listens: the port opens, and the stream says who opened it.
    let owner = tcp_server(&lab.server, 6379)?;
    let opened = pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    assert_eq!(opened["port"], "tcp/6379", "{opened}");
    assert_eq!(opened["comm"], "socat", "{opened}");
    gated_with(&pw.seen, &opened, "listen")?;
    assert_eq!(opened["owner"], "user root, comm socat", "{opened}");
    assert!(opened["pid"].as_u64().is_some(), "{opened}");
    assert!(tcp_reachable(&lab.client, addr, 6379)?, "the owner listens");
    let line = status_listener(&lab, 6379)?;
    assert_eq!(line["exposure"], "exposed", "{line}");
    assert_eq!(line["is_owner"], true, "{line}");
    let owned = status_owned(&lab)?;
    assert_eq!(
        (&owned["open"], &owned["comm"]),
        (&Value::from(true), &Value::from("socat")),
        "{owned}"
    );
    assert_eq!(owned["squatters"], 0, "{owned}");
    metric(1, 0)?;

    // The owner goes: closed again, whatever the kernel would answer.
    drop(owner);
    let closed = pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == false)?;
    assert_eq!(closed["port"], "tcp/6379", "{closed}");
    gated_with(&pw.seen, &closed, "close")?;
    assert_silently_dropped(&tcp_probe(&lab.client, addr, 6379, None)?, "owner gone");

    // The policy shows the owner.
    let out = Command::new(portwatch_bin())
        .args(["policy", "--json", "--socket", &lab.socket()?])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("user root, comm socat"), "{text}");
    pw.stop()?;
    Ok(())
}

/// An owner named by cgroup: processes in that cgroup or below it may bind
/// the owned ports (TCP and UDP, IPv4 and IPv6, and join with
/// SO_REUSEPORT); a process in another cgroup is refused with EPERM, also
/// when it tries to join the owner's SO_REUSEPORT group or binds through
/// io_uring (IORING_OP_BIND), and each refusal
/// is a `bind_denied` event naming its cgroup, counted in status and
/// metrics. Binds in another network namespace are not the guard's.
#[test]
fn binds_of_owned_ports_are_refused_to_other_cgroups() -> Result {
    let lab = Lab::new()?;
    let mut cgroups = TestCgroup::new("own")?;
    let owner_cg = cgroups.child("owner")?;
    let worker_cg = cgroups.child("owner/worker")?;
    let stranger_cg = cgroups.child("stranger")?;
    let policy = TempFile::new(
        "owned-cgroup",
        &format!(
            "allow = [\n  {{ port = \"tcp/6379\", owner = {{ cgroup = \"{owner_cg}\" }} }},\n  \
             {{ port = \"udp/5353\", owner = {{ cgroup = \"{owner_cg}\" }} }},\n]\n"
        ),
    )?;
    let mut pw = start_guard(&lab, &policy, &["--metrics", "127.0.0.1:9465"])?;
    let python = |cg: &str| cgroups.command(cg, &lab.server, "python3");

    for (proto, host, port) in [
        ("tcp", "0.0.0.0", 6379),
        ("tcp", "::", 6379),
        ("udp", "127.0.0.1", 5353),
        ("udp", "::1", 5353),
    ] {
        let what = format!("{proto} [{host}]:{port}");
        assert_eq!(
            try_bind(python(&stranger_cg), proto, host, port, false)?,
            "EPERM",
            "a stranger's bind of {what}"
        );
        assert_eq!(
            try_bind(python(&owner_cg), proto, host, port, false)?,
            "bound",
            "the owner's bind of {what}"
        );
        assert_eq!(
            try_bind(python(&worker_cg), proto, host, port, false)?,
            "bound",
            "a bind of {what} from below the owner's cgroup"
        );
    }
    // Ports nobody owns, and the owned ports in another namespace: free.
    assert_eq!(
        try_bind(python(&stranger_cg), "tcp", "::", 6380, false)?,
        "bound"
    );
    assert_eq!(
        try_bind(
            cgroups.command(&stranger_cg, &lab.client, "python3"),
            "tcp",
            "::",
            6379,
            false
        )?,
        "bound",
        "another namespace"
    );

    // The owner listens with SO_REUSEPORT: its own second process may join
    // the group, a stranger may not.
    let mut socat = cgroups.command(&owner_cg, &lab.server, "socat");
    socat
        .args([
            "TCP6-LISTEN:6379,ipv6only=0,reuseaddr,reuseport,fork",
            "SYSTEM:echo hi",
        ])
        .stdin(std::process::Stdio::null());
    let _owner = portwatch_lab::ChildGuard::spawn(&mut socat)?;
    portwatch_lab::wait_listening(&lab.server, "tcp", 6379)?;
    pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 6379)?);
    assert_eq!(
        try_bind(python(&stranger_cg), "tcp", "::", 6379, true)?,
        "EPERM",
        "a stranger joining the owner's SO_REUSEPORT group"
    );
    assert_eq!(
        try_bind(python(&worker_cg), "tcp", "::", 6379, true)?,
        "bound",
        "the owner's own process joining its group"
    );

    // io_uring's bind (IORING_OP_BIND) meets the same hook.
    let uring_bind = |cg: &str| -> Result<String> {
        let mut cmd = cgroups.command(cg, &lab.server, env!("CARGO_BIN_EXE_uring-bind"));
        cmd.args(["udp", "::", "5353"]);
        let out = run_bounded(&mut cmd, None, WAIT, None)?;
        ensure!(out.success(), "uring-bind: {}", out.stderr);
        Ok(out.stdout.trim().to_owned())
    };
    assert_eq!(
        uring_bind(&stranger_cg)?,
        "EPERM",
        "a stranger's io_uring bind"
    );
    assert_eq!(
        uring_bind(&worker_cg)?,
        "bound",
        "the owner's io_uring bind"
    );

    // Six refusals: four binds, the join and the io_uring bind, each reported.
    let events = |pw: &portwatch_tests::Portwatch| -> Vec<Value> {
        pw.seen
            .iter()
            .filter(|v| v["event"] == "bind_denied")
            .cloned()
            .collect()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while events(&pw).len() < 6 && std::time::Instant::now() < deadline {
        let _ = pw.wait_for(Duration::from_millis(200), |_| false);
    }
    let denied = events(&pw);
    assert_eq!(denied.len(), 6, "{denied:?}");
    for ev in &denied {
        assert_eq!(ev["cgroup"], stranger_cg.as_str(), "{ev}");
        assert!(
            ev["comm"] == "python3" || ev["comm"] == "uring-bind",
            "{ev}"
        );
        assert_eq!(ev["audit"], false, "{ev}");
        assert_eq!(ev["owner"], format!("cgroup {owner_cg}"), "{ev}");
    }
    let ports: Vec<&str> = denied.iter().filter_map(|v| v["port"].as_str()).collect();
    assert_eq!(
        ports,
        [
            "tcp/6379", "tcp/6379", "udp/5353", "udp/5353", "tcp/6379", "udp/5353"
        ]
    );
    let status = status_json(&lab)?;
    assert_eq!(status["totals"]["binds_refused"], 6, "{status}");
    assert_eq!(status["totals"]["binds_audited"], 0, "{status}");
    let text = metrics(&lab.server, "127.0.0.1:9465")?;
    for want in [
        "portwatch_owned_port_binds_total{verdict=\"refused\"} 6",
        "portwatch_owned_port_binds_total{verdict=\"audited\"} 0",
    ] {
        assert!(has_sample(&text, want), "no {want:?} in\n{text}");
    }
    pw.stop()?;
    Ok(())
}

/// In audit mode a stranger's bind of an owned port goes through, and the
/// stream says it would have been refused.
#[test]
fn audit_mode_lets_a_strangers_bind_through_and_reports_it() -> Result {
    let lab = Lab::new()?;
    let mut cgroups = TestCgroup::new("aud")?;
    let owner_cg = cgroups.child("owner")?;
    let stranger_cg = cgroups.child("stranger")?;
    let policy = TempFile::new(
        "owned-audit",
        &format!(
            "mode = \"audit\"\nallow = [\n  {{ port = \"udp/5353\", owner = {{ cgroup = \"{owner_cg}\" }} }},\n]\n"
        ),
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let got = try_bind(
        cgroups.command(&stranger_cg, &lab.server, "python3"),
        "udp",
        "0.0.0.0",
        5353,
        false,
    )?;
    assert_eq!(got, "bound", "audit mode refuses nothing");
    let audited = pw.wait_for(WAIT, |v| v["event"] == "bind_denied")?;
    assert_eq!(audited["audit"], true, "{audited}");
    assert_eq!(audited["port"], "udp/5353", "{audited}");
    assert_eq!(audited["cgroup"], stranger_cg.as_str(), "{audited}");
    let status = status_json(&lab)?;
    assert_eq!(status["totals"]["binds_audited"], 1, "{status}");
    assert_eq!(status["totals"]["binds_refused"], 0, "{status}");
    pw.stop()?;
    Ok(())
}

/// An owner whose cgroup does not exist yet (its unit has not started)
/// holds its port for nobody; once the cgroup is made, the first bind from
/// it goes through at once (the guard watches where cgroups are made), and
/// so does the first bind after a restart (the cgroup made anew, with a new
/// id), while a stranger stays refused throughout.
#[test]
fn a_restarted_owner_gets_its_port_back_at_once() -> Result {
    let lab = Lab::new()?;
    let mut cgroups = TestCgroup::new("rst")?;
    let stranger_cg = cgroups.child("stranger")?;
    let owner_cg = format!("{}/owner", cgroups.path());
    let policy = TempFile::new(
        "owned-later",
        &format!(
            "allow = [\n  {{ port = \"tcp/7000\", owner = {{ cgroup = \"{owner_cg}\" }} }},\n]\n"
        ),
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let bind = |cgroups: &TestCgroup, cg: &str| {
        try_bind(
            cgroups.command(cg, &lab.server, "python3"),
            "tcp",
            "::",
            7000,
            false,
        )
    };
    assert_eq!(
        bind(&cgroups, &stranger_cg)?,
        "EPERM",
        "no owner yet: nobody binds"
    );
    for round in ["start", "restart"] {
        cgroups.child("owner")?;
        assert_eq!(
            bind(&cgroups, &owner_cg)?,
            "bound",
            "the owner's first bind after its {round}"
        );
        assert_eq!(
            bind(&cgroups, &stranger_cg)?,
            "EPERM",
            "a stranger after the owner's {round}"
        );
        cgroups.remove_child("owner")?;
    }
    pw.stop()?;
    let refused: Vec<&Value> = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "bind_denied")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(
        refused.iter().all(|v| v["cgroup"] == stranger_cg.as_str()),
        "only the stranger was refused: {refused:?}"
    );
    Ok(())
}

/// An owner named by its executable: a process with the owner's command
/// name but another executable (a copy of socat elsewhere) may bind (the
/// kernel checks the command name), but the port stays closed at XDP: it is
/// not the owner, and status counts it as a squatter. The real executable
/// opens the port.
#[test]
fn a_process_with_another_executable_does_not_open_the_port() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new(
        "owned-exe",
        "allow = [\n  { port = \"tcp/6379\", owner = { comm = \"socat\", exe = \"/usr/bin/socat\" } },\n]\n",
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let dir = TempDir::new("exe")?;
    let copy = dir.join("socat");
    std::fs::copy("/usr/bin/socat", &copy)?;
    let copy = copy.to_string_lossy().into_owned();
    let impostor = spawn_server(
        &lab.server,
        "tcp",
        6379,
        &copy,
        &[
            "TCP6-LISTEN:6379,ipv6only=0,reuseaddr,fork",
            "SYSTEM:echo hi",
        ],
    )?;
    let listen = pw.wait_for(WAIT, |v| v["event"] == "listen" && v["port"] == 6379)?;
    assert_eq!(listen["exe"], copy.as_str(), "{listen}");
    assert_silently_dropped(
        &tcp_probe(&lab.client, lab.server_v4(), 6379, None)?,
        "another executable listens",
    );
    let owned = status_owned(&lab)?;
    assert_eq!(owned["open"], false, "{owned}");
    assert_eq!(owned["squatters"], 1, "{owned}");
    let squat = pw.wait_for(WAIT, |v| v["event"] == "not_owner")?;
    assert_eq!(squat["exe"], copy.as_str(), "{squat}");
    assert_eq!(squat["owner"], "comm socat, exe /usr/bin/socat", "{squat}");
    drop(impostor);
    pw.wait_for(WAIT, |v| v["event"] == "close" && v["port"] == 6379)?;

    let _owner = tcp_server(&lab.server, 6379)?;
    let opened = pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    assert_eq!(opened["comm"], "socat", "{opened}");
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 6379)?);
    pw.stop()?;
    Ok(())
}

/// kill -9 leaves the gate as the pinned maps have it (open: the owner
/// listened); the owner goes while no guard runs; the guard that adopts the
/// pinned datapath works the gate out again from its snapshot (closed),
/// and opens it when the owner is back.
#[test]
fn a_guard_adopting_after_kill_9_works_the_gate_out_again() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("ow")?;
    let policy = TempFile::new(
        "owned-adopt",
        "allow = [\n  { port = \"tcp/6379\", owner = { comm = \"socat\" } },\n]\n",
    )?;
    let addr = lab.server_v4();
    let owner = tcp_server(&lab.server, 6379)?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    assert!(tcp_reachable(&lab.client, addr, 6379)?, "the owner listens");

    portwatch_tests::signal(pw.pid(), libc::SIGKILL)?;
    let _ = pw.stop();
    assert!(
        tcp_reachable(&lab.client, addr, 6379)?,
        "while no guard runs, the pinned gate keeps its last state"
    );
    drop(owner);

    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    assert!(
        pw.stderr().contains("adopted the pinned datapath"),
        "{}",
        pw.stderr()
    );
    assert_silently_dropped(
        &tcp_probe(&lab.client, addr, 6379, None)?,
        "the adopting guard found no owner",
    );
    let _owner = tcp_server(&lab.server, 6379)?;
    pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    assert!(tcp_reachable(&lab.client, addr, 6379)?, "the owner is back");
    pw.stop()?;
    Ok(())
}

/// An owner pinned to its executable's contents: socat whose SHA-256 is the
/// one named opens its port; the same socat on a port whose rule names
/// another digest does not (a rebuilt or replaced binary is not the owner).
#[test]
fn an_owner_pinned_by_sha256_opens_only_with_that_executable() -> Result {
    let lab = Lab::new()?;
    let out = run_bounded(
        Command::new("sha256sum").arg("/usr/bin/socat"),
        None,
        WAIT,
        None,
    )?;
    ensure!(out.success(), "sha256sum: {}", out.stderr);
    let digest = out
        .stdout
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .unwrap_or_default();
    ensure!(digest.len() == 64, "{}", out.stdout);
    let other = "0".repeat(64);
    let policy = TempFile::new(
        "owned-sha",
        &format!(
            "allow = [\n  {{ port = \"tcp/6379\", owner = {{ exe = \"/usr/bin/socat\", sha256 = \"{digest}\" }} }},\n  \
             {{ port = \"tcp/6380\", owner = {{ exe = \"/usr/bin/socat\", sha256 = \"{other}\" }} }},\n]\n"
        ),
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let _pinned = tcp_server(&lab.server, 6379)?;
    let _other = tcp_server(&lab.server, 6380)?;
    let opened = pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    assert_eq!(opened["port"], "tcp/6379", "{opened}");
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 6379)?);
    pw.wait_for(WAIT, |v| v["event"] == "listen" && v["port"] == 6380)?;
    assert_silently_dropped(
        &tcp_probe(&lab.client, lab.server_v4(), 6380, None)?,
        "another digest",
    );
    let status = status_json(&lab)?;
    let owned = status["owned"]
        .as_array()
        .and_then(|o| o.iter().find(|p| p["port"] == "tcp/6380"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(owned["open"], false, "{owned}");
    assert_eq!(owned["squatters"], 1, "{owned}");
    pw.stop()?;
    assert!(
        !pw.seen
            .iter()
            .any(|v| v["event"] == "gate" && v["port"] == "tcp/6380"),
        "{:?}",
        pw.seen
    );
    Ok(())
}

/// The gate moved with the batch that reported the owner's `kind` event
/// on 6379 (milliseconds), not at the guard's next sweep (every 5 s).
fn gated_with(seen: &[Value], gate: &Value, kind: &str) -> Result {
    let event = seen
        .iter()
        .rev()
        .find(|v| v["event"] == kind && v["port"] == 6379 && v["comm"] == "socat")
        .with_context(|| format!("no {kind} of socat on 6379 before {gate}"))?;
    let lag = ts_of(gate)?
        .duration_since(ts_of(event)?)
        .unwrap_or_default();
    ensure!(
        lag < std::time::Duration::from_secs(2),
        "the gate moved {lag:?} after the owner's {kind}: {event} then {gate}"
    );
    Ok(())
}

/// The time a line of the guard's JSON stream says, read by portwatch's own
/// parser.
fn ts_of(v: &Value) -> Result<std::time::SystemTime> {
    use portwatch::{model::Event, sinks::json::Line};
    match portwatch::sinks::json::parse_line(&v.to_string())? {
        Line::Event(Event::Listener(ev)) => Ok(ev.ts),
        Line::Event(Event::Bind(b)) => Ok(b.ts),
        Line::Event(Event::Gate(g)) => Ok(g.ts),
        other => anyhow::bail!("no time in {other:?}"),
    }
}

/// No gap across a restart: after kill -9 the monitor's and the bind
/// hooks stay attached (pinned). While no guard runs, a stranger's bind of
/// the owned port is still refused, and a listener opens and closes; the
/// next guard (adopting the pinned datapath) reports all three from the
/// pinned rings, with the times they happened.
#[test]
fn hooks_hold_across_kill_9_and_the_next_guard_hears_what_happened() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("hk")?;
    let policy = TempFile::new(
        "owned-hooks",
        "allow = [\n  { port = \"tcp/6379\", owner = { comm = \"socat\" } },\n]\n",
    )?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    portwatch_tests::signal(pw.pid(), libc::SIGKILL)?;
    let _ = pw.stop();

    let before = std::time::SystemTime::now();
    drop(tcp_server(&lab.server, 7777)?);
    let got = try_bind(lab.server.command("python3"), "tcp", "::", 6379, false)?;
    assert_eq!(got, "EPERM", "the pinned bind hook, with no guard running");
    let after = std::time::SystemTime::now();

    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    assert!(
        pw.stderr().contains("adopted the pinned datapath"),
        "{}",
        pw.stderr()
    );
    for event in ["listen", "close"] {
        let line = pw.wait_for(WAIT, |v| v["event"] == event && v["port"] == 7777)?;
        let ts = ts_of(&line)?;
        assert!(
            before <= ts && ts <= after,
            "{event} of tcp/7777 at its own time, not the new guard's: {line}"
        );
    }
    let denied = pw.wait_for(WAIT, |v| v["event"] == "bind_denied")?;
    assert_eq!(denied["comm"], "python3", "{denied}");
    let ts = ts_of(&denied)?;
    assert!(before <= ts && ts <= after, "{denied}");
    pw.stop()?;
    Ok(())
}

/// Listens on a port as `pw-owner`, forks a child that renames itself
/// `pw-heir`, keeps the socket and answers "hi" on it (for 120 s at most),
/// prints the child's pid, and exits when its stdin says so.
const HAND_OVER: &str = r#"
import ctypes, os, signal, socket, sys
libc = ctypes.CDLL(None)
libc.prctl(15, b"pw-owner", 0, 0, 0)
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen()
child = os.fork()
if child == 0:
    libc.prctl(15, b"pw-heir", 0, 0, 0)
    signal.alarm(120)
    while True:
        c, _ = s.accept()
        c.sendall(b"hi\n")
        c.close()
print(child, flush=True)
sys.stdin.readline()
"#;

/// Ends a process the test started indirectly (a grandchild), by its pid.
struct Grandchild(u32);

impl Drop for Grandchild {
    fn drop(&mut self) {
        let _ = portwatch_tests::signal(self.0, libc::SIGKILL);
    }
}

/// A descriptor handed on keeps the port open only while an owner holds it:
/// the owner (`pw-owner`) listens and forks a child that keeps the socket;
/// while the owner lives the port is open; when it exits, the child holding
/// the socket is not the owner, and the port closes (on the next
/// housekeeping tick, 5 s) without any socket closing.
#[test]
fn a_socket_kept_by_a_stranger_after_its_owner_exits_closes_the_port() -> Result {
    use std::io::{BufRead, Write};
    let lab = Lab::new()?;
    let policy = TempFile::new(
        "owned-heir",
        "allow = [\n  { port = \"tcp/6379\", owner = { comm = \"pw-owner\" } },\n]\n",
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let mut cmd = lab.server.command("python3");
    cmd.args(["-c", HAND_OVER, "6379"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut owner = portwatch_lab::ChildGuard::spawn(&mut cmd)?;
    let mut line = String::new();
    let stdout = owner
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let heir = Grandchild(line.trim().parse()?);
    let opened = pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    assert_eq!(opened["comm"], "pw-owner", "{opened}");
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 6379)?);

    // The owner exits; its child keeps the listening socket.
    let mut stdin = owner
        .0
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    stdin.write_all(b"go\n")?;
    owner.wait_within(WAIT)?;
    let closed = pw.wait_for(Duration::from_secs(15), |v| {
        v["event"] == "gate" && v["open"] == false
    })?;
    assert_eq!(closed["port"], "tcp/6379", "{closed}");
    let heir_line = pw.wait_for(WAIT, |v| v["event"] == "not_owner")?;
    assert_eq!(heir_line["comm"], "pw-heir", "{heir_line}");
    assert_eq!(heir_line["pid"], heir.0, "{heir_line}");
    assert_silently_dropped(
        &tcp_probe(&lab.client, lab.server_v4(), 6379, None)?,
        "the socket is held by a stranger now",
    );
    drop(heir);
    pw.stop()?;
    Ok(())
}
