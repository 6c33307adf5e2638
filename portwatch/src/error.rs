//! Typed errors of the library. Each message names the problem and what to do.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "portwatch needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (missing: {missing}); run it with sudo"
    )]
    NotPrivileged { missing: String },

    #[error(
        "{fs} is not mounted at {path} and mounting it failed ({source}); mount it by hand: `mount -t {fs} {fs} {path}`"
    )]
    Mount {
        fs: &'static str,
        path: &'static str,
        #[source]
        source: nix::Error,
    },

    #[error(
        "no cgroup v2 hierarchy found in /proc/self/mountinfo; the UDP bind hooks need one: \
         mount it with `mount -t cgroup2 none /sys/fs/cgroup` (or boot with systemd.unified_cgroup_hierarchy=1)"
    )]
    NoCgroup2,

    #[error("cannot open the cgroup v2 root {path}: {source}")]
    CgroupOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("loading the eBPF object into the kernel failed: {0}")]
    Load(#[from] aya::EbpfError),

    #[error("the eBPF object has no {kind} named `{name}` (a build mismatch: rebuild portwatch)")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },

    #[error("{what} failed. {hint}")]
    Program {
        what: String,
        hint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("the map `{name}` could not be opened: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
