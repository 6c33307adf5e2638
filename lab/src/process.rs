//! Child processes that end with their owner, and how commands and exit
//! statuses read in messages.

use std::{
    fmt::Write as _,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A child process, killed (SIGKILL, by its pid) and reaped on drop if it
/// still runs.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        // A background job of a non-interactive shell (CI runners, nohup
        // jobs) inherits SIGINT ignored, and so would the child: then
        // `interrupt` could never stop it gently.
        // SAFETY: between fork and exec only signal() runs, which is
        // async-signal-safe; it touches no memory of the parent.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, || {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", command_line(cmd)))?;
        Ok(Self(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGINT (only while it is our unreaped child, so the pid is still
    /// its own), then waits up to `limit`; SIGKILL after that. The exit
    /// status, if it exited by itself.
    pub fn interrupt(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.0.try_wait() {
            return Some(status);
        }
        let _ = signal(self.pid(), libc::SIGINT);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        None
    }

    /// Waits up to `limit` for it to exit by itself.
    pub fn wait_within(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("pid {} still running after {limit:?}", self.pid());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends `sig` to process `pid` (one the caller started).
pub fn signal(pid: u32, sig: i32) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) takes plain integers; it touches no memory of ours.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The command line for messages, e.g. `ip netns add pws1x0`; arguments
/// with blanks or quotes are quoted as a shell would need them.
pub fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
            let _ = write!(line, " '{}'", arg.replace('\'', r"'\''"));
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    line
}

/// "exit status 3" or "killed by signal 9".
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'hi'", ""]);
        assert_eq!(command_line(&cmd), r"sh -c 'echo '\''hi'\''' ''");
    }

    #[test]
    fn a_dropped_child_is_killed_and_reaped() -> Result<()> {
        let child = ChildGuard::spawn(Command::new("sleep").arg("30"))?;
        let pid = child.pid();
        drop(child);
        // Reaped: no process (not even a zombie) has the pid any more.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    #[test]
    fn interrupt_ends_a_child_that_stops_on_sigint() -> Result<()> {
        let mut child = ChildGuard::spawn(Command::new("sleep").arg("30"))?;
        let status = child
            .interrupt(Duration::from_secs(5))
            .context("sleep did not end on SIGINT")?;
        assert_eq!(describe_status(status), "killed by signal 2");
        Ok(())
    }

    #[test]
    fn wait_within_gives_up_at_the_limit() -> Result<()> {
        let mut child = ChildGuard::spawn(Command::new("sleep").arg("30"))?;
        assert!(child.wait_within(Duration::from_millis(50)).is_err());
        let mut quick = ChildGuard::spawn(&mut Command::new("true"))?;
        assert!(quick.wait_within(Duration::from_secs(10))?.success());
        Ok(())
    }

    #[test]
    fn a_missing_program_is_named() {
        let err = ChildGuard::spawn(&mut Command::new("/nonexistent/pw-lab"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("could not start `/nonexistent/pw-lab`")
        );
    }
}
