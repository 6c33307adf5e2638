//! Loads the embedded kernel programs and attaches them: the listener
//! monitor, and the guard per interface. Dropping the `Datapath` detaches
//! every hook: links are file descriptors.

use std::fs::File;

use tokio::io::{Interest, unix::AsyncFd};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSock, TracePoint},
};

use crate::{
    error::{Error, Result, program_error},
    events::reader::RingReader,
    guard::{
        attach::{Attached, XdpModeArg},
        pins::{PINNED_MAPS, PinDir},
    },
    maps::{self, GuardMaps, MonitorStats},
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

/// The kernel object built by build.rs from portwatch-ebpf.
pub(crate) static PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch"));

pub struct Datapath {
    ebpf: Ebpf,
    pub events: RingReader,
    pub stats: MonitorStats,
    /// Forwards kernel log records to the `log` crate; aborted on drop.
    logger: Option<tokio::task::JoinHandle<()>>,
    /// The guard's pinned links, held while the daemon runs.
    held_links: Vec<aya::programs::links::PinnedLink>,
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
        let events = RingReader::new(maps::events(&mut ebpf)?).map_err(|source| Error::Io {
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
            events,
            stats,
            logger,
            held_links: Vec::new(),
        })
    }

    /// Attaches the TCP tracepoint and the UDP cgroup hooks.
    pub fn attach_monitor(&mut self) -> Result<()> {
        let tp: &mut TracePoint = program(&mut self.ebpf, "inet_sock_set_state")?;
        let tp_hint =
            "TCP listeners are seen through this tracepoint (Linux 4.16+, CONFIG_TRACEPOINTS)";
        tp.load().map_err(program_error(
            "loading the tracepoint program".into(),
            tp_hint,
        ))?;
        tp.attach("sock", "inet_sock_set_state")
            .map_err(program_error(
                "attaching to tracepoint sock/inet_sock_set_state".into(),
                tp_hint,
            ))?;

        let root = sys::cgroup2_root()?;
        let cg_hint =
            "UDP binds are seen through cgroup socket hooks (Linux 4.17+, CONFIG_CGROUP_BPF)";
        for name in ["post_bind4", "post_bind6", "sock_release"] {
            let cgroup = File::open(&root).map_err(|source| Error::CgroupOpen {
                path: root.clone(),
                source,
            })?;
            let prog: &mut CgroupSock = program(&mut self.ebpf, name)?;
            prog.load()
                .map_err(program_error(format!("loading cgroup/{name}"), cg_hint))?;
            // aya attaches through bpf_link (Linux 5.7+), which takes no flags and
            // always coexists with programs others attach there.
            prog.attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error(
                    format!("attaching cgroup/{name} at {}", root.display()),
                    cg_hint,
                ))?;
        }
        Ok(())
    }
}

impl Datapath {
    /// The guard's maps and its drop-report reader (registered before the
    /// guard attaches).
    pub fn guard_maps(&mut self) -> Result<(GuardMaps, RingReader)> {
        let maps = GuardMaps::open(&mut self.ebpf)?;
        let drops = RingReader::new(maps::drops(&mut self.ebpf)?).map_err(|source| Error::Io {
            what: "registering the drop report ring buffer with the runtime".into(),
            source,
        })?;
        Ok((maps, drops))
    }

    /// Attaches the guard (tc egress, then XDP) to one interface, or
    /// adopts the links a previous guard pinned there.
    pub fn attach_guard(
        &mut self,
        pins: &PinDir,
        iface: &str,
        mode: XdpModeArg,
    ) -> Result<Attached> {
        pins.attach(&mut self.ebpf, iface, mode, &mut self.held_links)
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
