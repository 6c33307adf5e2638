//! `cargo xtask soak` (not in CI): a guard under steady load for N minutes.
//!
//! A lab of two namespaces joined by a veth pair; `portwatch guard --json`
//! (enforce mode, native XDP, pins and control socket in directories of the
//! soak's own) on the server veth. For the whole run:
//!
//! - listener churn in the server namespace: one `listeners.py --churn`
//!   process after another (TCP and UDP in turn), each reporting its pid and
//!   how many listeners it opened and closed;
//! - policy flips: `portwatch allow` / `deny` of one port through the
//!   control socket every 100 ms;
//! - bounded-rate traffic from the client namespace (sent by this process
//!   from threads that entered it) to permitted, denied and flipped ports,
//!   answered by servers this process runs in the server namespace;
//! - every 10 s the guard's RSS and CPU time.
//!
//! It fails when the guard's RSS grows past the bound, when a churn event is
//! missing from the stream without the stream counting it as lost, when a
//! policy change goes unannounced, or when traffic gets a wrong verdict.
//! Results go to `bench/results/soak.{json,md}`.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs::File,
    io::{BufRead as _, BufReader, BufWriter, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use portwatch_lab::{
    ChildGuard, Lab, find_in_path, line_reader, netns::nsenter, require_tools, run_bounded,
    wait_line,
};
use serde_json::{Value, json};

use crate::{
    bench::{attach::start_guard, machine},
    build,
    procstat::{memory_mb, proc_cpu_seconds},
    setup, util,
};

/// Permitted by the policy, a server answers "hi".
const TCP_OPEN: u16 = 7001;
/// Not permitted; a server listens (a connection would show a leak).
const TCP_DENIED: u16 = 7002;
/// Permitted by the policy, a server echoes.
const UDP_OPEN: u16 = 7003;
/// Not permitted; a server counts what reaches it (it must stay 0).
const UDP_DENIED: u16 = 7004;
/// Allowed and denied in turn through the control socket; a server answers.
const TCP_FLIP: u16 = 7005;
/// The policy file's rules: a few ports, not the denied or flipped ones.
const ALLOW: [&str; 3] = ["tcp/22", "tcp/7001", "udp/7003"];

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// RSS before this is start-up (caches filling); the start figure is the
/// first sample from here on.
const WARM_UP: Duration = Duration::from_secs(30);
const FLIP_EVERY: Duration = Duration::from_millis(100);
/// Listeners per churn process (each opened, then closed at once) and how
/// often a new process starts: ~200 listeners, 400 events, a second.
const CHURN_PER_PROC: u32 = 200;
const CHURN_EVERY: Duration = Duration::from_secs(1);
/// One probe of each kind per tick at most (20/s).
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long a probe to a port that should drop waits for the handshake.
const DROP_WAIT: Duration = Duration::from_millis(250);
/// How long a probe to a permitted port waits for its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// "Flat": end RSS at most this much above the start, or the fraction
/// below of the start if that is more.
const RSS_BOUND_KIB: f64 = 4096.0;
const RSS_BOUND_FRACTION: f64 = 0.10;

/// Set by SIGINT/SIGTERM.
static SIGNALLED: AtomicBool = AtomicBool::new(false);
/// Set when the run ends (time is up, a signal, an error): workers stop.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst)
}

/// Ctrl-C and SIGTERM end the run through the normal path, so everything
/// is cleaned up (children in the terminal's process group get the signal
/// too and stop by themselves).
fn catch_signals() -> Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` touches no memory of ours.
        let old = unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        ensure!(
            old != libc::SIG_ERR,
            "installing a handler for signal {signal}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sleeps until `at` in short steps; false if the run is stopping.
fn sleep_until(at: Instant) -> bool {
    loop {
        if stopping() {
            return false;
        }
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The next tick after `prev` that is not already past (no catch-up bursts
/// after a stall).
fn next_tick(prev: Instant, every: Duration) -> Instant {
    (prev + every).max(Instant::now())
}

// ---------------------------------------------------------------------------
// Servers (server namespace) and traffic (client namespace)
// ---------------------------------------------------------------------------

/// What reached the servers, per port.
#[derive(Default)]
struct ServerCounts {
    tcp_open: AtomicU64,
    tcp_denied: AtomicU64,
    tcp_flip: AtomicU64,
    udp_open: AtomicU64,
    udp_denied: AtomicU64,
}

struct Servers {
    counts: Arc<ServerCounts>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Binds every server socket in the namespace at `netns` (0.0.0.0) and serves each on a
    /// thread until [`Servers::stop`].
    fn start(netns: &Path) -> Result<Self> {
        let (tcp, udp) = std::thread::scope(|s| {
            s.spawn(|| -> Result<_> {
                portwatch_lab::netns::enter(netns)?;
                let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
                let tcp = [TCP_OPEN, TCP_DENIED, TCP_FLIP].map(|port| {
                    TcpListener::bind(any(port)).with_context(|| format!("tcp/{port}"))
                });
                let udp = [UDP_OPEN, UDP_DENIED]
                    .map(|port| UdpSocket::bind(any(port)).with_context(|| format!("udp/{port}")));
                Ok((tcp, udp))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the server set-up thread panicked"))?
        })
        .context("binding the lab's servers")?;
        let [tcp_open, tcp_denied, tcp_flip] = tcp;
        let [udp_open, udp_denied] = udp;
        let counts = Arc::new(ServerCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (listener, pick) in [
            (
                tcp_open?,
                (|c| &c.tcp_open) as fn(&ServerCounts) -> &AtomicU64,
            ),
            (tcp_denied?, |c| &c.tcp_denied),
            (tcp_flip?, |c| &c.tcp_flip),
        ] {
            listener.set_nonblocking(true)?;
            let (counts, stop) = (counts.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                serve_tcp(&listener, pick(&counts), &stop);
            }));
        }
        for (socket, pick) in [
            (
                udp_open?,
                (|c| &c.udp_open) as fn(&ServerCounts) -> &AtomicU64,
            ),
            (udp_denied?, |c| &c.udp_denied),
        ] {
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (counts, stop) = (counts.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                serve_udp(&socket, pick(&counts), &stop);
            }));
        }
        Ok(Self {
            counts,
            stop,
            threads,
        })
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts (polling: the listener is non-blocking, so a stop is seen) and
/// says "hi" to every connection.
fn serve_tcp(listener: &TcpListener, accepted: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) && !SIGNALLED.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let _ = conn.set_nonblocking(false);
                let _ = conn.write_all(b"hi\n");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Echoes every datagram back to its sender.
fn serve_udp(socket: &UdpSocket, received: &AtomicU64, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) && !SIGNALLED.load(Ordering::SeqCst) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            received.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

/// How probes of one kind ended.
#[derive(Default, Debug)]
struct Tally {
    attempts: u64,
    /// Connected and the server's "hi" came / the datagram came back.
    answered: u64,
    /// Connected, but no "hi".
    connected: u64,
    /// A reset: the SYN reached the server's stack.
    refused: u64,
    /// No handshake / no echo in time.
    timed_out: u64,
    other: u64,
    other_example: Option<String>,
}

impl Tally {
    fn json(&self) -> Value {
        json!({
            "attempts": self.attempts,
            "answered": self.answered,
            "connected_without_answer": self.connected,
            "refused": self.refused,
            "timed_out": self.timed_out,
            "other_errors": self.other,
            "other_example": self.other_example,
        })
    }

    /// Probes that got past the XDP program.
    fn through(&self) -> u64 {
        self.answered + self.connected + self.refused
    }

    fn tcp(&mut self, to: SocketAddr, wait: Duration) {
        self.attempts += 1;
        match TcpStream::connect_timeout(&to, wait) {
            Ok(mut conn) => {
                let _ = conn.set_read_timeout(Some(ANSWER_WAIT));
                let mut got = Vec::new();
                let mut buf = [0u8; 16];
                while !got.starts_with(b"hi") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if got.starts_with(b"hi") {
                    self.answered += 1;
                } else {
                    self.connected += 1;
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => self.refused += 1,
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                self.timed_out += 1;
            }
            Err(e) => {
                self.other += 1;
                self.other_example.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Sends datagram `seq` from `socket` to `to`; with `wait`, waits that
    /// long for it to come back (older echoes are skipped).
    fn udp(&mut self, socket: &UdpSocket, to: SocketAddr, seq: u64, wait: Option<Duration>) {
        self.attempts += 1;
        let payload = format!("soak {seq}");
        if let Err(e) = socket.send_to(payload.as_bytes(), to) {
            self.other += 1;
            self.other_example.get_or_insert_with(|| e.to_string());
            return;
        }
        let Some(wait) = wait else {
            return;
        };
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
                self.timed_out += 1;
                return;
            }
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == payload.as_bytes() => {
                    self.answered += 1;
                    return;
                }
                Ok(_) => {}
                Err(_) => {
                    self.timed_out += 1;
                    return;
                }
            }
        }
    }

    /// Echoes that arrived for datagrams sent without waiting (a denied
    /// port must send none: they would mean the datagram got through).
    fn drain_echoes(&mut self, socket: &UdpSocket) {
        let mut buf = [0u8; 512];
        while socket.recv_from(&mut buf).is_ok() {
            self.answered += 1;
        }
    }
}

/// Probes of every kind, from the client namespace.
#[derive(Default, Debug)]
struct Traffic {
    tcp_open: Tally,
    tcp_denied: Tally,
    tcp_flip: Tally,
    udp_open: Tally,
    udp_denied: Tally,
}

/// Counters the main loop prints while the run goes on.
#[derive(Default)]
struct Progress {
    churn_listeners: AtomicU64,
    flips: AtomicU64,
    probes: AtomicU64,
}

/// One thread per probe kind in the namespace at `netns`, until the run
/// stops.
fn spawn_traffic(
    netns: &Path,
    server: IpAddr,
    progress: &Arc<Progress>,
) -> Vec<JoinHandle<Result<(&'static str, Tally)>>> {
    let at = |port| SocketAddr::new(server, port);
    let kinds: [(&'static str, SocketAddr); 5] = [
        ("tcp_open", at(TCP_OPEN)),
        ("tcp_denied", at(TCP_DENIED)),
        ("tcp_flip", at(TCP_FLIP)),
        ("udp_open", at(UDP_OPEN)),
        ("udp_denied", at(UDP_DENIED)),
    ];
    kinds
        .into_iter()
        .map(|(kind, to)| {
            let netns = netns.to_path_buf();
            let progress = progress.clone();
            std::thread::spawn(move || -> Result<(&'static str, Tally)> {
                portwatch_lab::netns::enter(&netns)?;
                let mut tally = Tally::default();
                let any = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
                let socket = UdpSocket::bind(any).context("a UDP client socket")?;
                if kind == "udp_denied" {
                    socket.set_nonblocking(true)?;
                }
                let mut tick = Instant::now();
                let mut seq = 0;
                while sleep_until(tick) {
                    match kind {
                        "tcp_open" => tally.tcp(to, ANSWER_WAIT),
                        "tcp_denied" | "tcp_flip" => tally.tcp(to, DROP_WAIT),
                        "udp_open" => tally.udp(&socket, to, seq, Some(ANSWER_WAIT)),
                        _ => {
                            tally.udp(&socket, to, seq, None);
                            tally.drain_echoes(&socket);
                        }
                    }
                    seq += 1;
                    progress.probes.fetch_add(1, Ordering::Relaxed);
                    tick = next_tick(tick, PROBE_EVERY);
                }
                if kind == "udp_denied" {
                    // A last look for late echoes.
                    std::thread::sleep(Duration::from_millis(300));
                    tally.drain_echoes(&socket);
                }
                Ok((kind, tally))
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Churn and flips
// ---------------------------------------------------------------------------

/// One churn process: what it says it did.
#[derive(Debug)]
struct ChurnProc {
    pid: u64,
    proto: &'static str,
    opened: u64,
    closed: u64,
}

/// `listeners.py --churn` processes in the server namespace, one after
/// another, TCP and UDP in turn, until the run stops.
fn spawn_churn(
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
                Err(_) if SIGNALLED.load(Ordering::SeqCst) => break,
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

#[derive(Default, Debug)]
struct Flips {
    allow: u64,
    deny: u64,
    failed: u64,
    failure_example: Option<String>,
}

/// `portwatch allow|deny tcp/TCP_FLIP --socket S` every FLIP_EVERY, in turn.
fn spawn_flips(portwatch: PathBuf, socket: PathBuf, progress: Arc<Progress>) -> JoinHandle<Flips> {
    std::thread::spawn(move || {
        let mut flips = Flips::default();
        let spec = format!("tcp/{TCP_FLIP}");
        // The policy file does not permit it: the first flip allows.
        let mut allowed = false;
        let mut tick = Instant::now();
        while sleep_until(tick) {
            let verb = if allowed { "deny" } else { "allow" };
            let mut cmd = Command::new(&portwatch);
            cmd.args([verb, &spec]).arg("--socket").arg(&socket);
            match run_bounded(&mut cmd, None, Duration::from_secs(10), None) {
                Ok(out) if out.success() => {
                    allowed = !allowed;
                    if allowed {
                        flips.allow += 1;
                    } else {
                        flips.deny += 1;
                    }
                    progress.flips.fetch_add(1, Ordering::Relaxed);
                }
                Ok(out) => {
                    flips.failed += 1;
                    flips.failure_example.get_or_insert_with(|| {
                        format!(
                            "`portwatch {verb} {spec}`: {}: {}",
                            out.describe(),
                            out.stderr.trim()
                        )
                    });
                }
                Err(e) => {
                    flips.failed += 1;
                    flips
                        .failure_example
                        .get_or_insert_with(|| format!("{e:#}"));
                }
            }
            tick = next_tick(tick, FLIP_EVERY);
        }
        flips
    })
}

/// Copies the guard's JSON Lines to `path` as they come, until its stdout
/// closes; the number of lines.
fn spawn_capture(lines: portwatch_lab::Lines, path: PathBuf) -> JoinHandle<Result<u64>> {
    std::thread::spawn(move || -> Result<u64> {
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let mut n = 0;
        for (_, line) in lines {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            n += 1;
        }
        out.flush()?;
        Ok(n)
    })
}

// ---------------------------------------------------------------------------
// The stream's accounting
// ---------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stream {
    lines: u64,
    unparsable: u64,
    /// Live listen/close events of churn pids in the server namespace (or
    /// in none), per pid.
    listens: HashMap<u64, u64>,
    closes: HashMap<u64, u64>,
    /// Of those, events without a namespace (the process had exited).
    without_netns: u64,
    /// Events of a churn pid in another namespace (not counted as seen).
    elsewhere: u64,
    /// Sum of the `lost` lines' counts.
    lost_announced: u64,
    /// `policy` lines about the flipped port.
    policy_flip: u64,
    policy_other: u64,
    drops: HashMap<u64, u64>,
    suppressed_announced: u64,
    summary: Option<Value>,
}

fn read_stream(path: &Path, churn_pids: &HashMap<u64, &ChurnProc>, netns: u64) -> Result<Stream> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut s = Stream::default();
    let flip = format!("tcp/{TCP_FLIP}");
    for line in BufReader::new(file).lines() {
        let line = line?;
        s.lines += 1;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            s.unparsable += 1;
            continue;
        };
        match v["event"].as_str() {
            Some(kind @ ("listen" | "close")) => {
                let pid = v["pid"].as_u64().unwrap_or(0);
                if v["origin"] != "live" || !churn_pids.contains_key(&pid) {
                    continue;
                }
                // The namespace comes from /proc when the event is read: a
                // fixture that already exited has none (pid and comm come
                // from the kernel).
                if v["netns"].is_null() && v["comm"] == "python3" {
                    s.without_netns += 1;
                } else if v["netns"] != netns {
                    s.elsewhere += 1;
                    continue;
                }
                let map = if kind == "listen" {
                    &mut s.listens
                } else {
                    &mut s.closes
                };
                *map.entry(pid).or_default() += 1;
            }
            Some("lost") => s.lost_announced += v["count"].as_u64().unwrap_or(0),
            Some("suppressed") => s.suppressed_announced += v["count"].as_u64().unwrap_or(0),
            Some("policy") => {
                if v["change"].as_str().is_some_and(|c| c.contains(&flip)) {
                    s.policy_flip += 1;
                } else {
                    s.policy_other += 1;
                }
            }
            Some("drop") => {
                *s.drops
                    .entry(v["dst_port"].as_u64().unwrap_or(0))
                    .or_default() += 1
            }
            Some("summary") => s.summary = Some(v),
            _ => {}
        }
    }
    Ok(s)
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Seconds since the load started.
    t: f64,
    rss_kib: f64,
    hwm_kib: f64,
    cpu_s: f64,
    load1: f64,
}

fn sample(pid: u32, t0: Instant) -> Result<Sample> {
    let (rss, hwm) = memory_mb(pid)?;
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Ok(Sample {
        t: t0.elapsed().as_secs_f64(),
        rss_kib: rss * 1024.0,
        hwm_kib: hwm * 1024.0,
        cpu_s: proc_cpu_seconds(pid)?,
        load1,
    })
}

/// Least-squares slope of RSS over time, KiB per minute.
fn slope_kib_per_min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mt = samples.iter().map(|s| s.t / 60.0).sum::<f64>() / n;
    let mr = samples.iter().map(|s| s.rss_kib).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        let dt = s.t / 60.0 - mt;
        num += dt * (s.rss_kib - mr);
        den += dt * dt;
    }
    if den == 0.0 { 0.0 } else { num / den }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

pub fn soak(minutes: u64) -> Result<()> {
    ensure!(minutes >= 1, "--minutes must be at least 1");
    ensure!(
        util::is_root()?,
        "the soak creates network namespaces and loads XDP programs: run it as root"
    );
    let root = util::workspace_root();
    setup::ensure()?;
    let portwatch = build::build_portwatch(true)?;
    require_tools(&["python3", "nsenter", "ip"])?;
    catch_signals()?;
    let duration = Duration::from_secs(minutes * 60);
    util::header(&format!("soak: {minutes} min"));
    let outcome = run(&root, &portwatch, duration);
    // Everything the run made is gone by now (dropped inside `run`).
    if SIGNALLED.load(Ordering::SeqCst) {
        bail!("interrupted; the lab, the guard and its pins were removed");
    }
    let report = outcome?;
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("soak.json");
    let md_path = dir.join("soak.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report.json)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, &report.markdown)
        .with_context(|| format!("writing {}", md_path.display()))?;
    println!("{}", report.markdown);
    println!("wrote {} and {}", json_path.display(), md_path.display());
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| what.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("soak failed: {}", failed.join("; "));
    }
    println!("soak passed");
    Ok(())
}

struct Report {
    json: Value,
    markdown: String,
    checks: Vec<(String, bool)>,
}

fn run(root: &Path, portwatch: &Path, duration: Duration) -> Result<Report> {
    // Declared first, dropped last: the namespaces go after everything
    // that runs in them.
    let lab = Lab::new().context("creating the lab")?;
    lab.pin_neighbours()?;
    let netns = lab.server.inode()?;
    // Pins under a unique /sys/fs/bpf directory, socket and policy in a
    // temporary directory: the host's guard paths are never touched.
    let mut guard = start_guard(portwatch, &lab, "native", &ALLOW).context("starting the guard")?;
    let pid = guard.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(
        comm.trim() == "portwatch",
        "pid {pid} is {comm:?}, not the guard"
    );
    let stream_path = lab.dir.join("guard.jsonl");
    let lines = std::mem::replace(&mut guard.lines, mpsc::channel().1);
    let capture = spawn_capture(lines, stream_path.clone());
    let mut servers = Servers::start(&lab.server.path())?;

    let progress = Arc::new(Progress::default());
    let t0 = Instant::now();
    let churn = spawn_churn(
        lab.server.path(),
        root.join("tests/fixtures/listeners.py"),
        lab.dir.join("churn.err"),
        progress.clone(),
    );
    let flips = spawn_flips(portwatch.to_path_buf(), guard.socket(), progress.clone());
    let traffic = spawn_traffic(&lab.client.path(), lab.server_v4(), &progress);
    let cpu0 = proc_cpu_seconds(pid)?;

    let mut samples = Vec::new();
    let mut next_sample = t0;
    let end = t0 + duration;
    let looped = (|| -> Result<()> {
        loop {
            if SIGNALLED.load(Ordering::SeqCst) {
                return Ok(());
            }
            if churn.is_finished() || flips.is_finished() || traffic.iter().any(|t| t.is_finished())
            {
                bail!("a load thread stopped early");
            }
            let now = Instant::now();
            if now >= next_sample || now >= end {
                let s = sample(pid, t0).context("sampling the guard (is it still running?)")?;
                println!(
                    "soak {:>4.0} s: guard RSS {:>6.1} MiB, CPU {:>6.2} s; {} churn listeners, {} flips, \
                     {} probes; load {:.1}",
                    s.t,
                    s.rss_kib / 1024.0,
                    s.cpu_s - cpu0,
                    progress.churn_listeners.load(Ordering::Relaxed),
                    progress.flips.load(Ordering::Relaxed),
                    progress.probes.load(Ordering::Relaxed),
                    s.load1,
                );
                samples.push(s);
                next_sample += SAMPLE_EVERY;
                if now >= end {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    let elapsed = t0.elapsed().as_secs_f64();
    STOP.store(true, Ordering::SeqCst);

    // Stop the load, then the servers (so no probe in flight loses its
    // answer), then let the guard drain its ring buffer and stop it.
    let churned = churn
        .join()
        .map_err(|_| anyhow::anyhow!("the churn thread panicked"));
    let flipped = flips
        .join()
        .map_err(|_| anyhow::anyhow!("the flip thread panicked"));
    let mut probes = Traffic::default();
    let mut traffic_error = None;
    for t in traffic {
        match t.join() {
            Ok(Ok((kind, tally))) => match kind {
                "tcp_open" => probes.tcp_open = tally,
                "tcp_denied" => probes.tcp_denied = tally,
                "tcp_flip" => probes.tcp_flip = tally,
                "udp_open" => probes.udp_open = tally,
                _ => probes.udp_denied = tally,
            },
            Ok(Err(e)) => traffic_error = Some(e),
            Err(_) => traffic_error = Some(anyhow::anyhow!("a traffic thread panicked")),
        }
    }
    servers.stop();
    looped?;
    if SIGNALLED.load(Ordering::SeqCst) {
        // The caller says so; the drops clean up.
        bail!("interrupted");
    }
    let churned = churned??;
    let flipped = flipped?;
    if let Some(e) = traffic_error {
        return Err(e.context("sending traffic"));
    }
    std::thread::sleep(Duration::from_secs(3));
    let guard_cpu = proc_cpu_seconds(pid)? - cpu0;
    let exit = guard.stop(Duration::from_secs(15));
    let captured = capture
        .join()
        .map_err(|_| anyhow::anyhow!("the capture thread panicked"))??;

    let by_pid: HashMap<u64, &ChurnProc> = churned.iter().map(|p| (p.pid, p)).collect();
    ensure!(
        by_pid.len() == churned.len(),
        "a churn pid came twice (pid reuse): the per-pid accounting would be wrong"
    );
    let stream = read_stream(&stream_path, &by_pid, netns)?;
    ensure!(
        stream.lines == captured,
        "read {} lines back, captured {captured}",
        stream.lines
    );
    Ok(report(&Inputs {
        duration,
        elapsed,
        samples: &samples,
        guard_cpu,
        exit_ok: exit.is_some_and(|s| s.success()),
        churned: &churned,
        stream: &stream,
        flips: &flipped,
        probes: &probes,
        servers: &servers.counts,
    }))
}

struct Inputs<'a> {
    duration: Duration,
    elapsed: f64,
    samples: &'a [Sample],
    guard_cpu: f64,
    exit_ok: bool,
    churned: &'a [ChurnProc],
    stream: &'a Stream,
    flips: &'a Flips,
    probes: &'a Traffic,
    servers: &'a ServerCounts,
}

fn report(i: &Inputs<'_>) -> Report {
    let mut checks: Vec<(String, bool)> = Vec::new();

    // Memory.
    let warm = WARM_UP.as_secs_f64();
    let after: Vec<Sample> = i.samples.iter().copied().filter(|s| s.t >= warm).collect();
    let first = i.samples.first().copied();
    let start = after.first().copied();
    let last = after.last().copied();
    let (start_kib, end_kib) = (
        start.map_or(0.0, |s| s.rss_kib),
        last.map_or(0.0, |s| s.rss_kib),
    );
    let max_kib = i.samples.iter().map(|s| s.rss_kib).fold(0.0, f64::max);
    let hwm_kib = last.map_or(0.0, |s| s.hwm_kib);
    let slope = slope_kib_per_min(&after);
    let bound_kib = RSS_BOUND_KIB.max(start_kib * RSS_BOUND_FRACTION);
    let growth = end_kib - start_kib;
    checks.push((
        format!(
            "RSS flat: end {:.1} MiB within +{:.1} MiB of start {:.1} MiB (grew {:+.0} KiB)",
            end_kib / 1024.0,
            bound_kib / 1024.0,
            start_kib / 1024.0,
            growth
        ),
        after.len() >= 2 && growth <= bound_kib,
    ));

    // Events.
    let made_listens: u64 = i.churned.iter().map(|p| p.opened).sum();
    let made_closes: u64 = i.churned.iter().map(|p| p.closed).sum();
    let seen_listens: u64 = i.stream.listens.values().sum();
    let seen_closes: u64 = i.stream.closes.values().sum();
    let over = i.churned.iter().filter(|p| {
        i.stream.listens.get(&p.pid).copied().unwrap_or(0) > p.opened
            || i.stream.closes.get(&p.pid).copied().unwrap_or(0) > p.closed
    });
    let over_pids = over.count();
    // Which fixtures came up short, with their place in the sequence.
    let short: Vec<Value> = i
        .churned
        .iter()
        .enumerate()
        .filter_map(|(k, p)| {
            let l = i.stream.listens.get(&p.pid).copied().unwrap_or(0);
            let c = i.stream.closes.get(&p.pid).copied().unwrap_or(0);
            (l < p.opened || c < p.closed).then(|| {
                json!({"index": k, "pid": p.pid, "proto": p.proto, "opened": p.opened,
                       "closed": p.closed, "listens_seen": l, "closes_seen": c})
            })
        })
        .take(20)
        .collect();
    let summary = i.stream.summary.as_ref();
    let field = |k: &str| summary.and_then(|s| s[k].as_u64()).unwrap_or(0);
    let (lost, malformed) = (field("lost"), field("malformed"));
    let missing = (made_listens + made_closes).saturating_sub(seen_listens + seen_closes);
    let tcp_procs = i.churned.iter().filter(|p| p.proto == "tcp").count();
    checks.push((
        format!(
            "guard stopped cleanly with a summary line (exit ok: {}, summary: {})",
            i.exit_ok,
            summary.is_some()
        ),
        i.exit_ok && summary.is_some(),
    ));
    checks.push((
        format!("no churn pid has more events than it made ({over_pids} pids over)"),
        over_pids == 0,
    ));
    checks.push((
        format!(
            "nothing lost silently: {missing} churn events missing <= {lost} lost + {malformed} \
             malformed counted by the guard"
        ),
        summary.is_some() && missing <= lost + malformed,
    ));
    checks.push((
        format!(
            "every loss announced: lost lines sum {} = summary lost {lost}",
            i.stream.lost_announced
        ),
        i.stream.lost_announced == lost,
    ));
    checks.push((
        format!(
            "the stream is JSON Lines ({} unparsable lines)",
            i.stream.unparsable
        ),
        i.stream.unparsable == 0,
    ));

    // Policy.
    let flips_made = i.flips.allow + i.flips.deny;
    checks.push((
        format!(
            "every flip succeeded and was announced: {flips_made} made, {} failed, {} policy \
             events for tcp/{TCP_FLIP}",
            i.flips.failed, i.stream.policy_flip
        ),
        flips_made > 0 && i.flips.failed == 0 && i.stream.policy_flip == flips_made,
    ));

    // Traffic.
    let p = i.probes;
    let srv = |c: &AtomicU64| c.load(Ordering::Relaxed);
    checks.push((
        format!(
            "permitted tcp/{TCP_OPEN}: {} of {} connections answered",
            p.tcp_open.answered, p.tcp_open.attempts
        ),
        p.tcp_open.attempts > 0 && p.tcp_open.answered == p.tcp_open.attempts,
    ));
    checks.push((
        format!(
            "permitted udp/{UDP_OPEN}: {} of {} datagrams echoed",
            p.udp_open.answered, p.udp_open.attempts
        ),
        p.udp_open.attempts > 0 && p.udp_open.answered == p.udp_open.attempts,
    ));
    checks.push((
        format!(
            "denied tcp/{TCP_DENIED}: {} of {} SYNs got through, server accepted {}",
            p.tcp_denied.through(),
            p.tcp_denied.attempts,
            srv(&i.servers.tcp_denied)
        ),
        p.tcp_denied.attempts > 0 && p.tcp_denied.through() == 0 && srv(&i.servers.tcp_denied) == 0,
    ));
    checks.push((
        format!(
            "denied udp/{UDP_DENIED}: {} of {} datagrams reached the server ({} echoes back)",
            srv(&i.servers.udp_denied),
            p.udp_denied.attempts,
            p.udp_denied.answered
        ),
        p.udp_denied.attempts > 0 && srv(&i.servers.udp_denied) == 0 && p.udp_denied.answered == 0,
    ));
    checks.push((
        format!(
            "flipped tcp/{TCP_FLIP} sees both verdicts: {} answered, {} dropped of {}",
            p.tcp_flip.answered, p.tcp_flip.timed_out, p.tcp_flip.attempts
        ),
        p.tcp_flip.answered > 0 && p.tcp_flip.timed_out > 0,
    ));

    let all_ok = checks.iter().all(|(_, ok)| *ok);
    let minutes = i.duration.as_secs_f64() / 60.0;
    let load: Vec<f64> = i.samples.iter().map(|s| s.load1).collect();
    let load_mean = if load.is_empty() {
        0.0
    } else {
        load.iter().sum::<f64>() / load.len() as f64
    };
    let m = machine();
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let events_total = field("events");

    let mut md = String::from("# portwatch soak\n\n");
    let _ = writeln!(
        md,
        "{date}: {minutes:.0} min ({:.0} s) on {} ({} cores), Linux {}; machine load average \
         (1 min) {load_mean:.1} on average over the run (the machine was shared).\n",
        i.elapsed,
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "Result: **{}**\n",
        if all_ok { "passed" } else { "FAILED" }
    );
    let _ = writeln!(md, "| check | result |\n|---|---|");
    for (what, ok) in &checks {
        let _ = writeln!(md, "| {what} | {} |", if *ok { "ok" } else { "FAILED" });
    }
    let _ = writeln!(
        md,
        "\n## Guard memory and CPU\n\n\
         | RSS at {:.0} s (start, after warm-up) | RSS at end | max | slope after warm-up | \
         VmHWM at end | RSS at first sample | guard CPU over the run |\n\
         |---|---|---|---|---|---|---|\n\
         | {:.1} MiB | {:.1} MiB | {:.1} MiB | {slope:+.1} KiB/min | {:.1} MiB | {:.1} MiB | \
         {:.2} s ({:.2}% of one core) |\n",
        start.map_or(0.0, |s| s.t),
        start_kib / 1024.0,
        end_kib / 1024.0,
        max_kib / 1024.0,
        hwm_kib / 1024.0,
        first.map_or(0.0, |s| s.rss_kib / 1024.0),
        i.guard_cpu,
        100.0 * i.guard_cpu / i.elapsed.max(1.0),
    );
    let _ = writeln!(
        md,
        "| t (s) | RSS (MiB) | guard CPU (s) | load (1 min) |\n|---|---|---|---|"
    );
    for s in i.samples {
        let _ = writeln!(
            md,
            "| {:.0} | {:.2} | {:.2} | {:.1} |",
            s.t,
            s.rss_kib / 1024.0,
            s.cpu_s - i.samples.first().map_or(0.0, |f| f.cpu_s),
            s.load1
        );
    }
    let _ = writeln!(
        md,
        "\n## Events\n\n\
         | | made (fixture's counts) | seen in the guard's stream |\n|---|---|---|\n\
         | churn processes | {} ({tcp_procs} TCP, {} UDP) | |\n\
         | listens | {made_listens} | {seen_listens} |\n\
         | closes | {made_closes} | {seen_closes} |\n\
         | policy changes of tcp/{TCP_FLIP} | {flips_made} ({} allow, {} deny; {} failed) | {} |\n\n\
         The guard's summary: {events_total} events, {lost} lost, {malformed} malformed, {} drops \
         reported, {} suppressed; {} stream lines in all. Churn events without a namespace (read \
         after the fixture exited, so no /proc details): {}; of a churn pid in another \
         namespace: {}; fixtures with fewer events seen than made: {}.\n",
        i.churned.len(),
        i.churned.len() - tcp_procs,
        i.flips.allow,
        i.flips.deny,
        i.flips.failed,
        i.stream.policy_flip,
        field("drops"),
        field("suppressed"),
        i.stream.lines,
        i.stream.without_netns,
        i.stream.elsewhere,
        short.len(),
    );
    let _ = writeln!(
        md,
        "## Traffic (client namespace → server veth)\n\n\
         | probe | verdict wanted | attempts | answered | connected, no answer | refused | \
         timed out | other errors | reached the server |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (name, want, t, server) in [
        (
            format!("tcp/{TCP_OPEN}"),
            "pass",
            &p.tcp_open,
            &i.servers.tcp_open,
        ),
        (
            format!("udp/{UDP_OPEN}"),
            "pass",
            &p.udp_open,
            &i.servers.udp_open,
        ),
        (
            format!("tcp/{TCP_DENIED}"),
            "drop",
            &p.tcp_denied,
            &i.servers.tcp_denied,
        ),
        (
            format!("udp/{UDP_DENIED}"),
            "drop",
            &p.udp_denied,
            &i.servers.udp_denied,
        ),
        (
            format!("tcp/{TCP_FLIP}"),
            "flips",
            &p.tcp_flip,
            &i.servers.tcp_flip,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {want} | {} | {} | {} | {} | {} | {} | {} |",
            t.attempts,
            t.answered,
            t.connected,
            t.refused,
            t.timed_out,
            t.other,
            srv(server)
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: a lab of two namespaces and a veth pair; `portwatch guard --json` (enforce, \
         native XDP, policy {ALLOW:?}) on the server veth with its own pin directory, control \
         socket and policy file. Churn: one `tests/fixtures/listeners.py --churn {CHURN_PER_PROC} \
         tcp|udp` process a second (TCP and UDP in turn) in the server namespace, each reporting \
         its pid and the listeners it opened and closed; its events are the live listen/close \
         lines with that pid and the server namespace's inode, or no namespace (comm python3): \
         portwatch reads the namespace from /proc, too late for a fixture that already exited. Flips: `portwatch allow|deny \
         tcp/{TCP_FLIP} --socket ...` in turn every {} ms. Traffic: at most 20 probes a second of \
         each kind from the client namespace (TCP connects waiting {} ms for a handshake on \
         dropped ports and {} s for the answer on permitted ones; UDP datagrams, echoed on the \
         permitted port). Memory: VmRSS of the guard every {} s; start = the first sample at or \
         after {} s; flat = end ≤ start + max({} MiB, {:.0}% of start); slope = least squares \
         over the samples from the start on.",
        FLIP_EVERY.as_millis(),
        DROP_WAIT.as_millis(),
        ANSWER_WAIT.as_secs(),
        SAMPLE_EVERY.as_secs(),
        WARM_UP.as_secs(),
        RSS_BOUND_KIB / 1024.0,
        RSS_BOUND_FRACTION * 100.0,
    );

    let samples_json: Vec<Value> = i
        .samples
        .iter()
        .map(|s| json!({"t_s": s.t, "rss_kib": s.rss_kib, "hwm_kib": s.hwm_kib, "cpu_s": s.cpu_s, "load1": s.load1}))
        .collect();
    let mut drops: Vec<(u64, u64)> = i.stream.drops.iter().map(|(k, v)| (*k, *v)).collect();
    drops.sort_unstable();
    let json = json!({
        "date": date,
        "machine": m,
        "minutes": minutes,
        "elapsed_s": i.elapsed,
        "load1_mean": load_mean,
        "passed": all_ok,
        "checks": checks.iter().map(|(what, ok)| json!({"check": what, "ok": ok})).collect::<Vec<_>>(),
        "rss": {
            "warm_up_s": WARM_UP.as_secs(),
            "start_t_s": start.map(|s| s.t),
            "start_kib": start_kib,
            "end_kib": end_kib,
            "max_kib": max_kib,
            "hwm_end_kib": hwm_kib,
            "first_sample_kib": first.map(|s| s.rss_kib),
            "slope_kib_per_min": slope,
            "bound_kib": bound_kib,
            "growth_kib": growth,
        },
        "guard_cpu_s": i.guard_cpu,
        "samples": samples_json,
        "events": {
            "churn_processes": i.churned.len(),
            "churn_tcp_processes": tcp_procs,
            "listens_made": made_listens,
            "listens_seen": seen_listens,
            "closes_made": made_closes,
            "closes_seen": seen_closes,
            "missing": missing,
            "pids_with_more_seen_than_made": over_pids,
            "pids_with_fewer_seen_than_made": short,
            "seen_without_netns": i.stream.without_netns,
            "churn_pid_in_other_netns": i.stream.elsewhere,
            "lost_announced": i.stream.lost_announced,
            "suppressed_announced": i.stream.suppressed_announced,
            "summary": summary,
            "stream_lines": i.stream.lines,
            "unparsable_lines": i.stream.unparsable,
        },
        "policy": {
            "flips_allow": i.flips.allow,
            "flips_deny": i.flips.deny,
            "flips_failed": i.flips.failed,
            "failure_example": i.flips.failure_example,
            "policy_events_flip_port": i.stream.policy_flip,
            "policy_events_other": i.stream.policy_other,
        },
        "traffic": {
            "tcp_open": p.tcp_open.json(),
            "udp_open": p.udp_open.json(),
            "tcp_denied": p.tcp_denied.json(),
            "udp_denied": p.udp_denied.json(),
            "tcp_flip": p.tcp_flip.json(),
            "server_received": {
                "tcp_open": srv(&i.servers.tcp_open),
                "udp_open": srv(&i.servers.udp_open),
                "tcp_denied": srv(&i.servers.tcp_denied),
                "udp_denied": srv(&i.servers.udp_denied),
                "tcp_flip": srv(&i.servers.tcp_flip),
            },
            "drop_reports_by_port": drops.iter().map(|(port, n)| json!({"port": port, "reports": n})).collect::<Vec<_>>(),
        },
    });
    Report {
        json,
        markdown: md,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_kib_per_minute() {
        let at = |t: f64, rss: f64| Sample {
            t,
            rss_kib: rss,
            hwm_kib: rss,
            cpu_s: 0.0,
            load1: 0.0,
        };
        // +60 KiB every 30 s: 120 KiB/min.
        let s = [at(30.0, 1000.0), at(60.0, 1060.0), at(90.0, 1120.0)];
        assert!((slope_kib_per_min(&s) - 120.0).abs() < 1e-9);
        assert_eq!(slope_kib_per_min(&s[..1]), 0.0);
        let flat = [at(30.0, 5.0), at(40.0, 5.0)];
        assert_eq!(slope_kib_per_min(&flat), 0.0);
    }
}
