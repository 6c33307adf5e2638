//! The typed events every part of portwatch speaks: the kernel decoder and the
//! start-up snapshot both produce them, every sink consumes them.

use std::{net::IpAddr, time::SystemTime};

use serde::Serialize;

pub use crate::policy::Exposure;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Listen,
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Snapshot,
    Live,
}

/// How a socket is identified, for matching a close to its listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SockId {
    /// The socket cookie (sock_diag, and the UDP hooks).
    Cookie(u64),
    /// The kernel address of the socket (the TCP tracepoint).
    KernelAddr(u64),
}

/// The process behind a socket, as far as it could be read. Every field is
/// optional: a process may exit before user space looks at /proc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub cgroup: Option<String>,
}

/// A listening socket: TCP in LISTEN, or a bound UDP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub sock_id: SockId,
    /// Network namespace inode, where known.
    pub netns: Option<u64>,
    pub process: ProcessInfo,
}

impl Listener {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

/// A listener opened or closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerEvent {
    pub ts: SystemTime,
    pub kind: EventKind,
    pub origin: Origin,
    pub listener: Listener,
    /// Whether the guard's policy lets the network reach it (guard only).
    pub exposure: Option<Exposure>,
}

/// Why the guard dropped a packet (or would have, in audit mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// No rule permits the destination port.
    NoRule,
    /// The port is permitted, but not from this source.
    SourceNotAllowed,
    /// Truncated or over-long headers.
    Malformed,
    /// A later fragment whose first fragment was not seen.
    Fragment,
}

/// An inbound packet the guard dropped (or in audit mode would have).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    pub ts: SystemTime,
    pub iface: Option<String>,
    pub reason: DropReason,
    /// IP protocol number (6 TCP, 17 UDP, others as the packet had them).
    pub proto: u8,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    /// The packet was passed because the guard is in audit mode.
    pub audit: bool,
}

/// The guard's policy changed at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEvent {
    pub ts: SystemTime,
    /// What changed, e.g. `allow tcp/8080 from anywhere`, `reload`.
    pub change: String,
    /// Who asked: uid and pid of the control socket peer; None for SIGHUP.
    pub by_uid: Option<u32>,
    pub by_pid: Option<u32>,
    pub mode: crate::policy::Mode,
    pub rules: usize,
}

/// Everything that flows to the sinks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Listener(ListenerEvent),
    /// The kernel could not queue `count` events since the last report
    /// (`total` since start).
    Lost {
        ts: SystemTime,
        count: u64,
        total: u64,
    },
    /// The hooks are attached and the snapshot (`snapshot` listeners) is
    /// out: everything after this is live.
    Ready {
        ts: SystemTime,
        snapshot: usize,
    },
    /// A packet the guard dropped.
    Drop(DropEvent),
    /// The policy in force changed.
    Policy(PolicyEvent),
    /// A guarded interface went away or came back.
    Interface {
        ts: SystemTime,
        iface: String,
        /// `removed`, `attached`, or `attach failed: WHY`.
        change: String,
        xdp_mode: Option<&'static str>,
    },
    /// Drop reports the kernel's rate limit held back since the last report.
    Suppressed {
        ts: SystemTime,
        count: u64,
        total: u64,
    },
}
