//! What of a configuration's CPU per packet is its XDP program: the
//! kernel's own BPF run-time statistics (BPF_ENABLE_STATS), read per
//! program over a flood of its own. The whole path costs ~2 µs per packet
//! here and its rounds spread by several percent; a program's run time is
//! steady to the nanosecond, so a difference of a few percent between two
//! programs shows here when the rounds' spread hides it.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use portwatch_lab::{Lab, run};

use super::trafgen::server_link_json;
use serde_json::Value;

/// Run-time statistics on for every BPF program while this lives (the
/// kernel turns them off when the last such fd closes, also if the bench
/// dies): each run then also pays for two clock reads, in every program
/// alike, so the passes that measure the path's CPU run without it.
pub struct StatsOn {
    _fd: OwnedFd,
}

/// `BPF_ENABLE_STATS` and its one statistic, from the kernel's uapi.
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

impl StatsOn {
    pub fn enable() -> Result<Self> {
        // union bpf_attr for BPF_ENABLE_STATS: { __u32 type; }, zero padded.
        let mut attr = [0u8; 16];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        // SAFETY: bpf(2) reads `attr.len()` bytes from a live buffer of
        // that size and returns a new fd or -1; nothing else is touched.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_mut_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("BPF_ENABLE_STATS (the kernel's BPF run-time statistics)");
        }
        let fd = i32::try_from(fd).context("BPF_ENABLE_STATS returned no fd")?;
        // SAFETY: the kernel just returned `fd`, open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { _fd: fd })
    }
}

/// The id of the XDP program attached to the lab's server veth.
fn server_xdp_prog(lab: &Lab) -> Result<u64> {
    let link = server_link_json(lab)?;
    let xdp = &link["xdp"];
    // One program: `prog` with its `mode`; more (generic and native):
    // `attached`, each with its own. 1 is native (XDP_ATTACHED_DRV).
    let native = |entry: &Value| {
        (entry["mode"] == 1)
            .then(|| entry["prog"]["id"].as_u64())
            .flatten()
    };
    native(xdp)
        .or_else(|| xdp["attached"].as_array()?.iter().find_map(native))
        .with_context(|| format!("no native XDP program on the server's veth: {xdp}"))
}

/// A program's (run time ns, runs) so far, as bpftool reports them (both
/// absent until it has run with statistics on).
fn prog_stats(id: u64) -> Result<(u64, u64)> {
    let out = run("bpftool", &["-j", "prog", "show", "id", &id.to_string()])?;
    let prog: Value = serde_json::from_str(&out).context("parsing `bpftool prog show`")?;
    let field = |name: &str| prog[name].as_u64().unwrap_or(0);
    Ok((field("run_time_ns"), field("run_cnt")))
}

/// Average run time in ns of the XDP program on the server's veth while
/// `flood` runs, statistics on meanwhile; errors if it ran for less than
/// `min_runs` packets (statistics that did not count).
pub fn program_ns(lab: &Lab, min_runs: u64, flood: impl FnOnce() -> Result<()>) -> Result<f64> {
    let id = server_xdp_prog(lab)?;
    let stats = StatsOn::enable()?;
    let (t0, n0) = prog_stats(id)?;
    flood()?;
    let (t1, n1) = prog_stats(id)?;
    drop(stats);
    let runs = n1.saturating_sub(n0);
    if runs < min_runs {
        bail!("program {id} counted {runs} runs with statistics on, expected {min_runs} at least");
    }
    Ok(t1.saturating_sub(t0) as f64 / runs as f64)
}
