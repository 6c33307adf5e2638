//! Drop throughput on a veth pair: trafgen in one namespace sends TCP SYNs
//! to a port nothing permits; the other namespace drops them with nothing,
//! nftables (ufw-style default drop with conntrack), iptables raw, xdp-filter,
//! a bare XDP_DROP program, or portwatch's guard (native and generic XDP).
//! Configurations alternate within each round.
//!
//! Also home of what the lab sections share (namespaces, veth pairs, bounded
//! child processes, a running guard, CPU counters): `permitted` and
//! `monitor` use it.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use super::{Ctx, Section, median};
use crate::util;

// ---------------------------------------------------------------------------
// Shared lab machinery
// ---------------------------------------------------------------------------

/// `pwb{tag}{pid}x{n}`: unique to this run (short enough for interface names
/// with a one-letter tag).
pub(super) fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "pwb{tag}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A child process, killed (SIGKILL) and reaped on drop if still running.
pub(crate) struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        Ok(Self(cmd.spawn().with_context(|| {
            format!("could not start `{}`", util::display(cmd))
        })?))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGINT (by pid, only while it is our unreaped child), then waits up to
    /// `limit`; SIGKILL after that. The exit status, if it exited by itself.
    pub fn interrupt(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.0.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-s", "INT", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        None
    }

    /// Waits up to `limit` for it to exit by itself.
    pub fn wait_within(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("pid {} still running after {limit:?}", self.pid());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads `from` to the end on a thread; the bytes arrive on the channel.
fn slurp(mut from: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` (stdin closed, output captured) for at most `limit`; killed
/// and an error after that. Any exit status is returned.
pub(crate) fn output_within(cmd: &mut Command, limit: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Proc::spawn(cmd)?;
    let out = slurp(child.0.stdout.take().context("no stdout pipe")?);
    let err = slurp(child.0.stderr.take().context("no stderr pipe")?);
    let status = child
        .wait_within(limit)
        .with_context(|| format!("`{}` timed out; killed", util::display(cmd)))?;
    // A grandchild could hold the pipes open: don't wait for it for long.
    let wait = Duration::from_secs(2);
    Ok(Output {
        status,
        stdout: out.recv_timeout(wait).unwrap_or_default(),
        stderr: err.recv_timeout(wait).unwrap_or_default(),
    })
}

/// [`output_within`], failing unless it exits 0; its stdout.
pub(super) fn run_within(cmd: &mut Command, limit: Duration) -> Result<String> {
    let out = output_within(cmd, limit)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::display(cmd),
            util::describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program args...`, bounded to 30 s, failing unless it exits 0.
pub(super) fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    run_within(Command::new(program).args(args), Duration::from_secs(30))
}

/// Lines of a child's output as they are read, each with the realtime clock
/// at the moment it was read.
pub(crate) fn line_reader(
    from: impl Read + Send + 'static,
) -> mpsc::Receiver<(SystemTime, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(1 << 16, from);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = SystemTime::now();
                    if tx.send((at, line.trim_end().to_string())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Waits up to `limit` for a line satisfying `want` (earlier lines are
/// consumed).
pub(crate) fn wait_line(
    rx: &mpsc::Receiver<(SystemTime, String)>,
    limit: Duration,
    mut want: impl FnMut(&str) -> bool,
) -> Result<(SystemTime, String)> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) if want(&line) => return Ok((at, line)),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("no such line within {limit:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the output ended first"),
        }
    }
}

/// A directory under /tmp, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("d"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A network namespace made for the bench, deleted on drop.
pub(crate) struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique(tag);
        run_ok("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        run_ok("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NAME program`: the namespace's own /sys, a private
    /// mount namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `nsenter --net=/run/netns/NAME program`: the host's mounts (bpffs
    /// pins outlive the process), this namespace's network.
    pub fn nsenter(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        cmd
    }

    /// The namespace's inode, as portwatch reports it in `netns`.
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(std::fs::metadata(format!("/run/netns/{}", self.name))?.ino())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = output_within(
            Command::new("ip").args(["netns", "del", &self.name]),
            Duration::from_secs(10),
        );
    }
}

/// Two namespaces joined by a veth pair: server `198.18.X.1/24` on
/// `server_if`, client `198.18.X.2/24` on `client_if`, fixed MACs. The
/// veths live and die with the namespaces; `dir` holds files for the run.
pub(crate) struct Lab {
    pub server_if: String,
    pub client_if: String,
    pub server_mac: String,
    pub client_mac: String,
    pub net: u8,
    pub dir: TempDir,
    // Last: the namespaces go after everything that may run in them.
    pub server: Netns,
    pub client: Netns,
}

impl Lab {
    pub fn new() -> Result<Self> {
        let server = Netns::new("s")?;
        let client = Netns::new("c")?;
        let tag = unique("");
        // Addresses never leave the two namespaces; X only keeps labs apart
        // in logs.
        let net = u8::try_from(std::process::id() % 200 + 20).context("lab number")?;
        let lab = Self {
            server_if: format!("{tag}s"),
            client_if: format!("{tag}c"),
            server_mac: format!("02:70:77:00:{net:02x}:01"),
            client_mac: format!("02:70:77:00:{net:02x}:02"),
            net,
            dir: TempDir::new()?,
            server,
            client,
        };
        // Created inside the namespaces: the names never exist on the host.
        run_ok(
            "ip",
            &[
                "link",
                "add",
                &lab.server_if,
                "address",
                &lab.server_mac,
                "netns",
                &lab.server.name,
                "type",
                "veth",
                "peer",
                "name",
                &lab.client_if,
                "address",
                &lab.client_mac,
                "netns",
                &lab.client.name,
            ],
        )?;
        for (ns, iface, ip) in [
            (&lab.server, &lab.server_if, lab.server_ip()),
            (&lab.client, &lab.client_if, lab.client_ip()),
        ] {
            run_ok(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    iface,
                ],
            )?;
            run_ok("ip", &["-n", &ns.name, "link", "set", iface, "up"])?;
        }
        // Static neighbours: no ARP in the measurements.
        for (ns, iface, ip, mac) in [
            (
                &lab.server,
                &lab.server_if,
                lab.client_ip(),
                &lab.client_mac,
            ),
            (
                &lab.client,
                &lab.client_if,
                lab.server_ip(),
                &lab.server_mac,
            ),
        ] {
            run_ok(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    mac,
                    "dev",
                    iface,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(lab)
    }

    pub fn server_ip(&self) -> String {
        format!("198.18.{}.1", self.net)
    }

    pub fn client_ip(&self) -> String {
        format!("198.18.{}.2", self.net)
    }

    /// `ip -n SERVER link show SERVER_IF`.
    pub fn server_link(&self) -> Result<String> {
        run_ok(
            "ip",
            &["-n", &self.server.name, "link", "show", &self.server_if],
        )
    }

    /// The server veth's rx_packets (XDP verdicts included).
    pub fn server_rx_packets(&self) -> Result<u64> {
        let out = run_ok(
            "ip",
            &[
                "-n",
                &self.server.name,
                "-s",
                "-j",
                "link",
                "show",
                &self.server_if,
            ],
        )?;
        let v: Value = serde_json::from_str(&out).context("parsing `ip -j -s link`")?;
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no stats64.rx.packets in `ip -j -s link`")
    }
}

/// The whole machine's busy CPU time so far (all CPUs, everything but idle
/// and iowait), in seconds, from /proc/stat.
pub(super) fn cpu_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // user nice system idle iowait irq softirq steal (guest is within user)
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    ensure!(f.len() == 8, "short cpu line in /proc/stat: {line}");
    Ok((f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) as f64 / USER_HZ)
}

/// The unit of /proc's CPU counters (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// utime + stime of a process so far, in seconds, from /proc/PID/stat.
pub(crate) fn proc_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is 3rd,
    // utime the 14th and stime the 15th of the whole line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        Ok(f.get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("parsing /proc/PID/stat")? as f64
            / USER_HZ)
    };
    Ok(tick(11)? + tick(12)?)
}

/// `median (min–max)` with `digits` decimals.
pub(super) fn spread(xs: &[f64], digits: usize) -> String {
    let (lo, hi) = min_max(xs);
    format!(
        "{:.*} ({:.*}–{:.*})",
        digits,
        median(xs),
        digits,
        lo,
        digits,
        hi
    )
}

pub(super) fn min_max(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() { (0.0, 0.0) } else { (lo, hi) }
}

/// `{median, min, max, samples}` for latest.json.
pub(super) fn stats_json(xs: &[f64]) -> Value {
    let (lo, hi) = min_max(xs);
    json!({"median": median(xs), "min": lo, "max": hi, "samples": xs})
}

/// "met" / "MISSED".
pub(super) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// `portwatch guard` on the lab's server veth, in the server's network
/// namespace and the host's mount namespace, with a pin directory and a
/// control socket of its own. Dropping it stops it (SIGINT; it was started
/// with `--detach-on-exit`), runs `portwatch down` on its pins and socket,
/// and removes both.
pub(crate) struct Guard {
    proc: Proc,
    portwatch: PathBuf,
    pins: PathBuf,
    run_dir: TempDir,
    /// Its JSON Lines (drained continuously, so it never blocks on them).
    pub lines: mpsc::Receiver<(SystemTime, String)>,
}

impl Guard {
    /// `mode`: native or generic; `allow`: the policy's rules.
    pub fn start(ctx: &Ctx, lab: &Lab, mode: &str, allow: &[&str]) -> Result<Self> {
        let run_dir = TempDir::new()?;
        let policy = run_dir.path("policy.toml");
        let rules: Vec<String> = allow.iter().map(|r| format!("\"{r}\"")).collect();
        std::fs::write(
            &policy,
            format!("mode = \"enforce\"\nallow = [{}]\n", rules.join(", ")),
        )?;
        let pins = PathBuf::from("/sys/fs/bpf").join(unique("p"));
        let socket = run_dir.path("control.sock");
        let stderr = std::fs::File::create(run_dir.path("guard.err"))?;
        let mut cmd = lab.server.nsenter(&ctx.portwatch);
        cmd.args(["guard", "--iface", &lab.server_if, "--xdp-mode", mode])
            .arg("--policy")
            .arg(&policy)
            .arg("--pin-dir")
            .arg(&pins)
            .arg("--socket")
            .arg(&socket)
            .args(["--detach-on-exit", "--json"])
            .env_remove("SSH_CONNECTION")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut proc = Proc::spawn(&mut cmd)?;
        let lines = line_reader(proc.0.stdout.take().context("no stdout pipe")?);
        let guard = Self {
            proc,
            portwatch: ctx.portwatch.clone(),
            pins,
            run_dir,
            lines,
        };
        if let Err(e) = wait_line(&guard.lines, Duration::from_secs(30), |l| {
            l.contains("\"event\":\"ready\"")
        }) {
            let err = std::fs::read_to_string(guard.run_dir.path("guard.err")).unwrap_or_default();
            bail!("portwatch guard ({mode}) did not get ready: {e:#}\n{err}");
        }
        // The mode asked for, not a fallback.
        let link = lab.server_link()?;
        let want = if mode == "generic" {
            "xdpgeneric"
        } else {
            "xdp "
        };
        ensure!(
            link.contains(want) && link.contains("xdp_guard"),
            "portwatch guard --xdp-mode {mode}: not attached as asked:\n{link}"
        );
        Ok(guard)
    }
}

impl Guard {
    /// The guard daemon's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its control socket.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.path("control.sock")
    }

    /// Stops it (SIGINT, SIGKILL after `limit`); its exit status if it
    /// exited by itself. Its pins go when it is dropped.
    pub fn stop(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.proc.interrupt(limit)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.proc.interrupt(Duration::from_secs(10));
        let _ = output_within(
            Command::new(&self.portwatch)
                .arg("down")
                .arg("--pin-dir")
                .arg(&self.pins)
                .arg("--socket")
                .arg(self.run_dir.path("control.sock")),
            Duration::from_secs(20),
        );
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

// ---------------------------------------------------------------------------
// The drop benchmark
// ---------------------------------------------------------------------------

/// The destination port of the flood; no configuration permits it.
const FLOOD_PORT: u16 = 9;
/// The port the guard's policy permits (nothing is sent there).
const PERMITTED: &str = "tcp/5201";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    None,
    Nft,
    IptRaw,
    XdpFilter,
    BareDrop,
    PwNative,
    PwGeneric,
}

const CONFIGS: [Config; 7] = [
    Config::None,
    Config::Nft,
    Config::IptRaw,
    Config::XdpFilter,
    Config::BareDrop,
    Config::PwNative,
    Config::PwGeneric,
];

impl Config {
    fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Nft => "nftables_ct",
            Config::IptRaw => "iptables_raw",
            Config::XdpFilter => "xdp_filter_native",
            Config::BareDrop => "bare_xdp_drop",
            Config::PwNative => "portwatch_native",
            Config::PwGeneric => "portwatch_generic",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Config::None => "no filter (closed port, RST)",
            Config::Nft => "nftables default drop + conntrack",
            Config::IptRaw => "iptables raw PREROUTING drop",
            Config::XdpFilter => "xdp-filter (native)",
            Config::BareDrop => "bare XDP_DROP (native)",
            Config::PwNative => "portwatch guard (native XDP)",
            Config::PwGeneric => "portwatch guard (generic XDP)",
        }
    }
}

const LLVM_MC: &str = "/usr/lib/llvm-22/bin/llvm-mc";

/// A two-instruction XDP program (`return ACTION`, frags-capable like
/// portwatch's), assembled at run time with llvm-mc (LLVM 22, which setup
/// installs) into `dir/NAME.o`. `action`: 1 XDP_DROP, 2 XDP_PASS.
pub(super) fn bare_program(dir: &TempDir, name: &str, action: u8) -> Result<PathBuf> {
    let asm = dir.path(&format!("{name}.s"));
    let obj = dir.path(&format!("{name}.o"));
    std::fs::write(
        &asm,
        format!(
            "\t.section xdp.frags,\"ax\",@progbits\n\t.globl {name}\n\t.type {name},@function\n\
             {name}:\n\tr0 = {action}\n\texit\n\t.size {name}, .-{name}\n\
             \t.section license,\"aw\",@progbits\n\t.asciz \"GPL\"\n"
        ),
    )?;
    run_within(
        Command::new(LLVM_MC)
            .args(["-triple=bpfel", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&asm),
        Duration::from_secs(30),
    )
    .with_context(|| format!("assembling {name}"))?;
    Ok(obj)
}

/// What a configuration attached; undone on drop.
pub(super) struct Attached {
    undo: Vec<Command>,
    guard: Option<Guard>,
}

impl Attached {
    /// The guard daemon's pid, when this is portwatch.
    fn guard_pid(&self) -> Option<u32> {
        self.guard.as_ref().map(|g| g.proc.pid())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for cmd in &mut self.undo {
            let _ = output_within(cmd, Duration::from_secs(20));
        }
    }
}

fn xdp_off(lab: &Lab) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args([
        "-n",
        &lab.server.name,
        "link",
        "set",
        "dev",
        &lab.server_if,
        "xdp",
        "off",
    ]);
    cmd
}

/// Attaches a [`bare_program`] to the server's veth in native mode.
pub(super) fn attach_bare(lab: &Lab, obj: &Path) -> Result<Attached> {
    let attached = Attached {
        undo: vec![xdp_off(lab)],
        guard: None,
    };
    let obj = obj.to_str().context("object path is not UTF-8")?;
    run_ok(
        "ip",
        &[
            "-n",
            &lab.server.name,
            "link",
            "set",
            "dev",
            &lab.server_if,
            "xdpdrv",
            "obj",
            obj,
            "sec",
            "xdp.frags",
        ],
    )?;
    Ok(attached)
}

/// ufw's shape: input policy drop, established/related and loopback accepted.
const NFT_RULESET: &str = "table inet pwbench {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif lo accept
  }
}
";

fn attach(ctx: &Ctx, lab: &Lab, config: Config, bare: &Path) -> Result<Attached> {
    let mut undo = Vec::new();
    let mut guard = None;
    match config {
        Config::None => {}
        Config::Nft => {
            let file = lab.dir.path("ruleset.nft");
            std::fs::write(&file, NFT_RULESET)?;
            let mut del = lab.server.exec("nft");
            del.args(["delete", "table", "inet", "pwbench"]);
            undo.push(del);
            run_within(
                lab.server.exec("nft").arg("-f").arg(&file),
                Duration::from_secs(20),
            )?;
        }
        Config::IptRaw => {
            let rule = [
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                &FLOOD_PORT.to_string(),
                "-j",
                "DROP",
            ]
            .map(str::to_string);
            let mut del = lab.server.exec("iptables");
            del.args(["-t", "raw", "-D"]).args(&rule);
            undo.push(del);
            run_within(
                lab.server
                    .exec("iptables")
                    .args(["-t", "raw", "-A"])
                    .args(&rule),
                Duration::from_secs(20),
            )?;
        }
        Config::XdpFilter => {
            undo.push(xdp_off(lab));
            // xdp-filter keeps its state pinned on bpffs: give it a private
            // one inside `ip netns exec`'s mount namespace, gone when the
            // shell exits (the attached program keeps its maps).
            let script = format!(
                "mount -t bpf bpf /sys/fs/bpf && xdp-filter load -m native {} && \
                 xdp-filter port {FLOOD_PORT}",
                lab.server_if
            );
            run_within(
                lab.server.exec("sh").args(["-c", &script]),
                Duration::from_secs(30),
            )?;
        }
        Config::BareDrop => return attach_bare(lab, bare),
        Config::PwNative => guard = Some(Guard::start(ctx, lab, "native", &[PERMITTED])?),
        Config::PwGeneric => guard = Some(Guard::start(ctx, lab, "generic", &[PERMITTED])?),
    }
    Ok(Attached { undo, guard })
}

struct Sample {
    pps: f64,
    /// The generator's CPU time (veth delivery and the receive path run in
    /// its softirq context here) plus ksoftirqd's and the guard daemon's,
    /// per packet.
    cpu_ns: f64,
    /// The whole machine's busy time, per packet.
    total_ns: f64,
    processed: u64,
}

/// Sends `n` SYNs with trafgen (one process, TX ring) and
/// measures what the server's veth processed and the CPU time meanwhile.
fn measure(
    lab: &Lab,
    cfg: &Path,
    n: u64,
    ksoftirqd: &[u32],
    daemon: Option<u32>,
) -> Result<Sample> {
    let daemon_cpu = || daemon.map_or(Ok(0.0), proc_cpu_seconds);
    let rx0 = lab.server_rx_packets()?;
    let cpu0 = cpu_busy_seconds()?;
    let helpers0 = ksoftirqd_seconds(ksoftirqd) + daemon_cpu()?;
    // The shell reports its children's CPU time (trafgen and its worker,
    // both waited for) from its own /proc/PID/stat once trafgen is done.
    let mut cmd = lab.client.exec("sh");
    cmd.args([
        "-c",
        "trafgen \"$@\" && cat /proc/$$/stat",
        "sh",
        "--no-sock-mem",
        "--notouch-irq",
        "--cpus",
        "1",
        "--num",
        &n.to_string(),
        "--dev",
        &lab.client_if,
        "--conf",
    ])
    .arg(cfg);
    // Even at 20k packets/s it is done well within this.
    let limit = Duration::from_secs(30 + n / 20_000);
    let out = run_within(&mut cmd, limit)?;
    let cpu1 = cpu_busy_seconds()?;
    let helpers1 = ksoftirqd_seconds(ksoftirqd) + daemon_cpu()?;
    let rx1 = lab.server_rx_packets()?;
    let seconds = trafgen_seconds(&out)
        .with_context(|| format!("no timing line in trafgen's output:\n{out}"))?;
    let generator = children_cpu_seconds(out.lines().last().unwrap_or_default())
        .context("reading trafgen's CPU time")?;
    let processed = rx1.saturating_sub(rx0);
    ensure!(
        processed * 100 >= n * 95,
        "the server's veth processed {processed} of {n} packets"
    );
    let per_packet = |s: f64| s * 1e9 / processed as f64;
    Ok(Sample {
        pps: processed as f64 / seconds,
        cpu_ns: per_packet(generator + helpers1 - helpers0),
        total_ns: per_packet(cpu1 - cpu0),
        processed,
    })
}

/// The pids of the ksoftirqd threads (softirq work deferred from the
/// context that raised it).
fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

fn ksoftirqd_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| proc_cpu_seconds(*pid).unwrap_or(0.0))
        .sum()
}

/// cutime + stime of a /proc/PID/stat line, in seconds.
fn children_cpu_seconds(stat: &str) -> Result<f64> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in /proc/PID/stat")?;
    // After the command name: state is field 3 of the line, cutime 16, cstime 17.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        Ok(f.get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("parsing /proc/PID/stat")? as f64
            / USER_HZ)
    };
    Ok(tick(13)? + tick(14)?)
}

/// trafgen's own send time: "  1 sec, 167183 usec on CPU0 (300000 packets)".
fn trafgen_seconds(out: &str) -> Option<f64> {
    let mut total = None;
    for line in out.lines().filter(|l| l.contains(" usec on CPU")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let secs: f64 = words.first()?.parse().ok()?;
        let usecs: f64 = words.get(2)?.parse().ok()?;
        let t = secs + usecs / 1e6;
        total = Some(f64::max(total.unwrap_or(0.0), t));
    }
    total.filter(|t| *t > 0.0)
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let (rounds, n) = if ctx.quick {
        (2, 200_000)
    } else {
        (5, 2_000_000)
    };
    for tool in ["trafgen", "nft", "iptables", "xdp-filter", "nsenter"] {
        ensure!(
            util::find_in_path(tool).is_some(),
            "{tool} not found (run `cargo xtask setup`)"
        );
    }
    let lab = Lab::new()?;
    let bare = bare_program(&lab.dir, "bench_xdp_drop", 1)?;
    // The flood: SYNs from varying source ports, as a scan or flood would.
    let cfg = lab.dir.path("syn.trafgen");
    std::fs::write(
        &cfg,
        format!(
            "{{\n  eth(da={}, sa={}),\n  ipv4(saddr={}, daddr={}, ttl=64, id=drnd()),\n  \
             tcp(sp=dinc(1024, 65000), dp={FLOOD_PORT}, seq=drnd(), syn, win=64240),\n}}\n",
            lab.server_mac,
            lab.client_mac,
            lab.client_ip(),
            lab.server_ip()
        ),
    )?;

    let ksoftirqd = ksoftirqd_pids();
    let mut pps: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    let mut total: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..rounds {
        // A different order each round, so no configuration always follows
        // the same one.
        for k in 0..CONFIGS.len() {
            let i = (k + round) % CONFIGS.len();
            let config = CONFIGS[i];
            let attached = attach(ctx, &lab, config, &bare)
                .with_context(|| format!("setting up {}", config.label()))?;
            // trafgen now and then fails its last TX ring flush (EAGAIN):
            // try again, twice at most.
            let daemon = attached.guard_pid();
            let mut sample = measure(&lab, &cfg, n, &ksoftirqd, daemon);
            for _ in 0..2 {
                if sample.is_ok() {
                    break;
                }
                sample = measure(&lab, &cfg, n, &ksoftirqd, daemon);
            }
            let sample = sample.with_context(|| format!("measuring {}", config.label()))?;
            drop(attached);
            eprintln!(
                "veth round {}/{rounds}: {:<34} {:>7.0} packets/s, {:>5.0} ns CPU/packet \
                 ({:>5.0} ns machine-wide), {} processed",
                round + 1,
                config.label(),
                sample.pps,
                sample.cpu_ns,
                sample.total_ns,
                sample.processed
            );
            pps[i].push(sample.pps);
            cpu[i].push(sample.cpu_ns);
            total[i].push(sample.total_ns);
        }
    }

    let idx = |c: Config| CONFIGS.iter().position(|x| *x == c).unwrap_or(0);
    let med_pps = |c: Config| median(&pps[idx(c)]);
    let med_cpu = |c: Config| median(&cpu[idx(c)]);
    let cpu_vs_bare = med_cpu(Config::PwNative) / med_cpu(Config::BareDrop);
    let med_total = |c: Config| median(&total[idx(c)]);
    let total_vs_bare = med_total(Config::PwNative) / med_total(Config::BareDrop);
    let vs_nft = med_pps(Config::PwNative) / med_pps(Config::Nft);
    let vs_filter = med_pps(Config::PwNative) / med_pps(Config::XdpFilter);
    let targets = [
        (
            "CPU per packet within 3% of bare XDP_DROP (portwatch native / bare)",
            cpu_vs_bare,
            cpu_vs_bare <= 1.03,
        ),
        (
            "throughput ≥ 1.6× nftables (portwatch native / nftables)",
            vs_nft,
            vs_nft >= 1.6,
        ),
        (
            "throughput ≥ 1.05× xdp-filter (portwatch native / xdp-filter)",
            vs_filter,
            vs_filter >= 1.05,
        ),
    ];

    let mut md = String::new();
    md.push_str(
        "| configuration | packets/s: median (min–max) | vs none | CPU ns/packet: median \
         (min–max) | vs bare XDP_DROP | machine-wide busy ns/packet |\n\
         |---|---|---|---|---|---|\n",
    );
    let mut configs_json = serde_json::Map::new();
    for (i, config) in CONFIGS.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2}× | {} | {:.3}× | {} |",
            config.label(),
            spread(&pps[i], 0),
            median(&pps[i]) / med_pps(Config::None),
            spread(&cpu[i], 0),
            median(&cpu[i]) / med_cpu(Config::BareDrop),
            spread(&total[i], 0),
        );
        configs_json.insert(
            config.key().into(),
            json!({
                "label": config.label(),
                "packets_per_s": stats_json(&pps[i]),
                "cpu_ns_per_packet": stats_json(&cpu[i]),
                "machine_busy_ns_per_packet": stats_json(&total[i]),
            }),
        );
    }
    let _ = writeln!(
        md,
        "\nMethod: {rounds} rounds × {n} TCP SYNs to port {FLOOD_PORT} (varying source \
         ports) from trafgen (1 process, TX ring) over a veth pair between \
         two namespaces; configurations alternate within each round, on the receiving veth. \
         packets/s = packets the receiving veth processed / trafgen's send time. veth delivery \
         and the receive path run in softirq in the sender's context here, which the kernel \
         charges to trafgen, so CPU ns/packet = (trafgen's user+system time + ksoftirqd's + \
         the guard daemon's, for portwatch) / \
         packets processed: the generator plus everything the packets cost, without other \
         processes' load; the last column is the whole machine's busy time from /proc/stat \
         per packet (it also counts whatever else runs meanwhile). xdp-filter as documented \
         (`load -m native`, `port {FLOOD_PORT}`); bare XDP_DROP is a two-instruction program \
         assembled at run time; portwatch's policy permits only {PERMITTED}.\n"
    );
    let _ = writeln!(
        md,
        "- for reference, machine-wide busy time, portwatch native / bare: {total_vs_bare:.3}"
    );
    let mut targets_json = Vec::new();
    for (what, ratio, met) in targets {
        let _ = writeln!(md, "- {what}: {ratio:.3} — {}", verdict(met));
        targets_json.push(json!({"target": what, "ratio": ratio, "met": met}));
    }
    Ok(Section {
        key: "veth",
        title: "Drop throughput on a veth pair",
        json: json!({
            "rounds": rounds,
            "packets_per_round": n,
            "configs": configs_json,
            "ratios": {
                "portwatch_native_cpu_vs_bare": cpu_vs_bare,
                "portwatch_native_machine_busy_vs_bare": total_vs_bare,
                "portwatch_native_pps_vs_nftables": vs_nft,
                "portwatch_native_pps_vs_xdp_filter": vs_filter,
                "portwatch_generic_pps_vs_native": med_pps(Config::PwGeneric) / med_pps(Config::PwNative),
            },
            "targets": targets_json,
        }),
        markdown: md,
    })
}
