//! `cargo xtask test`: lint, build, unit tests, then the kernel integration
//! tests as root. The first failing step ends the run and is named.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{build, package, setup, util};

/// `extra` goes to the integration test binaries (e.g. a test name filter).
pub fn test(extra: &[String]) -> Result<()> {
    let root = util::workspace_root();

    step("setup", setup::ensure)?;
    step("fmt", || {
        util::run(util::cargo(&root).args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        util::run(util::cargo(&root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))
    })?;
    // Before the unit tests so that a broken eBPF build is reported as such.
    step("build", || build::build_portwatch(false).map(drop))?;
    step("unit tests", || {
        // `fuzzing` adds the fuzz checks and the test replaying their seeds.
        util::run(util::cargo(&root).args([
            "test",
            "--workspace",
            "--exclude",
            "portwatch-tests",
            "--exclude",
            "portwatch-ebpf",
            "--features",
            "portwatch/fuzzing",
        ]))
    })?;
    let mut debs = None;
    step("package", || {
        let portwatch = build::portwatch_binary(&root, false)?;
        debs = Some(package::packages_for_tests(&portwatch)?);
        Ok(())
    })?;
    let debs = debs.context("the package step made no packages")?;
    step("integration tests", || {
        integration_tests(&root, extra, &debs)
    })?;

    util::header("all steps passed");
    Ok(())
}

fn step(name: &str, run: impl FnOnce() -> Result<()>) -> Result<()> {
    util::header(name);
    run().with_context(|| format!("step `{name}` failed"))
}

/// The tests load eBPF programs and make network namespaces, so they need
/// root; they run one at a time because they share kernel state.
fn integration_tests(root: &Path, extra: &[String], debs: &(PathBuf, PathBuf)) -> Result<()> {
    let portwatch = build::portwatch_binary(root, false)?;
    // tests/tests/package.rs installs, upgrades and purges these.
    let (deb, deb_next) = debs;

    if util::is_root()? {
        return util::run(
            util::cargo(root)
                .env("PORTWATCH_BIN", &portwatch)
                .env("PORTWATCH_DEB", deb)
                .env("PORTWATCH_DEB_NEXT", deb_next)
                .args(["test", "-p", "portwatch-tests", "--", "--test-threads=1"])
                .args(extra),
        );
    }

    if util::find_in_path("sudo").is_none() {
        bail!(
            "the kernel integration tests must run as root and sudo was not found; \
             run `cargo xtask test` as root"
        );
    }
    // Build as this user and run only the test binaries through sudo: cargo
    // under sudo would leave root-owned files in target/, and root may not
    // have the toolchains.
    for (exe, package_dir) in build_test_binaries(root)? {
        let mut cmd = Command::new("sudo");
        // `env` sets the variables even where sudo's policy drops them for -E.
        cmd.arg("-E")
            .arg("env")
            .arg(env_arg("PORTWATCH_BIN", &portwatch))
            .arg(env_arg("PORTWATCH_DEB", deb))
            .arg(env_arg("PORTWATCH_DEB_NEXT", deb_next))
            .arg(env_arg("CARGO_MANIFEST_DIR", &package_dir))
            .arg(&exe)
            .arg("--test-threads=1")
            .args(extra)
            // cargo test runs test binaries from the package directory.
            .current_dir(&package_dir);
        util::run(&mut cmd)?;
    }
    Ok(())
}

fn env_arg(name: &str, value: &Path) -> std::ffi::OsString {
    let mut arg = std::ffi::OsString::from(format!("{name}="));
    arg.push(value);
    arg
}

/// Builds portwatch-tests' test targets; returns each test executable with
/// its package directory, from cargo's JSON messages.
fn build_test_binaries(root: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut cmd = util::cargo(root);
    cmd.args([
        "test",
        "-p",
        "portwatch-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    // Compiler diagnostics and progress still reach the terminal.
    .stderr(Stdio::inherit());
    let stdout = util::stdout_of(&mut cmd)?;

    let mut binaries = Vec::new();
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test =
            message["reason"] == "compiler-artifact" && message["profile"]["test"] == true;
        let (Some(exe), Some(manifest)) = (
            message["executable"].as_str(),
            message["manifest_path"].as_str(),
        ) else {
            continue;
        };
        if is_test {
            let package_dir = Path::new(manifest).parent().unwrap_or(root).to_path_buf();
            binaries.push((PathBuf::from(exe), package_dir));
        }
    }
    if binaries.is_empty() {
        bail!("`{}` produced no test executables", util::display(&cmd));
    }
    Ok(binaries)
}

/// `cargo xtask proof`: the differential tests with `cases` per property.
pub fn proof(cases: u64) -> Result<()> {
    let root = util::workspace_root();
    step("setup", setup::ensure)?;
    let portwatch = build::build_portwatch(false)?;
    if !util::is_root()? {
        bail!("the differential tests load eBPF programs: run `cargo xtask proof` as root");
    }
    step("differential", || {
        util::run(
            util::cargo(&root)
                .env("PORTWATCH_BIN", &portwatch)
                .env("PORTWATCH_PROOF_CASES", cases.to_string())
                .args([
                    "test",
                    "--release",
                    "-p",
                    "portwatch-tests",
                    "--test",
                    "differential",
                    "--",
                    "--test-threads=1",
                ]),
        )
    })
}
