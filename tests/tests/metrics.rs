//! `--metrics`: a guard in the lab's server namespace serves /metrics on
//! loopback; the client namespace sends counted traffic; `curl` in the
//! server namespace scrapes, and the test parses the text format and checks
//! every figure against what it sent and opened.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use portwatch_tests::{
    ChildGuard, Netns, Portwatch, Result,
    net::{
        GuardPaths, Lab, TempFile, path_str, pinned_guard, run_bounded, tcp_reachable, tcp_server,
        wait_listening,
    },
    portwatch_bin,
};

/// Where the guard serves metrics, in the server namespace (IPv6 loopback,
/// to exercise the bracketed form of ADDR).
const METRICS_ADDR: &str = "[::1]:9469";

/// One scrape: status, headers, and the samples by `name{labels}`.
#[derive(Debug)]
struct Scrape {
    status: u16,
    headers: String,
    body: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The value of `name` with exactly these labels, in this order.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&series(name, labels)).copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.get(name, labels).with_context(|| {
            format!(
                "no sample {} in the scrape:\n{}",
                series(name, labels),
                self.body
            )
        })
    }

    /// Every sample of `name`, with its labels parsed.
    fn family(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter_map(|(key, v)| {
                let (n, labels) = split_series(key)?;
                (n == name).then_some((labels, *v))
            })
            .collect()
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// `name{k="v",...}` into the name and its labels (values without quotes
/// or commas, as portwatch's are).
fn split_series(key: &str) -> Option<(String, BTreeMap<String, String>)> {
    let Some(open) = key.find('{') else {
        return Some((key.to_string(), BTreeMap::new()));
    };
    let inner = key[open + 1..].strip_suffix('}')?;
    let mut labels = BTreeMap::new();
    for pair in inner.split(',') {
        let (k, v) = pair.split_once('=')?;
        labels.insert(
            k.to_string(),
            v.strip_prefix('"')?.strip_suffix('"')?.to_string(),
        );
    }
    Some((key[..open].to_string(), labels))
}

/// Parses the Prometheus text format strictly: every sample belongs to a
/// family announced by a `# TYPE` line, and every value is a number.
fn parse(body: &str) -> Result<BTreeMap<String, f64>> {
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE line")?;
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("sample line {line:?}"))?;
        let (name, _) = split_series(key).with_context(|| format!("labels in {line:?}"))?;
        ensure!(
            types.contains_key(&name),
            "{name} has no # TYPE line before it"
        );
        let value: f64 = value
            .parse()
            .with_context(|| format!("value in {line:?}"))?;
        ensure!(
            samples.insert(key.to_string(), value).is_none(),
            "{key} twice"
        );
    }
    Ok(samples)
}

/// `curl` from inside `ns`: status code, headers and body of `path`.
fn curl(ns: &Netns, method: &str, path: &str) -> Result<Scrape> {
    let url = format!("http://{METRICS_ADDR}{path}");
    let mut cmd = ns.command("curl");
    // -g: the brackets of the IPv6 address are not a glob.
    cmd.args(["-sS", "-g", "--max-time", "5", "-D", "/dev/stderr"]);
    match method {
        "HEAD" => cmd.arg("-I"),
        "GET" => &mut cmd,
        other => cmd.args(["-X", other]),
    };
    cmd.arg(&url);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(8), None)?;
    ensure!(out.success(), "curl {url} failed: {out:?}");
    // With -I the headers also go to stdout; they are the same.
    let headers = out.stderr;
    let status = headers
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {headers:?}"))?;
    let body = if method == "HEAD" {
        String::new()
    } else {
        out.stdout
    };
    let samples = if status == 200 && method == "GET" {
        parse(&body)?
    } else {
        BTreeMap::new()
    };
    Ok(Scrape {
        status,
        headers,
        body,
        samples,
    })
}

fn scrape(ns: &Netns) -> Result<Scrape> {
    let s = curl(ns, "GET", "/metrics")?;
    ensure!(s.status == 200, "scrape answered {}: {}", s.status, s.body);
    Ok(s)
}

/// Scrapes until `done` holds (the kernel counts asynchronously to the
/// sender), at most 10 s.
fn scrape_until(ns: &Netns, done: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(ns)?;
        if done(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the scrape never reached the expected values:\n{}", s.body);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends exactly `n` UDP datagrams of `size` bytes from `from`.
fn send_udp(from: &Netns, dst: IpAddr, port: u16, n: u32, size: usize) -> Result {
    let script = format!(
        "import socket\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         for i in range({n}):\n\
         \x20   s.sendto(b'x'*{size},('{dst}',{port}))\n"
    );
    let out = from.command("python3").args(["-c", &script]).output()?;
    ensure!(out.status.success(), "UDP sender: {out:?}");
    Ok(())
}

/// Sends exactly `n` bare TCP SYNs (no options) from `src` in `from`, on a
/// raw socket: a connect() would retransmit its SYN, making the count
/// depend on timing.
fn send_syns(from: &Netns, src: IpAddr, dst: IpAddr, port: u16, n: u32) -> Result {
    let script = format!(
        "import socket,struct\n\
         def csum(b):\n\
         \x20   s=sum(struct.unpack('!%dH'%(len(b)//2),b))\n\
         \x20   while s>>16: s=(s&0xffff)+(s>>16)\n\
         \x20   return ~s&0xffff\n\
         r=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_TCP)\n\
         for i in range({n}):\n\
         \x20   h=struct.pack('!HHIIBBHHH',40000+i,{port},1000+i,0,5<<4,0x02,64240,0,0)\n\
         \x20   p=socket.inet_aton('{src}')+socket.inet_aton('{dst}')+struct.pack('!BBH',0,6,len(h))\n\
         \x20   h=h[:16]+struct.pack('!H',csum(p+h))+h[18:]\n\
         \x20   r.sendto(h,('{dst}',0))\n"
    );
    let out = from.command("python3").args(["-c", &script]).output()?;
    ensure!(out.status.success(), "SYN sender: {out:?}");
    Ok(())
}

/// A UDP socket bound on `addr:port` in `ns` that swallows what it gets.
fn udp_sink(ns: &Netns, port: u16) -> Result<ChildGuard> {
    let child = ChildGuard::spawn(
        ns.command("socat")
            .args(["-u", &format!("UDP4-RECV:{port}"), "/dev/null"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )?;
    wait_listening(ns, "udp", port)?;
    Ok(child)
}

/// A TCP listener on 127.0.0.1 only.
fn loopback_tcp(ns: &Netns, port: u16) -> Result<ChildGuard> {
    let child = ChildGuard::spawn(
        ns.command("socat")
            .args([
                &format!("TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"),
                "SYSTEM:echo hi",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )?;
    wait_listening(ns, "tcp", port)?;
    Ok(child)
}

/// A Python `script` in `ns`, once its first line says `ready` (its
/// stdin is a pipe, closed when the child is dropped or taken).
fn python_saying(ns: &Netns, script: &str, ready: &str) -> Result<ChildGuard> {
    let mut child = ChildGuard::spawn(
        ns.command("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped()),
    )?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.as_mut().context("stdout")?),
        &mut line,
    )?;
    ensure!(line.trim() == ready, "{script}: said {line:?}");
    Ok(child)
}

fn wait_listen(pw: &mut Portwatch, proto: &str, port: u16) -> Result {
    pw.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "listen" && v["proto"] == proto && v["port"] == port
    })?;
    Ok(())
}

/// Counter deltas between two scrapes of `portwatch_packets_total` and
/// `portwatch_bytes_total` for one port and action.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(after.value(name, labels)? - before.get(name, labels).unwrap_or(0.0))
}

/// Ethernet + IPv4 + UDP headers: what a datagram adds to its payload on
/// the wire (portwatch counts whole frames).
const UDP_FRAME_OVERHEAD: usize = 14 + 20 + 8;
/// Ethernet + IPv4 + a TCP header without options.
const BARE_SYN_FRAME: usize = 14 + 20 + 20;

#[test]
fn guard_metrics_count_what_the_test_sent_and_opened() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("mt")?;
    let policy = TempFile::new(
        "metrics",
        "allow = [\"tcp/8080\", \"udp/5001\", { port = \"tcp/8443\", from = [\"198.18.0.0/15\"] }]\n",
    )?;
    let ns = &lab.server;
    // Exposure of each listener the test opens in the server namespace.
    let mut opened: Vec<(&str, u16, &str)> = Vec::new();
    // Before the guard: found by its snapshot.
    let _web = tcp_server(ns, 8080)?;
    opened.push(("tcp", 8080, "exposed"));
    let _sink_denied = udp_sink(ns, 5002)?;
    opened.push(("udp", 5002, "blocked"));
    let mut pw = pinned_guard(
        &lab,
        &paths,
        Path::new(policy.as_str()?),
        &["--metrics", METRICS_ADDR],
    )?;
    // The guard's own metrics socket is a listener too, on loopback.
    opened.push(("tcp", 9469, "blocked"));
    // Live ones.
    let _sink_ok = udp_sink(ns, 5001)?;
    opened.push(("udp", 5001, "exposed"));
    let _partial = tcp_server(ns, 8443)?;
    opened.push(("tcp", 8443, "partial"));
    let _closed = tcp_server(ns, 9090)?;
    opened.push(("tcp", 9090, "blocked"));
    let _local = loopback_tcp(ns, 7070)?;
    opened.push(("tcp", 7070, "blocked"));
    for (proto, port, _) in &opened {
        wait_listen(&mut pw, proto, *port)?;
    }

    let s0 = scrape(ns)?;
    ensure!(
        s0.headers
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        s0.headers
    );
    for exposure in ["exposed", "partial", "blocked"] {
        let want = opened.iter().filter(|(_, _, e)| *e == exposure).count();
        assert_eq!(
            s0.value("portwatch_listeners", &[("exposure", exposure)])?,
            want as f64,
            "{exposure} listeners; opened {opened:?}"
        );
    }
    // Other namespaces' listeners (the host's, the client's): whatever
    // they are, the series is there.
    s0.value("portwatch_listeners", &[("exposure", "unknown")])?;
    // Blocked and not loopback: 5002 (snapshot) and 9090 (live).
    let flagged = opened
        .iter()
        .filter(|(_, port, e)| *e == "blocked" && ![7070, 9469].contains(port))
        .count();
    assert_eq!(
        s0.value("portwatch_blocked_listeners_opened_total", &[])?,
        flagged as f64
    );
    assert_eq!(s0.value("portwatch_policy_changes_total", &[])?, 0.0);

    // Build, mode, interface.
    let version = Command::new(portwatch_bin()).arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version
        .split_whitespace()
        .nth(1)
        .context("portwatch --version")?;
    assert_eq!(
        s0.value("portwatch_build_info", &[("version", version)])?,
        1.0
    );
    assert_eq!(
        s0.value("portwatch_guard_mode", &[("mode", "enforce")])?,
        1.0
    );
    assert_eq!(s0.value("portwatch_guard_mode", &[("mode", "audit")])?, 0.0);
    let status = Command::new(portwatch_bin())
        .args(["status", "--json", "--socket", path_str(&paths.socket())?])
        .output()?;
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).with_context(|| format!("status: {status:?}"))?;
    let xdp_mode = status["interfaces"][0]["xdp_mode"]
        .as_str()
        .with_context(|| format!("no xdp_mode in {status}"))?;
    let attached = s0.family("portwatch_xdp_attached");
    assert_eq!(attached.len(), 1, "{attached:?}");
    assert_eq!(attached[0].0["iface"], lab.server_if);
    assert_eq!(attached[0].0["mode"], xdp_mode);
    assert_eq!(attached[0].1, 1.0);
    for ring in ["listeners", "drops"] {
        s0.value("portwatch_events_lost_total", &[("ring", ring)])?;
    }
    s0.value("portwatch_drop_reports_suppressed_total", &[])?;

    // Counted traffic. Numbers and sizes differ per kind, so a counter
    // that picked up the wrong packets cannot match by accident.
    let (server, client) = (lab.server_v4(), lab.client_v4());
    let (udp_ok, udp_denied, syns, connections) = (40u32, 25u32, 7u32, 3u32);
    let (ok_size, denied_size) = (10usize, 33usize);
    send_udp(&lab.client, server, 5001, udp_ok, ok_size)?;
    send_udp(&lab.client, server, 5002, udp_denied, denied_size)?;
    send_syns(&lab.client, client, server, 9090, syns)?;
    for _ in 0..connections {
        ensure!(tcp_reachable(&lab.client, server, 8080)?, "tcp/8080");
    }
    let p = "portwatch_packets_total";
    let b = "portwatch_bytes_total";
    let udp_5002_drop = [("proto", "udp"), ("port", "5002"), ("action", "drop")];
    let tcp_9090_drop = [("proto", "tcp"), ("port", "9090"), ("action", "drop")];
    let udp_5001_pass = [("proto", "udp"), ("port", "5001"), ("action", "pass")];
    let want_no_rule = f64::from(udp_denied + syns);
    let s1 = scrape_until(ns, |s| {
        let no_rule = s.get("portwatch_dropped_packets_total", &[("reason", "no_rule")]);
        let before = s0.get("portwatch_dropped_packets_total", &[("reason", "no_rule")]);
        no_rule.unwrap_or(0.0) - before.unwrap_or(0.0) >= want_no_rule
            && s.get(p, &udp_5001_pass).unwrap_or(0.0) >= f64::from(udp_ok)
    })?;
    // Kept for the README's example.
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/metrics-scrape.txt");
    std::fs::write(&target, &s1.body).with_context(|| format!("writing {}", target.display()))?;
    // Settled: a later scrape has the same figures (nothing still counting).
    std::thread::sleep(Duration::from_millis(300));
    let s1b = scrape(ns)?;
    for labels in [&udp_5002_drop, &tcp_9090_drop, &udp_5001_pass] {
        assert_eq!(s1.get(p, labels), s1b.get(p, labels), "{labels:?} moved");
    }

    // UDP is exact: one datagram, one frame.
    assert_eq!(delta(&s0, &s1, p, &udp_5002_drop)?, f64::from(udp_denied));
    assert_eq!(
        delta(&s0, &s1, b, &udp_5002_drop)?,
        f64::from(udp_denied) * (UDP_FRAME_OVERHEAD + denied_size) as f64
    );
    assert_eq!(
        delta(
            &s0,
            &s1,
            p,
            &[("proto", "udp"), ("port", "5002"), ("action", "pass")]
        )?,
        0.0
    );
    assert_eq!(delta(&s0, &s1, p, &udp_5001_pass)?, f64::from(udp_ok));
    assert_eq!(
        delta(&s0, &s1, b, &udp_5001_pass)?,
        f64::from(udp_ok) * (UDP_FRAME_OVERHEAD + ok_size) as f64
    );
    assert_eq!(
        delta(
            &s0,
            &s1,
            p,
            &[("proto", "udp"), ("port", "5001"), ("action", "drop")]
        )?,
        0.0
    );
    // Raw SYNs are exact too: nothing retransmits them.
    assert_eq!(delta(&s0, &s1, p, &tcp_9090_drop)?, f64::from(syns));
    assert_eq!(
        delta(&s0, &s1, b, &tcp_9090_drop)?,
        f64::from(syns) * BARE_SYN_FRAME as f64
    );
    // Connections to a permitted port: at least the SYN and the ACK of
    // each handshake pass (more with data, FIN, retransmits); none drop.
    let tcp_8080_pass = delta(
        &s0,
        &s1,
        p,
        &[("proto", "tcp"), ("port", "8080"), ("action", "pass")],
    )?;
    assert!(
        tcp_8080_pass >= f64::from(2 * connections),
        "{tcp_8080_pass} packets passed to tcp/8080 for {connections} connections"
    );
    assert_eq!(
        delta(
            &s0,
            &s1,
            p,
            &[("proto", "tcp"), ("port", "8080"), ("action", "drop")]
        )?,
        0.0
    );
    // Per reason: the denied datagrams and the SYNs, nothing else.
    assert_eq!(
        delta(
            &s0,
            &s1,
            "portwatch_dropped_packets_total",
            &[("reason", "no_rule")]
        )?,
        want_no_rule
    );
    for reason in ["source_not_allowed", "malformed", "fragment"] {
        assert_eq!(
            delta(
                &s0,
                &s1,
                "portwatch_dropped_packets_total",
                &[("reason", reason)]
            )?,
            0.0,
            "{reason}"
        );
    }

    // A runtime change counts, and takes effect in the counters.
    let allow = Command::new(portwatch_bin())
        .args(["allow", "udp/5002", "--socket", path_str(&paths.socket())?])
        .output()?;
    ensure!(allow.status.success(), "allow: {allow:?}");
    let s2 = scrape(ns)?;
    assert_eq!(s2.value("portwatch_policy_changes_total", &[])?, 1.0);
    let udp_5002_pass = [("proto", "udp"), ("port", "5002"), ("action", "pass")];
    let now_allowed = 5u32;
    send_udp(&lab.client, server, 5002, now_allowed, denied_size)?;
    let s3 = scrape_until(ns, |s| {
        s.get(p, &udp_5002_pass).unwrap_or(0.0) - s2.get(p, &udp_5002_pass).unwrap_or(0.0)
            >= f64::from(now_allowed)
    })?;
    assert_eq!(delta(&s2, &s3, p, &udp_5002_pass)?, f64::from(now_allowed));
    assert_eq!(delta(&s2, &s3, p, &udp_5002_drop)?, 0.0);
    // Its listener is exposed now.
    assert_eq!(
        s3.value("portwatch_listeners", &[("exposure", "exposed")])?,
        s0.value("portwatch_listeners", &[("exposure", "exposed")])? + 1.0
    );

    // Other paths and methods.
    let nope = curl(ns, "GET", "/nope")?;
    assert_eq!(nope.status, 404, "{nope:?}");
    let post = curl(ns, "POST", "/metrics")?;
    assert_eq!(post.status, 405, "{post:?}");
    assert!(
        post.headers
            .to_ascii_lowercase()
            .contains("allow: get, head"),
        "{}",
        post.headers
    );
    let head = curl(ns, "HEAD", "/metrics")?;
    assert_eq!(head.status, 200, "{head:?}");
    pw.stop()?;
    Ok(())
}

#[test]
fn a_bad_metrics_address_or_a_port_in_use_stops_the_guard_at_start() -> Result {
    let out = Command::new(portwatch_bin())
        .args(["guard", "--metrics", "localhost:9469"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("localhost:9469") && stderr.contains("not an IP address and port"),
        "{stderr}"
    );

    let lab = Lab::new()?;
    let paths = GuardPaths::new("mt")?;
    let policy = TempFile::new("metrics", "allow = [\"tcp/22\"]\n")?;
    let _taken = loopback_tcp(&lab.server, 9469)?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.server.name))
        .arg(portwatch_bin())
        .args(["guard", "--iface", &lab.server_if])
        .args(["--policy", policy.as_str()?])
        .args(["--pin-dir", path_str(&paths.pins)?])
        .args(["--socket", path_str(&paths.socket())?])
        .args(["--metrics", "127.0.0.1:9469"])
        .env_remove("SSH_CONNECTION");
    let out = run_bounded(&mut cmd, None, Duration::from_secs(20), None)?;
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("--metrics 127.0.0.1:9469: cannot listen there: Address already in use"),
        "{}",
        out.stderr
    );
    // It stopped before attaching or pinning anything.
    assert!(!lab.server_link()?.contains("prog/xdp"));
    assert_eq!(lab.server_guard_mode()?, None);
    assert!(!paths.pins.exists(), "{:?} was created", paths.pins);
    Ok(())
}

#[test]
fn watch_serves_its_listeners_and_lost_events() -> Result {
    let ns = Netns::new("mw")?;
    let mut pw = Portwatch::start_in(
        &ns,
        &[
            "watch",
            "--local",
            "--metrics",
            METRICS_ADDR,
            "--port",
            "7071",
        ],
    )?;
    let before = scrape(&ns)?;
    let unknown = before.value("portwatch_listeners", &[("exposure", "unknown")])?;
    let server = loopback_tcp(&ns, 7071)?;
    pw.wait_for(Duration::from_secs(10), |v| {
        v["event"] == "listen" && v["pid"] == server.pid()
    })?;
    // One more listener: the one opened (there may be others coming and
    // going on the host, so the figure is read until it settles on +1).
    let after = scrape_until(&ns, |s| {
        s.get("portwatch_listeners", &[("exposure", "unknown")]) == Some(unknown + 1.0)
    })?;
    after.value("portwatch_events_lost_total", &[("ring", "listeners")])?;
    // Without a guard: no guard figures, no exposure but unknown.
    assert_eq!(
        after.family("portwatch_listeners").len(),
        1,
        "{}",
        after.body
    );
    for absent in [
        "portwatch_packets_total",
        "portwatch_guard_mode",
        "portwatch_xdp_attached",
        "portwatch_policy_changes_total",
    ] {
        assert!(after.family(absent).is_empty(), "{absent}:\n{}", after.body);
    }
    assert!(
        after
            .get("portwatch_events_lost_total", &[("ring", "drops")])
            .is_none()
    );
    pw.stop()?;
    Ok(())
}

#[test]
fn metrics_clients_cannot_stall_the_guard() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("mt")?;
    let policy = TempFile::new("metrics", "allow = [\"tcp/8080\"]\n")?;
    let ns = &lab.server;
    let mut pw = pinned_guard(
        &lab,
        &paths,
        Path::new(policy.as_str()?),
        &["--metrics", METRICS_ADDR],
    )?;
    // Clients that connect and never send a request, more than the server
    // takes at once, and a flood of scrapes next to them.
    let idle = "import socket,time\n\
                s=[socket.create_connection(('::1',9469)) for i in range(32)]\n\
                print('connected',flush=True)\n\
                time.sleep(30)\n";
    let idlers = python_saying(ns, idle, "connected")?;
    let flood = format!(
        "for i in $(seq 40); do curl -s -g -o /dev/null --max-time 5 http://{METRICS_ADDR}/metrics & done; wait"
    );
    let _flood = ChildGuard::spawn(ns.command("sh").args(["-c", &flood]))?;
    // The guard goes on: control requests are answered and new listeners
    // reported promptly.
    for _ in 0..5 {
        let start = Instant::now();
        let status = Command::new(portwatch_bin())
            .args(["status", "--json", "--socket", path_str(&paths.socket())?])
            .output()?;
        ensure!(status.status.success(), "status: {status:?}");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(2), "status took {took:?}");
    }
    let start = Instant::now();
    let web = tcp_server(ns, 8080)?;
    pw.wait_for(Duration::from_secs(2), |v| {
        v["event"] == "listen" && v["pid"] == web.pid()
    })?;
    assert!(start.elapsed() < Duration::from_secs(3));
    // Once the idle clients are gone, scrapes are served again.
    drop(idlers);
    let s = scrape_until(ns, |s| {
        s.get("portwatch_listeners", &[("exposure", "exposed")]) == Some(1.0)
    })?;
    assert_eq!(s.status, 200);
    pw.stop()?;
    Ok(())
}

/// The guard's resident memory, from /proc (kB).
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// Series a scan may add: a summed `other` port per protocol, per action,
/// for packets and bytes.
const SCAN_SERIES_BOUND: usize = 2 * 2 * 2;
/// What a full scan may add to the guard's resident memory (the README
/// states the same bound).
const SCAN_RSS_BOUND_KIB: u64 = 8 * 1024;

#[test]
fn a_full_port_scan_sets_neither_the_series_nor_the_memory() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("ms")?;
    let policy = TempFile::new("scanned", "allow = [\"tcp/22\"]\n")?;
    let _ssh = tcp_server(&lab.server, 22)?;
    let mut pw = pinned_guard(
        &lab,
        &paths,
        Path::new(policy.as_str()?),
        &["--metrics", METRICS_ADDR],
    )?;
    wait_listen(&mut pw, "tcp", 22)?;
    // Warmed up: one scrape's own allocations are in the baseline.
    scrape(&lab.server)?;
    let before = scrape(&lab.server)?;
    let rss_before = rss_kib(pw.pid())?;

    let target = lab.server_v4().to_string();
    for args in [
        &["-sS", "-p-", "--min-rate", "20000"][..],
        &["-sU", "-p-", "--min-rate", "20000"][..],
    ] {
        let mut nmap = lab.client.command("nmap");
        nmap.args(args)
            .args(["-n", "-Pn", "--max-retries", "0", "--host-timeout", "90s"])
            .args(["-oX", "/dev/null", &target]);
        let out = run_bounded(&mut nmap, None, Duration::from_secs(120), None)?;
        ensure!(out.success(), "nmap {args:?}: {out:?}");
    }
    // Every probe counted: the no_rule drops cover (nearly) both ranges.
    let after = scrape_until(&lab.server, |s| {
        let drops = s.get("portwatch_dropped_packets_total", &[("reason", "no_rule")]);
        drops.unwrap_or(0.0) >= 2.0 * 65_000.0
    })?;
    let rss_after = rss_kib(pw.pid())?;
    let grown = after.samples.len().saturating_sub(before.samples.len());
    assert!(
        grown <= SCAN_SERIES_BOUND,
        "a scan added {grown} series (bound {SCAN_SERIES_BOUND}): {} -> {}",
        before.samples.len(),
        after.samples.len()
    );
    let other = [("proto", "tcp"), ("port", "other"), ("action", "drop")];
    ensure!(
        after.value("portwatch_packets_total", &other)? >= 65_000.0,
        "the scan's SYNs are summed under port=\"other\""
    );
    let udp_other = [("proto", "udp"), ("port", "other"), ("action", "drop")];
    ensure!(after.value("portwatch_packets_total", &udp_other)? >= 65_000.0);
    // The permitted listener keeps its own series.
    after.value(
        "portwatch_packets_total",
        &[("proto", "tcp"), ("port", "22"), ("action", "pass")],
    )?;
    let rss_grown = rss_after.saturating_sub(rss_before);
    assert!(
        rss_grown <= SCAN_RSS_BOUND_KIB,
        "the guard's RSS grew by {rss_grown} KiB ({rss_before} -> {rss_after}), bound {SCAN_RSS_BOUND_KIB} KiB"
    );
    eprintln!(
        "full scan: {} -> {} series, RSS {rss_before} -> {rss_after} KiB",
        before.samples.len(),
        after.samples.len()
    );
    let status = pw.stop()?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// Listened ports get counters of their own and give them back when their
/// listeners go, also when two processes close theirs a moment apart (the
/// second group's layout waits for the spacing after the first's, and
/// must still come).
#[test]
fn listened_ports_that_close_together_give_their_counters_back() -> Result {
    let lab = Lab::new()?;
    let paths = GuardPaths::new("mt")?;
    let policy = TempFile::new("metrics", "allow = [\"tcp/8080\"]\n")?;
    let ns = &lab.server;
    let _pw = pinned_guard(
        &lab,
        &paths,
        Path::new(policy.as_str()?),
        &["--metrics", METRICS_ADDR],
    )?;
    // Two processes, 20 UDP sockets each; each exits when its stdin closes.
    let bind = |base: u16| -> Result<ChildGuard> {
        let script = format!(
            "import socket,sys\n\
             s=[socket.socket(socket.AF_INET,socket.SOCK_DGRAM) for i in range(20)]\n\
             [x.bind(('0.0.0.0',{base}+i)) for i,x in enumerate(s)]\n\
             print('bound',flush=True)\n\
             sys.stdin.read()\n"
        );
        python_saying(ns, &script, "bound")
    };
    let ports: Vec<u16> = (6000..6020).chain(6100..6120).collect();
    let counted = |s: &Scrape| -> Vec<u16> {
        s.family("portwatch_packets_total")
            .into_iter()
            .filter(|(l, _)| l.get("proto").is_some_and(|p| p == "udp"))
            .filter_map(|(l, _)| l.get("port")?.parse().ok())
            .filter(|p| ports.contains(p))
            .collect::<std::collections::BTreeSet<u16>>()
            .into_iter()
            .collect()
    };
    let mut first = bind(6000)?;
    let mut second = bind(6100)?;
    let s = scrape_until(ns, |s| counted(s) == ports)?;
    ensure!(counted(&s) == ports, "{}", s.body);
    // Both exit, a moment apart.
    drop(first.0.stdin.take());
    first.wait_within(Duration::from_secs(10))?;
    drop(second.0.stdin.take());
    second.wait_within(Duration::from_secs(10))?;
    let s = scrape_until(ns, |s| counted(s).is_empty())?;
    assert!(counted(&s).is_empty(), "{}", s.body);
    Ok(())
}
