//! The checkers that `tests/tests/deploy.rs` runs on `deploy/`, installed
//! under `target/tools/` (the tests look there; keep the paths in step):
//!
//! - `promtool` (Prometheus rules), taken out of Debian's `prometheus`
//!   package without installing it: installing would also start a
//!   Prometheus server through its init script on machines without systemd.
//! - `kubernetes-validate` (Kubernetes schemas, bundled, so it runs offline)
//!   from PyPI in a virtualenv on Debian's python3, at pinned versions.
//!
//! ansible-playbook comes from the Debian package ansible-core (setup's
//! package list).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util;

/// Every distribution, pinned: `--no-deps` installs exactly these.
const PYTHON_REQUIREMENTS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "PyYAML==6.0.4",
    "typing_extensions==4.16.0",
    "importlib_resources==7.1.0",
    "packaging==26.3",
];

/// Debian's interpreter (package python3, with python3-venv), not whatever
/// python3 comes first on PATH.
const PYTHON: &str = "/usr/bin/python3";
/// Written into the venv after a complete install; holds the requirements.
const VENV_STAMP: &str = "portwatch-requirements.txt";

fn tools_dir() -> PathBuf {
    util::workspace_root().join("target").join("tools")
}

fn promtool_path() -> PathBuf {
    tools_dir().join("prometheus").join("promtool")
}

fn venv_dir() -> PathBuf {
    tools_dir().join("venv")
}

/// What `ensure` would install.
pub fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    if promtool_version().is_none() {
        missing.push(format!("promtool ({})", promtool_path().display()));
    }
    if !venv_current() {
        missing.push(format!("kubernetes-validate ({})", venv_dir().display()));
    }
    missing
}

pub fn ensure() -> Result<()> {
    let dir = tools_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Two setups at once (two shells, or a build while tests run) would
    // remove each other's half-finished work; the second waits here and
    // then finds everything in place.
    let lock_path = dir.join(".lock");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    ensure_promtool()?;
    ensure_venv()
}

// ---- promtool ----

/// "promtool, version 2.42.0+ds (...)" → "2.42.0+ds"; None when it does not run.
fn promtool_version() -> Option<String> {
    let out = Command::new(promtool_path())
        .arg("--version")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(2).map(str::to_string)
}

fn ensure_promtool() -> Result<()> {
    if let Some(version) = promtool_version() {
        println!("ok: promtool {version} ({})", promtool_path().display());
        return Ok(());
    }
    println!("installing: promtool from Debian's prometheus package (a 19 MB download)");
    let work = tools_dir().join(format!("prometheus-deb-{}", std::process::id()));
    // A half-finished earlier attempt.
    remove_dir_if_present(&work)?;
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let download = || {
        util::run(
            Command::new("apt-get")
                .current_dir(&work)
                .args(["download", "prometheus"]),
        )
    };
    if let Err(err) = download() {
        // apt's package lists may be missing or stale on a fresh machine.
        if !util::is_root()? {
            return Err(err.context(
                "`apt-get download prometheus` failed; run `sudo apt-get update`, then \
                 `cargo xtask setup` again",
            ));
        }
        println!("note: {err:#}; running apt-get update and trying again");
        util::run(Command::new("apt-get").arg("update"))?;
        download().context("downloading Debian's prometheus package failed")?;
    }
    let deb = std::fs::read_dir(&work)
        .with_context(|| format!("reading {}", work.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", work.display()))?;
    let extracted = work.join("root");
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;

    let target = promtool_path();
    let dir = target.parent().unwrap_or(&work);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let from = extracted.join("usr/bin/promtool");
    std::fs::rename(&from, &target)
        .with_context(|| format!("moving {} to {}", from.display(), target.display()))?;
    remove_dir_if_present(&work)?;

    match promtool_version() {
        Some(version) => {
            println!("ok: promtool {version} ({}) (installed)", target.display());
            Ok(())
        }
        None => bail!("{} was installed but does not run", target.display()),
    }
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

// ---- the Python virtualenv ----

fn requirements_text() -> String {
    PYTHON_REQUIREMENTS
        .iter()
        .map(|r| format!("{r}\n"))
        .collect()
}

/// The venv exists, was completed with today's requirements, and runs.
fn venv_current() -> bool {
    let venv = venv_dir();
    let stamp = std::fs::read_to_string(venv.join(VENV_STAMP)).unwrap_or_default();
    stamp == requirements_text()
        && Command::new(venv.join("bin/kubernetes-validate"))
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
}

fn ensure_venv() -> Result<()> {
    let venv = venv_dir();
    if venv_current() {
        println!("ok: kubernetes-validate ({})", venv.display());
        return Ok(());
    }
    println!(
        "installing: kubernetes-validate and its dependencies from PyPI into {} \
         (a 25 MB download)",
        venv.display()
    );
    // A venv with other versions is rebuilt rather than patched.
    remove_dir_if_present(&venv)?;
    util::run(Command::new(PYTHON).args(["-m", "venv"]).arg(&venv)).context(
        "creating the virtualenv failed; it needs Debian's python3 and python3-venv \
         (`cargo xtask setup` installs them)",
    )?;
    let requirements = venv.join("requirements.txt");
    std::fs::write(&requirements, requirements_text())
        .with_context(|| format!("writing {}", requirements.display()))?;
    util::run(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--no-deps",
                // Wheels only: nothing is compiled (rpds-py is Rust).
                "--only-binary=:all:",
                "-r",
            ])
            .arg(&requirements),
    )?;
    std::fs::write(venv.join(VENV_STAMP), requirements_text())
        .with_context(|| format!("writing {}", venv.join(VENV_STAMP).display()))?;
    if !venv_current() {
        bail!(
            "{} was installed but does not run",
            venv.join("bin/kubernetes-validate").display()
        );
    }
    println!("ok: kubernetes-validate ({}) (installed)", venv.display());
    Ok(())
}
