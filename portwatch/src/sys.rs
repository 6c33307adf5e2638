//! The system around the programs: privileges, pseudo file systems, cgroup v2,
//! clocks. Checked up front so failures come with a clear message, not an
//! errno from deep inside a load.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::error::{Error, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Fails unless the process may load and attach the programs: CAP_SYS_ADMIN
/// covers everything; otherwise CAP_BPF, CAP_PERFMON (tracepoints) and
/// CAP_NET_ADMIN (cgroup and XDP attach) are all needed.
pub fn check_privileges() -> Result<()> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
    ]
    .into_iter()
    .filter(|(cap, _)| !has(*cap))
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::NotPrivileged {
            missing: missing.join(", "),
        })
    }
}

/// What [`raise_priority`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// The nice value went from one to the other.
    Raised { from: i32, to: i32 },
    /// Left as it was: that high already (a service's `Nice=`, say), or
    /// lowered on purpose (a positive nice value: `nice -n 10 portwatch`).
    LeftAt(i32),
}

/// The calling thread's nice value.
pub fn nice() -> std::io::Result<i32> {
    nix::errno::Errno::clear();
    // SAFETY: getpriority only reads the calling thread's nice value; -1
    // is a valid answer too, so errno (cleared above) tells a failure.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if now == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(now)
}

/// Sets the calling thread's nice value (raising its priority needs
/// CAP_SYS_NICE or a high enough RLIMIT_NICE; lowering it, nothing).
fn set_nice(value: i32) -> std::io::Result<()> {
    // SAFETY: setpriority changes only the calling thread's nice value (on
    // Linux, `who` 0 with PRIO_PROCESS is the calling thread).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, value) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs this thread, and the threads it starts from now on (they inherit
/// it), at nice `-levels` at least, unless someone lowered its priority
/// on purpose (a positive nice value stays). A stream at the CPUs' fair
/// share falls behind a burst from several busy processes, and its events
/// then wait; a monitor ahead of them in the run queue reads each batch as
/// it comes.
pub fn raise_priority(levels: u8) -> std::io::Result<Priority> {
    let target = -i32::from(levels.min(20));
    let now = nice()?;
    if now <= target || now > 0 {
        return Ok(Priority::LeftAt(now));
    }
    set_nice(target)?;
    Ok(Priority::Raised {
        from: now,
        to: target,
    })
}

/// `struct sched_attr` as sched_setattr(2) takes it (SCHED_ATTR_SIZE_VER1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

const _: () = assert!(std::mem::size_of::<SchedAttr>() == 56);

/// `SCHED_FLAG_RESET_ON_FORK`, from the kernel's uapi.
const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// The time slice [`set_slice`]'s callers ask for: the shortest the
/// kernel grants.
pub const STREAM_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// What [`set_slice`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// The thread runs with the slice asked for.
    Set,
    /// The kernel took the call and kept its own slice (custom slices came
    /// with Linux 6.12).
    NotSupported,
    /// Left as it was: the thread runs under another policy than
    /// SCHED_OTHER (a real-time, batch or idle one someone chose).
    OtherPolicy(u32),
}

/// The calling thread's scheduling attributes (sched_getattr(2)).
fn sched_attr() -> std::io::Result<SchedAttr> {
    sched_attr_of(0)
}

/// Thread `tid`'s scheduling attributes (0: the calling thread).
fn sched_attr_of(tid: libc::pid_t) -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr(2) writes at most `size` (its third argument)
    // bytes into a live struct of that layout, for thread `tid`; flags
    // (the fourth) must be 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

/// Thread `tid`'s time slice as the scheduler reports it (0: the calling
/// thread): the kernel's default or the one asked for; 0 before Linux
/// 6.12.
pub fn slice_of(tid: libc::pid_t) -> std::io::Result<std::time::Duration> {
    Ok(std::time::Duration::from_nanos(sched_attr_of(tid)?.runtime))
}

/// Whether the running kernel grants custom slices (Linux 6.12).
pub fn kernel_has_custom_slices() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 12, 0))
}

/// Asks the scheduler for a time slice of `slice` for the calling thread
/// and the threads it starts from now on (EEVDF's custom slice, Linux
/// 6.12 and later, which clamps it to 0.1-100 ms). Only the slice changes:
/// the thread stays SCHED_OTHER at its nice value, with the same share of
/// the CPU, and keeps reset-on-fork if it had it (then the threads it
/// starts get the kernel's default slice back); a thread under another
/// policy is left alone. A woken thread with a shorter slice than the
/// running one takes the CPU at once; with the default slice it waits for
/// the running one's to end (1-3 ms), and in a burst, where busy
/// processes hold every CPU, the stream's events wait that long at each
/// wake-up.
pub fn set_slice(slice: std::time::Duration) -> std::io::Result<Slice> {
    let now = sched_attr()?;
    if now.policy != libc::SCHED_OTHER as u32 {
        return Ok(Slice::OtherPolicy(now.policy));
    }
    let wanted = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: now.policy,
        // Without SCHED_FLAG_UTIL_CLAMP the clamps stay as they are.
        flags: now.flags & SCHED_FLAG_RESET_ON_FORK,
        nice: now.nice,
        runtime: wanted,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr(2) reads `attr.size` bytes from a live struct
    // of that layout and changes only the calling thread's (tid 0)
    // scheduling.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // A kernel without custom slices takes the call and keeps its own
    // (or reports none); one that clamps differently still moved it.
    let after = sched_attr()?.runtime;
    Ok(if after == wanted || after != now.runtime {
        Slice::Set
    } else {
        Slice::NotSupported
    })
}

/// Moves the calling thread into the network namespace `ns_file` refers
/// to (such as /proc/PID/ns/net), if it is still namespace `inode`: the
/// process may have exited and its pid been reused since.
pub fn enter_netns(ns_file: &std::path::Path, inode: u64) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let file = std::fs::File::open(ns_file)?;
    if file.metadata()?.ino() != inode {
        return Err(std::io::Error::other(
            "the file now refers to another namespace",
        ));
    }
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
    Ok(())
}

/// One line of /proc/self/mountinfo: mount point and file system type.
fn mounts() -> Vec<(PathBuf, String)> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            // Fields: id parent major:minor root mount-point options ... - fstype source super
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
            Some((
                PathBuf::from(unescape_mount(mount_point)),
                fstype.to_string(),
            ))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn is_mounted(fstype: &str, at: &Path) -> bool {
    mounts().iter().any(|(p, t)| t == fstype && p == at)
}

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts `fs` at `path` when nothing of that type is there yet, and says so.
fn ensure_mounted(fs: &'static str, path: &'static str) -> Result<()> {
    if is_mounted(fs, Path::new(path)) {
        return Ok(());
    }
    // tracefs may also be reachable through debugfs; aya looks there too.
    if fs == "tracefs" && Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    nix::mount::mount(
        Some(fs),
        path,
        Some(fs),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error::Mount { fs, path, source })?;
    let name = if fs == "bpf" { "bpffs" } else { fs };
    log::info!("{name} was not mounted: mounted it at {path}");
    Ok(())
}

/// tracefs (tracepoint ids) and bpffs (pins) must be mounted.
pub fn ensure_pseudo_filesystems() -> Result<()> {
    ensure_mounted("tracefs", TRACEFS)?;
    ensure_mounted("bpf", BPFFS)
}

/// Where portwatch mounts cgroup v2 itself when nothing shows it, e.g. under
/// `ip netns exec`, which gives the command a fresh /sys without cgroups.
pub const OWN_CGROUP2: &str = "/run/portwatch/cgroup2";

/// The root of the cgroup v2 hierarchy: /sys/fs/cgroup on unified systems,
/// /sys/fs/cgroup/unified on hybrid ones; mounted by portwatch if missing.
pub fn cgroup2_root() -> Result<PathBuf> {
    let found = mounts()
        .into_iter()
        .filter(|(_, t)| t == "cgroup2")
        .map(|(p, _)| p)
        // The shortest path is the host's root, not a container's nested mount.
        .min_by_key(|p| p.as_os_str().len());
    if let Some(root) = found {
        return Ok(root);
    }
    fs::create_dir_all(OWN_CGROUP2).map_err(|_| Error::NoCgroup2)?;
    nix::mount::mount(
        Some("cgroup2"),
        OWN_CGROUP2,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|_| Error::NoCgroup2)?;
    log::info!("cgroup v2 was not mounted here: mounted it at {OWN_CGROUP2}");
    Ok(PathBuf::from(OWN_CGROUP2))
}

/// The cookie of this process's network namespace: what the kernel's
/// `bpf_get_netns_cookie` returns for sockets made here (Linux 5.14+ for
/// SO_NETNS_COOKIE).
pub fn netns_cookie() -> std::io::Result<u64> {
    // Not in the libc crate yet; the same value on every architecture.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the socket is open for the call; cookie and len are valid,
    // writable and len says cookie's size.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| u64::try_from(Duration::from(t).as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Converts kernel CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) to wall
/// clock time, using an offset taken once at start.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall clock time at monotonic zero.
    epoch: SystemTime,
}

impl Clock {
    pub fn new() -> Self {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(Duration::from)
            .unwrap_or_default();
        let now = SystemTime::now();
        Self {
            epoch: now.checked_sub(mono).unwrap_or(now),
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.epoch + Duration::from_nanos(monotonic_ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends `state` to systemd's notification socket when run by it
/// (Type=notify); a no-op otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    if let Err(e) = sock.send_to(state.as_bytes(), &path) {
        log::debug!("sd_notify: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case on a thread of its own, whose scheduling goes with it.
    fn on_a_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("the thread ran")
    }

    #[test]
    fn a_set_slice_holds_for_the_thread_and_the_threads_it_starts_and_nothing_else_changes() {
        let (outcome, own, started, nice_after) = on_a_thread(|| {
            set_nice(-3).expect("raising the priority");
            let outcome = set_slice(STREAM_SLICE).expect("setting the slice");
            let own = sched_attr().expect("reading the attributes");
            let started = on_a_thread(sched_attr).expect("reading its attributes");
            (outcome, own, started, nice().expect("reading the priority"))
        });
        if kernel_has_custom_slices() {
            assert_eq!(outcome, Slice::Set);
            assert_eq!(own.runtime, STREAM_SLICE.as_nanos() as u64);
            assert_eq!(
                started.runtime, own.runtime,
                "inherited by a thread it starts"
            );
        } else {
            assert_eq!(outcome, Slice::NotSupported);
        }
        assert_eq!(own.policy, libc::SCHED_OTHER as u32);
        assert_eq!((own.nice, nice_after), (-3, -3), "the nice value stays");
    }

    #[test]
    fn another_policy_is_left_alone_and_reset_on_fork_is_kept() {
        let batch = on_a_thread(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sets the calling thread's (0) policy from a live param.
            let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let outcome = set_slice(STREAM_SLICE).expect("asking for the slice");
            (
                outcome,
                sched_attr().expect("reading the attributes").policy,
            )
        });
        let batch_policy = libc::SCHED_BATCH as u32;
        assert_eq!(batch, (Slice::OtherPolicy(batch_policy), batch_policy));

        let flags = on_a_thread(|| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: as above; SCHED_RESET_ON_FORK is or-ed into the policy.
            let rc = unsafe {
                libc::sched_setscheduler(0, libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, &param)
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            set_slice(STREAM_SLICE).expect("setting the slice");
            sched_attr().expect("reading the attributes").flags
        });
        assert_ne!(flags & SCHED_FLAG_RESET_ON_FORK, 0, "reset-on-fork kept");
    }

    /// Run as root, as the unit tests are; each case on a thread of its
    /// own, whose nice value goes with it.
    #[test]
    fn priority_is_raised_to_the_level_asked_never_lowered_and_a_chosen_nice_stays() {
        let raised = std::thread::spawn(|| {
            let start = nice().expect("reading the priority").min(0);
            set_nice(start).expect("setting the priority");
            let first = raise_priority(3).expect("raising");
            let level = start.min(-3);
            if start > -3 {
                assert_eq!(
                    first,
                    Priority::Raised {
                        from: start,
                        to: -3
                    }
                );
            } else {
                assert_eq!(first, Priority::LeftAt(start));
            }
            assert_eq!(nice().ok(), Some(level));
            // Asking for less, or the same, changes nothing.
            for levels in [2, 3] {
                let again = raise_priority(levels).ok();
                assert_eq!(again, Some(Priority::LeftAt(level)));
            }
        });
        let chosen = std::thread::spawn(|| {
            // `nice -n 10 portwatch ...`: lowered on purpose, left so.
            set_nice(10).expect("lowering the priority");
            let left = raise_priority(5).ok();
            assert_eq!(left, Some(Priority::LeftAt(10)));
            assert_eq!(nice().ok(), Some(10));
        });
        raised.join().expect("raising panicked");
        chosen.join().expect("a chosen nice panicked");
    }

    #[test]
    fn finds_a_cgroup2_root_and_proc_mount() {
        assert!(
            mounts()
                .iter()
                .any(|(p, t)| t == "proc" && p == Path::new("/proc"))
        );
        let root = cgroup2_root().expect("this machine has cgroup v2");
        assert!(root.join("cgroup.procs").exists(), "{root:?}");
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mount("/a\\040b\\134c"), "/a b\\c");
    }

    #[test]
    fn clock_maps_now_to_now() {
        let clock = Clock::new();
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(Duration::from)
            .expect("monotonic clock");
        let wall = clock.wall(mono.as_nanos() as u64);
        let diff = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(1), "{diff:?}");
    }
}
