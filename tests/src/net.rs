//! A two-namespace network lab for the guard's tests: a server and a client
//! namespace joined by a veth pair, servers started in one, probes sent from
//! the other. Only 198.18.X.0/24 and fd7e:X::/64 are used, and traffic never
//! leaves the lab's namespaces. Everything is bounded in time.

use std::{
    io::{Read, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{ChildGuard, Netns, Result, run, unique_name};

/// How long a TCP connect may take before it counts as timed out.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a UDP request waits for its answer.
pub const UDP_WAIT: Duration = Duration::from_secs(2);

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Two fresh namespaces joined by a veth pair:
/// server `198.18.X.1/24` + `fd7e:X::1/64` on `server_if`,
/// client `198.18.X.2/24` + `fd7e:X::2/64` on `client_if`.
/// Dropping the lab deletes both namespaces, and with them the veths.
pub struct Lab {
    pub server: Netns,
    pub client: Netns,
    pub server_if: String,
    pub client_if: String,
    /// The X in the lab's prefixes.
    pub net: u8,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The namespaces go with their own guards; the lab's run directory
        // (control sockets, lock files) goes here.
        let _ = std::fs::remove_dir_all(self.run_dir());
    }
}

impl Lab {
    /// A directory for this lab's control socket and lock file, removed
    /// with the lab.
    pub fn run_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(&self.server.name)
    }

    /// The control socket path for a guard in this lab (its directory exists).
    pub fn socket(&self) -> Result<String> {
        std::fs::create_dir_all(self.run_dir())?;
        let path = self.run_dir().join("control.sock");
        Ok(path
            .to_str()
            .context("socket path is not UTF-8")?
            .to_string())
    }

    pub fn new() -> Result<Self> {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 2 + 5 + up to 4 + 1 characters: within IFNAMSIZ (15).
        let server_if = format!("pw{}{}s", pid % 100_000, n % 10_000);
        let client_if = format!("pw{}{}c", pid % 100_000, n % 10_000);
        let net = u8::try_from((pid % 254 + n) % 254 + 1).context("lab number")?;
        let server = Netns::new("s")?;
        let client = Netns::new("c")?;
        let lab = Self {
            server,
            client,
            server_if,
            client_if,
            net,
        };
        lab.connect()?;
        Ok(lab)
    }

    /// Creates the veth pair between the namespaces, with its addresses.
    /// `new` does this; a test that deletes the link can do it again.
    pub fn connect(&self) -> Result {
        // Created inside the namespaces: the names never exist on the host.
        run(
            "ip",
            &[
                "link",
                "add",
                &self.server_if,
                "netns",
                &self.server.name,
                "type",
                "veth",
                "peer",
                "name",
                &self.client_if,
                "netns",
                &self.client.name,
            ],
        )?;
        for (ns, iface, host) in [
            (&self.server, &self.server_if, 1),
            (&self.client, &self.client_if, 2),
        ] {
            let v4 = format!("{}/24", self.v4(host));
            let v6 = format!("{}/64", self.v6(u16::from(host)));
            run("ip", &["-n", &ns.name, "addr", "add", &v4, "dev", iface])?;
            run(
                "ip",
                &["-n", &ns.name, "addr", "add", &v6, "dev", iface, "nodad"],
            )?;
            run("ip", &["-n", &ns.name, "link", "set", iface, "up"])?;
            run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub fn v4(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.net, host))
    }

    pub fn v6(&self, host: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd7e,
            u16::from(self.net),
            0,
            0,
            0,
            0,
            0,
            host,
        ))
    }

    pub fn server_v4(&self) -> IpAddr {
        self.v4(1)
    }

    pub fn client_v4(&self) -> IpAddr {
        self.v4(2)
    }

    pub fn server_v6(&self) -> IpAddr {
        self.v6(1)
    }

    pub fn client_v6(&self) -> IpAddr {
        self.v6(2)
    }

    /// Gives the client's veth one more address, `198.18.X.host/24`.
    pub fn add_client_v4(&self, host: u8) -> Result<IpAddr> {
        let addr = self.v4(host);
        run(
            "ip",
            &[
                "-n",
                &self.client.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &self.client_if,
            ],
        )?;
        Ok(addr)
    }

    /// `ip -n SERVER link show SERVER_IF`.
    pub fn server_link(&self) -> Result<String> {
        run(
            "ip",
            &["-n", &self.server.name, "link", "show", &self.server_if],
        )
    }
}

/// A `.toml` file in the temp directory with a unique name, removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(tag: &str, contents: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name(tag)));
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn as_str(&self) -> Result<&str> {
        self.path.to_str().context("temp path is not UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a bounded command did.
#[derive(Debug)]
pub struct Outcome {
    /// `None`: still running at the deadline (or once `until` was seen), so
    /// it was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

fn pump(mut from: impl Read + Send + 'static, tx: mpsc::Sender<Chunk>, out: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let chunk = buf[..n].to_vec();
            let chunk = if out {
                Chunk::Out(chunk)
            } else {
                Chunk::Err(chunk)
            };
            if tx.send(chunk).is_err() {
                break;
            }
        }
    });
}

/// Runs `cmd` for at most `timeout`, writing `input` to its stdin (kept open
/// until the end, so that the command does not see EOF early). Stops early,
/// killing the command, once stdout contains `until`.
pub fn run_bounded(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
    until: Option<&str>,
) -> Result<Outcome> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = ChildGuard::spawn(cmd)?;
    let (tx, rx) = mpsc::channel();
    pump(
        child.0.stdout.take().context("no stdout pipe")?,
        tx.clone(),
        true,
    );
    pump(child.0.stderr.take().context("no stderr pipe")?, tx, false);
    let _stdin = match input {
        Some(bytes) => {
            let mut stdin = child.0.stdin.take().context("no stdin pipe")?;
            stdin.write_all(bytes)?;
            stdin.flush()?;
            Some(stdin)
        }
        None => None,
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let deadline = start + timeout;
    let mut status = None;
    let mut pipes_open = true;
    loop {
        if pipes_open {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(Chunk::Out(b)) => stdout.extend_from_slice(&b),
                Ok(Chunk::Err(b)) => stderr.extend_from_slice(&b),
                Err(mpsc::RecvTimeoutError::Disconnected) => pipes_open = false,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
        if until.is_some_and(|u| String::from_utf8_lossy(&stdout).contains(u)) {
            break;
        }
        if let Some(s) = child.0.try_wait()? {
            status = Some(s);
            // Whatever is still in the pipes, briefly (a grandchild may
            // hold them open).
            let drain_until = Instant::now() + Duration::from_millis(300);
            while let Ok(chunk) =
                rx.recv_timeout(drain_until.saturating_duration_since(Instant::now()))
            {
                match chunk {
                    Chunk::Out(b) => stdout.extend_from_slice(&b),
                    Chunk::Err(b) => stderr.extend_from_slice(&b),
                }
            }
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    let elapsed = start.elapsed();
    drop(child); // kills it if it still runs
    Ok(Outcome {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
    })
}

/// `[v6]` or `v4`, as socat and URLs write hosts.
pub fn host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "4" } else { "6" }
}

/// Waits until something in `ns` listens on `proto` (`tcp`/`udp`) `port`.
pub fn wait_listening(ns: &Netns, proto: &str, port: u16) -> Result {
    let flags = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
    let suffix = format!(":{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run("ip", &["netns", "exec", &ns.name, "ss", flags])?;
        let listening = out.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|local| local.ends_with(&suffix))
        });
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {proto}/{port} in {} after 10 s:\n{out}",
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_server(
    ns: &Netns,
    proto: &str,
    port: u16,
    program: &str,
    args: &[&str],
) -> Result<ChildGuard> {
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = ChildGuard::spawn(&mut cmd)?;
    if let Err(e) = wait_listening(ns, proto, port) {
        let status = server.0.try_wait();
        bail!("{program} {args:?} did not start listening ({status:?}): {e:#}");
    }
    Ok(server)
}

/// A dual-stack TCP server on `port` in `ns` that says "hi" to every
/// connection and closes it.
pub fn tcp_server(ns: &Netns, port: u16) -> Result<ChildGuard> {
    spawn_server(
        ns,
        "tcp",
        port,
        "socat",
        &[
            &format!("TCP6-LISTEN:{port},ipv6only=0,reuseaddr,fork"),
            "SYSTEM:echo hi",
        ],
    )
}

/// A dual-stack UDP server on `port` in `ns` that answers every datagram
/// with "pong" (from `port`).
pub fn udp_server(ns: &Netns, port: u16) -> Result<ChildGuard> {
    spawn_server(
        ns,
        "udp",
        port,
        "socat",
        &[
            &format!("UDP6-RECVFROM:{port},ipv6only=0,fork"),
            // The child must read its datagram: a child that exits first
            // makes socat's write fail (EPIPE) and the reply is lost.
            "SYSTEM:echo pong; cat >/dev/null",
        ],
    )
}

/// `python3 -m http.server` on `port` (dual-stack) in `ns`, serving `dir`.
pub fn http_server(ns: &Netns, port: u16, dir: &str) -> Result<ChildGuard> {
    spawn_server(
        ns,
        "tcp",
        port,
        "python3",
        &[
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "::",
            "--directory",
            dir,
        ],
    )
}

/// How a TCP connection attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    /// Connected, and the server's "hi" arrived.
    Answered,
    /// No answer to the SYN within [`CONNECT_TIMEOUT`].
    TimedOut,
    /// The peer answered with a reset.
    Refused,
    /// Anything else, with socat's stderr.
    Other(String),
}

#[derive(Debug)]
pub struct TcpProbe {
    pub result: Connect,
    pub elapsed: Duration,
    pub stderr: String,
}

/// Connects from `from` to `addr:port` (optionally from the local address
/// `bind`) with socat and reads what the server says.
pub fn tcp_probe(from: &Netns, addr: IpAddr, port: u16, bind: Option<IpAddr>) -> Result<TcpProbe> {
    let mut target = format!(
        "TCP{}:{}:{port},connect-timeout={}",
        family(addr),
        host(addr),
        CONNECT_TIMEOUT.as_secs()
    );
    if let Some(b) = bind {
        target.push_str(&format!(",bind={}", host(b)));
    }
    let mut cmd = from.command("socat");
    cmd.args(["-T3", "-u", &target, "STDOUT"]);
    let out = run_bounded(&mut cmd, None, CONNECT_TIMEOUT * 4, Some("hi"))?;
    let result = if out.stdout.contains("hi") {
        Connect::Answered
    } else if out.stderr.contains("timed out") {
        Connect::TimedOut
    } else if out.stderr.contains("Connection refused") {
        Connect::Refused
    } else {
        Connect::Other(format!("{out:?}"))
    };
    Ok(TcpProbe {
        result,
        elapsed: out.elapsed,
        stderr: out.stderr,
    })
}

/// Whether a TCP server at `addr:port` answers a connection from `from`.
pub fn tcp_reachable(from: &Netns, addr: IpAddr, port: u16) -> Result<bool> {
    Ok(tcp_probe(from, addr, port, None)?.result == Connect::Answered)
}

/// Sends "ping" from `from` to UDP `addr:port` and says whether "pong"
/// came back within [`UDP_WAIT`].
pub fn udp_echo(from: &Netns, addr: IpAddr, port: u16) -> Result<bool> {
    let target = format!("UDP{}:{}:{port}", family(addr), host(addr));
    let mut cmd = from.command("socat");
    cmd.args(["-T3", "-", &target]);
    let out = run_bounded(&mut cmd, Some(b"ping\n"), UDP_WAIT, Some("pong"))?;
    if out.status.is_some_and(|s| !s.success()) {
        bail!("socat {target} failed: {out:?}");
    }
    Ok(out.stdout.contains("pong"))
}

/// Fetches `http://addr:port/path` with curl from `from`; the HTTP status
/// code, or None when nothing answered.
pub fn http_status(from: &Netns, addr: IpAddr, port: u16, path: &str) -> Result<Option<u16>> {
    let url = format!("http://{}:{port}{path}", host(addr));
    let mut cmd = from.command("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--connect-timeout",
        "2",
        "--max-time",
        "5",
        &url,
    ]);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(8), None)?;
    if !out.success() {
        return Ok(None);
    }
    Ok(out.stdout.trim().parse().ok())
}

/// Per-test paths for a guard whose pins must outlive it: a pin directory on
/// the host's bpffs and a run directory for the socket and lock. Dropping it
/// runs `portwatch down` and removes both, whatever the test did.
pub struct GuardPaths {
    pub pins: std::path::PathBuf,
    pub run: std::path::PathBuf,
}

impl GuardPaths {
    pub fn new(tag: &str) -> Result<Self> {
        let name = crate::unique_name(tag);
        let run = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&run)?;
        Ok(Self {
            pins: std::path::PathBuf::from("/sys/fs/bpf").join(name),
            run,
        })
    }

    pub fn socket(&self) -> std::path::PathBuf {
        self.run.join("control.sock")
    }
}

impl Drop for GuardPaths {
    fn drop(&mut self) {
        let _ = Command::new(crate::portwatch_bin())
            .arg("down")
            .arg("--pin-dir")
            .arg(&self.pins)
            .arg("--socket")
            .arg(self.socket())
            .output();
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

/// A path as UTF-8, for command lines.
pub fn path_str(p: &std::path::Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// `portwatch guard` in the lab's server network namespace but the host's
/// mount namespace (`nsenter --net`), so its pins are on the host's bpffs
/// and outlive the process, as on a server.
pub fn pinned_guard(
    lab: &Lab,
    paths: &GuardPaths,
    policy: &std::path::Path,
    extra: &[&str],
) -> Result<crate::Portwatch> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.server.name))
        .arg(crate::portwatch_bin())
        .args(["guard", "--iface", &lab.server_if])
        .args(["--policy", path_str(policy)?])
        .args(["--pin-dir", path_str(&paths.pins)?])
        .args(["--socket", path_str(&paths.socket())?])
        .args(extra)
        .env_remove("SSH_CONNECTION");
    crate::Portwatch::start_command(cmd)
}
