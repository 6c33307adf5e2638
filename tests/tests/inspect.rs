//! `explain` and `verify` (#17): the guard asks its own loaded XDP program
//! about a packet. Real traffic from the lab's client namespace (socat,
//! from several source addresses) against real servers, and the program's
//! answer held against what that traffic experienced; a policy map altered
//! behind the guard's back with bpftool, and `verify` naming the listener.

use std::{net::IpAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use portwatch_tests::{
    Result,
    net::{
        Connect, GuardPaths, Lab, TempFile, path_str, pinned_guard, start_guard, status_json,
        succeeded, tcp_probe, tcp_reachable, tcp_server,
    },
    portwatch_bin, run,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// `portwatch explain ARGS --json` against `socket`: the answer and whether
/// the command said the program agrees with the policy (exit 0).
fn explain(socket: &str, args: &[&str]) -> Result<(Value, bool)> {
    let out = Command::new(portwatch_bin())
        .arg("explain")
        .args(args)
        .args(["--json", "--socket", socket])
        .output()?;
    let answer: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "explain {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(answer["ok"] == true, "explain {args:?}: {answer}");
    Ok((answer, out.status.success()))
}

/// The program's verdict and reason, e.g. ("drop", "no_rule").
fn verdict(answer: &Value) -> (String, String) {
    (
        answer["verdict"]["verdict"]
            .as_str()
            .unwrap_or("?")
            .to_string(),
        answer["verdict"]["reason"]
            .as_str()
            .unwrap_or("?")
            .to_string(),
    )
}

fn reasons(answer: &Value) -> String {
    answer["reasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default()
}

/// A connection from `bind` and the explanation of the same packet must
/// agree: answered ⇔ the program passes it.
fn same_fate(
    lab: &Lab,
    socket: &str,
    port: u16,
    bind: IpAddr,
    want: (&str, &str),
) -> Result<Value> {
    let server = lab.server_v4();
    let (answer, agrees) = explain(
        socket,
        &[
            &format!("tcp/{port}"),
            "--from",
            &bind.to_string(),
            "--to",
            &server.to_string(),
        ],
    )?;
    let probe = tcp_probe(&lab.client, server, port, Some(bind))?;
    let got = verdict(&answer);
    assert_eq!(
        (got.0.as_str(), got.1.as_str()),
        want,
        "tcp/{port} from {bind}: {answer}"
    );
    let passed = probe.result == Connect::Answered;
    assert_eq!(
        passed,
        got.0 == "pass",
        "tcp/{port} from {bind}: the traffic {:?}, explain said {got:?}",
        probe.result
    );
    if !passed {
        assert_eq!(probe.result, Connect::TimedOut, "dropped, not refused");
    }
    assert!(
        agrees,
        "explain says the program disagrees with the policy: {answer}"
    );
    assert_eq!(answer["agrees"], true, "{answer}");
    Ok(answer)
}

/// Passed, no rule, source not allowed, rate limited and owner-gated:
/// what explain says the program does is what the traffic gets, and the
/// reasons name the rule, its line, the network, the limit, the owner.
#[test]
fn explain_tells_what_the_traffic_experiences() -> Result {
    let lab = Lab::new()?;
    let outsider = lab.add_client_v4(200)?;
    let inside = lab.client_v4();
    let net = lab.net;
    let policy = TempFile::new(
        "explain",
        &format!(
            "allow = [\n  \"tcp/8080\",\n  {{ port = \"tcp/5432\", from = [\"198.18.{net}.0/25\"] }},\n  {{ port = \"tcp/7000\", limit = \"2/minute\" }},\n  {{ port = \"tcp/6379\", owner = {{ comm = \"socat\", user = \"root\" }} }},\n]\n"
        ),
    )?;
    let _servers = [8080, 5432, 7000, 9000]
        .iter()
        .map(|p| tcp_server(&lab.server, *p))
        .collect::<Result<Vec<_>>>()?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let socket = lab.socket()?;

    let open = same_fate(&lab, &socket, 8080, inside, ("pass", "rule"))?;
    assert_eq!(open["rule"]["rule"], "tcp/8080", "{open}");
    assert_eq!(open["rule"]["line"], 2, "{open}");
    assert!(reasons(&open).contains("every source"), "{open}");

    let closed = same_fate(&lab, &socket, 9000, inside, ("drop", "no_rule"))?;
    assert!(closed["rule"].is_null(), "{closed}");
    assert!(
        reasons(&closed).contains("no rule covers tcp/9000"),
        "{closed}"
    );
    // The drop the traffic above caused is among the port's last drops.
    pw.wait_for(WAIT, |v| v["event"] == "drop" && v["dst_port"] == 9000)?;
    let (again, _) = explain(&socket, &["tcp/9000", "--from", &inside.to_string()])?;
    let drops = again["last_drops"].to_string();
    assert!(drops.contains(&inside.to_string()), "{again}");
    assert!(again["drop_packets"].as_u64() >= Some(1), "{again}");

    let member = same_fate(&lab, &socket, 5432, inside, ("pass", "rule"))?;
    assert!(
        reasons(&member).contains(&format!("is in 198.18.{net}.0/25")),
        "{member}"
    );
    let stranger = same_fate(
        &lab,
        &socket,
        5432,
        outsider,
        ("drop", "source_not_allowed"),
    )?;
    assert!(
        reasons(&stranger).contains("none of the rule's 1 network"),
        "{stranger}"
    );
    assert_eq!(stranger["rule"]["line"], 3, "{stranger}");

    // Two connections use up the limit; asking about the third does not
    // take a token (the answer stays the same) and a fresh source passes.
    same_fate(&lab, &socket, 7000, inside, ("pass", "rule"))?;
    same_fate(&lab, &socket, 7000, inside, ("pass", "rule"))?;
    let limited = same_fate(&lab, &socket, 7000, inside, ("drop", "rate_limited"))?;
    assert!(reasons(&limited).contains("limit 2/minute"), "{limited}");
    let (fresh, _) = explain(&socket, &["tcp/7000", "--from", &outsider.to_string()])?;
    assert_eq!(verdict(&fresh), ("pass".into(), "rule".into()), "{fresh}");
    let (fresh_again, _) = explain(&socket, &["tcp/7000", "--from", &outsider.to_string()])?;
    assert_eq!(
        verdict(&fresh_again),
        verdict(&fresh),
        "probing took a token"
    );
    same_fate(&lab, &socket, 7000, outsider, ("pass", "rule"))?;

    // Owned: closed while its owner does not listen, open once it does.
    let gated = same_fate(&lab, &socket, 6379, inside, ("drop", "no_rule"))?;
    assert!(
        reasons(&gated).contains("owned by user root, comm socat: closed"),
        "{gated}"
    );
    let _owner = tcp_server(&lab.server, 6379)?;
    pw.wait_for(WAIT, |v| v["event"] == "gate" && v["open"] == true)?;
    // The kernel's policy changed without a policy change: the guard
    // verifies within a housekeeping tick.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = status_json(&lab)?;
        if status["verify"]["trigger"] == "owned ports opened or closed" {
            assert_eq!(status["verify"]["ok"], true, "{status}");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no verify after the gate opened: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let owned = same_fate(&lab, &socket, 6379, inside, ("pass", "rule"))?;
    assert!(
        reasons(&owned).contains("owned by user root, comm socat: open"),
        "{owned}"
    );

    // A scan's segment without ACK needs the rule a SYN needs; an ACK passes.
    let (xmas, _) = explain(&socket, &["tcp/9000", "--flags", "xmas"])?;
    assert_eq!(verdict(&xmas), ("drop".into(), "no_rule".into()), "{xmas}");
    let (ack, _) = explain(&socket, &["tcp/9000", "--flags", "ack"])?;
    assert_eq!(verdict(&ack), ("pass".into(), "connection".into()), "{ack}");

    // Bad questions get answers naming the problem.
    let out = Command::new(portwatch_bin())
        .args(["explain", "tcp/1-2", "--socket", &socket])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("one port"),
        "{out:?}"
    );
    let out = Command::new(portwatch_bin())
        .args(["explain", "udp/53", "--flags", "syn", "--socket", &socket])
        .output()?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("flags are TCP's"),
        "{out:?}"
    );
    pw.stop()?;
    Ok(())
}

/// `portwatch verify --json` against `paths`' socket: the report and the
/// exit status.
fn verify(paths: &GuardPaths) -> Result<(Value, bool, String)> {
    let json = paths.client(&["verify", "--json"])?;
    let report: Value = serde_json::from_slice(&json.stdout)
        .with_context(|| format!("verify: {}", String::from_utf8_lossy(&json.stderr)))?;
    let text = paths.client(&["verify"])?;
    assert_eq!(
        json.status.success(),
        text.status.success(),
        "one answer, two renderings"
    );
    Ok((
        report,
        json.status.success(),
        String::from_utf8_lossy(&text.stdout).into_owned(),
    ))
}

/// `POLICY_PORTS`' key and value for tcp/`port`, as bpftool takes them.
fn policy_port_entry(port: u16, value: u32) -> Vec<String> {
    let mut args: Vec<String> = vec!["key".into()];
    args.extend(u32::from(port).to_ne_bytes().iter().map(|b| b.to_string()));
    args.push("value".into());
    args.extend(value.to_ne_bytes().iter().map(|b| b.to_string()));
    args
}

/// Verify passes on a consistent datapath (and the guard ran it at
/// start), and fails naming the listener when a policy map is altered
/// behind the guard's back with bpftool — a change real traffic feels.
#[test]
fn verify_names_the_listener_whose_policy_map_was_altered_behind_the_guards_back() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("vf")?;
    let net = lab.net;
    let policy = TempFile::new(
        "verify",
        &format!(
            "allow = [\"tcp/8080\", {{ port = \"tcp/5432\", from = [\"198.18.{net}.0/25\", \"fd7e:{net:x}::/64\"] }}]\n"
        ),
    )?;
    let _servers = [8080, 5432, 9000]
        .iter()
        .map(|p| tcp_server(&lab.server, *p))
        .collect::<Result<Vec<_>>>()?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let server = lab.server_v4();

    let (report, ok, text) = verify(&paths)?;
    assert!(ok, "{text}\n{report}");
    assert_eq!(report["disagreements"], 0, "{report}");
    let rows = report["rows"].as_array().context("rows")?;
    for port in [8080, 5432, 9000] {
        let row = rows
            .iter()
            .find(|r| r["port"] == port)
            .with_context(|| format!("no row for {port}: {report}"))?;
        assert_eq!(row["ok"], true, "{row}");
        // IPv4 and IPv6 (the servers are dual-stack), and the edges of
        // the rule's networks for 5432.
        let samples = row["samples"].as_array().context("samples")?;
        assert!(
            samples
                .iter()
                .any(|s| s["to"].as_str().is_some_and(|t| t.contains(':'))),
            "{row}"
        );
        if port == 5432 {
            assert!(
                samples.iter().any(
                    |s| s["from"] == format!("198.18.{net}.127") && s["predicted_pass"] == true
                ),
                "{row}"
            );
            assert!(
                samples
                    .iter()
                    .any(|s| s["from"] == format!("198.18.{net}.128")
                        && s["predicted_pass"] == false),
                "{row}"
            );
        }
    }
    assert!(text.contains("verified"), "{text}");
    assert!(
        pw.stderr().contains("verify (start)"),
        "the guard verifies at start: {}",
        pw.stderr()
    );

    // Open tcp/9000 to anywhere in the kernel, not in the policy.
    let pins = path_str(&paths.pins)?.to_string();
    let map = format!("{pins}/POLICY_PORTS");
    let mut args: Vec<String> = ["map", "update", "pinned", &map]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(policy_port_entry(9000, portwatch_common::RULE_ANY));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("bpftool", &args)?;
    assert!(
        tcp_reachable(&lab.client, server, 9000)?,
        "the altered map lets traffic in"
    );
    let (report, ok, text) = verify(&paths)?;
    assert!(!ok, "verify must fail: {text}");
    assert!(text.contains("FAILED"), "{text}");
    let bad: Vec<&Value> = report["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .filter(|r| r["ok"] == false)
        .collect();
    assert_eq!(bad.len(), 1, "only tcp/9000 disagrees: {report}");
    assert_eq!(bad[0]["port"], 9000, "{report}");
    assert!(text.contains(":9000") && text.contains("NO"), "{text}");
    let status = paths.status_json()?;
    assert_eq!(status["verify"]["ok"], false, "{status}");
    assert!(
        status["verify"]["disagreements"]
            .to_string()
            .contains(":9000"),
        "{status}"
    );

    // Put the policy back: after a failed verify a reload diffs against
    // what the maps hold, rewriting the altered entry, and the automatic
    // verify after it passes.
    succeeded(&paths.client(&["reload"])?)?;
    let status = paths.status_json()?;
    assert_eq!(status["verify"]["trigger"], "reload", "{status}");
    assert_eq!(status["verify"]["ok"], true, "{status}");
    assert!(!tcp_reachable(&lab.client, server, 9000)?, "closed again");
    pw.stop()?;
    Ok(())
}

/// `n` TCP listeners on 0.0.0.0, ports `first` on, in the lab's server
/// namespace, once the guard lists them all; they go with the children.
/// At most 3,000 per process: a common file limit is 4,096.
fn many_listeners(lab: &Lab, n: usize, first: u16) -> Result<Vec<portwatch_tests::ChildGuard>> {
    const PER_PROCESS: usize = 3000;
    let mut children = Vec::new();
    for start in (0..n).step_by(PER_PROCESS) {
        let count = PER_PROCESS.min(n - start);
        let base = usize::from(first) + start;
        let script = format!(
            "import resource, socket, sys, time\n\
             soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
             resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, {count} + 64)), hard))\n\
             socks = []\n\
             for i in range({count}):\n\
             \x20   s = socket.socket()\n\
             \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             \x20   s.bind(('0.0.0.0', {base} + i))\n\
             \x20   s.listen(1)\n\
             \x20   socks.append(s)\n\
             print('ready', flush=True)\n\
             time.sleep(300)\n"
        );
        let mut cmd = lab.server.command("python3");
        cmd.args(["-c", &script])
            .stdout(std::process::Stdio::null());
        children.push(portwatch_tests::ChildGuard::spawn(&mut cmd)?);
    }
    // The guard has seen them all.
    let ours = u64::from(first)..u64::from(first) + n as u64;
    let deadline = std::time::Instant::now() + 3 * WAIT;
    loop {
        let status = status_json(lab)?;
        let seen = status["listeners"].as_array().map_or(0, |ls| {
            ls.iter()
                .filter(|l| {
                    l["proto"] == "tcp" && l["port"].as_u64().is_some_and(|p| ours.contains(&p))
                })
                .count()
        });
        if seen == n {
            return Ok(children);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the guard lists {seen} of the {n} listeners"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The head of `status` (`{"cmd":"status","lines":true}`, its first line),
/// straight over the control socket: cheap enough to ask often.
fn status_head(socket: &str) -> Result<Value> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(b"{\"cmd\":\"status\",\"lines\":true}\n")?;
    let mut head = String::new();
    std::io::BufReader::new(stream).read_line(&mut head)?;
    serde_json::from_str(&head).with_context(|| format!("status head: {head}"))
}

/// A requested `verify` is probed a chunk per turn of the guard's loop as
/// well (with 40,000 listeners one took 0.65 s, and a request meanwhile
/// waited up to 0.26 s): while it runs `status` says how far it has got,
/// and of two requests made together each gets a report of every
/// listener, the second from a run of its own after the first.
#[test]
fn a_requested_verify_runs_in_chunks_and_status_shows_how_far_it_got() -> Result {
    const LISTENERS: usize = 8000;
    let lab = Lab::new()?;
    let policy = TempFile::new("verifyasked", "allow = [\"tcp/22\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let _listeners = many_listeners(&lab, LISTENERS, 20000)?;
    let socket = lab.socket()?;
    // Two requests at once, their answers into files; status's head asked
    // meanwhile until it shows a run under way. Runs that every ask
    // missed (a loaded machine) are asked for again, a few times.
    let mut progress = None;
    for _ in 0..5 {
        let outs = [
            TempFile::new("verifyout", "")?,
            TempFile::new("verifyout", "")?,
        ];
        let mut asked = Vec::new();
        for out in &outs {
            let mut cmd = Command::new(portwatch_bin());
            cmd.args(["verify", "--json", "--socket", &socket])
                .stdout(std::fs::File::create(&out.path)?);
            asked.push(portwatch_tests::ChildGuard::spawn(&mut cmd)?);
        }
        let deadline = std::time::Instant::now() + 6 * WAIT;
        loop {
            let head = status_head(&socket)?;
            if progress.is_none() && !head["verifying"].is_null() {
                progress = Some(head["verifying"].clone());
            }
            let mut running = 0;
            for child in &mut asked {
                if child.0.try_wait()?.is_none() {
                    running += 1;
                }
            }
            if running == 0 {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{running} verify requests unanswered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for (child, out) in asked.iter_mut().zip(&outs) {
            let text = std::fs::read_to_string(&out.path)?;
            ensure!(child.wait_within(WAIT)?.success(), "verify failed: {text}");
            let report: Value = serde_json::from_str(&text).context("verify --json")?;
            let rows = report["rows"].as_array().map_or(0, Vec::len);
            ensure!(
                report["trigger"] == "request"
                    && report["disagreements"] == 0
                    && report["unchecked"] == 0
                    && rows >= LISTENERS,
                "{rows} rows; {}",
                report["interfaces"]
            );
        }
        if progress.is_some() {
            break;
        }
    }
    let progress = progress.context("status never showed a requested verify under way")?;
    let total = progress["listeners"].as_u64().context("listeners")?;
    let probed = progress["probed"].as_u64().context("probed")?;
    ensure!(
        progress["trigger"] == "request" && total >= LISTENERS as u64 && probed < total,
        "{progress}"
    );
    let status = status_json(&lab)?;
    ensure!(status["verifying"].is_null(), "{}", status["verifying"]);
    ensure!(
        status["verify"]["trigger"] == "request",
        "{}",
        status["verify"]
    );
    pw.stop()?;
    Ok(())
}

/// The automatic verify after a change probes a host's listeners a chunk
/// per turn of the guard's loop (the stream and the control socket go on
/// in between): with 600 listeners it still covers every one of them,
/// and its result is the one `status` shows.
#[test]
fn the_automatic_verify_covers_hundreds_of_listeners_in_chunks() -> Result {
    const LISTENERS: usize = 600;
    let lab = Lab::new()?;
    let policy = TempFile::new("verifymany", "allow = [\"tcp/22\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let _listeners = many_listeners(&lab, LISTENERS, 31000)?;
    let socket = lab.socket()?;
    succeeded(
        &Command::new(portwatch_bin())
            .args(["allow", "tcp/5555", "--socket", &socket])
            .output()?,
    )?;
    let deadline = std::time::Instant::now() + WAIT;
    let verify = loop {
        let status = status_json(&lab)?;
        if status["verify"]["trigger"] == "allow tcp/5555" {
            break status["verify"].clone();
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no verify after the change: {}",
            status["verify"]
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(verify["ok"] == true, "{verify}");
    ensure!(verify["unchecked"] == 0, "{verify}");
    let listeners = verify["listeners"].as_u64().context("listeners")?;
    ensure!(listeners >= LISTENERS as u64, "{verify}");
    // No rule: each is probed from outside, and TCP with a scan's segment.
    ensure!(
        verify["probes"].as_u64() >= Some(2 * LISTENERS as u64),
        "{verify}"
    );
    pw.stop()?;
    Ok(())
}
