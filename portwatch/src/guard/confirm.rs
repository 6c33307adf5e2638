//! Changes that revert unless confirmed (`--confirm-within`): what the
//! policy file said before, kept beside it until `portwatch confirm`, so
//! that a change that cuts the operator off undoes itself — also across a
//! guard restart, which finds the record and restores the file.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::policy::store::write_atomically;

/// The record of a change awaiting confirmation, as kept on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The policy file's text before the change; None: there was none.
    pub restore: Option<String>,
    /// When it reverts, in seconds since the Unix epoch.
    pub deadline: u64,
    /// What the change was (`allow tcp/8080`, `apply`).
    pub change: String,
}

/// Why a pending record cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("{path} is not a record of a pending change")]
    Parse {
        path: PathBuf,
        #[source]
        error: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
}

/// Where the record of `policy_path` lives: `POLICY.pending`.
pub fn record_path(policy_path: &Path) -> PathBuf {
    let mut name = policy_path.as_os_str().to_owned();
    name.push(".pending");
    PathBuf::from(name)
}

impl Pending {
    pub fn new(restore: Option<String>, within: Duration, change: String) -> Self {
        Self {
            restore,
            deadline: unix_now().saturating_add(within.as_secs()),
            change,
        }
    }

    /// How long until it reverts (zero once past).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.deadline.saturating_sub(unix_now()))
    }

    pub fn save(&self, policy_path: &Path) -> Result<(), PendingError> {
        let path = record_path(policy_path);
        // Plain data: encoding cannot fail.
        let text = serde_json::to_string(self).unwrap_or_default();
        write_atomically(&path, &text).map_err(|error| PendingError::Write { path, error })
    }

    /// The record next to `policy_path`, if there is one.
    pub fn load(policy_path: &Path) -> Result<Option<Self>, PendingError> {
        let path = record_path(policy_path);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(PendingError::Read { path, error }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| PendingError::Parse { path, error })
    }

    /// Removes the record (a missing one is fine).
    pub fn clear(policy_path: &Path) -> io::Result<()> {
        match fs::remove_file(record_path(policy_path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Puts the policy file back as it was before the change.
    pub fn restore_file(&self, policy_path: &Path) -> io::Result<()> {
        restore_text(policy_path, self.restore.as_deref())
    }
}

/// Writes `text` to the policy file, or removes the file when None (it did
/// not exist).
pub fn restore_text(policy_path: &Path, text: Option<&str>) -> io::Result<()> {
    match text {
        Some(text) => write_atomically(policy_path, text),
        None => match fs::remove_file(policy_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// At start-up: a change the previous guard never saw confirmed is undone
/// in the file before it is read. Returns the change reverted.
pub fn recover(policy_path: &Path) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    let Some(pending) = Pending::load(policy_path)? else {
        return Ok(None);
    };
    pending
        .restore_file(policy_path)
        .with_context(|| format!("restoring {} as it was", policy_path.display()))?;
    Pending::clear(policy_path)
        .with_context(|| format!("removing {}", record_path(policy_path).display()))?;
    Ok(Some(pending.change))
}

/// The policy file's text now; None when there is no file.
pub fn current_text(policy_path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(policy_path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A directory of its own, removed when the test ends (even failing).
    struct Dir(PathBuf);

    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d =
            std::env::temp_dir().join(format!("portwatch-pending-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("temporary directory");
        Dir(d)
    }

    #[test]
    fn a_record_survives_a_round_trip_and_restores_the_text() -> TestResult {
        let d = dir("round-trip");
        let policy = d.path().join("policy.toml");
        fs::write(&policy, "# before\nallow = []\n")?;
        let p = Pending::new(
            current_text(&policy)?,
            Duration::from_secs(30),
            "apply".into(),
        );
        p.save(&policy)?;
        fs::write(&policy, "allow = [\"tcp/22\"]\n")?;
        assert_eq!(Pending::load(&policy)?, Some(p.clone()));
        assert!(p.remaining() <= Duration::from_secs(30));
        assert!(p.remaining() >= Duration::from_secs(28));
        assert_eq!(recover(&policy)?.as_deref(), Some("apply"));
        assert_eq!(fs::read_to_string(&policy)?, "# before\nallow = []\n");
        assert!(!record_path(&policy).exists());
        assert_eq!(recover(&policy)?, None);
        Ok(())
    }

    #[test]
    fn a_file_that_did_not_exist_is_removed_again() -> TestResult {
        let d = dir("missing");
        let policy = d.path().join("policy.toml");
        Pending::new(None, Duration::from_secs(5), "allow tcp/80".into()).save(&policy)?;
        fs::write(&policy, "allow = [\"tcp/80\"]\n")?;
        assert_eq!(recover(&policy)?.as_deref(), Some("allow tcp/80"));
        assert!(!policy.exists());
        Ok(())
    }

    #[test]
    fn a_garbled_record_is_an_error_naming_it() -> TestResult {
        let d = dir("garbled");
        let policy = d.path().join("policy.toml");
        fs::write(record_path(&policy), "{not json")?;
        let e = recover(&policy).expect_err("a garbled record");
        assert!(format!("{e:#}").contains("policy.toml.pending"), "{e:#}");
        Ok(())
    }
}
