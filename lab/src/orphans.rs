//! What a run killed outright (SIGKILL, a CI job's timeout) left behind:
//! namespaces, bpffs pins and temp directories whose names say a process
//! that no longer runs made them. Drops clean up after every other ending;
//! the first namespace or guard a process makes sweeps these first, so one
//! killed run does not leave them to every later one.

use std::{path::Path, sync::Once};

use crate::bounded::run;

/// Sweeps once per process.
pub fn sweep_once() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(sweep);
}

/// Deletes every orphaned namespace, pin directory and temp directory.
pub fn sweep() {
    for name in orphans_in(Path::new("/run/netns")) {
        if let Err(e) = run("ip", &["netns", "del", &name]) {
            eprintln!("lab: leftover namespace {name} not deleted: {e:#}");
        }
    }
    for dir in [Path::new("/sys/fs/bpf"), &std::env::temp_dir()] {
        for name in orphans_in(dir) {
            let path = dir.join(&name);
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = gone {
                eprintln!("lab: leftover {} not removed: {e}", path.display());
            }
        }
    }
}

/// Entries of `dir` that `unique_name` made in a process that is gone.
fn orphans_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| orphaned(name))
        .collect()
}

/// Whether `name` is one `unique_name` made (`pw`, a lowercase tag, the
/// pid, `x`, a counter; a temp file may add an extension) in a process
/// that no longer runs. A pid another process took since is not gone:
/// the entry stays, which errs on the safe side.
pub fn orphaned(name: &str) -> bool {
    owner(name).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

fn owner(name: &str) -> Option<u32> {
    let stem = name.split_once('.').map_or(name, |(stem, _)| stem);
    let rest = stem
        .strip_prefix("pw")?
        .trim_start_matches(|c: char| c.is_ascii_lowercase());
    let (pid, counter) = rest.split_once('x')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(counter)).then(|| pid.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::unique_name;

    /// The pid of a child that has exited and been reaped.
    fn gone_pid() -> u32 {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawning true");
        let pid = child.id();
        child.wait().expect("reaping true");
        pid
    }

    #[test]
    fn names_of_live_processes_and_other_names_are_not_orphans() {
        assert!(!orphaned(&unique_name("s")));
        assert!(!orphaned(&format!("{}.toml", unique_name("policy"))));
        for other in [
            "pw",
            "pwsx1",
            "pws12x",
            "pws12y3",
            "eth0",
            "portwatch",
            "pws-1x2",
        ] {
            assert!(!orphaned(other), "{other}");
        }
    }

    #[test]
    fn a_namespace_of_a_gone_process_is_swept_and_a_live_ones_kept() -> anyhow::Result<()> {
        let pid = gone_pid();
        let left = format!("pws{pid}x7");
        assert!(orphaned(&left) && orphaned(&format!("pwlab{pid}x0.toml")));
        let live = crate::Netns::new("s")?;
        run("ip", &["netns", "add", &left])?;
        sweep();
        let names = run("ip", &["netns", "list"])?;
        let listed = |n: &str| names.split_whitespace().any(|w| w == n);
        // Not left behind should the assertion fail.
        let _ = run("ip", &["netns", "del", &left]);
        assert!(!listed(&left), "{left} is still there:\n{names}");
        assert!(listed(&live.name), "{} was swept:\n{names}", live.name);
        Ok(())
    }
}
