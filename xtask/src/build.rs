//! `cargo xtask build`: the portwatch binary with its embedded eBPF programs.

use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};

use crate::{setup, util};

/// Checks prerequisites (installing what is missing), then builds.
pub fn build(release: bool) -> Result<PathBuf> {
    setup::ensure()?;
    build_portwatch(release)
}

/// `cargo build -p portwatch`; returns the path of the binary.
pub fn build_portwatch(release: bool) -> Result<PathBuf> {
    let root = util::workspace_root();
    let mut cmd = util::cargo(&root);
    cmd.args(["build", "-p", "portwatch"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    portwatch_binary(&root, release)
}

/// `<target>/{debug,release}/portwatch`, which must exist.
pub fn portwatch_binary(root: &Path, release: bool) -> Result<PathBuf> {
    let bin = util::target_dir(root)?
        .join(util::profile_dir(release))
        .join("portwatch");
    ensure!(
        bin.is_file(),
        "{} does not exist after the build",
        bin.display()
    );
    Ok(bin)
}
