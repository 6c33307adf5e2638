//! The datapath: everything that touches the kernel's BPF objects, below
//! every other layer. It loads the embedded object ([`Datapath`]), attaches
//! the monitor and the guard ([`attach`]), pins what must outlive the
//! daemon ([`pins`]), reads the ring buffers ([`ring`]) and decodes their
//! records ([`decode`]), and owns every map handle ([`maps`]: the only code
//! that writes a map). Dropping the `Datapath` detaches every hook that is
//! not pinned: links are file descriptors.

pub mod attach;
pub mod decode;
pub mod hooks;
pub mod maps;
pub mod pins;
pub mod probe;
pub mod ring;
#[cfg(feature = "test-helpers")]
pub mod testing;

use std::fs::File;

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSock, TracePoint, links::FdLink},
};
use portwatch_common::{map, prog};
use tokio::io::{Interest, unix::AsyncFd};

use self::{
    attach::{Attached, XdpMode},
    hooks::HookLink,
    maps::{GuardMaps, MonitorStats, OwnerMap},
    pins::{PINNED_MAPS, PinDir},
    ring::RingReader,
};
use crate::{
    error::{Error, Result, program_error},
    sys,
};

/// A program of the object by name, as its concrete type.
pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(program_error(format!("the program `{name}`"), ""))
}

/// The kernel object built by build.rs from portwatch-ebpf: the monitor's
/// and the guard's programs, nothing else.
pub(crate) static PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch"));

/// What the event loop reads of the monitor: its ring buffer and counters.
pub struct MonitorFeed {
    pub events: RingReader,
    pub stats: MonitorStats,
}

pub struct Datapath {
    ebpf: Ebpf,
    /// Taken by the event loop (`take_monitor_feed`).
    feed: Option<MonitorFeed>,
    /// Forwards kernel log records to the `log` crate; aborted on drop.
    logger: Option<tokio::task::JoinHandle<()>>,
    /// The guard's pinned links, held while the daemon runs.
    held_links: Vec<aya::programs::links::PinnedLink>,
    /// The monitor's hook links (pinned for the guard).
    hooks: Vec<HookLink>,
}

impl Datapath {
    /// Checks the system, loads the object and opens the event reader. No
    /// hook is attached yet.
    pub fn load() -> Result<Self> {
        Self::load_with_pins(None)
    }

    /// Like `load`, with the guard's maps pinned in `pins` (opened from there
    /// when a previous guard left them).
    pub fn load_with_pins(pins: Option<&PinDir>) -> Result<Self> {
        sys::check_privileges()?;
        sys::ensure_pseudo_filesystems()?;
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, std::path::PathBuf)> = match pins {
            Some(pins) => {
                pins.create()?;
                let dropped = pins.drop_incompatible(PROGRAMS)?;
                if !dropped.is_empty() {
                    log::warn!(
                        "pinned maps {} in {} were made by a build with another layout: \
                         replaced (their flows and counters start over)",
                        dropped.join(", "),
                        pins.root.display()
                    );
                }
                PINNED_MAPS
                    .iter()
                    .map(|name| (*name, pins.map(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAMS)?;
        let events =
            RingReader::new(maps::ring(&mut ebpf, map::EVENTS)?).map_err(|source| Error::Io {
                what: "registering the event ring buffer with the runtime".into(),
                source,
            })?;
        let stats = MonitorStats::open(&mut ebpf)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(tokio::spawn(forward_kernel_logs(logger))),
            Err(e) => {
                log::warn!("kernel-side log messages are unavailable: {e}");
                None
            }
        };
        Ok(Self {
            ebpf,
            feed: Some(MonitorFeed { events, stats }),
            logger,
            held_links: Vec::new(),
            hooks: Vec::new(),
        })
    }

    /// The monitor's ring buffer and counters, for the event loop; None
    /// once taken.
    pub fn take_monitor_feed(&mut self) -> Option<MonitorFeed> {
        self.feed.take()
    }

    /// Attaches the TCP tracepoint and the UDP cgroup hooks, held by the
    /// `Datapath` (`watch`).
    pub fn attach_monitor(&mut self) -> Result<()> {
        self.attach_monitor_with(None)
    }

    /// Like `attach_monitor`, with the links pinned in `pins` (the guard):
    /// they stay attached while no guard runs, and a guard adopts those of
    /// its own build that it finds there.
    pub fn attach_monitor_pinned(&mut self, pins: &PinDir) -> Result<()> {
        self.attach_monitor_with(Some(pins))
    }

    fn attach_monitor_with(&mut self, pins: Option<&PinDir>) -> Result<()> {
        let tp_hint =
            "TCP listeners are seen through this tracepoint (Linux 4.16+, CONFIG_TRACEPOINTS)";
        let tp: &mut TracePoint = program(&mut self.ebpf, prog::INET_SOCK_SET_STATE)?;
        tp.load().map_err(program_error(
            "loading the tracepoint program".into(),
            tp_hint,
        ))?;
        let tag = tp.info().map(|i| i.tag()).unwrap_or_default();
        let (adopted, stale) = match pins {
            Some(p) => hooks::adopt(&p.hook_link(prog::INET_SOCK_SET_STATE), tag),
            None => (None, None),
        };
        if let Some(link) = adopted {
            self.hooks.push(link);
        } else {
            let id = tp
                .attach("sock", "inet_sock_set_state")
                .map_err(program_error(
                    "attaching to tracepoint sock/inet_sock_set_state".into(),
                    tp_hint,
                ))?;
            if let Some(p) = pins {
                let link = tp.take_link(id).map_err(program_error(
                    "taking the tracepoint's link".into(),
                    tp_hint,
                ))?;
                let pin = p.hook_link(prog::INET_SOCK_SET_STATE);
                match FdLink::try_from(link) {
                    Ok(fd) => self.hooks.push(hooks::pin(fd, &pin, stale)?),
                    Err(_) => {
                        // Only bpf_link attachments pin (Linux 5.15+ for
                        // tracepoints): attach again, held by the daemon.
                        log::warn!(
                            "the tracepoint cannot be pinned on this kernel: listener events \
                             are seen only while the guard runs"
                        );
                        tp.attach("sock", "inet_sock_set_state")
                            .map_err(program_error(
                                "attaching to tracepoint sock/inet_sock_set_state".into(),
                                tp_hint,
                            ))?;
                        if let Some(old) = stale {
                            old.release();
                        }
                    }
                }
            }
        }

        let root = sys::cgroup2_root()?;
        let cg_hint =
            "UDP binds are seen through cgroup socket hooks (Linux 4.17+, CONFIG_CGROUP_BPF)";
        for name in [prog::POST_BIND4, prog::POST_BIND6, prog::SOCK_RELEASE] {
            let prog: &mut CgroupSock = program(&mut self.ebpf, name)?;
            prog.load()
                .map_err(program_error(format!("loading cgroup/{name}"), cg_hint))?;
            let tag = prog.info().map(|i| i.tag()).unwrap_or_default();
            let (adopted, stale) = match pins {
                Some(p) => hooks::adopt(&p.hook_link(name), tag),
                None => (None, None),
            };
            if let Some(link) = adopted {
                self.hooks.push(link);
                continue;
            }
            let cgroup = File::open(&root).map_err(|source| Error::CgroupOpen {
                path: root.clone(),
                source,
            })?;
            // aya attaches through bpf_link (Linux 5.7+), which takes no flags and
            // always coexists with programs others attach there.
            let what = format!("attaching cgroup/{name} at {}", root.display());
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error(what.clone(), cg_hint))?;
            let link = prog
                .take_link(id)
                .map_err(program_error(what.clone(), cg_hint))?;
            let fd = FdLink::try_from(link).map_err(|e| Error::Io {
                what: format!("{what}: not a bpf_link"),
                source: std::io::Error::other(e.to_string()),
            })?;
            self.hooks.push(match pins {
                Some(p) => hooks::pin(fd, &p.hook_link(name), stale)?,
                None => hooks::unpinned(fd),
            });
        }
        Ok(())
    }
}

impl Datapath {
    /// The guard's maps and its drop-report reader (registered before the
    /// guard attaches).
    pub fn guard_maps(&mut self) -> Result<(GuardMaps, RingReader)> {
        let maps = GuardMaps::open(&mut self.ebpf)?;
        let drops = RingReader::new(maps::ring(&mut self.ebpf, map::DROPS)?).map_err(|source| {
            Error::Io {
                what: "registering the drop report ring buffer with the runtime".into(),
                source,
            }
        })?;
        Ok((maps, drops))
    }

    /// The monitor's table of bound UDP sockets, for adding those bound
    /// before the hooks were attached.
    pub fn udp_binds(&mut self) -> Result<maps::UdpBinds> {
        maps::UdpBinds::open(&mut self.ebpf)
    }

    /// The owned ports' policy map and the reader of the reports of binds
    /// refused (or audited) by the monitor's post_bind hooks.
    pub fn bind_guard(&mut self) -> Result<(OwnerMap, RingReader)> {
        let owners = OwnerMap::open(&mut self.ebpf)?;
        let reports =
            RingReader::new(maps::ring(&mut self.ebpf, map::BINDS)?).map_err(|source| {
                Error::Io {
                    what: "registering the bind report ring buffer with the runtime".into(),
                    source,
                }
            })?;
        Ok((owners, reports))
    }

    /// What the guard's code does with `probe` against its maps, asked of
    /// its read-only twin (see [`probe`]), loaded on first use.
    pub fn probe_guard(&mut self, probe: &probe::Probe) -> Result<probe::Answer> {
        let frame = probe.frame()?;
        probe::run(probe::twin(&mut self.ebpf)?, &frame)
    }

    /// The kernel's id of the loaded guard for `mode` (the XDP program,
    /// or the tc one), to tell it from what an interface actually runs.
    pub fn guard_program_id(&mut self, mode: attach::AttachedMode) -> Result<u32> {
        let info = if mode == attach::AttachedMode::Tc {
            let tc: &mut aya::programs::SchedClassifier = program(&mut self.ebpf, prog::TC_GUARD)?;
            tc.info()
        } else {
            let xdp: &mut aya::programs::Xdp = program(&mut self.ebpf, prog::XDP_GUARD)?;
            xdp.info()
        };
        info.map(|info| info.id()).map_err(program_error(
            format!("reading the {} guard's id", mode.hook()),
            "",
        ))
    }

    /// Attaches the guard (tc egress, then XDP or tc ingress) to one interface, or
    /// adopts the links a previous guard pinned there.
    pub fn attach_guard(&mut self, pins: &PinDir, iface: &str, mode: XdpMode) -> Result<Attached> {
        attach::attach(pins, &mut self.ebpf, iface, mode, &mut self.held_links)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Some(task) = self.logger.take() {
            task.abort();
        }
    }
}

/// Sleeps until the kernel logs something, then hands it to env_logger.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd, which stays open and the
    // same until the AsyncFd (which owns the logger) is dropped.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("kernel-side log messages are unavailable: {e}");
            return;
        }
    };
    while let Ok(mut guard) = fd.readable_mut().await {
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so loads
/// do not fail there. Newer kernels ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The shipped object holds exactly the programs and maps portwatch
    /// names in `portwatch_common` (and aya-log's), and says its licence.
    #[test]
    fn the_object_matches_the_names_user_space_uses() -> Result<(), aya_obj::ParseError> {
        let obj = aya_obj::Object::parse(PROGRAMS)?;
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = prog::ALL.iter().copied().collect();
        assert_eq!(programs, expected, "no benchmark program is shipped");
        let maps: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|m| !m.starts_with("AYA_LOG") && !m.starts_with('.'))
            .collect();
        let expected: BTreeSet<&str> = map::ALL.iter().copied().collect();
        assert_eq!(maps, expected);
        for name in PINNED_MAPS {
            assert!(map::ALL.contains(name), "{name}");
        }
        assert_eq!(obj.license.to_str().ok(), Some("Dual MIT/GPL"));
        Ok(())
    }
}
