//! `portwatch guard` against the real kernel: a server and a client network
//! namespace joined by a veth pair, the guard's XDP program on the server's
//! end, real servers and real clients (socat, curl, ping, nmap).

use std::{collections::BTreeMap, net::IpAddr, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
use portwatch_tests::{
    ChildGuard, Netns, Portwatch, Result,
    net::{
        CONNECT_TIMEOUT, Connect, Lab, TempFile, assert_silently_dropped, http_server, run_bounded,
        start_guard, status_listener, tcp_probe, tcp_reachable, tcp_server, udp_echo, udp_server,
    },
    nmap::nmap,
    portwatch_bin, run,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// The snapshot's listener line for `proto/port` in `ns`.
fn snapshot_line<'a>(pw: &'a Portwatch, ns: &Netns, proto: &str, port: u16) -> Result<&'a Value> {
    let inode = ns.inode()?;
    pw.seen
        .iter()
        .find(|v| {
            v["event"] == "listen"
                && v["origin"] == "snapshot"
                && v["netns"] == inode
                && v["proto"] == proto
                && v["port"] == port
        })
        .with_context(|| {
            format!(
                "no snapshot line for {proto}/{port} in netns {inode}; seen: {:#?}",
                pw.seen
            )
        })
}

/// Waits for the drop report of a packet from `src` to `dst_port`.
fn wait_drop(pw: &mut Portwatch, proto: &str, src: IpAddr, dst_port: u16) -> Result<Value> {
    let src = src.to_string();
    pw.wait_for(WAIT, |v| {
        v["event"] == "drop" && v["proto"] == proto && v["src"] == *src && v["dst_port"] == dst_port
    })
    .with_context(|| format!("no drop line for {proto} from {src} to port {dst_port}"))
}

fn summary(pw: &Portwatch) -> Result<&Value> {
    let last = pw.seen.last().context("no lines at all")?;
    anyhow::ensure!(
        last["event"] == "summary",
        "the last line is not the summary: {last}"
    );
    Ok(last)
}

#[test]
fn permitted_tcp_port_is_reachable_and_others_time_out_on_ipv4_and_ipv6() -> Result {
    let lab = Lab::new()?;
    let _permitted = tcp_server(&lab.server, 8080)?;
    let _blocked = tcp_server(&lab.server, 8081)?;
    // tcp/8082 is permitted and nothing listens there: the kernel's RST
    // must come back, which tells a refusal from a drop.
    let policy = TempFile::new("pol", "allow = [\"tcp/8080\", \"tcp/8082\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;

    let exposed = snapshot_line(&pw, &lab.server, "tcp", 8080)?;
    assert_eq!(exposed["exposure"], "exposed", "{exposed}");
    let blocked = snapshot_line(&pw, &lab.server, "tcp", 8081)?;
    assert_eq!(blocked["exposure"], "blocked", "{blocked}");

    for (client, server) in [
        (lab.client_v4(), lab.server_v4()),
        (lab.client_v6(), lab.server_v6()),
    ] {
        let ok = tcp_probe(&lab.client, server, 8080, None)?;
        assert_eq!(ok.result, Connect::Answered, "{server} tcp/8080: {ok:?}");

        let refused = tcp_probe(&lab.client, server, 8082, None)?;
        assert_eq!(
            refused.result,
            Connect::Refused,
            "{server} tcp/8082: {refused:?}"
        );
        assert!(refused.elapsed < CONNECT_TIMEOUT, "{refused:?}");

        let denied = tcp_probe(&lab.client, server, 8081, None)?;
        assert_silently_dropped(&denied, &format!("{server} tcp/8081"));

        let drop = wait_drop(&mut pw, "tcp", client, 8081)?;
        assert_eq!(drop["reason"], "no_rule", "{drop}");
        assert_eq!(drop["dst"], server.to_string(), "{drop}");
        assert_eq!(drop["iface"], lab.server_if.as_str(), "{drop}");
        assert_eq!(drop["audit"], false, "{drop}");
        assert!(
            drop["src_port"].as_u64().is_some_and(|p| p >= 1024),
            "the client's ephemeral port: {drop}"
        );
    }
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    let wrongly_dropped: Vec<&Value> = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "drop" && v["dst_port"] != 8081)
        .collect();
    assert!(wrongly_dropped.is_empty(), "{wrongly_dropped:#?}");
    Ok(())
}

#[test]
fn permitted_udp_port_answers_and_others_get_nothing_on_ipv4_and_ipv6() -> Result {
    let lab = Lab::new()?;
    let _permitted = udp_server(&lab.server, 5300)?;
    let _blocked = udp_server(&lab.server, 5301)?;
    let policy = TempFile::new("pol", "allow = [\"udp/5300\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;

    let exposed = snapshot_line(&pw, &lab.server, "udp", 5300)?;
    assert_eq!(exposed["exposure"], "exposed", "{exposed}");
    let blocked = snapshot_line(&pw, &lab.server, "udp", 5301)?;
    assert_eq!(blocked["exposure"], "blocked", "{blocked}");

    for (client, server) in [
        (lab.client_v4(), lab.server_v4()),
        (lab.client_v6(), lab.server_v6()),
    ] {
        assert!(
            udp_echo(&lab.client, server, 5300)?,
            "no answer from {server} udp/5300"
        );
        assert!(
            !udp_echo(&lab.client, server, 5301)?,
            "{server} udp/5301 answered through the guard"
        );
        let drop = wait_drop(&mut pw, "udp", client, 5301)?;
        assert_eq!(drop["reason"], "no_rule", "{drop}");
        assert_eq!(drop["dst"], server.to_string(), "{drop}");
        assert_eq!(drop["iface"], lab.server_if.as_str(), "{drop}");
    }
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn cidr_rule_admits_its_source_and_drops_other_sources_of_the_same_port() -> Result {
    let lab = Lab::new()?;
    let _server = tcp_server(&lab.server, 8080)?;
    let policy = TempFile::new(
        "pol",
        &format!(
            "allow = [\n  {{ port = \"tcp/8080\", from = [\"{}/32\"] }},\n]\n",
            lab.client_v4()
        ),
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let line = snapshot_line(&pw, &lab.server, "tcp", 8080)?;
    assert_eq!(line["exposure"], "partial", "{line}");

    let ok = tcp_probe(&lab.client, lab.server_v4(), 8080, None)?;
    assert_eq!(
        ok.result,
        Connect::Answered,
        "from the permitted source: {ok:?}"
    );

    // The same client, from an address outside the rule's CIDR.
    let other = lab.add_client_v4(3)?;
    let denied = tcp_probe(&lab.client, lab.server_v4(), 8080, Some(other))?;
    assert_silently_dropped(&denied, &format!("from {other}"));
    let drop = wait_drop(&mut pw, "tcp", other, 8080)?;
    assert_eq!(drop["reason"], "source_not_allowed", "{drop}");
    assert_eq!(drop["dst"], lab.server_v4().to_string(), "{drop}");

    // The rule names an IPv4 host only: the client's IPv6 address is another source.
    let denied = tcp_probe(&lab.client, lab.server_v6(), 8080, None)?;
    assert_silently_dropped(&denied, "from the client's IPv6 address");
    let drop = wait_drop(&mut pw, "tcp", lab.client_v6(), 8080)?;
    assert_eq!(drop["reason"], "source_not_allowed", "{drop}");

    // And the permitted source still gets through afterwards.
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 8080)?);
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    let from_permitted: Vec<&Value> = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "drop" && v["src"] == lab.client_v4().to_string())
        .collect();
    assert!(from_permitted.is_empty(), "{from_permitted:#?}");
    Ok(())
}

#[test]
fn host_outbound_tcp_and_udp_replies_pass_under_default_deny_but_unsolicited_udp_does_not() -> Result
{
    let lab = Lab::new()?;
    // Servers on the client side, for the guarded host to talk to.
    let _remote_tcp = tcp_server(&lab.client, 9000)?;
    let _remote_dns = udp_server(&lab.client, 5353)?;
    // A server on the guarded host that nothing permits.
    let _local_udp = udp_server(&lab.server, 5400)?;
    let policy = TempFile::new("pol", "allow = []\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;

    for (client, server) in [
        (lab.client_v4(), lab.server_v4()),
        (lab.client_v6(), lab.server_v6()),
    ] {
        // The SYN-ACK (and the data after it) come back in.
        let out = tcp_probe(&lab.server, client, 9000, None)?;
        assert_eq!(
            out.result,
            Connect::Answered,
            "host -> {client} tcp/9000: {out:?}"
        );
        // The reply to the host's own UDP request is admitted by the flow
        // that tc egress recorded.
        assert!(
            udp_echo(&lab.server, client, 5353)?,
            "no reply from {client} udp/5353 to the guarded host"
        );
        // Unsolicited UDP to the host is not.
        assert!(
            !udp_echo(&lab.client, server, 5400)?,
            "{server} udp/5400 answered an unsolicited datagram"
        );
        let drop = wait_drop(&mut pw, "udp", client, 5400)?;
        assert_eq!(drop["reason"], "no_rule", "{drop}");
    }
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    // Nothing the host asked for was dropped.
    let wrong: Vec<&Value> = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "drop" && v["dst_port"] != 5400)
        .collect();
    assert!(
        wrong.is_empty(),
        "replies to the host were dropped: {wrong:#?}"
    );
    Ok(())
}

fn neighbours(ns: &Netns) -> Result<String> {
    run("ip", &["-n", &ns.name, "neigh", "show"])
}

#[test]
fn ping_and_ipv6_neighbour_discovery_work_under_default_deny() -> Result {
    let lab = Lab::new()?;
    let _tcp = tcp_server(&lab.server, 8080)?;
    let policy = TempFile::new("pol", "allow = []\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;

    for ns in [&lab.server, &lab.client] {
        run("ip", &["-n", &ns.name, "neigh", "flush", "all"])?;
        let left = neighbours(ns)?;
        assert!(
            !left.contains("lladdr"),
            "{}: neighbours left after the flush:\n{left}",
            ns.name
        );
    }
    for (flag, server) in [("-4", lab.server_v4()), ("-6", lab.server_v6())] {
        let mut cmd = lab.client.command("ping");
        cmd.args([flag, "-c2", "-i0.2", "-W2", &server.to_string()]);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(10), None)?;
        assert!(out.success(), "ping {flag} {server}: {out:?}");
        assert!(out.stdout.contains("2 received"), "{out:?}");
    }
    // Both sides resolved each other through the guard: ARP and ND
    // (solicitation in, advertisement out and the other way round).
    let server_neigh = neighbours(&lab.server)?;
    for client in [lab.client_v4(), lab.client_v6()] {
        assert!(
            server_neigh
                .lines()
                .any(|l| l.starts_with(&format!("{client} ")) && l.contains("lladdr")),
            "the server has no neighbour entry for {client}:\n{server_neigh}"
        );
    }
    // The guard does enforce meanwhile.
    let denied = tcp_probe(&lab.client, lab.server_v4(), 8080, None)?;
    assert_silently_dropped(&denied, "tcp/8080 under default deny");
    wait_drop(&mut pw, "tcp", lab.client_v4(), 8080)?;

    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    let icmp: Vec<&Value> = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "drop" && v["proto"] != "tcp")
        .collect();
    assert!(icmp.is_empty(), "{icmp:#?}");
    Ok(())
}

#[test]
fn audit_mode_passes_everything_and_reports_what_it_would_drop() -> Result {
    let lab = Lab::new()?;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
    let _http = http_server(&lab.server, 8000, fixtures)?;
    let _tcp = tcp_server(&lab.server, 8081)?;
    let policy = TempFile::new("pol", "allow = []\n")?;
    let mut pw = start_guard(&lab, &policy, &["--mode", "audit"])?;

    for (client, server) in [
        (lab.client_v4(), lab.server_v4()),
        (lab.client_v6(), lab.server_v6()),
    ] {
        let code = portwatch_tests::net::http_status(&lab.client, server, 8000, "/listeners.py")?;
        assert_eq!(code, Some(200), "curl http://{server}:8000/listeners.py");
        let drop = wait_drop(&mut pw, "tcp", client, 8000)?;
        assert_eq!(drop["audit"], true, "{drop}");
        assert_eq!(drop["reason"], "no_rule", "{drop}");

        let probe = tcp_probe(&lab.client, server, 8081, None)?;
        assert_eq!(
            probe.result,
            Connect::Answered,
            "{server} tcp/8081: {probe:?}"
        );
        let drop = wait_drop(&mut pw, "tcp", client, 8081)?;
        assert_eq!(drop["audit"], true, "{drop}");
    }
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    let summary = summary(&pw)?;
    let drops = summary["drops"].as_u64().context("summary.drops")?;
    assert!(
        drops >= 4,
        "four connections would have been dropped: {summary}"
    );
    let enforced: Vec<&Value> = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "drop" && v["audit"] != true)
        .collect();
    assert!(enforced.is_empty(), "{enforced:#?}");
    Ok(())
}

#[test]
fn nmap_sees_only_permitted_listeners_open_and_the_rest_filtered() -> Result {
    let lab = Lab::new()?;
    let _tcp_ok = tcp_server(&lab.server, 8080)?;
    let _tcp_blocked = tcp_server(&lab.server, 8081)?;
    let _udp_ok = udp_server(&lab.server, 5300)?;
    let _udp_blocked = udp_server(&lab.server, 5301)?;
    // tcp/8082 and udp/5302 are permitted, and nothing listens there.
    let policy = TempFile::new(
        "pol",
        "allow = [\"tcp/8080\", \"tcp/8082\", \"udp/5300\", \"udp/5302\"]\n",
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;

    let key = |p: &str, n: u16| (p.to_owned(), n);
    let mut states = nmap(&lab, &["-sS", "-p", "8080,8081,8082"], lab.server_v4())?;
    states.extend(nmap(
        &lab,
        &["-sU", "--data-length", "4", "-p", "5300,5301,5302"],
        lab.server_v4(),
    )?);
    let want: BTreeMap<(String, u16), String> = [
        (key("tcp", 8080), "open"),
        (key("tcp", 8081), "filtered"),
        (key("tcp", 8082), "closed"),
        (key("udp", 5300), "open"),
        (key("udp", 5301), "open|filtered"),
        (key("udp", 5302), "closed"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    assert_eq!(states, want, "nmap over IPv4");

    let v6 = nmap(
        &lab,
        &["-6", "-sS", "-p", "8080,8081,8082"],
        lab.server_v6(),
    )?;
    let want_v6: BTreeMap<(String, u16), String> = want
        .iter()
        .filter(|((p, _), _)| p == "tcp")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(v6, want_v6, "nmap over IPv6");

    // The scans of the blocked ports were reported.
    wait_drop(&mut pw, "tcp", lab.client_v4(), 8081)?;
    wait_drop(&mut pw, "udp", lab.client_v4(), 5301)?;
    wait_drop(&mut pw, "tcp", lab.client_v6(), 8081)?;
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// `portwatch ARGS` in the foreground, bounded: fails fast or is killed.
fn portwatch(ns: Option<&Netns>, args: &[&str]) -> Result<portwatch_tests::net::Outcome> {
    let bin = portwatch_bin();
    let mut cmd = match ns {
        Some(ns) => ns.command(bin.to_str().context("binary path is not UTF-8")?),
        None => Command::new(&bin),
    };
    cmd.args(args).env_remove("SSH_CONNECTION");
    run_bounded(&mut cmd, None, Duration::from_secs(20), None)
}

#[test]
fn invalid_policies_and_allow_specs_are_refused_with_line_and_reason() -> Result {
    let cases: &[(&str, &str)] = &[
        (
            "allow = [\n  \"tcp/22\",\n  \"dccp/9\",\n]\n",
            r#"line 3: "dccp/9": unknown protocol "dccp" (expected tcp, udp, sctp or proto/NAME)"#,
        ),
        (
            "mode = \"enforce\"\nallow = [\"tcp/0\"]\n",
            r#"line 2: "tcp/0": port 0 is not a valid port (1-65535)"#,
        ),
        (
            "allow = [\n  \"udp/53\",\n  \"tcp/9000-8000\",\n]\n",
            r#"line 3: "tcp/9000-8000": range is reversed (did you mean tcp/8000-9000?)"#,
        ),
        (
            "allow = [\n  { port = \"tcp/22\", from = [\"10.0.0.0/33\"] },\n]\n",
            r#"line 2: "10.0.0.0/33" is not an address or CIDR: the prefix length "33" is not a number from 0 to 32 (IPv4)"#,
        ),
        (
            "allow = [\n  { port = \"tcp/22\", from = [\"10.0.0.1/8\"] },\n]\n",
            r#"line 2: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#,
        ),
        (
            "allow = [\n  \"tcp/21\",\n  \"udp/25\",\n  \"tcp/20-30\",\n]\n",
            "line 4: tcp/20-30 overlaps tcp/21 on line 2; a port can be in only one rule",
        ),
        (
            "mode = \"audit\"\nbogus = 1\n",
            r#"line 2: unknown key "bogus" in the policy (expected mode, forwarded, limit_ipv6_prefix, interfaces or allow)"#,
        ),
    ];
    for (text, want) in cases {
        let file = TempFile::new("bad", text)?;
        let out = portwatch(None, &["check-policy", file.as_str()?])?;
        assert!(
            out.status.is_some_and(|s| !s.success()),
            "check-policy accepted {text:?}: {out:?}"
        );
        let expected = format!("portwatch: error: {}: {want}", file.as_str()?);
        assert!(
            out.stderr.contains(&expected),
            "for {text:?}\nwanted: {expected}\n   got: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }

    let good = TempFile::new(
        "good",
        "mode = \"enforce\"\nallow = [\n  \"tcp/22\",\n  \"udp/53\",\n  { port = \"tcp/5432\", from = [\"10.0.0.0/8\", \"fd00::/8\"] },\n]\n",
    )?;
    let out = portwatch(None, &["check-policy", good.as_str()?])?;
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("ok: 3 rules"), "{out:?}");
    assert!(
        out.stdout
            .contains("allow tcp/5432 from 10.0.0.0/8, fd00::/8"),
        "{out:?}"
    );

    // A bad --allow fails before anything is loaded (in a namespace of its
    // own all the same, so that a regression cannot touch the host's lo).
    let ns = Netns::new("a")?;
    let out = portwatch(Some(&ns), &["guard", "--iface", "lo", "--allow", "tcp/0"])?;
    assert!(
        out.status.is_some_and(|s| !s.success()),
        "guard accepted --allow tcp/0: {out:?}"
    );
    assert!(
        out.stderr.contains("--allow tcp/0") && out.stderr.contains("port 0 is not a valid port"),
        "{out:?}"
    );
    let lo = run("ip", &["-n", &ns.name, "link", "show", "lo"])?;
    assert!(!lo.contains("xdp"), "{lo}");
    Ok(())
}

/// tc filters (clsact, before tcx) on the server's veth, both directions.
fn tc_filters(lab: &Lab) -> Result<String> {
    let mut out = String::new();
    for dir in ["ingress", "egress"] {
        out += &run(
            "ip",
            &[
                "netns",
                "exec",
                &lab.server.name,
                "tc",
                "filter",
                "show",
                "dev",
                &lab.server_if,
                dir,
            ],
        )?;
    }
    Ok(out)
}

/// The server veth's ifindex, in its namespace.
fn server_ifindex(lab: &Lab) -> Result<u64> {
    let link = lab.server_link()?;
    link.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no ifindex in {link:?}"))
}

/// The ids of the tcx links in direction `dir` (ingress, egress) that
/// process `pid` holds on `ifindex` (from /proc/PID/fdinfo: bpftool 7.1
/// cannot show tcx links).
fn tcx_links(pid: u32, ifindex: u64, dir: &str) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if field("link_type:").as_deref() == Some("tcx")
            && field("ifindex:").and_then(|i| i.parse::<u64>().ok()) == Some(ifindex)
            && field("attach_type:").is_some_and(|t| t.contains(dir))
            && let Some(id) = field("link_id:").and_then(|i| i.parse().ok())
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Ids of every BPF link the kernel has.
fn bpf_link_ids() -> Result<Vec<u64>> {
    let out = run("bpftool", &["--json", "link", "show"])?;
    let links: Vec<Value> = serde_json::from_str(&out).context("parsing bpftool's JSON")?;
    Ok(links.iter().filter_map(|l| l["id"].as_u64()).collect())
}

#[test]
fn guard_with_an_invalid_policy_exits_and_attaches_nothing() -> Result {
    let lab = Lab::new()?;
    let bad = TempFile::new("bad", "allow = [\n  \"tcp/22\",\n  \"tcp/0\",\n]\n")?;
    let out = portwatch(
        Some(&lab.server),
        &[
            "guard",
            "--iface",
            &lab.server_if,
            "--policy",
            bad.as_str()?,
            "--json",
        ],
    )?;
    assert!(
        out.status.is_some_and(|s| !s.success()),
        "guard ran with an invalid policy: {out:?}"
    );
    assert!(
        out.stderr.contains(&format!(
            "{}: line 3: \"tcp/0\": port 0 is not a valid port",
            bad.as_str()?
        )),
        "{out:?}"
    );
    assert!(!out.stdout.contains("\"ready\""), "{out:?}");
    let link = lab.server_link()?;
    assert!(!link.contains("xdp"), "{link}");
    assert_eq!(lab.server_guard_mode()?, None);
    let filters = tc_filters(&lab)?;
    assert!(filters.trim().is_empty(), "{filters}");
    Ok(())
}

#[test]
fn stopping_the_guard_detaches_it_and_prints_the_summary_last() -> Result {
    let lab = Lab::new()?;
    let _server = tcp_server(&lab.server, 8081)?;
    let policy = TempFile::new("pol", "allow = [\"udp/53\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &["--detach-on-exit"])?;

    let link = lab.server_link()?;
    assert!(
        link.contains("prog/xdp") && link.contains("xdp_guard"),
        "{link}"
    );
    // tc egress (tcx on this kernel) records the host's own flows.
    let tcx = tcx_links(pw.pid(), server_ifindex(&lab)?, "egress")?;
    assert_eq!(tcx.len(), 1, "tcx egress links of the guard: {tcx:?}");
    assert!(!tcp_reachable(&lab.client, lab.server_v4(), 8081)?);
    wait_drop(&mut pw, "tcp", lab.client_v4(), 8081)?;

    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    let summary = summary(&pw)?;
    assert!(
        summary["drops"].as_u64().is_some_and(|d| d >= 1),
        "{summary}"
    );
    assert!(summary["suppressed"].is_u64(), "{summary}");
    assert_eq!(
        pw.seen.iter().filter(|v| v["event"] == "summary").count(),
        1
    );

    let link = lab.server_link()?;
    assert!(
        !link.contains("prog/xdp") && !link.contains("xdp"),
        "{link}"
    );
    assert_eq!(lab.server_guard_mode()?, None);
    let filters = tc_filters(&lab)?;
    assert!(filters.trim().is_empty(), "{filters}");
    // The kernel releases links shortly after their last fd closes.
    let mut left = bpf_link_ids()?;
    for _ in 0..50 {
        if !tcx.iter().any(|id| left.contains(id)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = bpf_link_ids()?;
    }
    assert!(
        !tcx.iter().any(|id| left.contains(id)),
        "the tcx egress link {tcx:?} outlived the guard"
    );
    // With the guard gone, the port it blocked is reachable.
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 8081)?);
    Ok(())
}

#[test]
fn guard_refuses_to_cut_off_the_ssh_session_it_runs_in_unless_forced() -> Result {
    let lab = Lab::new()?;
    // A held TCP session from the client to port 22 of the server.
    let _sshd = ChildGuard::spawn(
        lab.server
            .command("socat")
            .args(["TCP-LISTEN:22,reuseaddr", "EXEC:sleep 30"]),
    )?;
    portwatch_tests::net::wait_listening(&lab.server, "tcp", 22)?;
    let (server, client) = (lab.server_v4(), lab.client_v4());
    let _session = ChildGuard::spawn(lab.client.command("socat").args([
        "-u".to_string(),
        format!("TCP:{server}:22,sourceport=50022"),
        "STDOUT".to_string(),
    ]))?;
    let policy = TempFile::new("lock", "allow = [\"tcp/80\"]\n")?;
    let ssh = format!("{client} 50022 {server} 22");
    let guard = |extra: &[&str], until: Option<&str>| -> Result<portwatch_tests::net::Outcome> {
        let bin = portwatch_bin();
        let mut cmd = lab
            .server
            .command(bin.to_str().context("binary path is not UTF-8")?);
        cmd.args([
            "guard",
            "--iface",
            &lab.server_if,
            "--policy",
            policy.as_str()?,
            "--json",
        ])
        .arg("--socket")
        .arg(lab.socket()?)
        .args(extra)
        .env("SSH_CONNECTION", &ssh);
        run_bounded(&mut cmd, None, Duration::from_secs(20), until)
    };
    // Wait until the session is established in the server's namespace.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.server.name,
            "ss",
            "-Htn",
            "state",
            "established",
        ],
    )?
    .contains(":22")
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the session never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let refused = guard(&[], None)?;
    assert!(refused.status.is_some_and(|s| !s.success()), "{refused:?}");
    assert!(
        refused.stderr.contains("refusing to enforce")
            && refused
                .stderr
                .contains(&format!("from {client} to port 22")),
        "{refused:?}"
    );
    assert!(
        refused.stdout.trim().is_empty(),
        "a refusal prints no partial stream: {refused:?}"
    );
    let link = lab.server_link()?;
    assert!(!link.contains("xdp"), "{link}");
    assert_eq!(lab.server_guard_mode()?, None);

    let forced = guard(&["--force"], Some("\"ready\""))?;
    assert!(forced.stdout.contains("\"ready\""), "{forced:?}");
    Ok(())
}

#[test]
fn guard_attaches_in_native_mode_on_a_jumbo_mtu() -> Result {
    let lab = Lab::new()?;
    // Without multi-buffer support (xdp.frags), native XDP refuses MTUs
    // larger than a page.
    run(
        "ip",
        &[
            "-n",
            &lab.server.name,
            "link",
            "set",
            &lab.server_if,
            "mtu",
            "9000",
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            &lab.client.name,
            "link",
            "set",
            &lab.client_if,
            "mtu",
            "9000",
        ],
    )?;
    let policy = TempFile::new("jumbo", "allow = [\"tcp/8080\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &["--xdp-mode", "native"])?;
    let link = lab.server_link()?;
    assert!(
        link.contains("mtu 9000") && link.contains("prog/xdp"),
        "{link}"
    );
    let _server = tcp_server(&lab.server, 8080)?;
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 8080)?);
    pw.stop()?;
    Ok(())
}

/// A status with many listeners is not one line of megabytes: asked with
/// `"lines": true` (as `status` and `top` do), the answer says how many
/// listeners follow and each comes on a line of its own; a real client
/// (socat) reads the same listeners `status --json` prints as one document.
#[test]
fn status_sends_its_listeners_one_line_each() -> Result {
    let lab = Lab::new()?;
    let _tcp = tcp_server(&lab.server, 8080)?;
    let _blocked = tcp_server(&lab.server, 8091)?;
    let _udp = udp_server(&lab.server, 5353)?;
    let policy = TempFile::new("lines", "allow = [\"tcp/8080\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let socket = lab.socket()?;
    // The request, then end of input: socat half-closes, the guard answers
    // and closes.
    let out = run_bounded(
        Command::new("sh").args([
            "-c",
            r#"printf '%s\n' "$1" | socat -t 5 - UNIX-CONNECT:"$2""#,
            "sh",
            r#"{"cmd":"status","lines":true}"#,
            &socket,
        ]),
        None,
        Duration::from_secs(10),
        None,
    )?;
    ensure!(
        out.success(),
        "socat: {:?} after {:?}: {} {}",
        out.status,
        out.elapsed,
        out.stderr,
        out.stdout
    );
    let mut lines = out.stdout.lines();
    let head: Value = serde_json::from_str(lines.next().context("no answer")?)?;
    assert_eq!(head["ok"], true, "{head}");
    assert_eq!(head["listeners"], serde_json::json!([]), "{head}");
    assert!(head["totals"].is_object(), "{head}");
    let follow = head["listeners_follow"]
        .as_u64()
        .with_context(|| format!("no count in {head}"))?;
    let streamed: Vec<Value> = lines
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(streamed.len() as u64, follow, "{}", out.stdout);
    let key = |l: &Value| format!("{}/{} {}", l["proto"], l["port"], l["addr"]);
    for (proto, port, exposure) in [
        ("tcp", 8080, "exposed"),
        ("tcp", 8091, "blocked"),
        ("udp", 5353, "blocked"),
    ] {
        let found = streamed
            .iter()
            .find(|l| l["proto"] == proto && l["port"] == port)
            .with_context(|| format!("no {proto}/{port} in {}", out.stdout))?;
        assert_eq!(found["exposure"], exposure, "{found}");
    }

    let whole = Command::new(portwatch_bin())
        .args(["status", "--json", "--socket", &socket])
        .output()?;
    ensure!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    assert_eq!(whole.stdout.iter().filter(|&&b| b == b'\n').count(), 1);
    let whole: Value = serde_json::from_slice(&whole.stdout)?;
    assert!(whole.get("listeners_follow").is_none(), "{whole}");
    let mut a: Vec<String> = streamed.iter().map(key).collect();
    let mut b: Vec<String> = whole["listeners"]
        .as_array()
        .context("no listeners")?
        .iter()
        .map(key)
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    pw.stop()?;
    Ok(())
}

/// An interface the guard is not on is a way around it. A listener the
/// policy blocks, reachable through such an interface, is reported exposed
/// and the interface is named: when it appears under a running guard, for
/// listeners opened after, and in other namespaces by their own interfaces.
#[test]
fn a_way_in_without_the_guard_is_reported_and_really_is_open() -> Result {
    let lab = Lab::new()?;
    let _blocked = tcp_server(&lab.server, 8090)?;
    let policy = TempFile::new("pol", "allow = [\"tcp/8080\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let line = snapshot_line(&pw, &lab.server, "tcp", 8090)?;
    assert_eq!(line["exposure"], "blocked", "{line}");
    assert!(line.get("exposed_via").is_none(), "{line}");

    let (side, side_peer) = lab.add_side_link()?;
    // The running guard learns of the new way in without being told.
    let deadline = std::time::Instant::now() + WAIT;
    let entry = loop {
        let entry = status_listener(&lab, 8090)?;
        if entry["exposure"] == "exposed" || std::time::Instant::now() > deadline {
            break entry;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(entry["exposure"], "exposed", "{entry}");
    assert_eq!(entry["exposed_via"], serde_json::json!([side]), "{entry}");

    // What it says is what the network gets: dropped through the guard,
    // answered around it.
    let guarded = tcp_probe(&lab.client, lab.server_v4(), 8090, None)?;
    assert_silently_dropped(&guarded, "tcp/8090 through the guard");
    let around = tcp_probe(&lab.client, lab.side_v4(1), 8090, None)?;
    assert_eq!(
        around.result,
        Connect::Answered,
        "around the guard: {around:?}"
    );

    // A listener opened now is reported with the way around at once.
    let server_ns = lab.server.inode()?;
    let _later = tcp_server(&lab.server, 8091)?;
    let live = pw.wait_for(WAIT, |v| {
        v["event"] == "listen" && v["port"] == 8091 && v["netns"] == server_ns
    })?;
    assert_eq!(live["exposure"], "exposed", "{live}");
    assert_eq!(live["policy_exposure"], "blocked", "{live}");
    assert_eq!(live["exposed_via"], serde_json::json!([side]), "{live}");

    // Another namespace has no guard at all: every way into it counts.
    let client_ns = lab.client.inode()?;
    let _elsewhere = tcp_server(&lab.client, 8092)?;
    let other = pw.wait_for(WAIT, |v| {
        v["event"] == "listen" && v["port"] == 8092 && v["netns"] == client_ns
    })?;
    assert_eq!(other["exposure"], "exposed", "{other}");
    let mut want = vec![lab.client_if.clone(), side_peer];
    want.sort();
    assert_eq!(other["exposed_via"], serde_json::json!(want), "{other}");

    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// Writes `text` as the policy and has the running guard reload it.
fn reload(lab: &Lab, policy: &TempFile, text: &str) -> Result {
    std::fs::write(policy.as_str()?, text)?;
    let out = Command::new(portwatch_bin())
        .args(["reload", "--socket", &lab.socket()?])
        .output()?;
    anyhow::ensure!(out.status.success(), "reload: {out:?}");
    Ok(())
}

/// A network routed behind the guarded host (a container's, a VM's) is
/// not the host's: by default its traffic passes the guard, with
/// `forwarded = "judge"` the policy applies to it; the host's own ports
/// are judged either way, and an address added to the host at run time
/// is the host's at once.
#[test]
fn routed_traffic_passes_unless_judged_and_the_hosts_own_stays_guarded() -> Result {
    let lab = Lab::new()?;
    let routed = lab.add_routed()?;
    let _behind = tcp_server(&routed, 8080)?;
    let _own = tcp_server(&lab.server, 8081)?;
    let policy = TempFile::new("pol", "allow = [\"tcp/22\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    for addr in [lab.routed_v4(), lab.routed_v6()] {
        assert!(
            tcp_reachable(&lab.client, addr, 8080)?,
            "{addr}:8080 behind the host"
        );
    }
    for addr in [lab.server_v4(), lab.server_v6()] {
        let own = tcp_probe(&lab.client, addr, 8081, None)?;
        assert_silently_dropped(&own, &format!("the host's own {addr}:8081"));
    }

    // An address the host gets now is the host's at once: judged.
    let added = lab.v4(50);
    run(
        "ip",
        &[
            "-n",
            &lab.server.name,
            "addr",
            "add",
            &format!("{added}/24"),
            "dev",
            &lab.server_if,
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let probe = tcp_probe(&lab.client, added, 8081, None)?;
    assert_silently_dropped(&probe, "the host's new address");

    reload(
        &lab,
        &policy,
        "forwarded = \"judge\"\nallow = [\"tcp/22\"]\n",
    )?;
    for addr in [lab.routed_v4(), lab.routed_v6()] {
        let behind = tcp_probe(&lab.client, addr, 8080, None)?;
        assert_silently_dropped(&behind, &format!("{addr}:8080 judged"));
    }
    let drop = wait_drop(&mut pw, "tcp", lab.client_v4(), 8080)?;
    assert_eq!(drop["dst"], lab.routed_v4().to_string(), "{drop}");
    reload(
        &lab,
        &policy,
        "forwarded = \"judge\"\nallow = [\"tcp/8080\"]\n",
    )?;
    assert!(
        tcp_reachable(&lab.client, lab.routed_v4(), 8080)?,
        "judged and permitted"
    );

    let out = Command::new(portwatch_bin())
        .args(["status", "--json", "--socket", &lab.socket()?])
        .output()?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        status["totals"]["forwarded"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{status}"
    );
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// A UDP peer on port 5400 (IPv4 and IPv6) that answers each datagram
/// with "pong" 4 s after it came.
const DELAYED_ECHO: &str = "\
import socket, threading, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(('::', 5400))
def answer(peer):
    time.sleep(4)
    s.sendto(b'pong\\n', peer)
while True:
    _, peer = s.recvfrom(64)
    threading.Thread(target=answer, args=(peer,)).start()
";

/// A UDP flow the host opened before the guard started gets its replies
/// after: the guard records the host's connected UDP sockets as flows when
/// it starts. IPv4 and IPv6; the peer answers 4 s after it is asked.
#[test]
fn replies_to_a_udp_flow_opened_before_the_guard_pass() -> Result {
    let lab = Lab::new()?;
    let _peer = portwatch_lab::listening::spawn_server(
        &lab.client,
        "udp",
        5400,
        "python3",
        &["-c", DELAYED_ECHO],
    )?;
    let ask = |to: IpAddr| {
        let target = format!(
            "UDP{}:{}:5400",
            if to.is_ipv4() { "4" } else { "6" },
            portwatch_tests::net::host(to)
        );
        let mut cmd = lab.server.command("socat");
        cmd.args(["-T15", "-", &target]);
        std::thread::spawn(move || {
            run_bounded(
                &mut cmd,
                Some(b"ping\n"),
                Duration::from_secs(15),
                Some("pong"),
            )
        })
    };
    let v4 = ask(lab.client_v4());
    let v6 = ask(lab.client_v6());
    // The questions are out before the guard is.
    std::thread::sleep(Duration::from_millis(500));
    let policy = TempFile::new("pol", "allow = [\"tcp/22\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    for (family, asked) in [("IPv4", v4), ("IPv6", v6)] {
        let out = asked
            .join()
            .map_err(|_| anyhow::anyhow!("the {family} client thread panicked"))??;
        assert!(
            out.stdout.contains("pong"),
            "{family}: no reply through the guard: {out:?}"
        );
    }
    assert!(
        pw.stderr().contains("UDP flows opened before the guard"),
        "{}",
        pw.stderr()
    );
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

/// Opens `n` TCP connections at once from `ns` to `addr:port` and counts
/// those established within `secs` seconds.
const CONNECT_BURST: &str = "\
import select, socket, sys, time
host, port, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ':' in host else socket.AF_INET
socks = []
for _ in range(n):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((host, port))
    socks.append(s)
deadline = time.time() + secs
pending, up = set(socks), 0
while pending and time.time() < deadline:
    _, ready, _ = select.select([], list(pending), [], max(0.0, deadline - time.time()))
    for s in ready:
        pending.discard(s)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            up += 1
print(up)
";

fn connect_burst(ns: &portwatch_tests::Netns, addr: IpAddr, port: u16, n: u32) -> Result<u32> {
    let out = ns
        .command("python3")
        .args([
            "-c",
            CONNECT_BURST,
            &addr.to_string(),
            &port.to_string(),
            &n.to_string(),
            "1.0",
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "connect burst: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// `limit = "5/second"` on tcp/8080: a burst of 50 connection attempts
/// from one source gets the burst (5) and what a second of refill adds
/// through, no more; a second source connects meanwhile; the drops say
/// `rate_limited`.
#[test]
fn a_rate_limit_holds_back_one_source_and_not_another() -> Result {
    let lab = Lab::new()?;
    let _web = tcp_server(&lab.server, 8080)?;
    let second = lab.add_client_v4(60)?;
    let policy = TempFile::new(
        "pol",
        "allow = [{ port = \"tcp/8080\", limit = \"5/second\" }]\n",
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let up = connect_burst(&lab.client, lab.server_v4(), 8080, 50)?;
    assert!(
        (1..=11).contains(&up),
        "{up} of 50 attempts in a second got through a 5/second limit"
    );
    let other = tcp_probe(&lab.client, lab.server_v4(), 8080, Some(second))?;
    assert_eq!(
        other.result,
        Connect::Answered,
        "the second source: {other:?}"
    );
    let drop = pw.wait_for(WAIT, |v| {
        v["event"] == "drop" && v["reason"] == "rate_limited"
    })?;
    assert_eq!(drop["src"], lab.client_v4().to_string(), "{drop}");
    let out = Command::new(portwatch_bin())
        .args(["status", "--json", "--socket", &lab.socket()?])
        .output()?;
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        status["totals"]["drop_rate_limited"]
            .as_u64()
            .is_some_and(|n| n >= 39),
        "{status}"
    );
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn auto_attaches_generic_xdp_on_a_veth_and_says_why() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new("auto-mode", "allow = [\"tcp/8080\"]\n")?;
    let status_of = || -> Result<Value> {
        let out = Command::new(portwatch_bin())
            .args(["status", "--json", "--socket", &lab.socket()?])
            .output()?;
        ensure!(out.status.success(), "{out:?}");
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let _server = tcp_server(&lab.server, 8080)?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    assert!(
        pw.stderr().contains("generic XDP") && pw.stderr().contains("veth: native XDP would copy"),
        "{}",
        pw.stderr()
    );
    let status = status_of()?;
    let iface = &status["interfaces"][0];
    assert_eq!(iface["xdp_mode"], "generic", "{status}");
    assert!(
        iface["why"]
            .as_str()
            .is_some_and(|w| w.starts_with("veth:")),
        "{iface}"
    );
    assert!(
        lab.server_link()?.contains("xdpgeneric"),
        "{}",
        lab.server_link()?
    );
    assert_eq!(lab.server_guard_mode()?, Some("generic"));
    assert!(tcp_reachable(&lab.client, lab.server_v4(), 8080)?);
    assert!(!tcp_reachable(&lab.client, lab.server_v4(), 9090)?);
    pw.stop()?;

    // Asked for, native XDP or tc ingress it is, with the same verdicts.
    for mode in ["native", "tc"] {
        let mut pw = start_guard(&lab, &policy, &["--xdp-mode", mode])?;
        let status = status_of()?;
        assert_eq!(status["interfaces"][0]["xdp_mode"], mode, "{status}");
        assert!(status["interfaces"][0].get("why").is_none(), "{status}");
        assert_eq!(lab.server_guard_mode()?, Some(mode));
        assert!(tcp_reachable(&lab.client, lab.server_v4(), 8080)?);
        assert!(!tcp_reachable(&lab.client, lab.server_v4(), 9090)?);
        pw.stop()?;
        // Its links went with it (the kernel releases them shortly after
        // their last reference).
        let mut left = lab.server_guard_mode()?;
        for _ in 0..50 {
            if left.is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            left = lab.server_guard_mode()?;
        }
        assert_eq!(left, None, "{mode}: still attached after the guard stopped");
    }
    Ok(())
}

/// Python helpers for the frames the tests below send raw: a MAC from
/// text, and an IPv4 header (with its checksum) for a transport segment.
const FRAME_PY: &str = r#"
import socket, struct
def mac(m): return bytes(int(x, 16) for x in m.split(":"))
def ipv4(src, dst, proto, l4):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s = sum(struct.unpack("!10H", ip))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ip[:10] + struct.pack("!H", ~s & 0xffff) + ip[12:]
"#;

/// Sends one frame raw from the client's veth (AF_PACKET): VLAN tags with
/// `tpids` (outermost first) around an IPv4 TCP SYN from the client to
/// the server's `port`.
fn send_tagged_syn(lab: &Lab, tpids: &[u16], port: u16) -> Result {
    let tpids: Vec<String> = tpids.iter().map(u16::to_string).collect();
    let script = format!(
        r#"{FRAME_PY}
tcp = struct.pack("!HHIIBBHHH", 40000, {port}, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
frame = mac("{dst_mac}") + mac("{src_mac}")
for i, tpid in enumerate([{tpids}]):
    frame += struct.pack("!HH", tpid, 10 + i)
frame += struct.pack("!H", 0x0800) + ipv4("{src}", "{dst}", 6, tcp) + tcp
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("{iface}", 0))
s.send(frame)
"#,
        src = lab.client_v4(),
        dst = lab.server_v4(),
        dst_mac = lab.server_mac,
        src_mac = lab.client_mac,
        iface = lab.client_if,
        tpids = tpids.join(", "),
    );
    let out = run_bounded(
        lab.client.command("python3").args(["-c", &script]),
        None,
        Duration::from_secs(10),
        None,
    )?;
    ensure!(out.status.is_some_and(|s| s.success()), "{out:?}");
    Ok(())
}

/// The walk accepts two VLAN tags. At tc ingress the kernel has already
/// moved the outer one into the skb's metadata; it still counts, so both
/// hooks judge tagged frames alike: three tags are malformed, two are
/// judged by the policy.
#[test]
fn vlan_tags_count_the_same_at_tc_ingress_as_in_xdp() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new("vlan", "allow = [\"tcp/8080\"]\n")?;
    for mode in ["tc", "generic"] {
        let mut pw = start_guard(&lab, &policy, &["--xdp-mode", mode])?;
        assert_eq!(lab.server_guard_mode()?, Some(mode));
        send_tagged_syn(&lab, &[0x88a8, 0x8100, 0x8100], 8080)?;
        pw.wait_for(WAIT, |v| v["event"] == "drop" && v["reason"] == "malformed")
            .with_context(|| format!("{mode}: three tags were not dropped as malformed"))?;
        send_tagged_syn(&lab, &[0x88a8, 0x8100], 9090)?;
        let drop = pw
            .wait_for(WAIT, |v| v["event"] == "drop" && v["dst_port"] == 9090)
            .with_context(|| format!("{mode}: two tags to a closed port were not dropped"))?;
        assert_eq!(drop["reason"], "no_rule", "{mode}: {drop}");
        assert_eq!(drop["src"], lab.client_v4().to_string(), "{mode}: {drop}");
        pw.stop()?;
        let malformed = pw
            .seen
            .iter()
            .filter(|v| v["event"] == "drop" && v["reason"] == "malformed")
            .count();
        assert_eq!(malformed, 1, "{mode}");
    }
    Ok(())
}

/// Sends one IPv4 UDP datagram of `len` payload bytes from the client's
/// veth to the server's `port` through a packet socket with a virtio-net
/// header whose `hdr_len` is 14: a frame longer than a page then leaves as
/// an skb with only its Ethernet header linear, the IP and UDP headers in
/// a page fragment (how a NIC driver or a tap device may hand one over).
fn send_split_udp(lab: &Lab, port: u16, len: usize) -> Result {
    let script = format!(
        r#"{FRAME_PY}
payload = b"x" * {len}
udp = struct.pack("!HHHH", 40000, {port}, 8 + len(payload), 0) + payload
frame = mac("{dst_mac}") + mac("{src_mac}") + struct.pack("!H", 0x0800)
frame += ipv4("{src}", "{dst}", 17, udp) + udp
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind(("{iface}", 0))
# flags, gso_type (none), hdr_len: only Ethernet goes in the linear part.
s.send(struct.pack("<BBHHHH", 0, 0, 14, 0, 0, 0) + frame)
"#,
        src = lab.client_v4(),
        dst = lab.server_v4(),
        dst_mac = lab.server_mac,
        src_mac = lab.client_mac,
        iface = lab.client_if,
    );
    let out = run_bounded(
        lab.client.command("python3").args(["-c", &script]),
        None,
        Duration::from_secs(10),
        None,
    )?;
    ensure!(out.status.is_some_and(|s| s.success()), "{out:?}");
    Ok(())
}

/// At tc ingress the guard reads headers that lie past the skb's linear
/// part with bpf_skb_load_bytes: a datagram whose IP and UDP headers are
/// in a page fragment is judged by its ports, not dropped as malformed:
/// delivered to a permitted port, dropped with `no_rule` at a closed one.
#[test]
fn tc_ingress_judges_headers_outside_the_linear_part() -> Result {
    let lab = Lab::new()?;
    for (ns, iface) in [
        (&lab.server.name, &lab.server_if),
        (&lab.client.name, &lab.client_if),
    ] {
        run("ip", &["-n", ns, "link", "set", iface, "mtu", "9000"])?;
    }
    let policy = TempFile::new("split", "allow = [\"udp/5300\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &["--xdp-mode", "tc"])?;
    assert_eq!(lab.server_guard_mode()?, Some("tc"));
    let mut receiver = lab.server.command("python3");
    receiver.args([
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         s.bind(('0.0.0.0', 5300)); s.settimeout(8); print('ready', flush=True); \
         print(len(s.recv(65535)), flush=True)",
    ]);
    let received =
        std::thread::spawn(move || run_bounded(&mut receiver, None, Duration::from_secs(15), None));
    std::thread::sleep(Duration::from_millis(500));
    send_split_udp(&lab, 5300, 6000)?;
    send_split_udp(&lab, 9090, 6000)?;
    let drop = pw
        .wait_for(WAIT, |v| v["event"] == "drop")
        .context("the datagram to the closed port was not dropped")?;
    assert_eq!(drop["reason"], "no_rule", "{drop}");
    assert_eq!(drop["dst_port"], 9090, "{drop}");
    assert_eq!(drop["proto"], "udp", "{drop}");
    let out = received
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))??;
    assert!(
        out.stdout.lines().any(|l| l == "6000"),
        "the permitted datagram did not arrive: {out:?}"
    );
    pw.stop()?;
    let malformed = pw
        .seen
        .iter()
        .filter(|v| v["event"] == "drop" && v["reason"] == "malformed")
        .count();
    assert_eq!(malformed, 0);
    Ok(())
}

/// Every dropped packet is reported, held back by the report rate limit,
/// or lost for want of ring space, and the counts add up: a SYN scan of
/// 200 closed ports under one report a second leaves a few reports in the
/// stream and counts the rest as held back, the same number in `status`
/// and in the summary.
#[test]
fn every_drop_is_reported_or_counted_as_held_back() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new("heldback", "allow = [\"tcp/22\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &["--report-rate", "1"])?;
    // One open port, so that nmap lists one among the filtered ones.
    let _server = tcp_server(&lab.server, 22)?;
    let found = nmap(&lab, &["-sS", "-p", "22,1000-1199"], lab.server_v4())?;
    ensure!(
        found.get(&("tcp".to_owned(), 22)).map(String::as_str) == Some("open"),
        "{found:?}"
    );
    // The scan is over: the kernel's counts are final.
    let totals = portwatch_tests::net::status_json(&lab)?["totals"].clone();
    let count = |k: &str| {
        totals[k]
            .as_u64()
            .with_context(|| format!("{k} in {totals}"))
    };
    let dropped = [
        "drop_no_rule",
        "drop_source",
        "drop_malformed",
        "drop_fragment",
        "drop_rate_limited",
    ]
    .iter()
    .map(|k| count(k))
    .sum::<Result<u64>>()?;
    let (held_back, lost) = (count("reports_suppressed")?, count("reports_lost")?);
    let status = pw.stop()?;
    ensure!(status.success(), "{status}");
    let summary = summary(&pw)?;
    let reported = summary["drops"].as_u64().context("drops")?;
    ensure!(
        dropped >= 200,
        "{dropped} drops counted for 200 ports: {totals}"
    );
    ensure!(
        held_back > 0 && reported > 0,
        "{reported} reported, {held_back} held back: {totals}"
    );
    ensure!(
        reported + held_back + lost == dropped,
        "{reported} reported + {held_back} held back + {lost} lost != {dropped} dropped"
    );
    ensure!(
        summary["suppressed"] == held_back,
        "summary {summary} against status {totals}"
    );
    Ok(())
}
