//! cargo-deb, the tool `cargo xtask package` builds the Debian package
//! with: the pinned release, checked and installed by setup.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util;

/// The cargo-deb release the packaging is tested with.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// `cargo deb`, run from `root`.
pub fn cargo_deb(root: &Path) -> Command {
    let mut cmd = util::cargo(root);
    cmd.arg("deb");
    cmd
}

/// The installed cargo-deb's version, if it runs.
fn cargo_deb_version() -> Option<String> {
    let out = cargo_deb(&util::workspace_root())
        .arg("--version")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // "cargo-deb 3.8.0"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_string)
}

/// Whether the pinned cargo-deb is installed (for `setup::ensure`).
pub fn cargo_deb_present() -> bool {
    cargo_deb_version().as_deref() == Some(CARGO_DEB_VERSION)
}

/// Installs the pinned cargo-deb when it is missing or another version.
pub fn ensure_cargo_deb() -> Result<()> {
    match cargo_deb_version() {
        Some(v) if v == CARGO_DEB_VERSION => {
            println!("ok: cargo-deb {CARGO_DEB_VERSION}");
            return Ok(());
        }
        Some(v) => println!("installing: cargo-deb {CARGO_DEB_VERSION} (found {v})"),
        None => println!("installing: cargo-deb {CARGO_DEB_VERSION} (takes about two minutes)"),
    }
    let root = util::workspace_root();
    util::run(
        util::cargo(&root)
            // Not from the workspace: no workspace config or toolchain applies.
            .current_dir(std::env::temp_dir())
            .args([
                "install",
                "cargo-deb",
                "--version",
                CARGO_DEB_VERSION,
                "--locked",
            ]),
    )
    .context("installing cargo-deb failed")?;
    match cargo_deb_version() {
        Some(v) if v == CARGO_DEB_VERSION => {
            println!("ok: cargo-deb {CARGO_DEB_VERSION} (installed)");
            Ok(())
        }
        other => bail!(
            "cargo install succeeded, but `cargo deb --version` reports {other:?}; \
             is another cargo-deb earlier on PATH?"
        ),
    }
}
