//! The guard's tests on the lab's network (a server and a client namespace
//! joined by a veth pair, from `portwatch-lab`): servers started in one,
//! probes sent from the other, and guards whose pins outlive them.
//! Everything is bounded in time.

use std::{net::IpAddr, ops::Deref, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use portwatch_lab::{ChildGuard, Netns, spawn_server};
pub use portwatch_lab::{Lab, Outcome, TempFile, run_bounded, wait_listening};

use crate::{Portwatch, Result, portwatch_bin};

/// How long a TCP connect may take before it counts as timed out.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a UDP request waits for its answer.
pub const UDP_WAIT: Duration = Duration::from_secs(2);

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

/// Per-test paths for a guard whose pins must outlive it (the lab's
/// [`portwatch_lab::GuardPaths`] for the binary under test): a pin directory
/// on the host's bpffs and a run directory for the socket and lock. Dropping
/// it runs `portwatch down` and removes both, whatever the test did.
pub struct GuardPaths(portwatch_lab::GuardPaths);

impl GuardPaths {
    pub fn new(tag: &str) -> Result<Self> {
        Ok(Self(portwatch_lab::GuardPaths::new(tag, &portwatch_bin())?))
    }

    /// `portwatch ARGS --socket SOCKET`: a client command (`allow`,
    /// `status`, `learn`, ...) against this guard.
    pub fn client(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(std::process::Command::new(portwatch_bin())
            .args(args)
            .args(["--socket", path_str(&self.socket())?])
            .output()?)
    }

    /// The guard's `status --json`.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = succeeded(&self.client(&["status", "--json"])?)?;
        Ok(serde_json::from_str(&out)?)
    }
}

/// What a command printed, if it succeeded; else an error with its exit
/// status and output.
pub fn succeeded(out: &std::process::Output) -> Result<String> {
    anyhow::ensure!(
        out.status.success(),
        "{}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Deref for GuardPaths {
    type Target = portwatch_lab::GuardPaths;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A path as UTF-8, for command lines.
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// `portwatch guard` in the lab's server network namespace but the host's
/// mount namespace, on `paths` (see [`portwatch_lab::GuardPaths::guard_command`]).
pub fn pinned_guard(
    lab: &Lab,
    paths: &GuardPaths,
    policy: &Path,
    extra: &[&str],
) -> Result<Portwatch> {
    let mut cmd = paths.guard_command(&lab.server, &lab.server_if, policy);
    cmd.args(extra);
    Portwatch::start_command(cmd)
}

/// `portwatch guard` on the lab's server interface with `policy`, its
/// control socket in the lab's directory (they go with the lab), and
/// `extra` arguments.
pub fn start_guard(lab: &Lab, policy: &TempFile, extra: &[&str]) -> Result<Portwatch> {
    let socket = lab.socket()?;
    let mut args = vec![
        "guard",
        "--iface",
        &lab.server_if,
        "--policy",
        policy.as_str()?,
        "--socket",
        &socket,
    ];
    args.extend_from_slice(extra);
    Portwatch::start_in(&lab.server, &args)
}

/// The guard's `status --json`.
pub fn status_json(lab: &Lab) -> Result<serde_json::Value> {
    let out = std::process::Command::new(portwatch_bin())
        .args(["status", "--json", "--socket", &lab.socket()?])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The status line of the TCP listener on `port`.
pub fn status_listener(lab: &Lab, port: u16) -> Result<serde_json::Value> {
    let status = status_json(lab)?;
    status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["proto"] == "tcp" && l["port"] == port))
        .cloned()
        .with_context(|| format!("no tcp/{port} in {status}"))
}

/// Whether a TCP connect was dropped, not refused: socat says it timed out,
/// and it took the whole connect timeout.
pub fn assert_silently_dropped(probe: &TcpProbe, what: &str) {
    assert_eq!(probe.result, Connect::TimedOut, "{what}: {probe:?}");
    assert!(
        probe.elapsed >= CONNECT_TIMEOUT - Duration::from_millis(100),
        "{what}: gave up after {:?}, before the connect timeout: {probe:?}",
        probe.elapsed
    );
}

/// A python3 script that binds one socket (`tcp|udp ADDR PORT [reuseport]`)
/// and says how it went: `bound`, or the errno's name.
pub const TRY_BIND: &str = r#"
import errno, socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM)
if 'reuseport' in sys.argv[4:]:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
try:
    s.bind((host, port))
    print('bound')
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"#;
