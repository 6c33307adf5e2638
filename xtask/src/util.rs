//! Paths, privileges and running commands with errors that say what failed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};

use anyhow::{Context as _, Result, bail};
/// "exit status 3" or "killed by signal 9".
pub use portwatch_lab::describe_status as describe;
/// The first executable called `name` on PATH.
pub use portwatch_lab::find_in_path;

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    // `cargo run` sets CARGO_MANIFEST_DIR at run time; the compile-time value
    // covers running the built binary directly.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(manifest_dir)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the current
/// directory, as cargo reads it) or `<root>/target`.
pub fn target_dir(root: &Path) -> Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                Ok(dir)
            } else {
                let cwd = std::env::current_dir().context("reading the current directory")?;
                Ok(cwd.join(dir))
            }
        }
        _ => Ok(root.join("target")),
    }
}

/// The cargo profile directory name for a build.
pub fn profile_dir(release: bool) -> &'static str {
    if release { "release" } else { "debug" }
}

/// Whether this process runs with effective uid 0. Read from /proc so that
/// xtask needs no libc binding.
pub fn is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(euid == "0")
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin` or `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".cargo").join("bin"))
}

/// Whether `dir` is one of PATH's entries.
pub fn dir_on_path(dir: &Path) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|entry| entry == dir))
}

/// PATH for child processes: PATH with the cargo bin directory added when it
/// is missing, so that the eBPF build finds bpf-linker right after setup
/// installed it there.
pub fn child_path() -> OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    match cargo_bin_dir() {
        Some(bin) if !dir_on_path(&bin) => {
            let entries = std::iter::once(bin).chain(std::env::split_paths(&path));
            std::env::join_paths(entries).unwrap_or(path)
        }
        _ => path,
    }
}

/// A cargo command run from the workspace root with [`child_path`].
pub fn cargo(root: &Path) -> Command {
    // CARGO is the cargo running xtask (set by `cargo run`); using it keeps the
    // inner builds on the same toolchain.
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(root).env("PATH", child_path());
    cmd
}

/// The command line for messages, e.g. `cargo build -p portwatch`.
pub fn display(cmd: &Command) -> String {
    let line = portwatch_lab::command_line(cmd);
    let program = cmd.get_program().to_string_lossy();
    // Show `cargo` rather than the toolchain path CARGO points at.
    match line.strip_prefix(&*program) {
        Some(args) if program.ends_with("/cargo") => format!("cargo{args}"),
        _ => line,
    }
}

/// Runs `cmd` with inherited stdio and fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(status));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status().with_context(|| start_error(cmd))
}

/// Runs `cmd` capturing its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| start_error(cmd))
}

/// Runs `cmd` and returns its stdout; a non-zero exit is an error naming
/// the command.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        anyhow::bail!("`{}` failed ({})", display(cmd), describe(out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start_error(cmd: &Command) -> String {
    format!(
        "could not start `{}` (is `{}` installed and on PATH?)",
        display(cmd),
        cmd.get_program().to_string_lossy()
    )
}

/// Prints a step header so CI logs show where each step starts.
pub fn header(step: &str) {
    println!("==> {step}");
}
