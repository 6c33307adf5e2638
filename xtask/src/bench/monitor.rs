//! The monitor: a burst of listeners from several processes (in a namespace
//! of the bench's own) watched by `portwatch watch --json --no-snapshot`,
//! then by a bpftrace one-liner on the same tracepoint; and the start-up
//! snapshot with the listeners open, against `ss -ltnp`.
//!
//! Latency is from the realtime clock each listener process reads just
//! before its `listen()` to the realtime clock when the bench read the event
//! line from the watcher's stdout.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Write as _,
    path::PathBuf,
    process::{ChildStdin, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use portwatch_lab::{
    ChildGuard, Guard, Lab, Lines, Netns, TempDir, line_reader, require_tools, run_bounded,
    wait_line,
};
use serde_json::{Value, json};

use super::{
    Ctx, Section,
    stats::{column, median, quantile, spread, stats_json, verdict},
};
use crate::procstat::proc_run_seconds;

/// Binds `n` TCP sockets (raising RLIMIT_NOFILE first), says "bound", and on
/// "go" calls listen() on each, noting CLOCK_REALTIME just before; writes
/// "port ns" lines to the file, says "done", and holds the sockets until
/// its stdin says anything more (or closes).
const LISTENER: &str = r#"
import resource, socket, sys, time
n, addr, base, out = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
udp = sys.argv[5:] == ["udp"]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = n + 64
if soft < want:
    if hard != resource.RLIM_INFINITY and hard < want:
        hard = want
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.bind((addr, base + i))
    socks.append(s)
print("bound", flush=True)
if udp:
    sys.stdin.readline()
    sys.exit(0)
sys.stdin.readline()
clock, rt = time.clock_gettime_ns, time.CLOCK_REALTIME
stamps = [0] * n
for i, s in enumerate(socks):
    stamps[i] = clock(rt)
    s.listen(8)
with open(out, "w") as f:
    f.write("\n".join(f"{base + i} {t}" for i, t in enumerate(stamps)))
print("done", flush=True)
sys.stdin.readline()
"#;

/// The bpftrace baseline: the same tracepoint portwatch uses, into LISTEN.
const BPFTRACE: &str = r#"tracepoint:sock:inet_sock_set_state /args->newstate == 10/ { printf("%d %d\n", args->sport, pid); }"#;

/// Listener processes in `ns`, `per` sockets each on 127.0.0.1, ports from
/// `FIRST_PORT` on. Killed on drop if still running.
struct Listeners {
    procs: Vec<(ChildGuard, ChildStdin, Lines)>,
    files: Vec<PathBuf>,
}

const FIRST_PORT: u16 = 10_000;

impl Listeners {
    fn spawn(ns: &Netns, dir: &TempDir, procs: u16, per: u16, tag: &str) -> Result<Self> {
        Self::spawn_proto(ns, dir, procs, per, tag, "tcp")
    }

    /// TCP sockets that listen at `go`, or UDP ones (`proto` "udp"), bound
    /// at once.
    fn spawn_proto(
        ns: &Netns,
        dir: &TempDir,
        procs: u16,
        per: u16,
        tag: &str,
        proto: &str,
    ) -> Result<Self> {
        let mut me = Self {
            procs: Vec::new(),
            files: Vec::new(),
        };
        for k in 0..procs {
            let file = dir.join(format!("{tag}-{k}.stamps"));
            let base = FIRST_PORT + k * per;
            let mut cmd = ns.command("python3");
            // From a file: the command line portwatch reports stays short,
            // as a real server's is.
            cmd.arg(dir.join("listener.py"))
                .args([&per.to_string(), "127.0.0.1", &base.to_string()])
                .arg(&file)
                .arg(proto)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut proc = ChildGuard::spawn(&mut cmd)?;
            let stdin = proc.0.stdin.take().context("no stdin pipe")?;
            let lines = line_reader(proc.0.stdout.take().context("no stdout pipe")?);
            me.procs.push((proc, stdin, lines));
            me.files.push(file);
        }
        for (_, _, lines) in &me.procs {
            wait_line(lines, Duration::from_secs(60), |l| l == "bound")
                .context("a listener process did not bind its sockets")?;
        }
        Ok(me)
    }

    /// Starts the burst in every process.
    fn go(&mut self) -> Result<()> {
        for (_, stdin, _) in &mut self.procs {
            stdin.write_all(b"go\n")?;
            stdin.flush()?;
        }
        Ok(())
    }

    fn wait_done(&self) -> Result<()> {
        for (_, _, lines) in &self.procs {
            wait_line(lines, Duration::from_secs(60), |l| l == "done")
                .context("a listener process did not finish its burst")?;
        }
        Ok(())
    }

    /// Seconds from the first listen() of the burst to the last (any
    /// process): the burst itself, which the hooks slow down.
    fn listen_span(stamps: &HashMap<u16, i128>) -> f64 {
        let first = stamps.values().copied().min().unwrap_or(0);
        let last = stamps.values().copied().max().unwrap_or(0);
        (last - first) as f64 / 1e9
    }

    /// port → realtime ns just before its listen().
    fn stamps(&self) -> Result<HashMap<u16, i128>> {
        let mut map = HashMap::new();
        for file in &self.files {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            for line in text.lines() {
                let (port, ns) = line.split_once(' ').context("bad stamp line")?;
                map.insert(port.parse()?, ns.parse()?);
            }
        }
        Ok(map)
    }

    /// Lets the processes close their sockets and exit.
    fn release(mut self) -> Result<()> {
        for (_, stdin, _) in &mut self.procs {
            let _ = stdin.write_all(b"exit\n");
        }
        for (proc, _, _) in &mut self.procs {
            proc.wait_within(Duration::from_secs(30))?;
        }
        Ok(())
    }
}

fn epoch_ns(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Reads event lines until every port in `stamps` was seen (or nothing came
/// for 3 s, or 60 s passed). `port_of` picks the port out of a line that is
/// a burst event. Latencies in µs, one per port, first sighting; and when
/// the last of them was read (epoch ns).
fn collect(
    lines: &Lines,
    stamps: &HashMap<u16, i128>,
    mut port_of: impl FnMut(&str) -> Option<u16>,
    other: &mut Vec<String>,
) -> (Vec<f64>, i128) {
    let mut seen: HashMap<u16, f64> = HashMap::new();
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < stamps.len() && Instant::now() < deadline {
        let Ok((at, line)) = lines.recv_timeout(Duration::from_secs(3)) else {
            break;
        };
        match port_of(&line) {
            Some(port) => {
                if let Some(stamp) = stamps.get(&port) {
                    let at = epoch_ns(at);
                    last = last.max(at);
                    seen.entry(port).or_insert((at - stamp) as f64 / 1e3);
                }
            }
            None => other.push(line),
        }
    }
    (seen.into_values().collect(), last)
}

/// What a watcher made of one burst.
struct Watched {
    /// Listen→read latencies, µs, one per port seen.
    lat_us: Vec<f64>,
    /// The watcher's lines that were not burst events.
    other: Vec<String>,
    /// The watcher's CPU time over the burst.
    cpu_s: f64,
    /// First listen() to last.
    listen_s: f64,
    /// First listen() to the last event read: when the watcher had told
    /// everything.
    done_s: f64,
}

/// Starts the burst of `listeners` under a watcher (pid `watcher`, its
/// output on `lines`) and reads its events; `port_of` picks the port out
/// of a line that is a burst event.
fn watch(
    listeners: &mut Listeners,
    watcher: u32,
    lines: &Lines,
    port_of: impl FnMut(&str) -> Option<u16>,
) -> Result<Watched> {
    let cpu0 = proc_run_seconds(watcher)?;
    listeners.go()?;
    listeners.wait_done()?;
    let stamps = listeners.stamps()?;
    let listen_s = Listeners::listen_span(&stamps);
    let first = stamps.values().copied().min().unwrap_or(0);
    let mut other = Vec::new();
    let (lat_us, last_read) = collect(lines, &stamps, port_of, &mut other);
    let cpu1 = proc_run_seconds(watcher)?;
    Ok(Watched {
        lat_us,
        other,
        cpu_s: cpu1 - cpu0,
        listen_s,
        done_s: (last_read - first) as f64 / 1e9,
    })
}

struct Burst {
    delivered: usize,
    /// Events the watcher said it lost (or, following a guard, missed).
    lost: u64,
    lat_us: Vec<f64>,
    /// Following a guard: the same events' latencies on the guard's own
    /// stream (its stdout), where the follower's part begins.
    upstream_lat_us: Vec<f64>,
    cpu_s: f64,
    listen_s: f64,
    done_s: f64,
}

impl Burst {
    fn new(watched: Watched, lost: u64) -> Self {
        Self {
            delivered: watched.lat_us.len(),
            lost,
            lat_us: watched.lat_us,
            upstream_lat_us: Vec::new(),
            cpu_s: watched.cpu_s,
            listen_s: watched.listen_s,
            done_s: watched.done_s,
        }
    }
}

fn summarise(lat: &[f64]) -> (f64, f64, f64) {
    (
        median(lat),
        quantile(lat, 0.99),
        lat.iter().copied().fold(0.0, f64::max),
    )
}

/// The same burst with no watcher: seconds from the first listen() to the
/// last, the baseline for what the hooks add to each listen().
fn bare_burst(ns: &Netns, dir: &TempDir, procs: u16, per: u16) -> Result<f64> {
    let mut listeners = Listeners::spawn(ns, dir, procs, per, "bare")?;
    listeners.go()?;
    listeners.wait_done()?;
    let span = Listeners::listen_span(&listeners.stamps()?);
    listeners.release()?;
    Ok(span)
}

/// One burst under `portwatch watch --json --no-snapshot`.
fn portwatch_burst(ctx: &Ctx, ns: &Netns, dir: &TempDir, procs: u16, per: u16) -> Result<Burst> {
    let inode = ns.inode()?;
    let listeners = Listeners::spawn(ns, dir, procs, per, "pw")?;
    let (mut pw, lines, _) = start_watch(ctx, &["--no-snapshot", "--local"], 30)?;
    let mut listeners = listeners;
    let mut watched = watch(&mut listeners, pw.pid(), &lines, |line| {
        live_listen_port(line, inode)
    })?;
    ensure!(
        pw.interrupt(Duration::from_secs(10)).is_some(),
        "portwatch watch did not stop on SIGINT"
    );
    // The rest of its output, up to the summary.
    while let Ok((_, line)) = lines.recv_timeout(Duration::from_secs(5)) {
        watched.other.push(line);
    }
    let summary: Value = watched
        .other
        .iter()
        .rev()
        .find(|l| l.contains("\"event\":\"summary\""))
        .and_then(|l| serde_json::from_str(l).ok())
        .context("no summary line from portwatch watch")?;
    let lost = summary["lost"].as_u64().context("no lost in the summary")?;
    listeners.release()?;
    Ok(Burst::new(watched, lost))
}

/// The same burst under `portwatch watch --json` following a guard's
/// stream. The guard runs on the lab's veth and the listeners open in its
/// namespace, as a server's do on the host it guards: each new port is
/// one the guard may give a counter of its own. CPU is the guard's and
/// the follower's together: the follower's events cost both.
fn follower_burst(ctx: &Ctx, dir: &TempDir, procs: u16, per: u16) -> Result<Burst> {
    let lab = Lab::new()?;
    let inode = lab.server.inode()?;
    let guard = Guard::start(
        &ctx.portwatch,
        &lab.server,
        &lab.server_if,
        &["tcp/22"],
        &[],
    )?;
    let listeners = Listeners::spawn(&lab.server, dir, procs, per, "fw")?;
    let socket = guard.socket();
    let (mut pw, lines, _) = start_watch(ctx, &["--socket", &socket.to_string_lossy()], 30)
        .context("portwatch watch did not follow the guard")?;
    let guard_cpu0 = proc_run_seconds(guard.pid())?;
    let mut listeners = listeners;
    let mut watched = watch(&mut listeners, pw.pid(), &lines, |line| {
        live_listen_port(line, inode)
    })?;
    watched.cpu_s += proc_run_seconds(guard.pid())? - guard_cpu0;
    // The guard's own lines of the same events, read meanwhile on their
    // own thread.
    let (upstream_lat_us, _) = collect(
        &guard.lines,
        &listeners.stamps()?,
        |line| live_listen_port(line, inode),
        &mut Vec::new(),
    );
    ensure!(
        pw.interrupt(Duration::from_secs(10)).is_some(),
        "portwatch watch did not stop on SIGINT"
    );
    while let Ok((_, line)) = lines.recv_timeout(Duration::from_secs(1)) {
        watched.other.push(line);
    }
    // What the guard could not queue for it, as it was told.
    let missed = watched
        .other
        .iter()
        .filter(|l| l.contains("\"event\":\"missed\"") || l.contains("\"event\":\"lost\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["count"].as_u64())
        .sum();
    listeners.release()?;
    drop(guard);
    Ok(Burst {
        upstream_lat_us,
        ..Burst::new(watched, missed)
    })
}

/// The port of a live TCP listen in namespace `inode`, from a JSON line.
fn live_listen_port(line: &str, inode: u64) -> Option<u16> {
    if !line.contains("\"event\":\"listen\"") {
        return None;
    }
    let v: Value = serde_json::from_str(line).ok()?;
    (v["netns"] == inode && v["origin"] == "live" && v["proto"] == "tcp")
        .then(|| v["port"].as_u64().and_then(|p| u16::try_from(p).ok()))
        .flatten()
}

/// The same burst under bpftrace.
fn bpftrace_burst(ns: &Netns, dir: &TempDir, procs: u16, per: u16) -> Result<Burst> {
    let listeners = Listeners::spawn(ns, dir, procs, per, "bt")?;
    let err = std::fs::File::create(dir.join("bpftrace.err"))?;
    let mut cmd = Command::new("bpftrace");
    cmd.args(["-B", "line", "-e", BPFTRACE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err);
    let mut bt = ChildGuard::spawn(&mut cmd)?;
    let lines = line_reader(bt.0.stdout.take().context("no stdout pipe")?);
    if let Err(e) = wait_line(&lines, Duration::from_secs(60), |l| {
        l.starts_with("Attaching")
    }) {
        let err = std::fs::read_to_string(dir.join("bpftrace.err")).unwrap_or_default();
        bail!("bpftrace did not attach: {e:#}\n{err}");
    }
    // "Attaching" comes just before the attach itself.
    std::thread::sleep(Duration::from_millis(500));
    let mut listeners = listeners;
    let mut watched = watch(&mut listeners, bt.pid(), &lines, |line| {
        let mut words = line.split_whitespace();
        let port = words.next()?.parse().ok()?;
        words.next()?.parse::<u32>().ok()?;
        Some(port)
    })?;
    bt.interrupt(Duration::from_secs(10));
    while let Ok((_, line)) = lines.recv_timeout(Duration::from_secs(2)) {
        watched.other.push(line);
    }
    // "Lost N events" when its perf buffer overflowed.
    let err = std::fs::read_to_string(dir.join("bpftrace.err")).unwrap_or_default();
    let lost = watched
        .other
        .iter()
        .map(String::as_str)
        .chain(err.lines())
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("Lost ")?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    listeners.release()?;
    Ok(Burst::new(watched, lost))
}

/// Closes of listeners `portwatch watch` found at start: how many of
/// them it reported, in how long from the moment they began to close, at
/// what CPU.
struct FoundCloses {
    delivered: usize,
    seconds: f64,
    cpu_s: f64,
}

/// `procs` × `per` `proto` listeners open before `portwatch watch --json`
/// starts (its snapshot has them), then all closed at once: the tracepoint
/// names TCP sockets by kernel address, sock_diag by cookie, and the UDP
/// release hook knows only binds it saw or was handed.
fn found_closes(
    ctx: &Ctx,
    ns: &Netns,
    dir: &TempDir,
    (procs, per): (u16, u16),
    proto: &str,
) -> Result<FoundCloses> {
    let inode = ns.inode()?;
    let mut held = Listeners::spawn_proto(ns, dir, procs, per, "found", proto)?;
    if proto == "tcp" {
        held.go()?;
        held.wait_done()?;
    }
    let (mut pw, lines, _) = start_watch(ctx, &["--local"], 120)?;
    let total = usize::from(procs) * usize::from(per);
    let cpu0 = proc_run_seconds(pw.pid())?;
    let t0 = Instant::now();
    held.release()?;
    let mut seen = std::collections::HashSet::new();
    let mut last = t0;
    let deadline = t0 + Duration::from_secs(60);
    while seen.len() < total && Instant::now() < deadline {
        let Ok((_, line)) = lines.recv_timeout(Duration::from_secs(3)) else {
            break;
        };
        if !line.contains("\"event\":\"close\"") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let port = v["port"].as_u64().and_then(|p| u16::try_from(p).ok());
        if v["netns"] == inode
            && v["proto"] == proto
            && let Some(port) = port
            && seen.insert(port)
        {
            last = Instant::now();
        }
    }
    let cpu_s = proc_run_seconds(pw.pid())? - cpu0;
    pw.interrupt(Duration::from_secs(10));
    Ok(FoundCloses {
        delivered: seen.len(),
        seconds: (last - t0).as_secs_f64(),
        cpu_s,
    })
}

fn found_json(fs: &[FoundCloses]) -> Value {
    let col = |f: fn(&FoundCloses) -> f64| stats_json(&fs.iter().map(f).collect::<Vec<_>>());
    json!({
        "reported": col(|f| f.delivered as f64),
        "seconds": col(|f| f.seconds),
        "cpu_seconds": col(|f| f.cpu_s),
    })
}

/// `portwatch watch --json ARGS`, once it said `ready` (within `wait_s`):
/// the process, its lines, and the ready line.
fn start_watch(ctx: &Ctx, args: &[&str], wait_s: u64) -> Result<(ChildGuard, Lines, String)> {
    let mut cmd = Command::new(&ctx.portwatch);
    cmd.args(["watch", "--json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut pw = ChildGuard::spawn(&mut cmd)?;
    let lines = line_reader(pw.0.stdout.take().context("no stdout pipe")?);
    let (_, ready) = wait_line(&lines, Duration::from_secs(wait_s), |l| {
        l.contains("\"event\":\"ready\"")
    })
    .context("portwatch watch did not get ready")?;
    Ok((pw, lines, ready))
}

/// Seconds from starting `portwatch watch --json` to its ready line (the
/// snapshot, with owners, is out by then), and the snapshot's size.
fn portwatch_snapshot(ctx: &Ctx) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let (mut pw, _lines, ready) = start_watch(ctx, &["--local"], 120)?;
    let took = t0.elapsed().as_secs_f64();
    pw.interrupt(Duration::from_secs(10));
    let v: Value = serde_json::from_str(&ready).context("parsing the ready line")?;
    Ok((took, v["snapshot"].as_u64().unwrap_or(0)))
}

/// Seconds `ss -ltnp` takes in `ns` (output read through a pipe), and its
/// line count.
fn ss_snapshot(ns: &Netns) -> Result<(f64, u64)> {
    let t0 = Instant::now();
    let out = run_bounded(
        ns.nsenter("ss").arg("-Hltnp"),
        None,
        Duration::from_secs(120),
        None,
    )?;
    let took = t0.elapsed().as_secs_f64();
    ensure!(out.success(), "ss -ltnp failed ({})", out.describe());
    Ok((took, out.stdout.matches('\n').count() as u64))
}

/// What the guard holds per listener: its RSS before and after `procs` ×
/// `per` listeners open in its namespace, and what `status --json` costs
/// then.
struct GuardMemory {
    before_mb: f64,
    after_mb: f64,
    status_bytes: usize,
    status_s: f64,
    /// The control socket's answer to `{"cmd":"status","lines":true}`, read
    /// raw: its lines, the longest, and when the first listener came.
    wire: WireStatus,
}

struct WireStatus {
    lines: usize,
    longest: usize,
    first_listener_s: f64,
}

/// Asks for the status as lines, as `status` and `top` do, and measures
/// what comes back.
fn wire_status(socket: &std::path::Path) -> Result<WireStatus> {
    use std::io::{BufRead as _, BufReader};
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let t = Instant::now();
    (&stream).write_all(b"{\"cmd\":\"status\",\"lines\":true}\n")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reader = BufReader::new(stream);
    let (mut lines, mut longest, mut first_listener_s) = (0, 0, 0.0);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line)? > 0 {
        lines += 1;
        longest = longest.max(line.len());
        if lines == 2 {
            first_listener_s = t.elapsed().as_secs_f64();
        }
        line.clear();
    }
    Ok(WireStatus {
        lines,
        longest,
        first_listener_s,
    })
}

/// Target: the guard's RSS grows by ≤ 300 bytes per listener.
const MAX_BYTES_PER_LISTENER: f64 = 300.0;

fn guard_memory(ctx: &Ctx, dir: &TempDir, procs: u16, per: u16) -> Result<GuardMemory> {
    let lab = portwatch_lab::Lab::new()?;
    let guard = portwatch_lab::Guard::start(
        &ctx.portwatch,
        &lab.server,
        &lab.server_if,
        &["tcp/22"],
        &[],
    )?;
    let before_mb = crate::procstat::memory_mb(guard.pid())?.0;
    let mut listeners = Listeners::spawn(&lab.server, dir, procs, per, "mem")?;
    listeners.go()?;
    listeners.wait_done()?;
    // Every listen through the guard's stream: then it holds them all.
    let total = usize::from(procs) * usize::from(per);
    let mut seen = 0;
    wait_line(&guard.lines, Duration::from_secs(120), |l| {
        seen +=
            usize::from(l.contains("\"event\":\"listen\"") && l.contains("\"origin\":\"live\""));
        seen >= total
    })
    .with_context(|| format!("the guard reported {seen} of {total} listeners"))?;
    let after_mb = crate::procstat::memory_mb(guard.pid())?.0;
    let t = Instant::now();
    let out = run_bounded(
        Command::new(&ctx.portwatch)
            .args(["status", "--json", "--socket"])
            .arg(guard.socket()),
        None,
        Duration::from_secs(60),
        None,
    )?;
    let status_s = t.elapsed().as_secs_f64();
    let wire = wire_status(&guard.socket())?;
    drop(listeners);
    Ok(GuardMemory {
        before_mb,
        after_mb,
        status_bytes: out.stdout.len(),
        status_s,
        wire,
    })
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let (rounds, procs, per): (usize, u16, u16) = if ctx.quick {
        (1, 3, 2_000)
    } else {
        (3, 3, 15_000)
    };
    let total = usize::from(procs) * usize::from(per);
    require_tools(&["python3", "bpftrace", "ss", "nsenter"])?;
    let ns = Netns::new("m")?;
    let dir = TempDir::new("m")?;
    std::fs::write(dir.join("listener.py"), LISTENER)?;

    let mut pw_bursts = Vec::new();
    let mut fw_bursts = Vec::new();
    let mut bt_bursts = Vec::new();
    let mut bare = Vec::new();
    let mut pw_snap = Vec::new();
    let mut ss_snap = Vec::new();
    let mut found_tcp = Vec::new();
    let mut found_udp = Vec::new();
    let mut sizes = (0, 0);
    for round in 0..rounds {
        bare.push(bare_burst(&ns, &dir, procs, per).context("burst without a watcher")?);
        let b = portwatch_burst(ctx, &ns, &dir, procs, per).context("portwatch burst")?;
        let (m, p99, _) = summarise(&b.lat_us);
        eprintln!(
            "monitor round {}/{rounds}: portwatch {}/{total} events, {} lost, listen→read median {m:.0} µs, p99 {p99:.0} µs, {:.2} s CPU",
            round + 1,
            b.delivered,
            b.lost,
            b.cpu_s
        );
        pw_bursts.push(b);

        let b = follower_burst(ctx, &dir, procs, per).context("follower burst")?;
        let (m, p99, _) = summarise(&b.lat_us);
        let (um, up99, _) = summarise(&b.upstream_lat_us);
        eprintln!(
            "monitor round {}/{rounds}: follower {}/{total} events, {} missed, listen→read median {m:.0} µs, p99 {p99:.0} µs, {:.2} s CPU (the guard's own stream: median {um:.0} µs, p99 {up99:.0} µs, {} events)",
            round + 1,
            b.delivered,
            b.lost,
            b.cpu_s,
            b.upstream_lat_us.len()
        );
        fw_bursts.push(b);

        // The snapshot, with the listeners open, alternating with ss.
        let held = Listeners::spawn(&ns, &dir, procs, per, "snap")?;
        let mut held = held;
        held.go()?;
        held.wait_done()?;
        for first_pw in [round % 2 == 0, round % 2 != 0] {
            if first_pw {
                let (t, n) = portwatch_snapshot(ctx)?;
                pw_snap.push(t);
                sizes.0 = n;
            } else {
                let (t, n) = ss_snapshot(&ns)?;
                ss_snap.push(t);
                sizes.1 = n;
            }
        }
        held.release()?;
        eprintln!(
            "monitor round {}/{rounds}: snapshot portwatch {:.3} s ({} listeners), ss -ltnp {:.3} s ({} lines)",
            round + 1,
            pw_snap.last().copied().unwrap_or(0.0),
            sizes.0,
            ss_snap.last().copied().unwrap_or(0.0),
            sizes.1
        );

        for (proto, into) in [("tcp", &mut found_tcp), ("udp", &mut found_udp)] {
            let f = found_closes(ctx, &ns, &dir, (procs, per), proto)
                .with_context(|| format!("closes of {proto} listeners found at start"))?;
            eprintln!(
                "monitor round {}/{rounds}: {proto} listeners found at start closing: {}/{total} \
                 reported in {:.3} s, {:.2} s CPU",
                round + 1,
                f.delivered,
                f.seconds,
                f.cpu_s
            );
            into.push(f);
        }

        let b = bpftrace_burst(&ns, &dir, procs, per).context("bpftrace burst")?;
        let (m, p99, _) = summarise(&b.lat_us);
        eprintln!(
            "monitor round {}/{rounds}: bpftrace {}/{total} events, {} lost, listen→read median {m:.0} µs, p99 {p99:.0} µs, {:.2} s CPU",
            round + 1,
            b.delivered,
            b.lost,
            b.cpu_s
        );
        bt_bursts.push(b);
    }

    let per_round = |bs: &[Burst], f: fn(&Burst) -> f64| column(bs, f);
    let delivered = |bs: &[Burst]| per_round(bs, |b| b.delivered as f64);
    let lost = |bs: &[Burst]| per_round(bs, |b| b.lost as f64);
    let p50 = |bs: &[Burst]| per_round(bs, |b| median(&b.lat_us));
    let p99 = |bs: &[Burst]| per_round(bs, |b| quantile(&b.lat_us, 0.99));
    let max = |bs: &[Burst]| per_round(bs, |b| b.lat_us.iter().copied().fold(0.0, f64::max));
    let cpu_us = |bs: &[Burst]| per_round(bs, |b| b.cpu_s * 1e6 / (b.delivered.max(1) as f64));
    let listen_s = |bs: &[Burst]| per_round(bs, |b| b.listen_s);
    let done_s = |bs: &[Burst]| per_round(bs, |b| b.done_s);
    // Each process makes `per` listen() calls in the span: wall time per
    // call, net of the same burst without a watcher.
    let per_listen_us = |span: f64| span * 1e6 / f64::from(per);
    let bare_us = per_listen_us(median(&bare));
    let hook_us = |bs: &[Burst]| per_listen_us(median(&listen_s(bs))) - bare_us;

    let pw_all_delivered = pw_bursts.iter().all(|b| b.delivered == total);
    let pw_lost: u64 = pw_bursts.iter().map(|b| b.lost).sum();
    let zero_lost = pw_lost == 0 && pw_all_delivered;
    let pw_p99 = median(&p99(&pw_bursts));
    let bt_p99 = median(&p99(&bt_bursts));
    let p99_met = pw_p99 <= bt_p99;
    let fw_all_delivered = fw_bursts.iter().all(|b| b.delivered == total);
    let fw_missed: u64 = fw_bursts.iter().map(|b| b.lost).sum();
    let fw_complete = fw_all_delivered && fw_missed == 0;
    let fw_p99 = median(&p99(&fw_bursts));
    let fw_p99_met = fw_p99 <= bt_p99;
    let up_p50 = median(&per_round(&fw_bursts, |b| median(&b.upstream_lat_us)));
    let up_p99 = median(&per_round(&fw_bursts, |b| {
        quantile(&b.upstream_lat_us, 0.99)
    }));
    let done_ratio = median(&done_s(&pw_bursts)) / median(&done_s(&bt_bursts));
    let fw_done_ratio = median(&done_s(&fw_bursts)) / median(&done_s(&bt_bursts));
    let span_ratio = median(&listen_s(&pw_bursts)) / median(&listen_s(&bt_bursts));
    let span_met = span_ratio <= 1.0;
    let cpu_ratio = median(&cpu_us(&pw_bursts)) / median(&cpu_us(&bt_bursts));
    let cpu_met = cpu_ratio <= 1.0;
    let fw_cpu_ratio = median(&cpu_us(&fw_bursts)) / median(&cpu_us(&bt_bursts));
    let fw_cpu_met = fw_cpu_ratio <= 1.0;
    let snap_ratio = median(&pw_snap) / median(&ss_snap);
    let snap_met = snap_ratio <= 0.5;

    let mut md = String::from(
        "| watcher | events delivered (of burst) | lost | listen→read p50 µs | p99 µs | max µs | CPU µs/event | first → last listen() s | first listen() → last event read s |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, bs) in [
        ("portwatch watch --json", &pw_bursts),
        (
            "portwatch watch --json following a guard (lost: missed)",
            &fw_bursts,
        ),
        ("bpftrace one-liner", &bt_bursts),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} / {total} | {} | {} | {} | {} | {} | {} | {} |",
            spread(&delivered(bs), 0),
            spread(&lost(bs), 0),
            spread(&p50(bs), 0),
            spread(&p99(bs), 0),
            spread(&max(bs), 0),
            spread(&cpu_us(bs), 2),
            spread(&listen_s(bs), 3),
            spread(&done_s(bs), 3),
        );
    }
    let _ = writeln!(
        md,
        "| no watcher (baseline) | – | – | – | – | – | – | {} | – |",
        spread(&bare, 3)
    );
    let _ = writeln!(
        md,
        "\n| start-up snapshot ({total} listeners open) | seconds: median (min–max) | size |\n|---|---|---|\n\
         | portwatch watch --json (start → ready, with owners; all namespaces, hooks attached) | {} | {} listeners |\n\
         | ss -ltnp (in the listeners' namespace) | {} | {} lines |\n",
        spread(&pw_snap, 3),
        sizes.0,
        spread(&ss_snap, 3),
        sizes.1
    );
    let found_cols = |fs: &[FoundCloses]| {
        let delivered: Vec<f64> = fs.iter().map(|f| f.delivered as f64).collect();
        let seconds: Vec<f64> = fs.iter().map(|f| f.seconds).collect();
        let cpu_us: Vec<f64> = fs
            .iter()
            .map(|f| f.cpu_s * 1e6 / f.delivered.max(1) as f64)
            .collect();
        (delivered, seconds, cpu_us)
    };
    let _ = writeln!(
        md,
        "\n| listeners found at start, then all closed ({total}) | closes reported | seconds to the last | CPU µs/close |\n|---|---|---|---|"
    );
    for (name, fs) in [("TCP", &found_tcp), ("UDP", &found_udp)] {
        let (delivered, seconds, cpu_us) = found_cols(fs);
        let _ = writeln!(
            md,
            "| {name} | {} / {total} | {} | {} |",
            spread(&delivered, 0),
            spread(&seconds, 3),
            spread(&cpu_us, 2)
        );
    }
    let _ = writeln!(
        md,
        "\nListeners found at start: the same processes' sockets (TCP listening, or UDP \
         bound) open before `portwatch watch --json` starts, then the processes exit at once; \
         seconds from their exit to the last close read, CPU the watcher's meanwhile.\n"
    );
    let found_all = found_tcp
        .iter()
        .chain(&found_udp)
        .all(|f| f.delivered == total);
    let _ = writeln!(
        md,
        "Method: {rounds} rounds; each burst is {procs} Python processes × {per} TCP sockets on \
         127.0.0.1 in a namespace of the bench's own, bound beforehand, then listen() in a \
         tight loop, all processes at once. Latency: CLOCK_REALTIME just before each listen() \
         → the realtime clock when the bench read the event's line from the watcher's stdout \
         (p50/p99/max per round; the table shows median (min–max) over rounds). CPU: the \
         time the watcher's threads ran (/proc/PID/task/*/schedstat, to the nanosecond) from \
         the burst's start until all its events were read; for the follower, the guard's and \
         the follower's together. The follower: \
         `portwatch watch --json` following a guard (`tcp/22`, on the lab's veth, started \
         afresh each round; the burst's listeners open in the guard's namespace), which tells \
         it how many events it missed if it cannot keep up. \
         bpftrace: `{BPFTRACE}` (-B line). The hooks' cost per listen(): the \
         wall time per call in the first → last listen() span, less the same burst's with no \
         watcher: portwatch {:.2} µs, bpftrace {:.2} µs (baseline {bare_us:.2} µs per call).\n",
        hook_us(&pw_bursts),
        hook_us(&bt_bursts),
    );
    let _ = writeln!(
        md,
        "- zero events lost in the burst (portwatch): {pw_lost} lost, {} — {}",
        if pw_all_delivered {
            "all delivered"
        } else {
            "some not delivered"
        },
        verdict(zero_lost)
    );
    let _ = writeln!(
        md,
        "- p99 listen→event ≤ bpftrace's (median over rounds): portwatch {pw_p99:.0} µs, bpftrace {bt_p99:.0} µs — {}",
        verdict(p99_met)
    );
    let _ = writeln!(
        md,
        "- a follower of the guard receives every event of the burst: {fw_missed} missed, {} — {}",
        if fw_all_delivered {
            "all delivered"
        } else {
            "some not delivered"
        },
        verdict(fw_complete)
    );
    let _ = writeln!(
        md,
        "- p99 listen→event of the follower ≤ bpftrace's: {fw_p99:.0} µs, bpftrace {bt_p99:.0} µs — {}",
        verdict(fw_p99_met)
    );
    let _ = writeln!(
        md,
        "- for reference, where the follower's latency arises: the same events on the guard's \
         own stream (its stdout, read by the bench meanwhile) p50 {up_p50:.0} µs, p99 \
         {up_p99:.0} µs; the follower's p50 {:.0} µs, p99 {fw_p99:.0} µs",
        median(&per_round(&fw_bursts, |b| median(&b.lat_us)))
    );
    let _ = writeln!(
        md,
        "- for reference, first listen() → last event read against bpftrace's: watch {done_ratio:.2}×, follower {fw_done_ratio:.2}× (bpftrace's hooks slow the burst itself, so each event waits less)"
    );
    let _ = writeln!(
        md,
        "- the burst itself (first → last listen()) no slower than under bpftrace: {span_ratio:.2}× — {}",
        verdict(span_met)
    );
    let _ = writeln!(
        md,
        "- CPU per event ≤ bpftrace's: {cpu_ratio:.2}× — {}",
        verdict(cpu_met)
    );
    let _ = writeln!(
        md,
        "- CPU per event following a guard ≤ bpftrace's (the guard's and the follower's \
         together, the guard's own stream and counters included): {fw_cpu_ratio:.2}× — {}",
        verdict(fw_cpu_met)
    );
    let _ = writeln!(
        md,
        "- snapshot ≤ half the time of ss -ltnp (portwatch / ss): {snap_ratio:.3} — {}",
        verdict(snap_met)
    );
    let _ = writeln!(
        md,
        "- every close of a listener found at start is reported, TCP and UDP (all of them \
         closing at once, `portwatch watch --json` started after they opened): {} — {}",
        if found_all {
            "all reported"
        } else {
            "some not reported"
        },
        verdict(found_all)
    );

    let mem = guard_memory(ctx, &dir, procs, per).context("the guard's memory per listener")?;
    let per_listener = (mem.after_mb - mem.before_mb) * 1024.0 * 1024.0 / total as f64;
    let mem_met = per_listener <= MAX_BYTES_PER_LISTENER;
    let _ = writeln!(
        md,
        "- the guard's RSS per listener ≤ {MAX_BYTES_PER_LISTENER} B ({total} listeners in its \
         namespace, {procs} processes; RSS {:.1} → {:.1} MB): {per_listener:.0} B — {}; \
         `status --json` then: {:.1} MB in {:.2} s",
        mem.before_mb,
        mem.after_mb,
        verdict(mem_met),
        mem.status_bytes as f64 / 1e6,
        mem.status_s
    );
    // A head and at least one line per listener of the burst, none long.
    let streamed = mem.wire.lines > total && mem.wire.longest < 64 << 10;
    let _ = writeln!(
        md,
        "- `status` streams its listeners instead of one line of megabytes: the socket \
         answered {} lines (a head, then one per listener), the longest {} B, the first \
         listener after {:.3} s — {}",
        mem.wire.lines,
        mem.wire.longest,
        mem.wire.first_listener_s,
        verdict(streamed)
    );

    let burst_json = |bs: &[Burst]| {
        json!({
            "delivered": stats_json(&delivered(bs)),
            "lost": stats_json(&lost(bs)),
            "latency_p50_us": stats_json(&p50(bs)),
            "latency_p99_us": stats_json(&p99(bs)),
            "latency_max_us": stats_json(&max(bs)),
            "cpu_us_per_event": stats_json(&cpu_us(bs)),
            "listen_span_seconds": stats_json(&listen_s(bs)),
            "first_listen_to_last_event_seconds": stats_json(&done_s(bs)),
            "hook_us_per_listen": hook_us(bs),
        })
    };
    Ok(Section {
        key: "monitor",
        title: "The monitor",
        json: json!({
            "rounds": rounds,
            "burst_listeners": total,
            "processes": procs,
            "portwatch": burst_json(&pw_bursts),
            "follower": burst_json(&fw_bursts),
            "bpftrace": burst_json(&bt_bursts),
            "no_watcher_listen_span_seconds": stats_json(&bare),
            "found_closes": {
                "tcp": found_json(&found_tcp),
                "udp": found_json(&found_udp),
            },
            "snapshot": {
                "portwatch_seconds": stats_json(&pw_snap),
                "portwatch_listeners": sizes.0,
                "ss_seconds": stats_json(&ss_snap),
                "ss_lines": sizes.1,
            },
            "guard_memory": {
                "listeners": total,
                "rss_before_mb": mem.before_mb,
                "rss_after_mb": mem.after_mb,
                "bytes_per_listener": per_listener,
                "status_json_bytes": mem.status_bytes,
                "status_seconds": mem.status_s,
                "status_wire_lines": mem.wire.lines,
                "status_wire_longest_line": mem.wire.longest,
                "status_first_listener_seconds": mem.wire.first_listener_s,
            },
            "ratios": {
                "snapshot_portwatch_vs_ss": snap_ratio,
                "cpu_per_event_portwatch_vs_bpftrace": cpu_ratio,
                "cpu_per_event_follower_vs_bpftrace": fw_cpu_ratio,
                "listen_span_portwatch_vs_bpftrace": span_ratio,
                "done_portwatch_vs_bpftrace": done_ratio,
                "done_follower_vs_bpftrace": fw_done_ratio,
                "follower_upstream_p50_us": up_p50,
                "follower_upstream_p99_us": up_p99,
            },
            "targets": [
                {"target": "zero events lost", "lost": pw_lost, "all_delivered": pw_all_delivered, "met": zero_lost},
                {"target": "p99 listen→event ≤ bpftrace's", "p99_us": pw_p99, "bpftrace_p99_us": bt_p99, "met": p99_met},
                {"target": "a follower receives every event", "missed": fw_missed, "all_delivered": fw_all_delivered, "met": fw_complete},
                {"target": "follower p99 listen→event ≤ bpftrace's", "p99_us": fw_p99, "bpftrace_p99_us": bt_p99, "met": fw_p99_met},
                {"target": "burst (first → last listen()) ≤ bpftrace's", "ratio": span_ratio, "met": span_met},
                {"target": "CPU per event ≤ bpftrace's", "ratio": cpu_ratio, "met": cpu_met},
                {"target": "follower CPU per event ≤ bpftrace's", "ratio": fw_cpu_ratio, "met": fw_cpu_met},
                {"target": "snapshot ≤ 0.5× ss -ltnp", "ratio": snap_ratio, "met": snap_met},
                {"target": "every close of a listener found at start reported", "met": found_all},
                {"target": "guard RSS ≤ 300 B per listener", "bytes": per_listener, "met": mem_met},
            ],
        }),
        markdown: md,
    })
}
