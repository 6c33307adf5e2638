//! A portwatch guard with pins and a control socket of its own: the host's
//! guard paths are never touched, and nothing outlives the lab.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bounded::run_bounded,
    lines::{Lines, line_reader, wait_line},
    name::unique_name,
    netns::Netns,
    process::ChildGuard,
    temp::TempDir,
};

/// How long a guard may take to print its `ready` line.
const READY_WAIT: Duration = Duration::from_secs(30);

/// Paths for guards whose pins must outlive them: a pin directory on the
/// host's bpffs and a run directory for the control socket, lock and
/// files. Dropping it runs `portwatch down` on both and removes them,
/// whatever the guards did.
pub struct GuardPaths {
    pub pins: PathBuf,
    pub run: TempDir,
    portwatch: PathBuf,
}

impl GuardPaths {
    /// `portwatch`: the binary that takes the pins down on drop.
    pub fn new(tag: &str, portwatch: &Path) -> Result<Self> {
        crate::orphans::sweep_once();
        Ok(Self {
            pins: Path::new("/sys/fs/bpf").join(unique_name(tag)),
            run: TempDir::new(tag)?,
            portwatch: portwatch.to_path_buf(),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.run.join("control.sock")
    }

    /// `portwatch guard --iface IFACE --policy POLICY` with these pins and
    /// socket, in `netns`'s network and the host's mount namespace
    /// (`nsenter --net`), so its pins are on the host's bpffs and outlive
    /// the process, as on a server. `SSH_CONNECTION` is not passed on: it
    /// describes a session of the host's namespace.
    pub fn guard_command(&self, netns: &Netns, iface: &str, policy: &Path) -> Command {
        let mut cmd = netns.nsenter(&self.portwatch);
        cmd.args(["guard", "--iface", iface])
            .arg("--policy")
            .arg(policy)
            .arg("--pin-dir")
            .arg(&self.pins)
            .arg("--socket")
            .arg(self.socket())
            .env_remove("SSH_CONNECTION");
        cmd
    }
}

impl Drop for GuardPaths {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new(&self.portwatch)
                .arg("down")
                .arg("--pin-dir")
                .arg(&self.pins)
                .arg("--socket")
                .arg(self.socket()),
            None,
            Duration::from_secs(20),
            None,
        );
        let _ = std::fs::remove_dir_all(&self.pins);
        // `run` goes after this, with the socket and files in it.
    }
}

/// A running `portwatch guard --json --detach-on-exit` on its own
/// [`GuardPaths`], enforcing a policy of its own. Dropping it stops it
/// (SIGINT, SIGKILL after 10 s), then takes its pins down.
pub struct Guard {
    process: ChildGuard,
    /// Its JSON Lines. Read them (or take them away) so that it never
    /// blocks on a full pipe.
    pub lines: Lines,
    // After `process`: the pins go once the guard is stopped.
    paths: GuardPaths,
}

impl Guard {
    /// Starts the guard on `iface` in `netns` with a policy that permits
    /// `allow` (e.g. `"tcp/22"`) and enforces; `extra` are more arguments
    /// (e.g. `--xdp-mode generic`). Waits for its `ready` line.
    pub fn start(
        portwatch: &Path,
        netns: &Netns,
        iface: &str,
        allow: &[&str],
        extra: &[&str],
    ) -> Result<Self> {
        let rules: Vec<String> = allow.iter().map(|r| format!("\"{r}\"")).collect();
        let policy = format!("mode = \"enforce\"\nallow = [{}]\n", rules.join(", "));
        Self::start_with_policy(portwatch, netns, iface, &policy, extra)
    }

    /// Like [`Guard::start`], with the policy file's text as given.
    pub fn start_with_policy(
        portwatch: &Path,
        netns: &Netns,
        iface: &str,
        policy_text: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let paths = GuardPaths::new("g", portwatch)?;
        let policy = paths.run.join("policy.toml");
        std::fs::write(&policy, policy_text)
            .with_context(|| format!("writing {}", policy.display()))?;
        let errors = paths.run.join("guard.err");
        let stderr = std::fs::File::create(&errors)
            .with_context(|| format!("creating {}", errors.display()))?;
        let mut cmd = paths.guard_command(netns, iface, &policy);
        cmd.args(extra)
            .args(["--detach-on-exit", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut process = ChildGuard::spawn(&mut cmd)?;
        let lines = line_reader(process.0.stdout.take().context("no stdout pipe")?);
        let guard = Self {
            process,
            lines,
            paths,
        };
        if let Err(e) = wait_line(&guard.lines, READY_WAIT, |l| {
            l.contains("\"event\":\"ready\"")
        }) {
            let err = std::fs::read_to_string(&errors).unwrap_or_default();
            bail!("portwatch guard {extra:?} did not get ready: {e:#}\n{err}");
        }
        Ok(guard)
    }

    /// The guard daemon's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its control socket.
    pub fn socket(&self) -> PathBuf {
        self.paths.socket()
    }

    /// Its policy file (what `reload` re-reads).
    pub fn policy_path(&self) -> PathBuf {
        self.paths.run.join("policy.toml")
    }

    /// Stops it (SIGINT, SIGKILL after `limit`); its exit status if it
    /// exited by itself. Its pins go when it is dropped.
    pub fn stop(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.process.interrupt(limit)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.process.interrupt(Duration::from_secs(10));
    }
}
