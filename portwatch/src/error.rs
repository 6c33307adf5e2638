//! Typed errors of the library. Each message names the problem and what to do.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "portwatch needs root, or the capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (missing: {missing}); run it with sudo"
    )]
    NotPrivileged { missing: String },

    // The cause is printed by the error chain (`{:#}`), not repeated here.
    #[error(
        "{fs} is not mounted at {path} and mounting it failed; mount it by hand: `mount -t {fs} {fs} {path}`"
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

    #[error("cannot open the cgroup v2 root {path}")]
    CgroupOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("loading the eBPF object into the kernel failed")]
    Load(#[from] aya::EbpfError),

    #[error("the eBPF object has no {kind} named `{name}` (a build mismatch: rebuild portwatch)")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },

    #[error("{what} failed: {detail}. {hint}")]
    Program {
        what: String,
        hint: &'static str,
        /// The kernel's answer, with a verifier log cut to its end.
        detail: String,
    },

    #[error("the map `{name}` could not be opened")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    /// A probe the datapath cannot build or whose answer makes no sense.
    #[error("{0}")]
    Invalid(String),

    // The cause is printed by the error chain (`{:#}`), not repeated here.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds the error for a failed program load or attach. A verifier log can
/// run to thousands of lines: the message keeps its last lines (where the
/// reason is), the whole log goes to the debug log.
pub fn program_error(
    what: String,
    hint: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| {
        let full = source.to_string();
        log::debug!("{what}: {full}");
        let lines: Vec<&str> = full.lines().collect();
        let detail = if lines.len() > 12 {
            format!(
                "{}\n  ... ({} lines of verifier log omitted; RUST_LOG=debug shows them)\n{}",
                lines[0],
                lines.len() - 11,
                lines[lines.len() - 10..].join("\n")
            )
        } else {
            full
        };
        Error::Program { what, hint, detail }
    }
}
