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

/// What one kernel record comes to: its event (none for a duplicate), after
/// the close of a listener it shows was missed.
#[derive(Debug, Default)]
pub struct Applied {
    pub closed: Option<ListenerEvent>,
    pub event: Option<ListenerEvent>,
}

impl IntoIterator for Applied {
    type Item = ListenerEvent;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<ListenerEvent>, 2>>;

    fn into_iter(self) -> Self::IntoIter {
        [self.closed, self.event].into_iter().flatten()
    }
}

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

    /// Turns an enriched kernel record into events and updates the set:
    /// none for a duplicate of a snapshot entry (a listener opened while the
    /// snapshot was being taken is seen by both), and two when a listen
    /// shows that an earlier close was lost (see below).
    pub fn apply(&mut self, rec: Enriched, ts: SystemTime, before_snapshot: bool) -> Applied {
        let key = (rec.listener.proto, rec.listener.sock_id);
        let event = |kind, origin, listener| ListenerEvent {
            ts,
            kind,
            origin,
            listener,
            reach: None,
        };
        match rec.kind {
            EventKind::Listen => {
                let mut listener = rec.listener;
                if listener.proto == Proto::Tcp && listener.port == 0 {
                    listener.port = self
                        .autobound_port(&listener, &rec.listening_ports)
                        .unwrap_or(0);
                }
                if before_snapshot && self.seen_in_snapshot(&listener) {
                    return Applied::default();
                }
                let mut closed = None;
                if self.open.contains_key(&key) {
                    // A cookie names one socket for good: a second report
                    // of it is the snapshot's. A kernel address enters
                    // LISTEN again only as a new socket in a freed one's
                    // memory (a listener leaves LISTEN only by closing, and
                    // its events arrive in order): that close was lost in
                    // a ring overflow. Said now, or the new listener would
                    // pass for the old one, unreported, on the old port.
                    if !matches!(key.1, SockId::KernelAddr(_)) {
                        return Applied::default();
                    }
                    closed = self
                        .remove(&key)
                        .map(|old| event(EventKind::Close, Origin::Inferred, old));
                }
                self.add(key, listener.clone());
                Applied {
                    closed,
                    event: Some(event(EventKind::Listen, Origin::Live, listener)),
                }
            }
            EventKind::Close => {
                let listener = match self.remove(&key) {
                    Some(opened) => opened,
                    None => self
                        .take_snapshot_match(&rec.listener)
                        .unwrap_or(rec.listener),
                };
                Applied {
                    closed: None,
                    event: Some(event(EventKind::Close, Origin::Live, listener)),
                }
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::ProcessInfo;

    fn record(kind: EventKind, proto: Proto, port: u16, sock_id: SockId) -> Enriched {
        Enriched {
            ts_ns: 1,
            kind,
            listener: Listener {
                proto,
                addr: IpAddr::from([127, 0, 0, 1]),
                port,
                sock_id,
                netns: Some(1),
                process: ProcessInfo::default().into(),
            },
            listening_ports: Vec::new(),
            netns_ifaces: None,
        }
    }

    fn said(applied: Applied) -> Vec<(EventKind, Origin, u16)> {
        applied
            .into_iter()
            .map(|e| (e.kind, e.origin, e.listener.port))
            .collect()
    }

    #[test]
    fn a_listen_in_a_lost_listeners_memory_says_that_one_closed() {
        let mut set = Listeners::default();
        let at = SockId::KernelAddr(0xffff_8880_0000_1000);
        let now = SystemTime::UNIX_EPOCH;
        let listen = |port| record(EventKind::Listen, Proto::Tcp, port, at);
        assert_eq!(
            said(set.apply(listen(8080), now, false)),
            [(EventKind::Listen, Origin::Live, 8080)]
        );
        // Its close was lost; a new listener takes the freed socket.
        assert_eq!(
            said(set.apply(listen(9090), now, false)),
            [
                (EventKind::Close, Origin::Inferred, 8080),
                (EventKind::Listen, Origin::Live, 9090)
            ]
        );
        assert!(!set.is_listened(&(Proto::Tcp, 8080, Some(1))));
        assert!(set.is_listened(&(Proto::Tcp, 9090, Some(1))));
        assert_eq!(set.len(), 1);
        let close = record(EventKind::Close, Proto::Tcp, 9090, at);
        assert_eq!(
            said(set.apply(close, now, false)),
            [(EventKind::Close, Origin::Live, 9090)]
        );
        assert!(set.is_empty());
    }

    #[test]
    fn a_socket_reported_twice_by_cookie_is_one_listener() {
        let mut set = Listeners::default();
        let bind = || record(EventKind::Listen, Proto::Udp, 53, SockId::Cookie(7));
        set.insert_snapshot(bind().listener);
        assert!(said(set.apply(bind(), SystemTime::UNIX_EPOCH, true)).is_empty());
        assert!(said(set.apply(bind(), SystemTime::UNIX_EPOCH, false)).is_empty());
        assert_eq!(set.len(), 1);
    }
}
