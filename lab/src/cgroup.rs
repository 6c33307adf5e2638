//! cgroups v2 made for a test: a tree under the cgroup v2 root, named
//! uniquely, that processes are started in; removed when dropped.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Netns, unique_name};

/// Where cgroup v2 is mounted: the shortest such mount point (the host's
/// root, not a container's nested one).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    mounts
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .min_by_key(|p| p.as_os_str().len())
        .context(
            "cgroup v2 is not mounted (mount -t cgroup2 none /sys/fs/cgroup): the owned-port \
             tests need it",
        )
}

/// A cgroup of the test's own, e.g. `/pw-owner-1234-0`, with children made
/// by [`TestCgroup::child`]. Dropping it removes the tree once its processes
/// are gone (end them first: they are the test's own children).
pub struct TestCgroup {
    root: PathBuf,
    /// Relative to the root, without a leading slash.
    rel: PathBuf,
    /// Made below it, removed before it.
    children: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> Result<Self> {
        let root = cgroup2_root()?;
        let rel = PathBuf::from(unique_name(prefix));
        let dir = root.join(&rel);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            root,
            rel,
            children: Vec::new(),
        })
    }

    /// Makes `name` below it; its path as portwatch writes it.
    pub fn child(&mut self, name: &str) -> Result<String> {
        let rel = self.rel.join(name);
        let dir = self.root.join(&rel);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.children.push(rel.clone());
        Ok(format!("/{}", rel.display()))
    }

    /// Removes child `name` (empty by now), as systemd does when a unit
    /// stops; `child` makes it anew (a new cgroup, with a new id).
    pub fn remove_child(&mut self, name: &str) -> Result<()> {
        let rel = self.rel.join(name);
        Self::remove(&self.root.join(&rel))?;
        self.children.retain(|c| *c != rel);
        Ok(())
    }

    /// Its path as portwatch and /proc/PID/cgroup write it: `/NAME`.
    pub fn path(&self) -> String {
        format!("/{}", self.rel.display())
    }

    /// `program` in the network namespace `ns` (the host's mounts, as
    /// `nsenter` keeps them), moved into cgroup `path` (this one or a child)
    /// before it starts.
    pub fn command(&self, path: &str, ns: &Netns, program: impl AsRef<OsStr>) -> Command {
        let procs = self
            .root
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        let mut cmd = ns.nsenter("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(procs)
            .arg(program.as_ref());
        cmd
    }

    fn remove(dir: &Path) -> Result<()> {
        // A process killed a moment ago may still be leaving the cgroup.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!("removing {}: {e}", dir.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for rel in self.children.iter().rev() {
            if let Err(e) = Self::remove(&self.root.join(rel)) {
                eprintln!("{e:#}");
            }
        }
        if let Err(e) = Self::remove(&self.root.join(&self.rel)) {
            eprintln!("{e:#}");
        }
    }
}
