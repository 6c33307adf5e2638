//! Builds the kernel programs in `portwatch-ebpf` for bpfel-unknown-none and
//! leaves the object in OUT_DIR, where `loader.rs` embeds it.
//!
//! The eBPF build needs `core` built from source (-Z build-std), which the
//! rustup toolchains here cannot provide; `cargo xtask setup` links Debian's
//! compiler, which ships its library source, as the rustup toolchain below.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Name of the rustup toolchain `cargo xtask setup` links to Debian's rustc.
const BPF_TOOLCHAIN: &str = "portwatch-bpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PORTWATCH_BPF_TOOLCHAIN");
    // aya-build watches portwatch-ebpf only; the layouts it shares with user
    // space live in portwatch-common, and a change there left a stale object
    // whose structs no longer matched.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../portwatch-common/src")
    );
    let toolchain =
        std::env::var("PORTWATCH_BPF_TOOLCHAIN").unwrap_or_else(|_| BPF_TOOLCHAIN.to_string());
    check_prerequisites(&toolchain)?;

    // SAFETY: build scripts run single-threaded at this point; nothing else
    // reads the environment concurrently. aya-build passes this on to the inner
    // cargo so that Debian's stable rustc accepts -Z build-std=core.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };

    let package = aya_build::Package {
        name: "portwatch-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../portwatch-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
        .context("building the eBPF programs (portwatch-ebpf) failed")
}

/// Fails early, with what to do, when the eBPF toolchain is missing.
fn check_prerequisites(toolchain: &str) -> anyhow::Result<()> {
    let hint = "run `cargo xtask setup` (as root) to install it";
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(&linker, Ok(out) if out.status.success()) {
        bail!("bpf-linker is not on PATH; {hint}");
    }
    let rustc = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--version"])
        .output();
    if !matches!(&rustc, Ok(out) if out.status.success()) {
        bail!(
            "the rustup toolchain `{toolchain}` (Debian's rustc with rust-src) is missing; {hint}"
        );
    }
    Ok(())
}
