//! Owned ports at bind time: the kernel's `OWNERS` entries worked out from
//! the policy's owners (units and cgroups resolved to cgroup ids, users to
//! uids), and the reports of binds it refused or, in audit mode, let by.
//!
//! Only what the kernel can check at bind() goes there: cgroup (or unit),
//! uid and comm. An owner named by `exe` alone is checked in user space on
//! the listen event, where it keeps the port closed at XDP (the gate).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use portwatch_common::{
    IPPROTO_TCP, IPPROTO_UDP, OWNER_CGROUP, OWNER_COMM, OWNER_ENFORCE, OWNER_MANAGER, OWNER_UID,
    OwnerKey, OwnerRule,
};

use crate::{
    datapath::{
        decode::{DecodeError, RawBind, decode_bind},
        maps::OwnerMap,
        ring::RingReader,
    },
    model::{BindEvent, Mode},
    policy::{Activation, Owner, Policy, cgroup_under},
};

/// What woke the owned ports' side of the loop.
pub enum BindNews {
    /// Bind reports, in the batch.
    Reports,
    /// A directory where owners' cgroups live changed.
    CgroupsChanged,
}

/// Owned ports at bind() as the guard holds them: their map, what it holds, and
/// their reports.
pub struct BindHooks {
    map: OwnerMap,
    reports: RingReader,
    held: BTreeMap<OwnerKey, OwnerRule>,
    cgroups: Cgroups,
    netns_cookie: u64,
    /// Owned ports whose cgroup was missing at the last sync, to say so
    /// once rather than at every sync.
    missing: Vec<String>,
    /// Where the owners' cgroups come and go; `None` without inotify (then
    /// only the housekeeping tick re-resolves them).
    watch: Option<CgroupWatch>,
}

impl BindHooks {
    /// The map may hold what a previous guard left pinned: the first sync
    /// moves it to this guard's policy.
    pub fn new(map: OwnerMap, reports: RingReader, cgroups: Cgroups, netns_cookie: u64) -> Self {
        let held = map.entries();
        Self {
            map,
            reports,
            held,
            cgroups,
            netns_cookie,
            missing: Vec::new(),
            watch: CgroupWatch::new()
                .inspect_err(|e| {
                    log::warn!(
                        "cannot watch cgroups (inotify: {e}): a restarted owner's new cgroup is \
                         seen within 5 s, its binds refused until then"
                    );
                })
                .ok(),
        }
    }

    /// Waits for bind reports (decoded into `batch`) or for an owner's
    /// cgroup to come or go.
    pub async fn next(
        &mut self,
        batch: &mut Vec<Result<RawBind, DecodeError>>,
    ) -> std::io::Result<BindNews> {
        let watch = self.watch.as_mut();
        tokio::select! {
            read = self.reports.read_batch(|rec| batch.push(decode_bind(rec))) => {
                read.map(|_| BindNews::Reports)
            }
            changed = async {
                match watch {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => changed.map(|()| BindNews::CgroupsChanged),
        }
    }

    /// The reports queued now, without waiting.
    pub fn drain(&mut self) -> Vec<Result<RawBind, DecodeError>> {
        let mut batch = Vec::new();
        self.reports.drain_now(|rec| batch.push(decode_bind(rec)));
        batch
    }

    /// The cgroup tree the hooks resolve owners in.
    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// Puts `policy`'s owners in force at bind time (units resolved again:
    /// a restarted unit has a new cgroup). A map write is made only for
    /// what changed.
    pub fn sync(
        &mut self,
        policy: &Policy,
        mode: Mode,
        activation: &Activation,
    ) -> crate::error::Result<()> {
        let rules = owner_rules(policy, mode, activation, &self.cgroups, self.netns_cookie);
        if rules != self.held {
            self.map.apply(&self.held, &rules)?;
            self.held = rules;
        }
        if let Some(watch) = &mut self.watch {
            watch.follow(self.cgroups.parents(policy));
        }
        let missing = missing_cgroups(policy, &self.cgroups);
        if missing != self.missing {
            for port in missing.iter().filter(|m| !self.missing.contains(m)) {
                log::warn!(
                    "{port}: its unit or cgroup does not exist now; binds of the port are \
                     refused until it does (re-resolved when it appears)"
                );
            }
            self.missing = missing;
        }
        Ok(())
    }
}

/// A cgroup as the kernel knows it: its id, the inode of its directory in
/// cgroupfs (the same in every cgroup namespace; its depth is not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupRef {
    pub id: u64,
}

/// Looks cgroups up under the cgroup v2 mount.
#[derive(Clone, Debug)]
pub struct Cgroups {
    root: PathBuf,
    /// Units' paths as last found: a walk of the tree each, not repeated
    /// at every policy install; forgotten when cgroups come or go.
    unit_paths: std::cell::RefCell<BTreeMap<String, Option<String>>>,
}

/// How deep a unit may be nested below the root (slices within slices,
/// containers' trees).
const MAX_DEPTH: usize = 10;

impl Cgroups {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            unit_paths: std::cell::RefCell::default(),
        }
    }

    /// Forgets where units were found (a cgroup was made or removed).
    pub fn forget_units(&self) {
        self.unit_paths.borrow_mut().clear();
    }

    /// The cgroup at `path` ("/system.slice/redis.service"), if it exists.
    pub fn at(&self, path: &str) -> Option<CgroupRef> {
        let rel = path.trim_start_matches('/');
        let meta = std::fs::metadata(self.root.join(rel)).ok()?;
        if !meta.is_dir() {
            return None;
        }
        Some(CgroupRef { id: meta.ino() })
    }

    /// The cgroup path of systemd unit `unit`: the shallowest directory of
    /// that name (the host's unit before a container's of the same name).
    pub fn unit_path(&self, unit: &str) -> Option<String> {
        if let Some(known) = self.unit_paths.borrow().get(unit) {
            return known.clone();
        }
        let found = self.find_unit(unit);
        self.unit_paths
            .borrow_mut()
            .insert(unit.to_owned(), found.clone());
        found
    }

    fn find_unit(&self, unit: &str) -> Option<String> {
        let mut level: Vec<PathBuf> = vec![self.root.clone()];
        for _ in 0..MAX_DEPTH {
            let mut next = Vec::new();
            for dir in &level {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let path = entry.path();
                    if entry.file_name() == unit {
                        let rel = path.strip_prefix(&self.root).ok()?;
                        return Some(format!("/{}", rel.display()));
                    }
                    next.push(path);
                }
            }
            if next.is_empty() {
                return None;
            }
            level = next;
        }
        None
    }

    /// The directories where the owners' cgroups are made and removed: the
    /// parent of each one found, and for a unit not found the places
    /// systemd makes units (the root and system.slice).
    fn parents(&self, policy: &Policy) -> BTreeSet<PathBuf> {
        let mut dirs = BTreeSet::new();
        for owner in policy.rules.iter().filter_map(|r| r.owner.as_ref()) {
            let path = match (&owner.unit, &owner.cgroup) {
                (Some(unit), _) => self.unit_path(unit),
                (None, Some(cgroup)) => Some(cgroup.clone()),
                (None, None) => continue,
            };
            match path {
                Some(path) => {
                    let dir = self.root.join(path.trim_start_matches('/'));
                    // The nearest ancestor that exists: a cgroup's parent
                    // may be made with it.
                    let mut parent = dir.parent().map(PathBuf::from);
                    while let Some(p) = &parent {
                        if p.is_dir() || !p.starts_with(&self.root) {
                            break;
                        }
                        parent = p.parent().map(PathBuf::from);
                    }
                    if let Some(p) = parent.filter(|p| p.starts_with(&self.root)) {
                        dirs.insert(p);
                    }
                }
                None => {
                    dirs.insert(self.root.clone());
                    dirs.insert(self.root.join("system.slice"));
                }
            }
        }
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// The path of the cgroup with id `id` (its directory's inode), looked
    /// for breadth first.
    pub fn path_of(&self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        let mut level: Vec<PathBuf> = vec![self.root.clone()];
        for _ in 0..=MAX_DEPTH {
            let mut next = Vec::new();
            for dir in &level {
                if std::fs::metadata(dir).is_ok_and(|m| m.ino() == id) {
                    let rel = dir.strip_prefix(&self.root).ok()?;
                    return Some(format!("/{}", rel.display()));
                }
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                next.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            if next.is_empty() {
                return None;
            }
            level = next;
        }
        None
    }

    /// The cgroup an owner names, as far as the kernel can check it: the
    /// unit's (which must lie within `cgroup` when both are given), else
    /// the cgroup's. `Some(None)`: it names one that does not exist now
    /// (no process can match). `None`: it names no cgroup.
    fn of(&self, owner: &Owner) -> Option<Option<CgroupRef>> {
        let path = match (&owner.unit, &owner.cgroup) {
            (None, None) => return None,
            (Some(unit), within) => self
                .unit_path(unit)
                .filter(|p| within.as_deref().is_none_or(|w| cgroup_under(p, w))),
            (None, Some(cgroup)) => Some(cgroup.clone()),
        };
        Some(path.and_then(|p| self.at(&p)))
    }
}

/// inotify on the directories where owners' cgroups live: a cgroup made or
/// removed there (a unit started or stopped) is news at once, before the
/// service's first bind().
struct CgroupWatch {
    fd: AsyncFd<Notify>,
    watching: BTreeMap<PathBuf, WatchDescriptor>,
}

/// The inotify instance, as tokio registers it.
struct Notify(Inotify);

impl std::os::fd::AsRawFd for Notify {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsFd::as_fd(&self.0).as_raw_fd()
    }
}

impl CgroupWatch {
    fn new() -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the Inotify owns its fd, which stays open and the same
        // until the AsyncFd (which owns the Inotify) is dropped.
        let fd = unsafe {
            AsyncFd::register_with_interest(Notify(inotify), tokio::io::Interest::READABLE)
        }?;
        Ok(Self {
            fd,
            watching: BTreeMap::new(),
        })
    }

    /// Watches exactly `dirs`.
    fn follow(&mut self, dirs: BTreeSet<PathBuf>) {
        let gone: Vec<PathBuf> = self
            .watching
            .keys()
            .filter(|d| !dirs.contains(*d))
            .cloned()
            .collect();
        for dir in gone {
            if let Some(wd) = self.watching.remove(&dir) {
                // The directory may be gone already, and its watch with it.
                let _ = self.fd.get_ref().0.rm_watch(wd);
            }
        }
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_ONLYDIR;
        for dir in dirs {
            if self.watching.contains_key(&dir) {
                continue;
            }
            match self.fd.get_ref().0.add_watch(&dir, flags) {
                Ok(wd) => {
                    self.watching.insert(dir, wd);
                }
                Err(e) => log::debug!("cannot watch {}: {e}", dir.display()),
            }
        }
    }

    /// Waits for the next change and takes every event queued with it.
    async fn changed(&mut self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The kernel entries for `policy`'s owned ports: who may bind each one
/// in the network namespace `netns_cookie`.
pub fn owner_rules(
    policy: &Policy,
    mode: Mode,
    activation: &Activation,
    cgroups: &Cgroups,
    netns_cookie: u64,
) -> BTreeMap<OwnerKey, OwnerRule> {
    let manager = activation
        .manager_cgroup
        .as_deref()
        .and_then(|path| cgroups.at(path));
    let mut out = BTreeMap::new();
    for rule in &policy.rules {
        let Some(owner) = &rule.owner else { continue };
        let proto = rule.ports.proto.0;
        if (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || rule.ports.lo != rule.ports.hi {
            continue;
        }
        let mut entry = OwnerRule {
            netns_cookie,
            flags: if mode == Mode::Enforce {
                OWNER_ENFORCE
            } else {
                0
            },
            ..OwnerRule::default()
        };
        if let Some(cgroup) = cgroups.of(owner) {
            entry.flags |= OWNER_CGROUP;
            if let Some(cg) = cgroup {
                entry.cgroup_id = cg.id;
            }
        }
        if let Some(user) = &owner.user {
            entry.flags |= OWNER_UID;
            entry.uid = user.uid;
        }
        if let Some(comm) = &owner.comm {
            entry.flags |= OWNER_COMM;
            let bytes = comm.as_bytes();
            let n = bytes.len().min(15);
            entry.comm[..n].copy_from_slice(&bytes[..n]);
        }
        // Nothing the kernel can check (exe alone): the gate judges.
        if entry.flags & (OWNER_CGROUP | OWNER_UID | OWNER_COMM) == 0 {
            continue;
        }
        // systemd binds a socket-activated unit's port: PID 1 itself, or
        // its helper in the socket unit's slice.
        if let Some(unit) = owner
            .unit
            .as_ref()
            .filter(|u| activation.units.contains(*u))
        {
            entry.flags |= OWNER_MANAGER;
            if let Some(m) = manager {
                entry.manager_cgroup_id = m.id;
            }
            if let Some(slice) = activation
                .helper_slices
                .get(unit)
                .and_then(|p| cgroups.at(p))
            {
                entry.helper_slice_id = slice.id;
            }
        }
        let key = OwnerKey {
            port: rule.ports.lo,
            proto,
            _pad: 0,
        };
        out.insert(key, entry);
    }
    out
}

/// Owners whose unit or cgroup does not exist now: binds of their port
/// are refused until it does (the unit starts).
pub fn missing_cgroups(policy: &Policy, cgroups: &Cgroups) -> Vec<String> {
    policy
        .rules
        .iter()
        .filter_map(|r| r.owner.as_ref().map(|o| (r, o)))
        .filter(|(_, o)| cgroups.of(o) == Some(None))
        .map(|(r, o)| format!("{} (owner {o})", r.ports))
        .collect()
}

/// A kernel report as a stream event; the owner is the policy's. The
/// cgroup is the process's, or (a process gone already) the one with the
/// id the kernel reported.
pub fn event(
    policy: &Policy,
    raw: RawBind,
    ts: std::time::SystemTime,
    cgroups: Option<&Cgroups>,
) -> BindEvent {
    let cgroup = crate::procinfo::cgroup_of(raw.tgid)
        .or_else(|| cgroups.and_then(|c| c.path_of(raw.cgroup_id)));
    let owner = policy
        .rules
        .iter()
        .find(|r| r.owner.is_some() && r.ports.contains(raw.proto, raw.port))
        .and_then(|r| r.owner.as_ref())
        .map(ToString::to_string)
        .unwrap_or_else(|| "no longer in the policy".to_owned());
    BindEvent {
        ts,
        port: format!("{}/{}", raw.proto.as_str(), raw.port),
        addr: raw.addr,
        pid: raw.tgid,
        comm: Arc::from(raw.comm),
        uid: raw.uid,
        cgroup: cgroup.map(Arc::from),
        owner,
        audit: raw.audit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{OwnerUser, Rule};

    /// A directory tree standing in for cgroupfs; removed when dropped.
    struct Tree(PathBuf);
    use std::path::Path;

    impl Tree {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree() -> (Tree, Cgroups) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Tree(
            std::env::temp_dir().join(format!("portwatch-cgroups-{}-{n}", std::process::id())),
        );
        for d in [
            "system.slice/redis-server.service",
            "system.slice/web.slice/nginx.service",
            "machine.slice/c1/system.slice/nginx.service",
        ] {
            std::fs::create_dir_all(dir.path().join(d)).expect("created");
        }
        let cgroups = Cgroups::new(dir.path().to_path_buf());
        (dir, cgroups)
    }

    fn owned(spec: &str, owner: Owner) -> Rule {
        let mut rule = Rule::parse(spec, &[], None).expect("a rule");
        rule.owner = Some(owner);
        rule
    }

    #[test]
    fn units_resolve_to_the_shallowest_cgroup_of_their_name() {
        let (_dir, cgroups) = tree();
        assert_eq!(
            cgroups.unit_path("nginx.service").as_deref(),
            Some("/system.slice/web.slice/nginx.service")
        );
        assert_eq!(cgroups.unit_path("absent.service"), None);
        let id = cgroups
            .at("/system.slice/web.slice/nginx.service")
            .map(|c| c.id)
            .expect("exists");
        assert_eq!(
            cgroups.path_of(id).as_deref(),
            Some("/system.slice/web.slice/nginx.service")
        );
        assert_eq!(cgroups.path_of(0), None);
        let at = cgroups
            .at("/system.slice/web.slice/nginx.service")
            .expect("exists");
        assert_ne!(at.id, 0);
        assert!(cgroups.at("/").is_some());
        assert_eq!(cgroups.at("/system.slice/absent.service"), None);
    }

    #[test]
    fn kernel_entries_hold_the_checkable_keys() {
        let (_dir, cgroups) = tree();
        let policy = Policy {
            rules: vec![
                owned(
                    "tcp/6379",
                    Owner {
                        unit: Some("redis-server.service".into()),
                        user: Some(OwnerUser {
                            uid: 110,
                            name: None,
                        }),
                        ..Owner::default()
                    },
                ),
                owned(
                    "udp/51820",
                    Owner {
                        exe: Some("/usr/bin/wireguard-go".into()),
                        ..Owner::default()
                    },
                ),
                owned(
                    "tcp/443",
                    Owner {
                        unit: Some("stopped.service".into()),
                        comm: Some("nginx".into()),
                        ..Owner::default()
                    },
                ),
            ],
            ..Policy::default()
        };
        let rules = owner_rules(&policy, Mode::Enforce, &Activation::default(), &cgroups, 42);
        let key = |port, proto| OwnerKey {
            port,
            proto,
            _pad: 0,
        };
        assert_eq!(rules.len(), 2, "exe alone is for user space");
        let redis = rules[&key(6379, IPPROTO_TCP)];
        assert_eq!(redis.flags, OWNER_ENFORCE | OWNER_CGROUP | OWNER_UID);
        assert_eq!((redis.uid, redis.netns_cookie), (110, 42));
        assert_eq!(
            Some(redis.cgroup_id),
            cgroups
                .at("/system.slice/redis-server.service")
                .map(|c| c.id)
        );
        let web = rules[&key(443, IPPROTO_TCP)];
        assert_eq!(web.cgroup_id, 0, "a stopped unit's port: nobody binds");
        assert_eq!(&web.comm[..6], b"nginx\0");
        assert_eq!(
            missing_cgroups(&policy, &cgroups),
            vec!["tcp/443 (owner unit stopped.service, comm nginx)".to_owned()]
        );
        let audit = owner_rules(&policy, Mode::Audit, &Activation::default(), &cgroups, 42);
        assert_eq!(audit[&key(6379, IPPROTO_TCP)].flags & OWNER_ENFORCE, 0);
        // A socket-activated unit: the manager may bind for it.
        let activation = Activation {
            units: ["redis-server.service".to_owned()].into(),
            manager_cgroup: Some("/system.slice".into()),
            helper_slices: [(
                "redis-server.service".to_owned(),
                "/system.slice".to_owned(),
            )]
            .into(),
        };
        let activated = owner_rules(&policy, Mode::Enforce, &activation, &cgroups, 42);
        let redis = activated[&key(6379, IPPROTO_TCP)];
        assert_ne!(redis.flags & OWNER_MANAGER, 0);
        assert_eq!(
            Some(redis.manager_cgroup_id),
            cgroups.at("/system.slice").map(|c| c.id)
        );
        assert_eq!(redis.helper_slice_id, redis.manager_cgroup_id);
        assert_eq!(
            activated[&key(443, IPPROTO_TCP)].flags & OWNER_MANAGER,
            0,
            "not activated"
        );
    }

    #[test]
    fn a_unit_outside_the_cgroup_also_named_matches_nothing() {
        let (_dir, cgroups) = tree();
        let owner = Owner {
            unit: Some("redis-server.service".into()),
            cgroup: Some("/machine.slice".into()),
            ..Owner::default()
        };
        assert_eq!(cgroups.of(&owner), Some(None));
        let inside = Owner {
            cgroup: Some("/system.slice".into()),
            ..owner
        };
        assert!(matches!(cgroups.of(&inside), Some(Some(_))));
    }
}
