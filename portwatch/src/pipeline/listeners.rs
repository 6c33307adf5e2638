//! The set of listeners known right now, and turning enriched kernel
//! records into complete events: a close matched to the listen it ends (so
//! a close carries who opened the socket), a listen the snapshot already
//! reported left out.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    net::IpAddr,
    time::SystemTime,
};

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

/// What a listener listens on, the same whether the kernel hook or
/// sock_diag found it (they name sockets differently).
type Endpoint = (Proto, IpAddr, u16, Option<u64>);

/// A listener known here: its key and its process.
type Known = ((Proto, SockId), Option<u32>);

fn endpoint(l: &Listener) -> Endpoint {
    (l.proto, l.addr, l.port, l.netns)
}

#[derive(Default)]
pub struct Listeners {
    /// Boxed: the table keeps spare slots (up to half of it after it
    /// grows), which then cost a pointer each rather than a listener.
    open: HashMap<(Proto, SockId), Box<Listener>, Fast>,
    /// Listeners per port, kept only for a daemon that asks (the guard's
    /// owned ports): `watch` has no use for it, and would pay a second
    /// table's probe per event and a list of changes nobody takes.
    ports: Option<PortCounts>,
    /// While a rescan runs: when it began (monotonic ns), and what kernel
    /// records since then opened or closed, which it may or may not show.
    touched: Option<(u64, HashSet<Endpoint, Fast>)>,
    /// TCP listeners that sock_diag found (named by cookie), by address and
    /// port: the tracepoint names TCP sockets by kernel address, so its
    /// reports of these are matched by what they listen on. A scan of every
    /// listener per report made 45,000 of them closing at once quadratic
    /// (41 us per close, 5.8 s to report them all).
    found_tcp: HashMap<(IpAddr, u16), Vec<u64>, Fast>,
    /// While a batch of records is applied: the TCP ports known here to be
    /// held by each process that made a listen() without bind() in it (how
    /// many listeners on each), built with one pass over the table per
    /// process and batch and kept in step. A scan per record made a burst
    /// of such listens quadratic.
    held: HashMap<u32, HashMap<u16, u32, Fast>, Fast>,
    /// UDP sockets found at start that closed before the release hook was
    /// told of them, said closed then (cookies are never reused): the
    /// kernel's records of them are stale. A handful, from the start.
    gone_unseen: HashSet<u64, Fast>,
}

#[derive(Default)]
struct PortCounts {
    /// Listeners per port, to say at once whether a port is listened on.
    per_port: HashMap<PortKey, usize, Fast>,
    /// Ports that gained their first listener or lost their last since the
    /// last `take_changed`.
    changed: Vec<PortKey>,
    /// Ports that gained or lost any listener since the last
    /// `take_touched` (who holds a port can change without the first of
    /// these).
    touched: Vec<PortKey>,
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

    /// From now on, counts listeners per port (for [`Self::is_listened`]
    /// and [`Self::take_changed`]); the listeners already known count too.
    pub fn track_ports(&mut self) {
        if self.ports.is_some() {
            return;
        }
        let mut counts = PortCounts::default();
        for l in self.open.values() {
            *counts.per_port.entry(port_key(l)).or_insert(0) += 1;
        }
        counts.changed = counts.per_port.keys().copied().collect();
        self.ports = Some(counts);
    }

    /// Whether anything listens on `proto/port` in `netns`; always false
    /// unless [`Self::track_ports`] was called.
    pub fn is_listened(&self, key: &PortKey) -> bool {
        self.ports
            .as_ref()
            .and_then(|p| p.per_port.get(key))
            .is_some_and(|n| *n > 0)
    }

    /// The ports that were first listened on or last closed since the last
    /// call (while ports are tracked).
    pub fn take_changed(&mut self) -> Vec<PortKey> {
        self.ports
            .as_mut()
            .map(|p| std::mem::take(&mut p.changed))
            .unwrap_or_default()
    }

    /// The ports that gained or lost a listener since the last call
    /// (while ports are tracked).
    pub fn take_touched(&mut self) -> Vec<PortKey> {
        self.ports
            .as_mut()
            .map(|p| std::mem::take(&mut p.touched))
            .unwrap_or_default()
    }

    fn add(&mut self, key: (Proto, SockId), listener: Listener) {
        if let Some(old) = self.open.remove(&key) {
            self.noted_out(key, &old);
        }
        self.noted_in(key, &listener);
        self.open.insert(key, Box::new(listener));
    }

    /// What is kept beside the table for a listener that came in under
    /// `key`: its port's count, the index of found TCP listeners, the
    /// ports a batch's processes hold.
    fn noted_in(&mut self, key: (Proto, SockId), l: &Listener) {
        self.count_in(port_key(l));
        if let Some((endpoint, cookie)) = found_tcp_key(key, l) {
            self.found_tcp.entry(endpoint).or_default().push(cookie);
        }
        self.held_in(l);
    }

    /// [`Self::noted_in`] undone, for a listener that left the table.
    fn noted_out(&mut self, key: (Proto, SockId), l: &Listener) {
        self.count_out(port_key(l));
        if let Some((endpoint, cookie)) = found_tcp_key(key, l)
            && let Entry::Occupied(mut e) = self.found_tcp.entry(endpoint)
        {
            e.get_mut().retain(|c| *c != cookie);
            if e.get().is_empty() {
                e.remove();
            }
        }
        self.held_out(l);
    }

    /// The found TCP listeners on `addr`:`port`, by key.
    fn found_on(&self, addr: IpAddr, port: u16) -> impl Iterator<Item = (Proto, SockId)> + '_ {
        self.found_tcp
            .get(&(addr, port))
            .into_iter()
            .flatten()
            .map(|c| (Proto::Tcp, SockId::Cookie(*c)))
    }

    fn count_in(&mut self, port: PortKey) {
        let Some(ports) = &mut self.ports else {
            return;
        };
        ports.touched.push(port);
        let n = ports.per_port.entry(port).or_insert(0);
        *n += 1;
        if *n == 1 {
            ports.changed.push(port);
        }
    }

    fn remove(&mut self, key: &(Proto, SockId)) -> Option<Listener> {
        let listener = self.open.remove(key)?;
        self.noted_out(*key, &listener);
        Some(*listener)
    }

    fn count_out(&mut self, port: PortKey) {
        let Some(ports) = &mut self.ports else {
            return;
        };
        ports.touched.push(port);
        if let Some(n) = ports.per_port.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                ports.per_port.remove(&port);
                ports.changed.push(port);
            }
        }
    }

    /// Whether a live TCP listen is one the snapshot already reported: the
    /// tracepoint names sockets by kernel address, sock_diag by cookie, so a
    /// listener seen by both is matched by what it listens on. (A UDP
    /// socket has its cookie on both sides: a second report of it is one
    /// of the same key.)
    fn seen_in_snapshot(&self, l: &Listener) -> bool {
        l.proto == Proto::Tcp
            && self.found_on(l.addr, l.port).any(|key| {
                self.open
                    .get(&key)
                    .is_some_and(|s| s.netns == l.netns && s.process.pid == l.process.pid)
            })
    }

    /// Turns an enriched kernel record into events and updates the set:
    /// none for a duplicate of a snapshot entry (a listener opened while the
    /// snapshot was being taken is seen by both), and two when a listen
    /// shows that an earlier close was lost (see below).
    pub fn apply(&mut self, rec: Enriched, ts: SystemTime, before_snapshot: bool) -> Applied {
        let key = (rec.listener.proto, rec.listener.sock_id);
        if let (Proto::Udp, SockId::Cookie(cookie)) = key
            && self.gone_unseen.contains(&cookie)
        {
            return Applied::default();
        }
        self.touch(rec.ts_ns, &rec.listener);
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
                        .autobound_port(
                            &listener,
                            rec.listening_ports.as_deref().unwrap_or_default(),
                        )
                        .unwrap_or(0);
                }
                self.touch(rec.ts_ns, &listener);
                if before_snapshot && self.seen_in_snapshot(&listener) {
                    return Applied::default();
                }
                // One probe of the table for the common case, a new key.
                let replaced = match self.open.entry(key) {
                    Entry::Vacant(slot) => {
                        slot.insert(Box::new(listener.clone()));
                        None
                    }
                    // A cookie names one socket for good: a second report
                    // of it is the snapshot's.
                    Entry::Occupied(_) if !matches!(key.1, SockId::KernelAddr(_)) => {
                        return Applied::default();
                    }
                    // A kernel address enters LISTEN again only as a new
                    // socket in a freed one's memory (a listener leaves
                    // LISTEN only by closing, and its events arrive in
                    // order): that close was lost in a ring overflow. Said
                    // now, or the new listener would pass for the old one,
                    // unreported, on the old port.
                    Entry::Occupied(mut slot) => Some(slot.insert(Box::new(listener.clone()))),
                };
                let closed = replaced.map(|old| {
                    self.noted_out(key, &old);
                    event(EventKind::Close, Origin::Inferred, *old)
                });
                self.noted_in(key, &listener);
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
                self.touch(rec.ts_ns, &listener);
                Applied {
                    closed: None,
                    event: Some(event(EventKind::Close, Origin::Live, listener)),
                }
            }
        }
    }

    /// Takes out a UDP socket found at start that closed before it was
    /// handed to the release hook: the kernel's records of it still in the
    /// ring (its bind, its close) are stale from now on.
    pub fn closed_unseen(&mut self, cookie: u64) -> Option<Listener> {
        self.gone_unseen.insert(cookie);
        self.remove(&(Proto::Udp, SockId::Cookie(cookie)))
    }

    /// Notes that a record stamped `ts_ns` opened or closed something on
    /// `l`'s endpoint, if a rescan began before it.
    fn touch(&mut self, ts_ns: u64, l: &Listener) {
        if let Some((since, touched)) = &mut self.touched
            && ts_ns >= *since
        {
            touched.insert(endpoint(l));
        }
    }

    /// A rescan (a fresh sock_diag snapshot) begins: records stamped from
    /// `now_ns` on are noted, since it may or may not show them.
    pub fn begin_rescan(&mut self, now_ns: u64) {
        self.touched = Some((now_ns, HashSet::default()));
    }

    /// A rescan that came to nothing.
    pub fn end_rescan(&mut self) {
        self.touched = None;
    }

    /// Brings the set in line with `found`, a snapshot begun at
    /// [`Self::begin_rescan`], once every kernel record stamped before
    /// that has been applied: what the kernel's lost records would have
    /// said. Endpoints that records since then touched are left as those
    /// records made them. `gone` says whether a process has exited.
    /// Returns the closes and listens this infers.
    pub fn reconcile(
        &mut self,
        found: Vec<Listener>,
        ts: SystemTime,
        gone: impl Fn(u32) -> bool,
    ) -> Vec<ListenerEvent> {
        let Some((_, touched)) = self.touched.take() else {
            return Vec::new();
        };
        let mut want: HashMap<Endpoint, Vec<Listener>, Fast> = HashMap::default();
        for l in found {
            let e = endpoint(&l);
            if !touched.contains(&e) {
                want.entry(e).or_default().push(l);
            }
        }
        // Open here, by endpoint: their keys and processes.
        let mut have: HashMap<Endpoint, Vec<Known>, Fast> = HashMap::default();
        for (key, l) in &self.open {
            let e = endpoint(l);
            if !touched.contains(&e) {
                have.entry(e).or_default().push((*key, l.process.pid));
            }
        }
        let inferred = |kind, listener| ListenerEvent {
            ts,
            kind,
            origin: Origin::Inferred,
            listener,
            reach: None,
        };
        let mut events = Vec::new();
        let mut say = |kind, l| events.push(inferred(kind, l));
        for (e, open) in have {
            let wanted = want.remove(&e).unwrap_or_default();
            self.settle(open, wanted, &gone, &mut say);
        }
        // Endpoints with nothing open here at all.
        for (_, wanted) in want {
            self.settle(Vec::new(), wanted, &gone, &mut say);
        }
        events
    }

    /// One endpoint of a rescan: `open` (known here: keys and processes)
    /// against `found` (the snapshot's). The same process on both sides is
    /// the same listener. Of the rest, a known listener whose process has
    /// gone (`gone`) closed; one whose process lives is taken for a found
    /// one still unpaired (the snapshot names one holder of a socket that
    /// several processes share, not always the one that listened), else it
    /// closed. Found ones left over opened.
    fn settle(
        &mut self,
        open: Vec<Known>,
        mut found: Vec<Listener>,
        gone: &impl Fn(u32) -> bool,
        say: &mut impl FnMut(EventKind, Listener),
    ) {
        let mut unpaired = Vec::new();
        for (key, pid) in open {
            match found.iter().position(|f| f.process.pid == pid) {
                Some(i) => {
                    found.swap_remove(i);
                }
                None => unpaired.push((key, pid)),
            }
        }
        // The gone first, so that the living pair with what is left.
        unpaired.sort_by_key(|(_, pid)| !pid.is_some_and(gone));
        for (key, pid) in unpaired {
            if !pid.is_some_and(gone) && found.pop().is_some() {
                continue;
            }
            if let Some(l) = self.remove(&key) {
                say(EventKind::Close, l);
            }
        }
        for l in found {
            if self.open.contains_key(&(l.proto, l.sock_id)) {
                continue;
            }
            self.add((l.proto, l.sock_id), l.clone());
            say(EventKind::Listen, l);
        }
    }

    /// The port the kernel picked for a listen() without bind(): one of the
    /// process's listening ports (`listening`, read from /proc) that no
    /// known listener of it holds yet.
    fn autobound_port(&mut self, l: &Listener, listening: &[u16]) -> Option<u16> {
        let pid = l.process.pid?;
        let open = &self.open;
        let held = self.held.entry(pid).or_insert_with(|| {
            let mut ports = HashMap::default();
            for o in open.values() {
                if o.proto == Proto::Tcp && o.process.pid == Some(pid) {
                    *ports.entry(o.port).or_insert(0) += 1;
                }
            }
            ports
        });
        listening
            .iter()
            .copied()
            .find(|port| !held.contains_key(port))
    }

    /// A TCP listener came in: counted for its process while a batch
    /// looks at that process's ports.
    fn held_in(&mut self, l: &Listener) {
        if l.proto != Proto::Tcp {
            return;
        }
        if let Some(ports) = l.process.pid.and_then(|pid| self.held.get_mut(&pid)) {
            *ports.entry(l.port).or_insert(0) += 1;
        }
    }

    fn held_out(&mut self, l: &Listener) {
        if l.proto != Proto::Tcp {
            return;
        }
        if let Some(ports) = l.process.pid.and_then(|pid| self.held.get_mut(&pid))
            && let Entry::Occupied(mut n) = ports.entry(l.port)
        {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }

    /// A new batch of records: what the last one kept per process goes.
    pub fn end_batch(&mut self) {
        self.held.clear();
    }

    /// A TCP listener from the snapshot closing: match by address, port and
    /// namespace, preferring the same process (SO_REUSEPORT groups share a port).
    fn take_snapshot_match(&mut self, closing: &Listener) -> Option<Listener> {
        if closing.proto != Proto::Tcp {
            return None;
        }
        let key = self
            .found_on(closing.addr, closing.port)
            .filter_map(|key| Some((key, self.open.get(&key)?)))
            .max_by_key(|(_, s)| {
                (
                    s.process.pid == closing.process.pid,
                    s.netns == closing.netns,
                )
            })
            .map(|(k, _)| k)?;
        self.remove(&key)
    }
}

/// Where a listener goes in the index of found TCP ones, if it does.
fn found_tcp_key(key: (Proto, SockId), l: &Listener) -> Option<((IpAddr, u16), u64)> {
    match key {
        (Proto::Tcp, SockId::Cookie(c)) => Some(((l.addr, l.port), c)),
        _ => None,
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
            listening_ports: None,
            netns_ifaces: None,
        }
    }

    /// A live TCP listen on `port` by the socket at kernel address `addr`.
    fn tcp_listen(port: u16, addr: u64) -> Enriched {
        record(
            EventKind::Listen,
            Proto::Tcp,
            port,
            SockId::KernelAddr(addr),
        )
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
        set.track_ports();
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
    fn ports_are_counted_only_once_asked_and_then_from_what_is_open() {
        let mut set = Listeners::default();
        let now = SystemTime::UNIX_EPOCH;
        let listen = tcp_listen;
        set.apply(listen(8080, 1), now, false);
        set.apply(listen(8080, 2), now, false);
        // Untracked: no count and no list of changes growing unread.
        assert!(!set.is_listened(&(Proto::Tcp, 8080, Some(1))));
        assert!(set.take_changed().is_empty());
        set.track_ports();
        assert!(set.is_listened(&(Proto::Tcp, 8080, Some(1))));
        assert_eq!(set.take_changed(), [(Proto::Tcp, 8080, Some(1))]);
        set.apply(listen(9090, 3), now, false);
        let close = record(EventKind::Close, Proto::Tcp, 8080, SockId::KernelAddr(1));
        set.apply(close, now, false);
        // One of 8080's two listeners is left: only 9090 changed.
        assert!(set.is_listened(&(Proto::Tcp, 8080, Some(1))));
        assert_eq!(set.take_changed(), [(Proto::Tcp, 9090, Some(1))]);
    }

    #[test]
    fn found_tcp_listeners_are_matched_by_endpoint_and_process() {
        let now = SystemTime::UNIX_EPOCH;
        let with_pid = |mut r: Enriched, pid| {
            r.listener.process = ProcessInfo {
                pid: Some(pid),
                ..ProcessInfo::default()
            }
            .into();
            r
        };
        let mut set = Listeners::default();
        // An SO_REUSEPORT group on 8080 (two processes) and one on 9090.
        for (cookie, port, pid) in [(1, 8080, 10), (2, 8080, 20), (3, 9090, 10)] {
            let found = record(EventKind::Listen, Proto::Tcp, port, SockId::Cookie(cookie));
            set.insert_snapshot(with_pid(found, pid).listener);
        }
        // The tracepoint's report of one of them while the snapshot ran.
        let live = record(EventKind::Listen, Proto::Tcp, 8080, SockId::KernelAddr(5));
        assert!(said(set.apply(with_pid(live.clone(), 20), now, true)).is_empty());
        let live_other = with_pid(live.clone(), 30);
        assert_eq!(
            said(set.apply(live_other, now, true)),
            [(EventKind::Listen, Origin::Live, 8080)],
            "another process's listen on the port is new"
        );
        // Closes by kernel address find the found listener of their process.
        let close = |port, addr, pid| {
            let r = record(EventKind::Close, Proto::Tcp, port, SockId::KernelAddr(addr));
            with_pid(r, pid)
        };
        let closed = set.apply(close(8080, 6, 20), now, false).event;
        assert_eq!(closed.map(|e| e.listener.sock_id), Some(SockId::Cookie(2)));
        assert_eq!(set.found_tcp[&(IpAddr::from([127, 0, 0, 1]), 8080)], [1]);
        set.apply(close(8080, 7, 10), now, false);
        set.apply(close(9090, 8, 10), now, false);
        assert!(set.found_tcp.is_empty(), "{:?}", set.found_tcp);
        // Left: the live one of process 30, under its kernel address.
        assert_eq!(set.len(), 1);
        // A UDP close of a socket never seen closes no other socket.
        let udp = |cookie| record(EventKind::Listen, Proto::Udp, 53, SockId::Cookie(cookie));
        set.insert_snapshot(udp(11).listener);
        let mut gone = udp(12);
        gone.kind = EventKind::Close;
        set.apply(gone, now, false);
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn listens_without_bind_take_the_ports_no_known_listener_holds() {
        let now = SystemTime::UNIX_EPOCH;
        let of_pid = |mut r: Enriched, pid| {
            r.listener.process = ProcessInfo {
                pid: Some(pid),
                ..ProcessInfo::default()
            }
            .into();
            r
        };
        let mut set = Listeners::default();
        let bound = record(EventKind::Listen, Proto::Tcp, 5001, SockId::KernelAddr(1));
        set.apply(of_pid(bound, 7), now, false);
        // Another process on 5000 does not hold it for pid 7.
        let other = record(EventKind::Listen, Proto::Tcp, 5000, SockId::KernelAddr(2));
        set.apply(of_pid(other, 8), now, false);
        let listening: std::sync::Arc<[u16]> = std::sync::Arc::from([5000, 5001, 5002]);
        let mut ports = Vec::new();
        for addr in 10..13 {
            let mut r = record(EventKind::Listen, Proto::Tcp, 0, SockId::KernelAddr(addr));
            r.listening_ports = Some(std::sync::Arc::clone(&listening));
            let said = said(set.apply(of_pid(r, 7), now, false));
            ports.extend(said.iter().map(|(_, _, port)| *port));
        }
        assert_eq!(ports, [5000, 5002, 0]);
        // A close in the batch gives its port back.
        let close = record(EventKind::Close, Proto::Tcp, 5002, SockId::KernelAddr(11));
        set.apply(of_pid(close, 7), now, false);
        let mut r = record(EventKind::Listen, Proto::Tcp, 0, SockId::KernelAddr(14));
        r.listening_ports = Some(listening);
        assert_eq!(
            said(set.apply(of_pid(r, 7), now, false)),
            [(EventKind::Listen, Origin::Live, 5002)]
        );
        set.end_batch();
        assert!(set.held.is_empty());
    }

    #[test]
    fn records_of_a_udp_socket_said_closed_at_the_hand_over_are_stale() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = Listeners::default();
        let bind = |cookie| record(EventKind::Listen, Proto::Udp, 53, SockId::Cookie(cookie));
        set.insert_snapshot(bind(7).listener);
        set.insert_snapshot(bind(8).listener);
        assert!(set.closed_unseen(7).is_some());
        assert!(set.closed_unseen(7).is_none(), "said once");
        // Its bind and close, still in the ring, come after.
        assert!(said(set.apply(bind(7), now, true)).is_empty());
        let mut close = bind(7);
        close.kind = EventKind::Close;
        assert!(said(set.apply(close, now, false)).is_empty());
        // Another socket's are not.
        let mut close = bind(8);
        close.kind = EventKind::Close;
        assert_eq!(
            said(set.apply(close, now, false)),
            [(EventKind::Close, Origin::Live, 53)]
        );
        assert!(set.is_empty());
    }

    #[test]
    fn every_listener_gained_or_lost_touches_its_port_while_tracked() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = Listeners::default();
        let listen = tcp_listen;
        set.apply(listen(80, 1), now, false);
        assert!(set.take_touched().is_empty(), "not tracked: nothing kept");
        set.track_ports();
        // A second listener on 80 changes no port's listened state, but
        // touches 80 (who holds it may change).
        set.apply(listen(80, 2), now, false);
        set.apply(listen(443, 3), now, false);
        let mut close = listen(80, 1);
        close.kind = EventKind::Close;
        set.apply(close, now, false);
        let key = |port| (Proto::Tcp, port, Some(1));
        assert_eq!(set.take_touched(), [key(80), key(443), key(80)]);
        assert_eq!(set.take_changed(), [key(80), key(443)]);
        assert!(set.take_touched().is_empty());
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

    #[test]
    fn a_rescan_says_what_lost_records_would_have_and_leaves_newer_ones_be() {
        let mut set = Listeners::default();
        let now = SystemTime::UNIX_EPOCH;
        let rec = |kind, port, sock_id, ts_ns, pid| {
            let mut r = record(kind, Proto::Tcp, port, sock_id);
            r.ts_ns = ts_ns;
            r.listener.process = ProcessInfo {
                pid: Some(pid),
                ..ProcessInfo::default()
            }
            .into();
            r
        };
        for (port, addr) in [(8080, 1), (9090, 2), (7070, 3)] {
            let r = rec(EventKind::Listen, port, SockId::KernelAddr(addr), 10, 10);
            assert_eq!(said(set.apply(r, now, false)).len(), 1);
        }
        set.begin_rescan(100);
        // Closed after the rescan began: the snapshot may still show it.
        let r = rec(EventKind::Close, 7070, SockId::KernelAddr(3), 150, 10);
        assert_eq!(said(set.apply(r, now, false)).len(), 1);
        let found = |port, cookie| rec(EventKind::Listen, port, SockId::Cookie(cookie), 0, 10);
        let found = vec![
            found(9090, 22).listener,
            found(7070, 33).listener,
            found(6060, 44).listener,
        ];
        let events: Vec<_> = set
            .reconcile(found, now, |_| false)
            .into_iter()
            .map(|e| (e.kind, e.origin, e.listener.port))
            .collect();
        // 8080 closed unseen, 6060 opened unseen; 9090 stays as it was.
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events.contains(&(EventKind::Close, Origin::Inferred, 8080)));
        assert!(events.contains(&(EventKind::Listen, Origin::Inferred, 6060)));
        let mut open: Vec<u16> = set.iter().map(|l| l.port).collect();
        open.sort_unstable();
        assert_eq!(open, [6060, 9090]);
        // Once only.
        assert!(set.reconcile(Vec::new(), now, |_| false).is_empty());
        // A live close of a listener the rescan found is matched to it.
        let r = rec(EventKind::Close, 6060, SockId::KernelAddr(9), 200, 10);
        assert_eq!(
            said(set.apply(r, now, false)),
            [(EventKind::Close, Origin::Live, 6060)]
        );
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn a_rescan_tells_a_new_listener_on_an_old_port_from_a_shared_socket() {
        let now = SystemTime::UNIX_EPOCH;
        let listener = |pid, sock_id| {
            let mut l = record(EventKind::Listen, Proto::Tcp, 5050, sock_id).listener;
            l.process = ProcessInfo {
                pid: Some(pid),
                ..ProcessInfo::default()
            }
            .into();
            l
        };
        let rescan = |gone: fn(u32) -> bool| {
            let mut set = Listeners::default();
            let mut r = record(EventKind::Listen, Proto::Tcp, 5050, SockId::KernelAddr(1));
            r.listener = listener(10, SockId::KernelAddr(1));
            set.apply(r, now, false);
            set.begin_rescan(100);
            let events: Vec<_> = set
                .reconcile(vec![listener(20, SockId::Cookie(2))], now, gone)
                .into_iter()
                .map(|e| (e.kind, e.listener.process.pid))
                .collect();
            (events, set.len())
        };
        // Its listener exited: the port's listener now is another.
        assert_eq!(
            rescan(|pid| pid == 10),
            (
                vec![(EventKind::Close, Some(10)), (EventKind::Listen, Some(20))],
                1
            )
        );
        // It lives: the snapshot named another holder of the same socket.
        assert_eq!(rescan(|_| false), (vec![], 1));
    }
}
