//! What only /proc knows about the process behind a listener (exe, command
//! line, cgroup, network namespace), added on a worker thread: reading
//! /proc blocks, and the event loop must not wait on it. Records go through
//! one FIFO, so a close never overtakes the listen it ends.
//!
//! The loop submits decoded batches and takes enriched batches back; while
//! [`MAX_IN_FLIGHT`] batches are out, it stops reading the ring buffer, so a
//! slow /proc makes the kernel count lost events rather than this queue
//! grow without bound. A batch whose processes are all in the cache (the
//! common case in a burst: many listeners from a few processes) is enriched
//! on the loop itself, and held back until the batches before it are back
//! from the worker: two thread hand-overs per batch cost more than the
//! lookups (they were a quarter of the stream's CPU), and the worker woken
//! for each batch took the loop's CPU in a burst.

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError, TryLockError, mpsc as std_mpsc},
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    datapath::decode::RawListen,
    iface::table::{Iface, NetnsDumper, dump_in},
    model::{EventKind, Listener, ProcessInfo, Proto},
    procinfo,
};

/// Batches submitted and not yet taken: out with the worker, or enriched
/// on the loop and held back behind those.
pub const MAX_IN_FLIGHT: usize = 64;

/// A kernel record with what /proc adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enriched {
    pub ts_ns: u64,
    pub kind: EventKind,
    pub listener: Listener,
    /// For a TCP listen on port 0 (listen() without bind()): the ports the
    /// process listens on, one of which the kernel picked. Read once per
    /// process and batch, shared by the batch's records.
    pub listening_ports: Option<Arc<[u16]>>,
    /// The interfaces of the listener's namespace, when it is not ours and
    /// they were (re)read for this record.
    pub netns_ifaces: Option<(u64, Arc<Vec<Iface>>)>,
}

/// The worker thread and its two channels.
pub struct Enricher {
    to_worker: Option<std_mpsc::SyncSender<Vec<RawListen>>>,
    from_worker: mpsc::Receiver<Vec<Enriched>>,
    /// The numbers of the batches out with the worker, oldest first (it
    /// answers in order).
    out: VecDeque<u64>,
    /// Shared with the worker, which holds it while it reads /proc; the
    /// loop only ever tries it.
    cache: Arc<Mutex<ProcCache>>,
    /// Batches enriched on the loop, not yet taken, with their numbers.
    ready: VecDeque<(u64, Vec<Enriched>)>,
    /// The next batch's number: batches are taken in the order submitted.
    next_seq: u64,
}

impl Enricher {
    /// Starts the worker. It ends when the `Enricher` is dropped.
    pub fn start() -> std::io::Result<Self> {
        let (to_worker, inbox) = std_mpsc::sync_channel::<Vec<RawListen>>(MAX_IN_FLIGHT);
        let (outbox, from_worker) = mpsc::channel(MAX_IN_FLIGHT);
        let cache = Arc::new(Mutex::new(ProcCache {
            own_netns: procinfo::netns_of(std::process::id()),
            dumper: NetnsDumper::start()
                .inspect_err(|e| log::warn!("no netns thread ({e}): a thread per dump instead"))
                .ok(),
            ..ProcCache::default()
        }));
        let shared = Arc::clone(&cache);
        thread::Builder::new()
            .name("portwatch-proc".into())
            .spawn(move || {
                for batch in inbox {
                    // The cache holds no invariant a panic could break.
                    let mut procs = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    let done = procs.enrich_all(batch);
                    drop(procs);
                    if outbox.blocking_send(done).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            to_worker: Some(to_worker),
            from_worker,
            out: VecDeque::new(),
            cache,
            ready: VecDeque::new(),
            next_seq: 0,
        })
    }

    /// Whether another batch may be submitted now: batches held back
    /// behind the worker's count too, so a stuck /proc read stops the
    /// ring's reading rather than letting them pile up.
    pub fn has_room(&self) -> bool {
        self.out.len() + self.ready.len() < MAX_IN_FLIGHT
    }

    /// Whether every submitted batch has come back.
    pub fn is_idle(&self) -> bool {
        self.out.is_empty() && self.ready.is_empty()
    }

    /// Enriches a batch, on the loop when /proc need not be read, else on
    /// the worker. Never blocks while `has_room`.
    pub fn submit(&mut self, batch: Vec<RawListen>) {
        if batch.is_empty() {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let procs = match self.cache.try_lock() {
            Ok(procs) => Some(procs),
            // The cache holds no invariant a panic could break.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(mut procs) = procs
            && procs.all_warm(&batch)
        {
            let done = procs.enrich_all(batch);
            drop(procs);
            self.ready.push_back((seq, done));
            return;
        }
        let batch = match &self.to_worker {
            Some(tx) => match tx.send(batch) {
                Ok(()) => {
                    self.out.push_back(seq);
                    return;
                }
                Err(std_mpsc::SendError(batch)) => batch,
            },
            None => batch,
        };
        // The worker is gone: /proc is read on the loop from now on, which
        // blocks it, rather than the stream losing what the kernel said.
        if self.to_worker.take().is_some() {
            log::error!("the /proc worker ended; process details are read on the event loop now");
        }
        let mut procs = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let done = procs.enrich_all(batch);
        drop(procs);
        self.ready.push_back((seq, done));
    }

    /// The next enriched batch, in the order submitted; never completes
    /// while nothing is out.
    pub async fn next(&mut self) -> Vec<Enriched> {
        let worker_first = match (self.out.front(), self.ready.front()) {
            (None, None) => return std::future::pending().await,
            (Some(out), Some((ready, _))) => out < ready,
            (out, _) => out.is_some(),
        };
        if !worker_first && let Some((_, done)) = self.ready.pop_front() {
            return done;
        }
        match self.from_worker.recv().await {
            Some(batch) => {
                self.out.pop_front();
                batch
            }
            // The worker is gone (a panic in it, say): what was out is
            // lost with it, and said; later batches are enriched here.
            None => {
                log::error!(
                    "the /proc worker ended with {} batches of listener events not enriched: \
                     they are lost",
                    self.out.len()
                );
                self.out.clear();
                self.to_worker = None;
                Vec::new()
            }
        }
    }
}

impl Drop for Enricher {
    fn drop(&mut self) {
        // Closing the inbox ends the worker's loop.
        self.to_worker.take();
    }
}

/// What /proc said about a process, kept for a short while: a burst of
/// listeners comes from a few processes, and reading four /proc files per
/// event would make user space the bottleneck (about 50 us an event).
#[derive(Default)]
struct ProcCache {
    entries: HashMap<u32, CachedProc, foldhash::fast::RandomState>,
    /// Our own network namespace; others get their interfaces read.
    own_netns: Option<u64>,
    /// When each other namespace's interfaces were last read.
    netns_read: HashMap<u64, Instant>,
    /// Dumps made to place listeners of processes already gone.
    placing: Budget,
    /// Reads other namespaces' interfaces (a thread of its own, started
    /// with the worker; if it could not start or has ended, a thread per
    /// dump).
    dumper: Option<NetnsDumper>,
}

/// At most this many sock_diag dumps a second to place a listener whose
/// process is already gone: a burst of short-lived listeners must not turn
/// into a burst of dumps (beyond it their namespace stays unknown).
const PLACE_PER_SECOND: u32 = 20;

/// A count of uses per one-second window.
#[derive(Default)]
struct Budget {
    window: Option<Instant>,
    used: u32,
}

impl Budget {
    /// Takes one use at `now`, if the window has one left.
    fn take(&mut self, now: Instant, per_second: u32) -> bool {
        if self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < per_second {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// How long another namespace's interfaces are trusted without a new read.
const NETNS_TTL: Duration = Duration::from_secs(30);

struct CachedProc {
    /// The kernel's comm when it was read: a different one means the pid
    /// now runs another program (exec, or a reused pid). Shared by the
    /// process's listeners.
    comm: Arc<str>,
    read_at: Instant,
    netns: Option<u64>,
    /// The details every listener of the process points at (one copy per
    /// process, not per listener); rebuilt when the kernel reports another
    /// uid for the same program.
    info: Arc<ProcessInfo>,
}

/// How long a process's details are trusted without reading /proc again.
const PROC_TTL: Duration = Duration::from_secs(2);
/// Entries this close to expiry do not count as warm: `enrich` must find
/// them still fresh a moment later, or it would read /proc on the loop.
const WARM_MARGIN: Duration = Duration::from_millis(100);
/// Bound on the cache; it is cleared when full (the next reads refill it).
const PROC_CACHE_MAX: usize = 4096;

impl ProcCache {
    /// Whether `enrich` would read nothing from /proc for any of `batch`,
    /// also [`WARM_MARGIN`] from now.
    fn all_warm(&self, batch: &[RawListen]) -> bool {
        let now = Instant::now();
        batch.iter().all(|raw| {
            !needs_listening_ports(raw)
                && self
                    .fresh_proc(raw.tgid, &raw.comm, now, WARM_MARGIN)
                    .is_some_and(|c| {
                        !self.netns_stale(c.netns, now, WARM_MARGIN)
                            // A gone process's listen may be placed by a
                            // sock_diag dump: not on the loop.
                            && (c.netns.is_some() || raw.kind != EventKind::Listen)
                    })
        })
    }

    /// The cached details of `tgid` if it still runs `comm` and they stay
    /// fresh for `margin` after `now`.
    fn fresh_proc(
        &self,
        tgid: u32,
        comm: &str,
        now: Instant,
        margin: Duration,
    ) -> Option<&CachedProc> {
        self.entries.get(&tgid).filter(|c| {
            &*c.comm == comm && now.saturating_duration_since(c.read_at) + margin < PROC_TTL
        })
    }

    /// Whether the interfaces of namespace `netns` are to be (re)read: not
    /// ours, and not read within [`NETNS_TTL`] of `now` plus `margin`.
    fn netns_stale(&self, netns: Option<u64>, now: Instant, margin: Duration) -> bool {
        netns.is_some_and(|ns| {
            Some(ns) != self.own_netns
                && self
                    .netns_read
                    .get(&ns)
                    .is_none_or(|at| now.saturating_duration_since(*at) + margin >= NETNS_TTL)
        })
    }

    fn lookup(&mut self, tgid: u32, comm: &str, uid: u32, now: Instant) -> &CachedProc {
        let fresh = self.fresh_proc(tgid, comm, now, Duration::ZERO).is_some();
        if !fresh {
            if self.entries.len() >= PROC_CACHE_MAX {
                self.entries.clear();
            }
            self.entries.remove(&tgid);
        }
        let cached = self.entries.entry(tgid).or_insert_with(|| {
            let details = procinfo::process_details(tgid);
            let comm: Arc<str> = comm.into();
            let info = Arc::new(ProcessInfo {
                pid: Some(tgid),
                comm: Some(Arc::clone(&comm)),
                uid: Some(uid),
                exe: details.exe,
                cmdline: details.cmdline,
                cgroup: details.cgroup,
            });
            CachedProc {
                comm,
                read_at: Instant::now(),
                netns: procinfo::netns_of(tgid),
                info,
            }
        });
        // The uid is the kernel's at listen time: a process that changed
        // credentials gets details of its own from now on.
        if cached.info.uid != Some(uid) {
            let mut info = ProcessInfo::clone(&cached.info);
            info.uid = Some(uid);
            cached.info = Arc::new(info);
        }
        cached
    }

    /// [`Self::enrich`] for each of a batch, with one clock read for all
    /// (a read per record was a twentieth of the stream's CPU in a burst).
    fn enrich_all(&mut self, batch: Vec<RawListen>) -> Vec<Enriched> {
        let now = Instant::now();
        // A burst of listen()s without bind() reads each process's sockets
        // once, not once per record (each read is O(its sockets)).
        let mut ports: HashMap<(u32, bool), Arc<[u16]>> = HashMap::new();
        batch
            .into_iter()
            .map(|r| {
                let listening = needs_listening_ports(&r).then(|| {
                    let key = (r.tgid, r.addr.is_ipv6());
                    Arc::clone(ports.entry(key).or_insert_with(|| {
                        procinfo::listening_tcp_ports(r.tgid, r.addr.is_ipv6()).into()
                    }))
                });
                self.enrich(r, now, listening)
            })
            .collect()
    }

    /// Adds what only /proc knows. The kernel's pid, comm and uid stay:
    /// they were taken in the right context, /proc may already show
    /// another program. `now` is when the batch began.
    fn enrich(
        &mut self,
        raw: RawListen,
        now: Instant,
        listening_ports: Option<Arc<[u16]>>,
    ) -> Enriched {
        let own_netns = self.own_netns;
        let cached = self.lookup(raw.tgid, &raw.comm, raw.uid, now);
        let mut netns = cached.netns;
        let process = Arc::clone(&cached.info);
        // The process is gone already (a helper that made the socket and
        // handed it on): the socket may still listen, here.
        if netns.is_none()
            && raw.kind == EventKind::Listen
            && self.placing.take(now, PLACE_PER_SECOND)
            && crate::snapshot::listens_here(raw.proto, raw.addr, raw.port)
        {
            netns = own_netns;
        }
        let listener = Listener {
            proto: raw.proto,
            addr: raw.addr,
            port: raw.port,
            sock_id: raw.sock_id,
            netns,
            process,
        };
        let netns_ifaces = self.netns_ifaces(raw.tgid, netns);
        Enriched {
            ts_ns: raw.ts_ns,
            kind: raw.kind,
            listener,
            listening_ports,
            netns_ifaces,
        }
    }

    /// The interfaces of `pid`'s namespace `netns` when it is not ours and
    /// not read in the last [`NETNS_TTL`].
    fn netns_ifaces(&mut self, pid: u32, netns: Option<u64>) -> Option<(u64, Arc<Vec<Iface>>)> {
        let ns = netns?;
        if !self.netns_stale(netns, Instant::now(), Duration::ZERO) {
            return None;
        }
        if self.netns_read.len() >= PROC_CACHE_MAX {
            self.netns_read.clear();
        }
        self.netns_read.insert(ns, Instant::now());
        let file = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let mut dumped = match &self.dumper {
            Some(dumper) => dumper.dump_in(&file, ns),
            None => dump_in(&file, ns),
        };
        if dumped.is_err() && self.dumper.as_ref().is_some_and(|d| !d.is_alive()) {
            // Gone for good (it may have answered first): a thread per
            // dump from now on, this one included.
            self.dumper = None;
            dumped = dump_in(&file, ns);
        }
        match dumped {
            Ok(ifaces) => Some((ns, Arc::new(ifaces))),
            Err(e) => {
                log::debug!("cannot read the interfaces of netns {ns}: {e}");
                None
            }
        }
    }
}

/// A TCP listen() without bind(): which port the kernel picked is read
/// from the process's sockets.
fn needs_listening_ports(raw: &RawListen) -> bool {
    raw.kind == EventKind::Listen && raw.proto == Proto::Tcp && raw.port == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn placing_dumps_are_bounded_per_second() {
        let mut budget = Budget::default();
        let t0 = Instant::now();
        let taken = (0..50).filter(|_| budget.take(t0, 20)).count();
        assert_eq!(taken, 20, "at most 20 in a second");
        assert!(!budget.take(t0 + Duration::from_millis(999), 20));
        assert!(budget.take(t0 + Duration::from_secs(1), 20), "a new second");
    }

    use super::*;
    use crate::model::SockId;

    fn raw(kind: EventKind, port: u16) -> RawListen {
        RawListen {
            ts_ns: 1,
            kind,
            proto: Proto::Udp,
            addr: std::net::Ipv4Addr::UNSPECIFIED.into(),
            port,
            sock_id: SockId::Cookie(u64::from(port)),
            tgid: std::process::id(),
            tid: std::process::id(),
            uid: 0,
            comm: "self".into(),
        }
    }

    /// A process the cache has not seen (`sleep`), ended when dropped, also
    /// when the test fails.
    struct Stranger(std::process::Child);

    impl Stranger {
        fn start() -> Self {
            let child = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("sleep starts");
            Self(child)
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        /// A listen of its on `port`.
        fn listen(&self, port: u16) -> RawListen {
            RawListen {
                tgid: self.pid(),
                comm: "sleep".into(),
                ..raw(EventKind::Listen, port)
            }
        }
    }

    impl Drop for Stranger {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A warm batch enriched on the loop while a cold one is out with the
    /// worker waits for it: the stream keeps the kernel's order.
    #[tokio::test]
    async fn a_warm_batch_on_the_loop_comes_out_after_the_cold_one_before_it() {
        let mut enricher = Enricher::start().expect("worker starts");
        // Our own process in the cache.
        enricher.submit(vec![raw(EventKind::Listen, 1)]);
        while !enricher.is_idle() {
            enricher.next().await;
        }
        // A process the cache has not seen: the worker reads /proc.
        let stranger = Stranger::start();
        enricher.submit(vec![stranger.listen(2)]);
        assert_eq!(enricher.out.len(), 1, "a cold batch stayed on the loop");
        // Once the worker has answered, it holds the cache no longer, so
        // the next batch is certain to be enriched here.
        while enricher.from_worker.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        enricher.submit(vec![raw(EventKind::Listen, 3)]);
        assert_eq!(enricher.out.len(), 1, "a warm batch went to the worker");
        assert_eq!(enricher.ready.len(), 1);
        let first = enricher.next().await;
        let second = enricher.next().await;
        assert_eq!(first[0].listener.port, 2, "{first:?}");
        assert_eq!(first[0].listener.process.pid, Some(stranger.pid()));
        assert_eq!(second[0].listener.port, 3, "{second:?}");
        assert!(enricher.is_idle());
    }

    /// A worker that is gone does not take the stream's events with it.
    #[tokio::test]
    async fn a_batch_the_worker_cannot_take_is_enriched_on_the_loop() {
        let mut enricher = Enricher::start().expect("worker starts");
        let (gone, inbox) = std_mpsc::sync_channel(1);
        drop(inbox);
        enricher.to_worker = Some(gone);
        let stranger = Stranger::start();
        enricher.submit(vec![stranger.listen(5)]);
        assert!(enricher.out.is_empty());
        assert!(enricher.to_worker.is_none());
        let done = enricher.next().await;
        assert_eq!(done.len(), 1, "the batch was dropped");
        assert_eq!(done[0].listener.port, 5);
        assert!(done[0].listener.process.exe.is_some(), "{done:?}");
        assert!(enricher.is_idle());
    }

    #[tokio::test]
    async fn batches_come_back_in_order_with_proc_details() {
        let mut enricher = Enricher::start().expect("worker starts");
        assert!(enricher.is_idle());
        for port in [1, 2, 3] {
            enricher.submit(vec![
                raw(EventKind::Listen, port),
                raw(EventKind::Close, port),
            ]);
        }
        assert!(!enricher.is_idle());
        let mut ports = Vec::new();
        while !enricher.is_idle() {
            for rec in enricher.next().await {
                assert_eq!(rec.listener.process.pid, Some(std::process::id()));
                assert!(rec.listener.process.exe.is_some(), "{rec:?}");
                assert_eq!(rec.listener.netns, procinfo::netns_of(std::process::id()));
                ports.push((rec.kind, rec.listener.port));
            }
        }
        use EventKind::{Close, Listen};
        // Our process is in the cache now: the next batch is enriched on
        // the spot, with the same details.
        enricher.submit(vec![raw(EventKind::Listen, 4)]);
        assert!(enricher.out.is_empty(), "a warm batch went to the worker");
        assert!(!enricher.is_idle());
        let warm = enricher.next().await;
        assert_eq!(warm.len(), 1);
        assert!(warm[0].listener.process.exe.is_some(), "{warm:?}");
        assert!(enricher.is_idle());
        assert_eq!(
            ports,
            [
                (Listen, 1),
                (Close, 1),
                (Listen, 2),
                (Close, 2),
                (Listen, 3),
                (Close, 3)
            ]
        );
    }
}
