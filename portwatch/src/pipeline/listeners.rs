//! The set of listeners known right now, and turning enriched kernel
//! records into complete events: a close matched to the listen it ends (so
//! a close carries who opened the socket), a listen the snapshot already
//! reported left out.

use std::{collections::HashMap, time::SystemTime};

use super::enrich::Enriched;
use crate::model::{EventKind, Listener, ListenerEvent, Origin, Proto, SockId};

/// The tables' hasher: their keys are the kernel's socket ids and ports,
/// not something a peer picks, and SipHash was a tenth of a burst's cost.
type Fast = foldhash::fast::RandomState;

/// A port in a network namespace.
pub type PortKey = (Proto, u16, Option<u64>);

#[derive(Default)]
pub struct Listeners {
    /// Boxed: the table keeps spare slots (up to half of it after it
    /// grows), which then cost a pointer each rather than a listener.
    open: HashMap<(Proto, SockId), Box<Listener>, Fast>,
    /// Listeners per port, to say at once whether a port is listened on.
    per_port: HashMap<PortKey, usize, Fast>,
    /// Ports that gained their first listener or lost their last since the
    /// last `take_changed`.
    changed: Vec<PortKey>,
}

fn port_key(l: &Listener) -> PortKey {
    (l.proto, l.port, l.netns)
}

impl Listeners {
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Listener> {
        self.open.values().map(|l| &**l)
    }

    /// Records a listener found by the start-up snapshot.
    pub fn insert_snapshot(&mut self, listener: Listener) {
        self.add((listener.proto, listener.sock_id), listener);
    }

    /// Names another process as the one behind a listener (its socket was
    /// handed on); false when no such listener is open.
    pub fn set_process(
        &mut self,
        proto: Proto,
        sock_id: SockId,
        process: std::sync::Arc<crate::model::ProcessInfo>,
    ) -> bool {
        match self.open.get_mut(&(proto, sock_id)) {
            Some(l) => {
                l.process = process;
                true
            }
            None => false,
        }
    }

    /// Whether anything listens on `proto/port` in `netns`.
    pub fn is_listened(&self, key: &PortKey) -> bool {
        self.per_port.get(key).is_some_and(|n| *n > 0)
    }

    /// The ports that were first listened on or last closed since the last
    /// call.
    pub fn take_changed(&mut self) -> Vec<PortKey> {
        std::mem::take(&mut self.changed)
    }

    fn add(&mut self, key: (Proto, SockId), listener: Listener) {
        let port = port_key(&listener);
        if let Some(old) = self.open.insert(key, Box::new(listener)) {
            self.count_out(port_key(&old));
        }
        let n = self.per_port.entry(port).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.changed.push(port);
        }
    }

    fn remove(&mut self, key: &(Proto, SockId)) -> Option<Listener> {
        let listener = self.open.remove(key)?;
        self.count_out(port_key(&listener));
        Some(*listener)
    }

    fn count_out(&mut self, port: PortKey) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_port.remove(&port);
                self.changed.push(port);
            }
        }
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

    /// Turns an enriched kernel record into an event and updates the set.
    /// Returns None for a duplicate of a snapshot entry (a listener opened
    /// while the snapshot was being taken is seen by both).
    pub fn apply(
        &mut self,
        rec: Enriched,
        ts: SystemTime,
        before_snapshot: bool,
    ) -> Option<ListenerEvent> {
        let key = (rec.listener.proto, rec.listener.sock_id);
        match rec.kind {
            EventKind::Listen => {
                let mut listener = rec.listener;
                if listener.proto == Proto::Tcp && listener.port == 0 {
                    listener.port = self
                        .autobound_port(&listener, &rec.listening_ports)
                        .unwrap_or(0);
                }
                let duplicate = self.open.contains_key(&key)
                    || (before_snapshot && self.seen_in_snapshot(&listener));
                if duplicate {
                    return None;
                }
                self.add(key, listener.clone());
                Some(ListenerEvent {
                    ts,
                    kind: EventKind::Listen,
                    origin: Origin::Live,
                    listener,
                    reach: None,
                })
            }
            EventKind::Close => {
                let listener = match self.remove(&key) {
                    Some(opened) => opened,
                    None => self
                        .take_snapshot_match(&rec.listener)
                        .unwrap_or(rec.listener),
                };
                Some(ListenerEvent {
                    ts,
                    kind: EventKind::Close,
                    origin: Origin::Live,
                    listener,
                    reach: None,
                })
            }
        }
    }

    /// The port the kernel picked for a listen() without bind(): one of the
    /// process's listening ports (`listening`, read from /proc) that no
    /// known listener of it holds yet.
    fn autobound_port(&self, l: &Listener, listening: &[u16]) -> Option<u16> {
        let pid = l.process.pid?;
        listening.iter().copied().find(|port| {
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
        self.remove(&key)
    }
}
