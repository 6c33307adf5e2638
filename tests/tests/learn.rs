//! `portwatch learn` (#17): a guard in audit mode records who connects to
//! what; the proposal has a rule for exactly the listeners that got
//! traffic, owners filled and sources aggregated; it survives a guard
//! restart; applied in enforce mode it keeps that traffic working and
//! drops a scan. Real servers (socat), real clients (socat from several
//! source addresses, IPv4 and IPv6) and nmap in the lab's namespaces.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{Context as _, ensure};
use portwatch_lab::spawn_server;
use portwatch_tests::{
    Result,
    net::{
        GuardPaths, Lab, TempFile, path_str, pinned_guard, succeeded, tcp_probe, tcp_reachable,
        tcp_server, udp_echo, udp_server,
    },
    nmap::nmap,
    portwatch_bin,
};
use serde_json::Value;

fn proposal(paths: &GuardPaths, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["learn", "--json"];
    args.extend_from_slice(extra);
    let text = succeeded(&paths.client(&args)?)?;
    let v: Value = serde_json::from_str(&text).context("learn --json")?;
    ensure!(v["ok"] == true, "{v}");
    Ok(v)
}

/// The proposed rules by port: the `allow` item's text.
fn rules(p: &Value) -> Vec<(String, String)> {
    p["rules"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (
                        r["port"].as_str().unwrap_or("?").to_owned(),
                        r["toml"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The owner a proposal should name for a process of this test: its
/// system unit when the test runs in one, else user root and comm socat.
fn expected_owner(pid: u32) -> Result<String> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("");
    let unit = path
        .strip_prefix("/system.slice/")
        .and_then(|rest| rest.rsplit('/').find(|c| c.ends_with(".service")));
    Ok(match unit {
        Some(unit) => format!("owner = {{ unit = \"{unit}\" }}"),
        None => "owner = { user = \"root\", comm = \"socat\" }".to_owned(),
    })
}

#[test]
fn learn_proposes_the_listeners_that_got_traffic_and_the_proposal_keeps_it_working() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("lr")?;
    let net = lab.net;
    let second = lab.add_client_v4(70)?;
    let third = lab.add_client_v4(71)?;
    let policy = TempFile::new("learn", "mode = \"audit\"\nallow = [\"tcp/22\"]\n")?;
    let web = tcp_server(&lab.server, 8080)?;
    let _db = tcp_server(&lab.server, 5432)?;
    let _dns = udp_server(&lab.server, 5353)?;
    let _idle = tcp_server(&lab.server, 9000)?;
    let _local = spawn_server(
        &lab.server,
        "tcp",
        6000,
        "socat",
        &[
            "TCP-LISTEN:6000,bind=127.0.0.1,reuseaddr,fork",
            "SYSTEM:echo hi",
        ],
    )?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let server4 = lab.server_v4();
    let server6 = lab.server_v6();

    // Audit mode: everything gets through, and is recorded.
    assert!(tcp_reachable(&lab.client, server4, 8080)?);
    assert!(tcp_reachable(&lab.client, server6, 8080)?);
    let from_second = tcp_probe(&lab.client, server4, 8080, Some(second))?;
    assert_eq!(from_second.result, portwatch_tests::net::Connect::Answered);
    let from_third = tcp_probe(&lab.client, server4, 5432, Some(third))?;
    assert_eq!(from_third.result, portwatch_tests::net::Connect::Answered);
    assert!(udp_echo(&lab.client, server4, 5353)?);
    // Nothing listens on 7777: refused, but recorded as an attempt.
    tcp_probe(&lab.client, server4, 7777, None)?;

    // What was learned survives a restart of the guard (the table is pinned).
    pw.stop()?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;

    let p = proposal(&paths, &[])?;
    let got = rules(&p);
    let ports: BTreeSet<&str> = got.iter().map(|(port, _)| port.as_str()).collect();
    assert_eq!(
        ports,
        BTreeSet::from(["tcp/8080", "tcp/5432", "udp/5353"]),
        "exactly the listeners that got traffic: {p}"
    );
    let owner = expected_owner(web.pid())?;
    let rule = |port: &str| {
        got.iter()
            .find(|(p, _)| p == port)
            .map(|(_, t)| t.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        rule("tcp/8080"),
        format!(
            "{{ port = \"tcp/8080\", from = [\"198.18.{net}.0/24\", \"fd7e:{net:x}::/64\"], {owner} }}"
        ),
        "{p}"
    );
    assert_eq!(
        rule("tcp/5432"),
        format!("{{ port = \"tcp/5432\", from = [\"198.18.{net}.0/24\"], {owner} }}"),
        "{p}"
    );
    let comments = p["rules"].to_string();
    assert!(
        comments.contains("3 attempts"),
        "8080 had three: {comments}"
    );
    let left_out = p["left_out"].to_string();
    for want in [
        ":9000",
        "no connection attempts seen",
        "127.0.0.1:6000",
        "loopback only",
        "tcp/7777: 1 attempts from 1 sources, nothing listens",
        "rule tcp/22",
    ] {
        assert!(
            left_out.contains(want),
            "left out should say {want:?}: {left_out}"
        );
    }
    assert_eq!(p["recording"], "on (audit mode)", "{p}");
    assert!(p["pairs"].as_u64() >= Some(6), "{p}");

    // Beyond --spread networks, a rule is from anywhere; narrower
    // prefixes split the sources.
    let wide = proposal(&paths, &["--spread", "1"])?;
    assert!(
        rules(&wide).contains(&(
            "tcp/8080".into(),
            format!("{{ port = \"tcp/8080\", {owner} }}")
        )),
        "{wide}"
    );
    let narrow = proposal(&paths, &["--prefix4", "32", "--spread", "8"])?;
    assert!(
        rules(&narrow)
            .iter()
            .any(|(port, t)| port == "tcp/8080" && t.contains(&format!("\"{second}/32\""))),
        "{narrow}"
    );
    // --keep adds a listener without traffic.
    let kept = proposal(&paths, &["--keep", "tcp/9000"])?;
    assert!(
        rules(&kept).iter().any(|(port, _)| port == "tcp/9000"),
        "{kept}"
    );

    // --diff shows what it would change; --write, apply, confirm.
    let diff = succeeded(&paths.client(&["learn", "--diff"])?)?;
    assert!(diff.contains("~ mode audit -> enforce"), "{diff}");
    assert!(diff.contains("- tcp/22"), "{diff}");
    let dir = tempdir()?;
    let file = dir.join("proposed.toml");
    succeeded(&paths.client(&["learn", "--write", path_str(&file)?])?)?;
    let text = std::fs::read_to_string(&file)?;
    assert!(
        text.starts_with("# proposed by `portwatch learn`"),
        "{text}"
    );
    succeeded(
        &Command::new(portwatch_bin())
            .args(["check-policy", path_str(&file)?])
            .output()?,
    )?;
    succeeded(&paths.client(&["apply", path_str(&file)?, "--confirm-within", "60"])?)?;
    succeeded(&paths.client(&["confirm"])?)?;

    // Enforced: the learned traffic still works...
    assert!(tcp_reachable(&lab.client, server4, 8080)?);
    assert!(tcp_reachable(&lab.client, server6, 8080)?);
    let again = tcp_probe(&lab.client, server4, 5432, Some(third))?;
    assert_eq!(again.result, portwatch_tests::net::Connect::Answered);
    assert!(udp_echo(&lab.client, server4, 5353)?);
    // ... a scan finds only what was proposed ...
    let scan = nmap(&lab, &["-sS", "-p", "8080,5432,9000,7777,22"], server4)?;
    let state = |port: u16| {
        scan.get(&("tcp".to_owned(), port))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(state(8080), "open", "{scan:?}");
    assert_eq!(state(5432), "open", "{scan:?}");
    for closed in [9000, 7777, 22] {
        assert_eq!(state(closed), "filtered", "tcp/{closed}: {scan:?}");
    }
    // ... and the kernel agrees with the policy for every listener.
    let verify = succeeded(&paths.client(&["verify"])?)?;
    assert!(verify.contains("verified"), "{verify}");
    pw.stop()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// In enforce mode nothing is recorded until `learn --for` asks; then
/// the proposal comes from what arrived while it recorded.
#[test]
fn learn_for_records_in_enforce_mode_for_a_while() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("lf")?;
    let policy = TempFile::new("learnfor", "allow = [\"tcp/8080\"]\n")?;
    let _web = tcp_server(&lab.server, 8080)?;
    let _other = tcp_server(&lab.server, 8443)?;
    let mut pw = pinned_guard(&lab, &paths, Path::new(policy.as_str()?), &[])?;
    let server = lab.server_v4();
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    let before = proposal(&paths, &[])?;
    assert!(
        rules(&before).is_empty(),
        "enforce mode records nothing: {before}"
    );
    assert!(
        before["recording"]
            .as_str()
            .is_some_and(|r| r.starts_with("off")),
        "{before}"
    );

    let socket = paths.socket();
    let socket = path_str(&socket)?.to_owned();
    let learner = std::thread::spawn(move || {
        Command::new(portwatch_bin())
            .args(["learn", "--for", "4s", "--json", "--socket", &socket])
            .output()
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(tcp_reachable(&lab.client, server, 8080)?);
    // Dropped, and recorded as dropped: the port has a listener.
    assert!(!tcp_reachable(&lab.client, server, 8443)?);
    let out = learner
        .join()
        .map_err(|_| anyhow::anyhow!("the learn thread panicked"))??;
    let p: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let ports: BTreeSet<String> = rules(&p).into_iter().map(|(port, _)| port).collect();
    assert_eq!(
        ports,
        BTreeSet::from(["tcp/8080".to_owned(), "tcp/8443".to_owned()]),
        "{p}"
    );
    // 8443's SYNs (the client retries) were all dropped, and recorded so.
    let comment = rules(&p)
        .iter()
        .position(|(port, _)| port == "tcp/8443")
        .map(|i| p["rules"][i]["comment"].to_string())
        .unwrap_or_default();
    assert!(comment.contains("(0 permitted by the policy then,"), "{p}");
    pw.stop()?;
    Ok(())
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(portwatch_tests::unique_name("learnw"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
