//! Installs what building and running portwatch needs: Debian packages,
//! bpf-linker built against Debian's LLVM 22, and a rustup toolchain linked
//! to Debian's rustc (which ships the library source -Z build-std needs).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util;

/// Debian packages for building (Rust with source, LLVM for bpf-linker), for
/// running and testing (bpftool, network tools, real clients/servers) and
/// for the benchmarks' baselines.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "socat",
    "nmap",
    "ncat",
    "curl",
    "iproute2",
    "bpftool",
    "tmux",
    "python3",
    "procps",
    "iputils-ping",
    // tests/tests/lockout.rs: a real SSH session into the guard's namespace
    // (the server alone, no service: dropbear-bin ships no init script;
    // systemd-socket-activate, from systemd below, starts it per
    // connection as ssh.socket does).
    "dropbear-bin",
    "openssh-client",
    // `cargo xtask bench`: a packet generator (trafgen), TCP throughput,
    // the firewalls and XDP filter compared against, a tracing baseline.
    "netsniff-ng",
    "iperf3",
    "nftables",
    "iptables",
    "xdp-tools",
    "bpftrace",
    // The Debian package (cargo xtask package, tests/tests/package.rs):
    // dpkg-shlibdeps for its dependencies, systemd-analyze and
    // deb-systemd-helper for the unit, man for `systemd-analyze verify`'s
    // check of the unit's Documentation= pages.
    "dpkg-dev",
    "systemd",
    "man-db",
    // tests/tests/package.rs boots the unit under a real systemd in a
    // container (systemd-nspawn), as PID 1 may not be systemd.
    "systemd-container",
    // tests/tests/deploy.rs: the Ansible playbook in deploy/ is run, and
    // deploy_tools builds a virtualenv on Debian's python3.
    "ansible-core",
    "python3-venv",
];

/// bpf-linker's newest release that builds with the LLVM Debian ships.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Put first on PATH while building bpf-linker so llvm-sys finds LLVM 22's
/// llvm-config.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// Must match portwatch/build.rs.
const DEFAULT_BPF_TOOLCHAIN: &str = "portwatch-bpf";
/// Where the linked toolchain lives (Debian's /usr/bin/rustc).
const BPF_TOOLCHAIN_PATH: &str = "/usr";
/// Debian's rustc-web release; older rustc cannot build the aya crates with
/// -Z build-std.
const MIN_BPF_RUSTC: (u32, u32) = (1, 96);
/// Library source from rust-web-src, needed by -Z build-std=core.
const RUST_LIBRARY_SRC: &str = "/usr/lib/rustlib/src/rust/library";

/// `cargo xtask setup`: checks each item, installs what is missing.
pub fn setup() -> Result<()> {
    ensure_packages()?;
    ensure_bpf_linker()?;
    ensure_bpf_toolchain()?;
    crate::cargo_deb::ensure_cargo_deb()?;
    crate::deploy_tools::ensure()?;
    Ok(())
}

/// Quick check before build/run/test: runs the full setup only when
/// something is missing.
pub fn ensure() -> Result<()> {
    let missing = missing_items()?;
    if missing.is_empty() {
        println!("ok: build prerequisites present");
        return Ok(());
    }
    println!("missing: {}; running setup", missing.join(", "));
    setup()
}

fn missing_items() -> Result<Vec<String>> {
    let mut missing: Vec<String> = missing_packages()?
        .into_iter()
        .map(|p| format!("package {p}"))
        .collect();
    if !matches!(bpf_linker_state(), LinkerState::Ok { .. }) {
        missing.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    let toolchain = bpf_toolchain();
    if !matches!(toolchain_state(&toolchain)?, ToolchainState::Ok(_)) {
        missing.push(format!("rustup toolchain {toolchain}"));
    }
    if !Path::new(RUST_LIBRARY_SRC).is_dir() {
        missing.push(format!("Rust library source ({RUST_LIBRARY_SRC})"));
    }
    if !crate::cargo_deb::cargo_deb_present() {
        missing.push(format!("cargo-deb {}", crate::cargo_deb::CARGO_DEB_VERSION));
    }
    missing.extend(crate::deploy_tools::missing());
    Ok(missing)
}

// ---- Debian packages ----

fn ensure_packages() -> Result<()> {
    let missing = missing_packages()?;
    for package in PACKAGES.iter().filter(|p| !missing.contains(p)) {
        println!("ok: package {package}");
    }
    if missing.is_empty() {
        return Ok(());
    }

    let list = missing.join(" ");
    let apt_get = util::find_in_path("apt-get");
    let root = util::is_root()?;
    if apt_get.is_none() || !root {
        let why = if apt_get.is_none() {
            "apt-get not found"
        } else {
            "installing packages needs root"
        };
        bail!(
            "{why}: install these packages by hand, then run `cargo xtask setup` again:\n  \
             sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends {list}\n\
             (rustc-web, cargo-web, rust-web-src and llvm-22-dev come from bookworm-security)"
        );
    }

    println!("installing Debian packages: {list}");
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .context(
        "apt-get install failed; rustc-web, cargo-web, rust-web-src and llvm-22-dev \
         need the bookworm-security suite in the apt sources",
    )?;

    let still_missing = missing_packages()?;
    if !still_missing.is_empty() {
        bail!(
            "still not installed after apt-get install: {}",
            still_missing.join(" ")
        );
    }
    for package in &missing {
        println!("ok: package {package} (installed)");
    }
    Ok(())
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for &package in PACKAGES {
        if !package_installed(package)? {
            missing.push(package);
        }
    }
    Ok(missing)
}

fn package_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .with_context(|| {
            format!(
                "dpkg-query not found: setup supports Debian only; install these packages \
                 (or their equivalents) by hand: {}",
                PACKAGES.join(" ")
            )
        })?;
    // dpkg-query fails for packages it has never seen; that is "missing" too.
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

// ---- bpf-linker ----

enum LinkerState {
    /// The right version; `on_path` is false when only found in the cargo
    /// bin directory.
    Ok {
        path: PathBuf,
        on_path: bool,
    },
    Wrong {
        path: PathBuf,
        version: String,
    },
    Missing,
}

fn bpf_linker_state() -> LinkerState {
    let candidates = util::find_in_path("bpf-linker")
        .map(|p| (p, true))
        .into_iter()
        .chain(
            util::cargo_bin_dir()
                .map(|dir| (dir.join("bpf-linker"), false))
                .filter(|(p, _)| p.is_file()),
        );
    let mut wrong = None;
    for (path, on_path) in candidates {
        match linker_version(&path) {
            Some(v) if v == BPF_LINKER_VERSION => return LinkerState::Ok { path, on_path },
            Some(version) => {
                wrong.get_or_insert(LinkerState::Wrong { path, version });
            }
            None => {}
        }
    }
    wrong.unwrap_or(LinkerState::Missing)
}

/// "0.13.0" from "bpf-linker 0.13.0"; None when it does not run.
fn linker_version(path: &Path) -> Option<String> {
    let out = Command::new(path).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_string)
}

fn ensure_bpf_linker() -> Result<()> {
    match bpf_linker_state() {
        LinkerState::Ok { path, on_path } => {
            println!("ok: bpf-linker {BPF_LINKER_VERSION} ({})", path.display());
            if !on_path {
                report_bin_dir_off_path(&path);
            }
            return Ok(());
        }
        LinkerState::Wrong { path, version } => println!(
            "installing: bpf-linker {BPF_LINKER_VERSION} (found {version} at {})",
            path.display()
        ),
        LinkerState::Missing => println!(
            "installing: bpf-linker {BPF_LINKER_VERSION} with LLVM 22 (takes about a minute)"
        ),
    }

    let root = util::workspace_root();
    let install = |locked: bool| {
        let mut cmd = util::cargo(&root);
        // Not from the workspace, so no workspace config or toolchain applies.
        cmd.current_dir(std::env::temp_dir())
            .env("PATH", path_with_llvm())
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"]);
        if locked {
            cmd.arg("--locked");
        }
        util::run(&mut cmd)
    };
    // --locked reproduces the release's dependency set; its lock file may not
    // resolve against this toolchain, so retry with fresh resolution.
    if let Err(err) = install(true) {
        println!("note: {err:#}; retrying without --locked");
        install(false).context("installing bpf-linker failed")?;
    }

    match bpf_linker_state() {
        LinkerState::Ok { path, on_path } => {
            println!("ok: bpf-linker {BPF_LINKER_VERSION} ({})", path.display());
            if !on_path {
                report_bin_dir_off_path(&path);
            }
            Ok(())
        }
        LinkerState::Wrong { path, version } => bail!(
            "cargo install succeeded, but {} reports version {version}; \
             it shadows the new bpf-linker on PATH",
            path.display()
        ),
        LinkerState::Missing => bail!(
            "cargo install succeeded, but bpf-linker is neither on PATH nor in {}",
            util::cargo_bin_dir().unwrap_or_default().display()
        ),
    }
}

fn path_with_llvm() -> std::ffi::OsString {
    let rest = util::child_path();
    let entries = std::iter::once(PathBuf::from(LLVM_BIN)).chain(std::env::split_paths(&rest));
    std::env::join_paths(entries).unwrap_or(rest)
}

fn report_bin_dir_off_path(linker: &Path) {
    let dir = linker.parent().unwrap_or(linker);
    println!(
        "note: {} is not on PATH; xtask adds it for its own builds, but for plain \
         `cargo build` run: export PATH=\"{}:$PATH\"",
        dir.display(),
        dir.display()
    );
}

// ---- the rustup toolchain linked to Debian's rustc ----

/// The toolchain name portwatch/build.rs uses.
fn bpf_toolchain() -> String {
    std::env::var("PORTWATCH_BPF_TOOLCHAIN")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| DEFAULT_BPF_TOOLCHAIN.to_string())
}

enum ToolchainState {
    /// `rustc --version` output.
    Ok(String),
    TooOld(String),
    Missing,
}

fn toolchain_state(toolchain: &str) -> Result<ToolchainState> {
    if util::find_in_path("rustup").is_none() {
        bail!(
            "rustup not found on PATH: install rustup (https://rustup.rs) or add ~/.cargo/bin \
             to PATH; the eBPF build runs through `rustup run {toolchain}`"
        );
    }
    let out = util::output(Command::new("rustup").args(["run", toolchain, "rustc", "--version"]))?;
    if !out.status.success() {
        return Ok(ToolchainState::Missing);
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // "rustc 1.96.0 (ac68faa20 2026-05-25) ..."
    let numbers: Vec<u32> = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split(['.', '-'])
        .map_while(|part| part.parse().ok())
        .collect();
    match numbers.as_slice() {
        [major, minor, ..] if (*major, *minor) >= MIN_BPF_RUSTC => Ok(ToolchainState::Ok(version)),
        _ => Ok(ToolchainState::TooOld(version)),
    }
}

fn ensure_bpf_toolchain() -> Result<()> {
    let toolchain = bpf_toolchain();
    let (min_major, min_minor) = MIN_BPF_RUSTC;
    match toolchain_state(&toolchain)? {
        ToolchainState::Ok(version) => println!("ok: rustup toolchain {toolchain} ({version})"),
        state => {
            match state {
                ToolchainState::TooOld(version) => println!(
                    "installing: relinking rustup toolchain {toolchain} to {BPF_TOOLCHAIN_PATH} \
                     (it has {version}, needs {min_major}.{min_minor} or newer)"
                ),
                _ => println!(
                    "installing: rustup toolchain {toolchain} linked to {BPF_TOOLCHAIN_PATH} \
                     (Debian's rustc)"
                ),
            }
            // Linking over an existing name replaces the link.
            util::run(Command::new("rustup").args([
                "toolchain",
                "link",
                &toolchain,
                BPF_TOOLCHAIN_PATH,
            ]))?;
            match toolchain_state(&toolchain)? {
                ToolchainState::Ok(version) => {
                    println!("ok: rustup toolchain {toolchain} ({version})");
                }
                ToolchainState::TooOld(version) => bail!(
                    "{BPF_TOOLCHAIN_PATH}/bin/rustc is {version}; the eBPF build needs \
                     {min_major}.{min_minor} or newer (Debian's rustc-web)"
                ),
                ToolchainState::Missing => bail!(
                    "`rustup run {toolchain} rustc --version` still fails after linking \
                     {BPF_TOOLCHAIN_PATH}; is rustc-web installed?"
                ),
            }
        }
    }

    if !Path::new(RUST_LIBRARY_SRC).is_dir() {
        bail!(
            "{RUST_LIBRARY_SRC} is missing; it comes from the Debian package rust-web-src \
             (reinstall it: apt-get install --reinstall rust-web-src)"
        );
    }
    println!("ok: Rust library source ({RUST_LIBRARY_SRC})");
    Ok(())
}
