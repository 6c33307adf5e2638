//! `cargo xtask package`: the Debian package, built by cargo-deb from the
//! metadata in portwatch/Cargo.toml and the files in portwatch/debian/.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};

use crate::{
    build,
    cargo_deb::{cargo_deb, ensure_cargo_deb},
    setup, util,
};

/// What the package installs, generated from the clap definitions by the
/// built binary: `target/<profile>/portwatch-docs/{man,completions}`, where
/// the asset list in portwatch/Cargo.toml expects them.
const DOCS_DIR: &str = "portwatch-docs";

/// Completion scripts: shell and the file name the asset list uses.
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "portwatch.bash"),
    ("zsh", "_portwatch"),
    ("fish", "portwatch.fish"),
];

pub struct Options<'a> {
    /// Package the debug build (`cargo deb --profile dev`): what CI does,
    /// since it has just built it; releases use the release build.
    pub debug: bool,
    /// The whole Debian version (`cargo deb --deb-version`), e.g. to make
    /// a newer package for an upgrade test.
    pub deb_version: Option<&'a str>,
    /// Quicker compression (`cargo deb --fast`).
    pub fast: bool,
    /// Where the .deb goes (default: target/debian/, where cargo-deb deletes
    /// the package's other versions each time it writes one).
    pub output: Option<&'a Path>,
}

/// `cargo xtask package`: prerequisites, build, docs, cargo deb; prints the
/// path of the .deb.
pub fn package(options: &Options) -> Result<PathBuf> {
    setup::ensure()?;
    let binary = build::build_portwatch(!options.debug)?;
    let deb = package_built(&binary, options)?;
    println!("{}", deb.display());
    Ok(deb)
}

/// Packages an already built `binary` (`target/<profile>/portwatch`).
pub fn package_built(binary: &Path, options: &Options) -> Result<PathBuf> {
    let root = util::workspace_root();
    ensure_cargo_deb()?;
    let profile_dir = binary
        .parent()
        .context("the portwatch binary has no parent directory")?;
    generate_docs(binary, &profile_dir.join(DOCS_DIR))?;

    let mut cmd = cargo_deb(&root);
    cmd.args(["-p", "portwatch", "--no-build"]);
    if options.debug {
        // cargo-deb warns that it is meant for release builds; the package is
        // the same but for the binary's optimisation level.
        cmd.args(["--profile", "dev"]);
    }
    if let Some(version) = options.deb_version {
        cmd.args(["--deb-version", version]);
    }
    if options.fast {
        cmd.arg("--fast");
    }
    if let Some(dir) = options.output {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        cmd.arg("--output").arg(dir);
    }
    cmd.stderr(std::process::Stdio::inherit());
    let stdout = util::stdout_of(&mut cmd)?;
    // cargo-deb prints the path of the package it wrote.
    let deb = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no .deb path:\n{stdout}"))?;
    let deb = if deb.is_absolute() {
        deb
    } else {
        root.join(deb)
    };
    ensure!(
        deb.is_file(),
        "{} does not exist after cargo deb",
        deb.display()
    );
    Ok(deb)
}

/// Man pages (gzipped, as Debian installs them) and completion scripts,
/// written by running the built binary.
fn generate_docs(binary: &Path, dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    // Pages of removed subcommands must not linger into the package.
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    util::run(
        Command::new(binary)
            .args(["manpage", "--out"])
            .arg(&man)
            .stdout(std::process::Stdio::null()),
    )?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(&man).with_context(|| format!("reading {}", man.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "8") {
            pages.push(path);
        }
    }
    ensure!(
        !pages.is_empty(),
        "`portwatch manpage` wrote no pages into {}",
        man.display()
    );
    // -n: no name or time stamp inside, so the same pages give the same bytes.
    util::run(Command::new("gzip").args(["-9nf"]).args(&pages))?;

    for (shell, file) in COMPLETIONS {
        let out = util::output(Command::new(binary).args(["completions", shell]))?;
        ensure!(
            out.status.success() && !out.stdout.is_empty(),
            "`portwatch completions {shell}` failed ({}): {}",
            util::describe(out.status),
            String::from_utf8_lossy(&out.stderr)
        );
        let path = completions.join(file);
        std::fs::write(&path, &out.stdout)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "generated {} man pages and {} completion scripts in {}",
        pages.len(),
        COMPLETIONS.len(),
        dir.display()
    );
    Ok(())
}

/// The packages tests/tests/package.rs installs, from the debug `binary`
/// CI has just built: one as `cargo xtask package --debug` makes it, and
/// the same with a higher version for the upgrade.
pub fn packages_for_tests(binary: &Path) -> Result<(PathBuf, PathBuf)> {
    // Outside target/debian/, so that making the second does not delete
    // the first.
    let dir = util::target_dir(&util::workspace_root())?.join("debian-test");
    let options = Options {
        debug: true,
        deb_version: None,
        fast: true,
        output: Some(&dir),
    };
    let first = package_built(binary, &options)?;
    let out = util::output(
        Command::new("dpkg-deb")
            .arg("-f")
            .arg(&first)
            .arg("Version"),
    )?;
    ensure!(
        out.status.success(),
        "dpkg-deb -f {} Version failed",
        first.display()
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let next_version = format!("{version}+upgrade");
    let next = package_built(
        binary,
        &Options {
            deb_version: Some(&next_version),
            ..options
        },
    )?;
    println!("packages: {} and {}", first.display(), next.display());
    Ok((first, next))
}
