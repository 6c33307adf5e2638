//! `cargo xtask run`: builds, then runs portwatch as root.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{Result, bail};

use crate::{build, util};

/// Never returns on success: xtask replaces itself with portwatch (or sudo),
/// so Ctrl-C and the exit status belong to portwatch alone.
pub fn run(release: bool, args: &[String]) -> Result<()> {
    let bin = build::build(release)?;

    // Loading eBPF programs needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN.
    let mut cmd = if util::is_root()? {
        Command::new(&bin)
    } else {
        if util::find_in_path("sudo").is_none() {
            bail!(
                "portwatch must run as root and sudo was not found; run it as root: {} {}",
                bin.display(),
                args.join(" ")
            );
        }
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(&bin);
        cmd
    };
    cmd.args(args);

    // exec only returns on failure.
    let err = cmd.exec();
    Err(anyhow::Error::new(err).context(format!("could not start `{}`", util::display(&cmd))))
}
