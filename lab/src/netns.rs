//! Network namespaces made for one test or task, deleted on drop.

use std::{
    ffi::OsStr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{bounded::run, name::unique_name, run_bounded};

/// A named network namespace (`ip netns add`), its loopback up. Dropping
/// it deletes it, and with it every interface inside.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        crate::orphans::sweep_once();
        let name = unique_name(tag);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `/run/netns/NAME`, what `nsenter` and [`enter`] take.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's inode, as portwatch reports it in `netns`.
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let path = self.path();
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(meta.ino())
    }

    /// `ip netns exec NAME program`: the namespace's network and its own
    /// /sys, in a private mount namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `nsenter --net=/run/netns/NAME program`: this namespace's network,
    /// the host's mounts (so bpffs pins outlive the process).
    pub fn nsenter(&self, program: impl AsRef<OsStr>) -> Command {
        nsenter(&self.path(), program)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("ip").args(["netns", "del", &self.name]),
            None,
            Duration::from_secs(10),
            None,
        );
    }
}

/// [`Netns::nsenter`] for a namespace known by its path (threads that do
/// not hold the [`Netns`]).
pub fn nsenter(netns: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut net = std::ffi::OsString::from("--net=");
    net.push(netns);
    let mut cmd = Command::new("nsenter");
    cmd.arg(net).arg(program.as_ref());
    cmd
}

/// Moves the calling thread into the network namespace at `netns`
/// ([`Netns::path`]); the sockets it creates from then on live there.
pub fn enter(netns: &Path) -> Result<()> {
    let file =
        std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    // SAFETY: setns reads only the descriptor, which `file` keeps open for
    // the call; it changes this thread's network namespace and no memory.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({})", netns.display()));
    }
    Ok(())
}
