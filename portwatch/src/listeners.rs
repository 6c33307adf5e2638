//! The set of listeners known right now, and turning kernel records into
//! complete events: process details from /proc, and a close matched to the
//! listen it ends (so a close carries who opened the socket).

use std::{collections::HashMap, time::SystemTime};

use crate::{
    events::decode::RawListen,
    model::{EventKind, Listener, ListenerEvent, Origin, ProcessInfo, Proto, SockId},
    procinfo,
};

#[derive(Default)]
pub struct Listeners {
    open: HashMap<(Proto, SockId), Listener>,
    procs: ProcCache,
}

/// What /proc said about a process, kept for a short while: a burst of
/// listeners comes from a few processes, and reading six /proc files per
/// event would make user space the bottleneck (about 50 us an event).
#[derive(Default)]
struct ProcCache {
    entries: HashMap<u32, CachedProc>,
}

struct CachedProc {
    /// The kernel's comm when it was read: a different one means the pid
    /// now runs another program (exec, or a reused pid).
    comm: String,
    read_at: std::time::Instant,
    netns: Option<u64>,
    exe: Option<String>,
    cmdline: Option<String>,
    cgroup: Option<String>,
}

/// How long a process's details are trusted without reading /proc again.
const PROC_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// Bound on the cache; it is cleared when full (the next reads refill it).
const PROC_CACHE_MAX: usize = 4096;

impl ProcCache {
    fn lookup(&mut self, tgid: u32, comm: &str) -> &CachedProc {
        let fresh = self
            .entries
            .get(&tgid)
            .is_some_and(|c| c.comm == comm && c.read_at.elapsed() < PROC_TTL);
        if !fresh {
            if self.entries.len() >= PROC_CACHE_MAX {
                self.entries.clear();
            }
            let details = procinfo::process_info(tgid);
            self.entries.insert(
                tgid,
                CachedProc {
                    comm: comm.to_string(),
                    read_at: std::time::Instant::now(),
                    netns: procinfo::netns_of(tgid),
                    exe: details.exe,
                    cmdline: details.cmdline,
                    cgroup: details.cgroup,
                },
            );
        }
        &self.entries[&tgid]
    }
}

impl Listeners {
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Listener> {
        self.open.values()
    }

    /// Records a listener found by the start-up snapshot.
    pub fn insert_snapshot(&mut self, listener: Listener) {
        self.open
            .insert((listener.proto, listener.sock_id), listener);
    }

    /// Whether a live TCP listen is one the snapshot already reported: the
    /// tracepoint names sockets by kernel address, sock_diag by cookie, so a
    /// listener seen by both is matched by what it listens on.
    fn seen_in_snapshot(&self, l: &Listener) -> bool {
        self.open.values().any(|s| {
            matches!(s.sock_id, SockId::Cookie(_))
                && s.proto == l.proto
                && s.addr == l.addr
                && s.port == l.port
                && s.netns == l.netns
                && s.process.pid == l.process.pid
        })
    }

    /// Turns a kernel record into an event and updates the set. Returns None
    /// for a duplicate of a snapshot entry (a listener opened while the
    /// snapshot was being taken is seen by both).
    pub fn apply(
        &mut self,
        raw: RawListen,
        ts: SystemTime,
        before_snapshot: bool,
    ) -> Option<ListenerEvent> {
        let key = (raw.proto, raw.sock_id);
        match raw.kind {
            EventKind::Listen => {
                let mut listener = enrich(&mut self.procs, raw);
                if listener.proto == Proto::Tcp && listener.port == 0 {
                    listener.port = self.autobound_port(&listener).unwrap_or(0);
                }
                let duplicate = self.open.contains_key(&key)
                    || (before_snapshot && self.seen_in_snapshot(&listener));
                if duplicate {
                    return None;
                }
                self.open.insert(key, listener.clone());
                Some(ListenerEvent {
                    ts,
                    kind: EventKind::Listen,
                    origin: Origin::Live,
                    listener,
                    exposure: None,
                })
            }
            EventKind::Close => {
                let listener = match self.open.remove(&key) {
                    Some(opened) => opened,
                    None => {
                        let closing = from_kernel(&raw, None);
                        self.take_snapshot_match(&closing)
                            .unwrap_or_else(|| enrich(&mut self.procs, raw))
                    }
                };
                Some(ListenerEvent {
                    ts,
                    kind: EventKind::Close,
                    origin: Origin::Live,
                    listener,
                    exposure: None,
                })
            }
        }
    }

    /// The port the kernel picked for a listen() without bind(): one of the
    /// process's listening ports that no known listener of it holds yet.
    fn autobound_port(&self, l: &Listener) -> Option<u16> {
        let pid = l.process.pid?;
        procinfo::listening_tcp_ports(pid, l.addr.is_ipv6())
            .into_iter()
            .find(|port| {
                !self
                    .open
                    .values()
                    .any(|o| o.proto == Proto::Tcp && o.port == *port && o.process.pid == Some(pid))
            })
    }

    /// A TCP listener from the snapshot closing: match by address, port and
    /// namespace, preferring the same process (SO_REUSEPORT groups share a port).
    fn take_snapshot_match(&mut self, closing: &Listener) -> Option<Listener> {
        let candidates = self.open.iter().filter(|(_, s)| {
            matches!(s.sock_id, SockId::Cookie(_))
                && s.proto == closing.proto
                && s.addr == closing.addr
                && s.port == closing.port
        });
        let key = candidates
            .max_by_key(|(_, s)| {
                (
                    s.process.pid == closing.process.pid,
                    s.netns == closing.netns,
                )
            })
            .map(|(k, _)| *k)?;
        self.open.remove(&key)
    }
}

fn from_kernel(raw: &RawListen, netns: Option<u64>) -> Listener {
    Listener {
        proto: raw.proto,
        addr: raw.addr,
        port: raw.port,
        sock_id: raw.sock_id,
        netns,
        process: ProcessInfo {
            pid: Some(raw.tgid),
            comm: Some(raw.comm.clone()),
            uid: Some(raw.uid),
            ..ProcessInfo::default()
        },
    }
}

/// Adds what only /proc knows. The kernel's pid, comm and uid stay: they
/// were taken in the right context, /proc may already show another program.
fn enrich(procs: &mut ProcCache, raw: RawListen) -> Listener {
    let cached = procs.lookup(raw.tgid, &raw.comm);
    let mut listener = from_kernel(&raw, cached.netns);
    listener.process.exe = cached.exe.clone();
    listener.process.cmdline = cached.cmdline.clone();
    listener.process.cgroup = cached.cgroup.clone();
    listener
}
