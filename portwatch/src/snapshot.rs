//! The listeners that already exist when portwatch starts, in every network
//! namespace of the host, read with NETLINK_SOCK_DIAG (what `ss -ltnup` uses).

use std::{
    collections::{HashMap, HashSet},
    fmt, fs, io,
    net::IpAddr,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
};

use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, Parseable,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SOCK_DIAG_BY_FAMILY, SockDiagMessage, TCP_CLOSE,
    TCP_LISTEN,
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{
    model::{Listener, ProcessInfo, Proto, SockId},
    procinfo::{process_info, socket_owners},
};

/// Why a snapshot could not be taken. A namespace that cannot be entered is
/// not an error (it is skipped); a namespace whose sockets cannot be listed is.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket in {netns}: {source}")]
    Socket {
        netns: Netns,
        #[source]
        source: io::Error,
    },
    #[error("netlink sock_diag query for {query} in {netns} failed: {source}")]
    Query {
        query: &'static str,
        netns: Netns,
        #[source]
        source: io::Error,
    },
    #[error("netlink sock_diag reply for {query} in {netns} is malformed: {source}")]
    Decode {
        query: &'static str,
        netns: Netns,
        #[source]
        source: DecodeError,
    },
    #[error("cannot start a thread to enter other network namespaces: {0}")]
    Thread(#[source] io::Error),
    #[error("a snapshot worker thread panicked")]
    WorkerPanicked,
}

/// The namespace an error happened in, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Netns(pub Option<u64>);

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(inode) => write!(f, "netns {inode}"),
            None => f.write_str("the current netns"),
        }
    }
}

/// Every TCP socket in LISTEN and every bound, unconnected UDP socket
/// (`ss -ltu`), IPv4 and IPv6, across all network namespaces, with the
/// owning process where one holds the socket. Sorted by (netns, proto, port,
/// addr).
pub fn snapshot() -> Result<Vec<Listener>, SnapshotError> {
    let (own, others) = namespaces();
    let next = AtomicUsize::new(0);
    let (sockets, owners) = thread::scope(|scope| {
        // The /proc fd scan is the slow part; overlap it with the dumps
        // (or run it afterwards if no thread can be had).
        let owners = thread::Builder::new().spawn_scoped(scope, socket_owners);
        let sockets = dump_all(own, &others, &QUERIES, &next, scope).map(|d| d.sockets);
        let owners = match owners {
            Ok(handle) => handle.join().map_err(|_| SnapshotError::WorkerPanicked),
            Err(_) => Ok(socket_owners()),
        };
        (sockets, owners)
    });
    let (sockets, owners) = (sockets?, owners?);

    // One /proc read per process, not per socket: a server can hold
    // thousands of listeners.
    let mut processes: HashMap<u32, ProcessInfo> = HashMap::new();
    // Listeners point at one shared copy per (process, socket uid).
    let mut shared: HashMap<(Option<u32>, u32), Arc<ProcessInfo>> = HashMap::new();
    let mut listeners: Vec<(u64, Listener)> = sockets
        .into_iter()
        .map(|sock| {
            let owner = (sock.inode != 0)
                .then(|| owners.get(&u64::from(sock.inode)).copied())
                .flatten();
            let process = shared
                .entry((owner, sock.uid))
                .or_insert_with(|| {
                    let mut process = match owner {
                        Some(pid) => processes
                            .entry(pid)
                            .or_insert_with(|| process_info(pid))
                            .clone(),
                        None => ProcessInfo::default(),
                    };
                    // The socket's uid (its creator's) stands in when there
                    // is no process or its status can't be read.
                    process.uid = process.uid.or(Some(sock.uid));
                    Arc::new(process)
                })
                .clone();
            let listener = Listener {
                proto: sock.proto,
                addr: sock.addr,
                port: sock.port,
                sock_id: SockId::Cookie(sock.cookie),
                netns: sock.netns,
                process,
            };
            (sock.cookie, listener)
        })
        .collect();
    // The cookie breaks ties (SO_REUSEPORT groups) so the order is stable.
    listeners.sort_unstable_by(|(ca, a), (cb, b)| {
        (a.netns, a.proto, a.port, a.addr, ca).cmp(&(b.netns, b.proto, b.port, b.addr, cb))
    });
    Ok(listeners.into_iter().map(|(_, l)| l).collect())
}

/// Every UDP socket that exists now, bound or connected: which of the
/// sockets a snapshot found are still open.
#[derive(Debug, Default)]
pub struct UdpSockets {
    /// (netns, cookie): before Linux 5.12 cookies count per namespace.
    pub cookies: HashSet<(Option<u64>, u64)>,
    /// The namespaces read: of the others, nothing can be said.
    pub namespaces: HashSet<Option<u64>>,
}

/// [`UdpSockets`] of every network namespace that can be read now.
pub fn udp_cookies() -> Result<UdpSockets, SnapshotError> {
    let (own, others) = namespaces();
    let next = AtomicUsize::new(0);
    let dumped = thread::scope(|scope| dump_all(own, &others, &UDP_ANY, &next, scope))?;
    Ok(UdpSockets {
        cookies: dumped.sockets.iter().map(|s| (s.netns, s.cookie)).collect(),
        namespaces: dumped.namespaces.into_iter().collect(),
    })
}

/// The calling thread's namespace (what a socket created here sees; it can
/// differ from the process's if someone setns'd this thread) and the others.
fn namespaces() -> (Option<u64>, Vec<NsFile>) {
    match fs::metadata("/proc/thread-self/ns/net") {
        Ok(own) => (Some(own.ino()), other_namespaces(own.dev(), own.ino())),
        Err(_) => {
            log::debug!("cannot stat /proc/thread-self/ns/net; listing the current netns only");
            (None, Vec::new())
        }
    }
}

/// A network namespace other than ours, and a file that refers to it.
#[derive(Debug)]
struct NsFile {
    inode: u64,
    path: PathBuf,
}

/// Distinct network namespaces other than `own_ino`: those of processes
/// (/proc/PID/ns/net, one PID each) plus the named ones `ip netns add`
/// bind-mounts in /run/netns, which may hold no process at all.
fn other_namespaces(nsfs_dev: u64, own_ino: u64) -> Vec<NsFile> {
    let mut seen = HashSet::from([own_ino]);
    let mut found = Vec::new();
    let mut consider = |path: PathBuf| {
        // Only nsfs inodes are namespaces: a stale /run/netns file that is no
        // longer a bind mount lives on tmpfs.
        if let Ok(meta) = fs::metadata(&path)
            && meta.dev() == nsfs_dev
            && seen.insert(meta.ino())
        {
            found.push(NsFile {
                inode: meta.ino(),
                path,
            });
        }
    };
    if let Ok(procs) = fs::read_dir("/proc") {
        for entry in procs.flatten() {
            let name = entry.file_name();
            if !name.as_bytes().iter().all(u8::is_ascii_digit) {
                continue;
            }
            let mut path = PathBuf::from("/proc");
            path.push(&name);
            path.push("ns/net");
            consider(path);
        }
    }
    // Absent unless `ip netns add` was ever used.
    if let Ok(named) = fs::read_dir("/run/netns") {
        for entry in named.flatten() {
            consider(entry.path());
        }
    }
    found
}

/// What dumps found, and in which namespaces they could look.
#[derive(Default)]
struct Dumped {
    sockets: Vec<RawSocket>,
    namespaces: Vec<Option<u64>>,
}

/// Dumps our namespace on this thread and the others on worker threads.
fn dump_all<'scope>(
    own: Option<u64>,
    others: &'scope [NsFile],
    queries: &'static [Query],
    next: &'scope AtomicUsize,
    scope: &'scope thread::Scope<'scope, '_>,
) -> Result<Dumped, SnapshotError> {
    // A few workers, each entering namespaces one after another (taking the
    // next index from `next`); a host can have hundreds of containers and a
    // thread each would be wasteful.
    let n_workers = thread::available_parallelism()
        .map_or(2, usize::from)
        .clamp(2, 8)
        .min(others.len());
    let mut workers = Vec::with_capacity(n_workers);
    for _ in 0..n_workers {
        match thread::Builder::new().spawn_scoped(scope, move || dump_others(others, queries, next))
        {
            Ok(worker) => workers.push(worker),
            // The workers already running share out all the namespaces.
            Err(err) if !workers.is_empty() => log::debug!("fewer netns workers: {err}"),
            Err(err) => return Err(SnapshotError::Thread(err)),
        }
    }
    let mut dumped = Dumped {
        sockets: dump_netns(own, queries)?,
        namespaces: vec![own],
    };
    for worker in workers {
        let theirs = worker.join().map_err(|_| SnapshotError::WorkerPanicked)??;
        dumped.sockets.extend(theirs.sockets);
        dumped.namespaces.extend(theirs.namespaces);
    }
    Ok(dumped)
}

/// Worker loop: take the next namespace, enter it, dump it. The thread is
/// moved into other namespaces and is discarded at the end; the caller's
/// thread never changes namespace.
fn dump_others(
    others: &[NsFile],
    queries: &[Query],
    next: &AtomicUsize,
) -> Result<Dumped, SnapshotError> {
    let mut dumped = Dumped::default();
    while let Some(ns) = others.get(next.fetch_add(1, Ordering::Relaxed)) {
        match enter(ns) {
            // A socket is bound to the namespace it is created in, so
            // dump_netns's socket lists this namespace.
            Ok(()) => {
                dumped.sockets.extend(dump_netns(Some(ns.inode), queries)?);
                dumped.namespaces.push(Some(ns.inode));
            }
            Err(err) => log::debug!("skipping netns {} ({}): {err}", ns.inode, ns.path.display()),
        }
    }
    Ok(dumped)
}

/// Moves the calling thread into `ns`'s network namespace.
fn enter(ns: &NsFile) -> io::Result<()> {
    crate::sys::enter_netns(&ns.path, ns.inode)
}

/// One of the four dumps.
struct Query {
    name: &'static str,
    proto: Proto,
    family: u8,
    /// Kernel-side filter on socket state.
    states: StateFlags,
    /// Only listeners (TCP in LISTEN, UDP bound and unconnected), or
    /// every socket the state filter passes.
    listeners_only: bool,
}

const QUERIES: [Query; 4] = [
    Query {
        name: "tcp/ipv4",
        proto: Proto::Tcp,
        family: AF_INET,
        states: StateFlags::LISTEN,
        listeners_only: true,
    },
    Query {
        name: "tcp/ipv6",
        proto: Proto::Tcp,
        family: AF_INET6,
        states: StateFlags::LISTEN,
        listeners_only: true,
    },
    // An unconnected UDP socket is in TCP_CLOSE ("UNCONN" in ss); a
    // connected one is in TCP_ESTABLISHED.
    Query {
        name: "udp/ipv4",
        proto: Proto::Udp,
        family: AF_INET,
        states: StateFlags::CLOSE,
        listeners_only: true,
    },
    Query {
        name: "udp/ipv6",
        proto: Proto::Udp,
        family: AF_INET6,
        states: StateFlags::CLOSE,
        listeners_only: true,
    },
];

/// Every UDP socket, bound or connected.
const UDP_ANY: [Query; 2] = [
    Query {
        name: "udp/ipv4 any",
        proto: Proto::Udp,
        family: AF_INET,
        states: StateFlags::all(),
        listeners_only: false,
    },
    Query {
        name: "udp/ipv6 any",
        proto: Proto::Udp,
        family: AF_INET6,
        states: StateFlags::all(),
        listeners_only: false,
    },
];

/// A listening socket as sock_diag reports it, before process attribution.
#[derive(Debug)]
struct RawSocket {
    proto: Proto,
    addr: IpAddr,
    port: u16,
    cookie: u64,
    inode: u32,
    uid: u32,
    netns: Option<u64>,
}

/// The kernel fills dump replies up to 32 KiB (less when the reader's buffer
/// was smaller); 64 KiB never truncates.
const RECV_BUF_LEN: usize = 64 * 1024;

/// `queries`' dumps in the namespace the calling thread is in.
fn dump_netns(netns: Option<u64>, queries: &[Query]) -> Result<Vec<RawSocket>, SnapshotError> {
    let socket_err = |source| SnapshotError::Socket {
        netns: Netns(netns),
        source,
    };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(socket_err)?;
    socket.bind_auto().map_err(socket_err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(socket_err)?;
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut sockets = Vec::new();
    for (seq, query) in (1..).zip(queries) {
        dump(&socket, query, None, seq, netns, &mut buf, &mut |diag| {
            sockets.extend(listener(query, diag, netns));
        })?;
    }
    Ok(sockets)
}

/// Whether a socket listens on `proto` `addr`:`port` in the calling
/// thread's namespace now: for a listener whose process is gone before it
/// could be looked at (it handed the socket on, as systemd's socket-making
/// helper does), where it lives.
pub fn listens_here(proto: Proto, addr: IpAddr, port: u16) -> bool {
    dump_netns(None, &QUERIES).is_ok_and(|sockets| {
        sockets
            .iter()
            .any(|s| s.proto == proto && s.addr == addr && s.port == port)
    })
}

/// The listening sockets of the calling thread's namespace with their
/// inodes (to find who holds them in /proc).
pub fn own_listening_sockets() -> Vec<(Proto, IpAddr, u16, u64)> {
    dump_netns(None, &QUERIES)
        .map(|sockets| {
            sockets
                .into_iter()
                .map(|s| (s.proto, s.addr, s.port, u64::from(s.inode)))
                .collect()
        })
        .unwrap_or_default()
}

/// A connected socket's two ends, addresses canonical (an IPv4 peer of a
/// dual-stack IPv6 socket is an IPv4 address, as `SSH_CONNECTION` and
/// the policy name it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connected {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
}

/// Every connected `proto` socket of the calling thread's network
/// namespace, IPv4 and IPv6 (`ss -tun state established`): sock_diag's
/// binary dump, one pass over the kernel's table per family, where
/// /proc/net/tcp formats every socket as text and walks the table again
/// for each read. With `local_ports`, only those on one of them: the
/// kernel filters (`ss ... '( sport = :22 )'`), so a host with tens of
/// thousands of connections hands over only the few asked for.
pub fn connected(
    proto: Proto,
    local_ports: Option<&[u16]>,
) -> Result<Vec<Connected>, SnapshotError> {
    if local_ports.is_some_and(<[u16]>::is_empty) {
        return Ok(Vec::new());
    }
    match local_ports.and_then(local_port_filter) {
        // A kernel (or sandbox) that refuses the program still answers
        // the plain dump: the ports are then picked here.
        Some(program) => connected_dump(proto, Some(&program), None)
            .or_else(|_| connected_dump(proto, None, local_ports)),
        None => connected_dump(proto, None, local_ports),
    }
}

/// [`connected`]'s dumps: `program` for the kernel to filter with, `pick`
/// the local ports kept here (None: all).
fn connected_dump(
    proto: Proto,
    program: Option<&[u8]>,
    pick: Option<&[u16]>,
) -> Result<Vec<Connected>, SnapshotError> {
    let wanted = |port: u16| pick.is_none_or(|ports| ports.contains(&port));
    let socket_err = |source| SnapshotError::Socket {
        netns: Netns(None),
        source,
    };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(socket_err)?;
    socket.bind_auto().map_err(socket_err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(socket_err)?;
    let mut buf = vec![0u8; RECV_BUF_LEN];
    let mut found = Vec::new();
    let names = match proto {
        Proto::Tcp => ["tcp/ipv4 established", "tcp/ipv6 established"],
        Proto::Udp => ["udp/ipv4 connected", "udp/ipv6 connected"],
    };
    for (seq, (name, family)) in (1..).zip(names.into_iter().zip([AF_INET, AF_INET6])) {
        let query = Query {
            name,
            proto,
            family,
            states: StateFlags::ESTABLISHED,
            listeners_only: false,
        };
        dump(&socket, &query, program, seq, None, &mut buf, &mut |diag| {
            let id = &diag.socket_id;
            let (local, remote) = (
                id.source_address.to_canonical(),
                id.destination_address.to_canonical(),
            );
            if id.destination_port != 0
                && !local.is_unspecified()
                && !remote.is_unspecified()
                && wanted(id.source_port)
            {
                found.push(Connected {
                    local: std::net::SocketAddr::new(local, id.source_port),
                    remote: std::net::SocketAddr::new(remote, id.destination_port),
                });
            }
        })?;
    }
    Ok(found)
}

/// sock_diag's `INET_DIAG_BC_*` op codes used here (linux/inet_diag.h).
const BC_JMP: u8 = 1;
const BC_S_EQ: u8 = 11;
/// The request attribute that carries a filter program.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// Ports one filter program tests, a bound no host's SSH ports come near;
/// beyond it the kernel hands over everything and [`connected`] picks.
const MAX_FILTER_PORTS: usize = 64;

/// A sock_diag filter program (`INET_DIAG_REQ_BYTECODE`) that keeps the
/// sockets whose local port is one of `ports`; none for no ports or more
/// than [`MAX_FILTER_PORTS`].
///
/// The kernel runs it op by op: a test that holds moves on by its `yes`
/// bytes, one that fails by its `no`; a socket is kept when the run ends
/// exactly at the program's end, dropped when it jumps past it. Every
/// `no` must land on an op reached by following `yes` from the start (the
/// kernel checks), so the ports are an OR chain as `ss` compiles one: each
/// `S_EQ` (8 bytes: the op, then one holding the port) goes on to a `JMP`
/// that always skips to the end when it holds, and past that `JMP` to the
/// next port's test when it does not; the last one's `no` jumps 4 bytes
/// past the end.
fn local_port_filter(ports: &[u16]) -> Option<Vec<u8>> {
    if ports.is_empty() || ports.len() > MAX_FILTER_PORTS {
        return None;
    }
    let op = |code: u8, yes: u8, no: u16| {
        let mut b = [code, yes, 0, 0];
        b[2..].copy_from_slice(&no.to_ne_bytes());
        b
    };
    let mut program = Vec::with_capacity(ports.len() * 12);
    for (i, &port) in ports.iter().enumerate() {
        program.extend_from_slice(&op(BC_S_EQ, 8, 12));
        program.extend_from_slice(&op(0, 0, port));
        // What follows this JMP: the other ports' tests, 12 bytes each
        // but the last (8), and 4 for the JMP itself; past them is the end.
        let left = ports.len() - 1 - i;
        if left > 0 {
            let skip = u16::try_from(left * 12).ok()?;
            program.extend_from_slice(&op(BC_JMP, 4, skip));
        }
    }
    Some(program)
}

/// Runs one dump to its NLMSG_DONE, handing each socket to `keep`;
/// `filter`: a sock_diag filter program for the kernel to run first.
fn dump(
    socket: &Socket,
    query: &Query,
    filter: Option<&[u8]>,
    seq: u32,
    netns: Option<u64>,
    buf: &mut [u8],
    keep: &mut dyn FnMut(&InetResponseHeader),
) -> Result<(), SnapshotError> {
    let query_err = |source| SnapshotError::Query {
        query: query.name,
        netns: Netns(netns),
        source,
    };
    let decode_err = |source| SnapshotError::Decode {
        query: query.name,
        netns: Netns(netns),
        source,
    };

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: query.family,
            protocol: match query.proto {
                Proto::Tcp => IPPROTO_TCP,
                Proto::Udp => IPPROTO_UDP,
            },
            extensions: ExtensionFlags::empty(),
            states: query.states.clone(),
            socket_id: if query.family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    // The crate has no filter attribute: appended by hand, and the
    // message's length (its header's first field) grown to match.
    if let Some(program) = filter {
        let too_long = || query_err(io::Error::other("sock_diag filter program too long"));
        let attr_len = u16::try_from(4 + program.len()).map_err(|_| too_long())?;
        let total = u32::try_from(bytes.len() + usize::from(attr_len)).map_err(|_| too_long())?;
        bytes.extend_from_slice(&attr_len.to_ne_bytes());
        bytes.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        bytes.extend_from_slice(program);
        bytes[..4].copy_from_slice(&total.to_ne_bytes());
    }
    socket.send(&bytes, 0).map_err(query_err)?;

    loop {
        // MSG_TRUNC makes recv return the real datagram length, so a
        // truncated one is detected instead of misparsed.
        let len = match socket.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Ok(len) => len,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(query_err(err)),
        };
        if len == 0 {
            return Err(query_err(io::ErrorKind::UnexpectedEof.into()));
        }
        let Some(mut rest) = buf.get(..len) else {
            return Err(query_err(io::Error::other(format!(
                "reply of {len} bytes exceeds the {} byte buffer",
                buf.len()
            ))));
        };
        while !rest.is_empty() {
            // Checks the length field, which is then at least a header long.
            let message = NetlinkBuffer::new_checked(rest).map_err(decode_err)?;
            let msg_len = message.length() as usize;
            if message.sequence_number() == seq {
                let payload = message.payload();
                match message.message_type() {
                    NLMSG_DONE => {
                        // A dump that fails midway reports it here.
                        return match status_code(payload) {
                            0 => Ok(()),
                            code => Err(query_err(errno(code))),
                        };
                    }
                    NLMSG_ERROR => match status_code(payload) {
                        0 => {} // an ACK
                        code => return Err(query_err(errno(code))),
                    },
                    NLMSG_OVERRUN => {
                        return Err(query_err(io::Error::other("netlink overrun, data lost")));
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        // Header only: the attributes are not needed.
                        let diag = InetResponseHeader::parse(payload).map_err(decode_err)?;
                        keep(&diag);
                    }
                    _ => {} // NLMSG_NOOP, or stray types
                }
            }
            // Messages are 4-byte aligned; the last one may lack its padding.
            let advance = msg_len.next_multiple_of(4).min(rest.len());
            rest = rest.get(advance..).unwrap_or_default();
        }
    }
}

/// The error code leading NLMSG_ERROR and NLMSG_DONE payloads (negative
/// errno, 0 for success); a DONE may legally have an empty payload.
fn status_code(payload: &[u8]) -> i32 {
    payload
        .first_chunk::<4>()
        .map_or(0, |code| i32::from_ne_bytes(*code))
}

/// The error a netlink status code (a negative errno) stands for.
fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code.saturating_neg())
}

/// The listener in a diag reply, if it is one (the request's state filter
/// already did most of the work).
fn listener(query: &Query, diag: &InetResponseHeader, netns: Option<u64>) -> Option<RawSocket> {
    let id = &diag.socket_id;
    let listening = match query.proto {
        Proto::Tcp => diag.state == TCP_LISTEN,
        // Bound but not connected: `ss -lu` shows exactly these.
        Proto::Udp => diag.state == TCP_CLOSE && id.destination_port == 0,
    };
    if query.listeners_only && !listening {
        return None;
    }
    Some(RawSocket {
        proto: query.proto,
        addr: id.source_address,
        port: id.source_port,
        cookie: cookie(id.cookie),
        inode: diag.inode,
        uid: diag.uid,
        netns,
    })
}

/// The kernel's `__u32 idiag_cookie[2]`, low word first, as the u64 that
/// bpf_get_socket_cookie() and SO_COOKIE report.
fn cookie(raw: [u8; 8]) -> u64 {
    let [a, b, c, d, e, f, g, h] = raw;
    let low = u32::from_ne_bytes([a, b, c, d]);
    let high = u32::from_ne_bytes([e, f, g, h]);
    u64::from(high) << 32 | u64::from(low)
}

#[cfg(test)]
mod tests {
    use std::{
        error::Error,
        net::{Ipv4Addr, Ipv6Addr, SocketAddr as NetAddr, TcpListener, UdpSocket},
        process::{Child, Command, Stdio},
        time::{Duration, Instant, SystemTime, UNIX_EPOCH},
    };

    use super::*;
    use crate::model::Family;

    type TestResult = Result<(), Box<dyn Error>>;

    fn own_netns() -> Result<u64, Box<dyn Error>> {
        Ok(fs::metadata("/proc/self/ns/net")?.ino())
    }

    fn find(listeners: &[Listener], proto: Proto, addr: IpAddr, port: u16) -> Option<&Listener> {
        listeners
            .iter()
            .find(|l| l.proto == proto && l.addr == addr && l.port == port)
    }

    #[test]
    fn lists_our_tcp_and_udp_listeners() -> TestResult {
        let pid = std::process::id();
        let netns = own_netns()?;
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let udp = UdpSocket::bind("[::]:0")?;
        let connected = UdpSocket::bind("127.0.0.1:0")?;
        connected.connect("127.0.0.1:9")?;
        let tcp_port = tcp.local_addr()?.port();
        let udp_port = udp.local_addr()?.port();
        let connected_port = connected.local_addr()?.port();

        let listeners = snapshot()?;

        let t = find(
            &listeners,
            Proto::Tcp,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            tcp_port,
        )
        .ok_or("our TCP listener is missing")?;
        assert_eq!(t.family(), Family::Ipv4);
        assert_eq!(t.process.pid, Some(pid));
        assert_eq!(t.netns, Some(netns));
        assert!(matches!(t.sock_id, SockId::Cookie(c) if c != 0));

        let u = find(
            &listeners,
            Proto::Udp,
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            udp_port,
        )
        .ok_or("our dual-stack UDP socket is missing")?;
        assert_eq!(u.family(), Family::Ipv6);
        assert_eq!(u.process.pid, Some(pid));
        assert_eq!(u.netns, Some(netns));
        assert!(u.process.comm.is_some());

        assert!(
            !listeners
                .iter()
                .any(|l| l.proto == Proto::Udp && l.port == connected_port),
            "a connected UDP socket is not a listener"
        );

        // Sorted, and each socket once.
        let keys: Vec<_> = listeners
            .iter()
            .map(|l| (l.netns, l.proto, l.port, l.addr))
            .collect();
        assert!(keys.is_sorted());
        let cookies: HashSet<_> = listeners
            .iter()
            .map(|l| match l.sock_id {
                SockId::Cookie(c) | SockId::KernelAddr(c) => Some(c),
                SockId::Unknown => None,
            })
            .collect();
        assert_eq!(cookies.len(), listeners.len());
        Ok(())
    }

    /// A named network namespace with a socat listening in it; both go away
    /// on drop, panic included.
    struct NsListener {
        name: String,
        child: Option<Child>,
    }

    impl NsListener {
        fn start(port: u16) -> Result<Self, Box<dyn Error>> {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
            let name = format!("pwtest-snap-{}-{nanos:x}", std::process::id());
            run(Command::new("ip").args(["netns", "add", &name]))?;
            let mut guard = NsListener { name, child: None };
            // A new namespace's loopback is down and has no 127.0.0.1 yet.
            run(Command::new("ip").args(["-n", &guard.name, "link", "set", "lo", "up"]))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &guard.name, "socat", "-u"])
                .arg(format!("TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1"))
                .arg("-")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?;
            guard.child = Some(child);
            Ok(guard)
        }

        /// `ip netns exec` execs its command, so this is socat's PID.
        fn pid(&self) -> Option<u32> {
            self.child.as_ref().map(Child::id)
        }
    }

    impl Drop for NsListener {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn run(cmd: &mut Command) -> TestResult {
        let status = cmd.status()?;
        if !status.success() {
            return Err(format!("{cmd:?} failed: {status}").into());
        }
        Ok(())
    }

    #[test]
    fn lists_listeners_in_other_namespaces() -> TestResult {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
        let port = 20_000 + u16::try_from(nanos % 40_000)?;
        let ns = NsListener::start(port)?;
        let ns_inode = fs::metadata(format!("/run/netns/{}", ns.name))?.ino();
        assert_ne!(Some(ns_inode), Some(own_netns()?));

        let deadline = Instant::now() + Duration::from_secs(3);
        let found = loop {
            let listeners = snapshot()?;
            let hit = listeners
                .into_iter()
                .find(|l| l.netns == Some(ns_inode) && l.proto == Proto::Tcp && l.port == port);
            match hit {
                Some(hit) => break hit,
                None if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                None => return Err(format!("socat on port {port} not seen in {}", ns.name).into()),
            }
        };
        assert_eq!(found.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(found.process.pid, ns.pid());
        assert_eq!(found.process.comm.as_deref(), Some("socat"));
        Ok(())
    }

    /// One line of ss: a listener and the PIDs holding it.
    type SsListener = (Proto, u16, Vec<u32>);

    /// The listeners `ss -ltnup -H` attributes to processes, in our netns.
    fn ss_listeners() -> Result<HashSet<SsListener>, Box<dyn Error>> {
        let output = Command::new("ss").args(["-ltnup", "-H"]).output()?;
        if !output.status.success() {
            return Err(format!("ss failed: {}", output.status).into());
        }
        let mut found = HashSet::new();
        for line in String::from_utf8(output.stdout)?.lines() {
            // Netid State Recv-Q Send-Q Local:Port Peer:Port Process
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(netid), Some(local)) = (fields.first(), fields.get(4)) else {
                continue;
            };
            let proto = match *netid {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => continue,
            };
            let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
            else {
                continue;
            };
            let mut pids: Vec<u32> = line
                .split("pid=")
                .skip(1)
                .filter_map(|rest| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().ok()
                })
                .collect();
            pids.sort_unstable();
            if !pids.is_empty() {
                found.insert((proto, port, pids));
            }
        }
        Ok(found)
    }

    #[test]
    fn agrees_with_ss() -> TestResult {
        // Something for ss to show with a pid even on a bare machine.
        let _tcp = TcpListener::bind(NetAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let _udp = UdpSocket::bind(NetAddr::from((Ipv6Addr::UNSPECIFIED, 0)))?;
        let netns = own_netns()?;

        // Only listeners ss shows both before and after the snapshot count:
        // other tests open and close sockets concurrently.
        let before = ss_listeners()?;
        let ours: HashSet<(Proto, u16, u32)> = snapshot()?
            .into_iter()
            .filter(|l| l.netns == Some(netns))
            .filter_map(|l| Some((l.proto, l.port, l.process.pid?)))
            .collect();
        let after = ss_listeners()?;
        assert!(!before.is_empty());
        for stable in before.intersection(&after) {
            let (proto, port, pids) = stable;
            assert!(
                pids.iter().any(|&pid| ours.contains(&(*proto, *port, pid))),
                "ss shows {proto:?} port {port} for pids {pids:?}; snapshot doesn't"
            );
        }
        Ok(())
    }

    /// The kernel keeps only the connections on the local ports asked for
    /// (so a program it rejected, or misread, fails here: the reader adds
    /// no check of its own when it sends one), for one port and a chain of
    /// several, IPv4 and IPv6; with no ports asked, every connection.
    #[test]
    fn connections_are_picked_by_local_port_in_the_kernel() -> TestResult {
        let listeners = [
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
            TcpListener::bind((Ipv6Addr::LOCALHOST, 0))?,
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
            TcpListener::bind((Ipv6Addr::LOCALHOST, 0))?,
        ];
        let ports = listeners
            .iter()
            .map(|l| Ok(l.local_addr()?.port()))
            .collect::<Result<Vec<u16>, io::Error>>()?;
        let mut held = Vec::new();
        for l in &listeners {
            held.push(std::net::TcpStream::connect(l.local_addr()?)?);
            held.push(l.accept()?.0);
        }
        // The accepted ends, by local port (the connecting ends have
        // ephemeral ones).
        let served = |found: &[Connected]| -> std::collections::BTreeSet<u16> {
            found
                .iter()
                .map(|c| c.local.port())
                .filter(|p| ports.contains(p))
                .collect()
        };
        for asked in [
            vec![ports[2]],
            vec![ports[0], ports[3]],
            vec![ports[1], ports[2], ports[4]],
        ] {
            let found = connected(Proto::Tcp, Some(&asked))?;
            assert!(
                found.iter().all(|c| asked.contains(&c.local.port())),
                "asked for {asked:?}, got {found:?}"
            );
            assert_eq!(served(&found), asked.iter().copied().collect(), "{found:?}");
        }
        let all = connected(Proto::Tcp, None)?;
        assert_eq!(served(&all), ports.iter().copied().collect());
        assert!(connected(Proto::Tcp, Some(&[]))?.is_empty());
        // A program the kernel refuses is an error, which `connected`
        // answers with the plain dump, picked by port here.
        assert!(connected_dump(Proto::Tcp, Some(&[0xff, 4, 8, 0]), None).is_err());
        let picked = connected_dump(Proto::Tcp, None, Some(&[ports[1]]))?;
        assert_eq!(served(&picked), [ports[1]].into_iter().collect());
        Ok(())
    }

    #[test]
    fn cookie_is_low_word_first() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x1122_3344u32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x5566_7788u32.to_ne_bytes());
        assert_eq!(cookie(raw), 0x5566_7788_1122_3344);
    }
}
