//! One guard at a time: an exclusive lock on a file next to the control
//! socket, held for the daemon's life and released by the kernel when it
//! exits, however it exits.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

pub struct GuardLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another portwatch guard is running (pid {pid}, lock {path}); steer it with `portwatch allow/deny/reload`, or stop it first"
    )]
    Held { pid: String, path: PathBuf },
    #[error("cannot create the lock file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl GuardLock {
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Held {
                    pid: pid.trim().to_string(),
                    path: path.to_path_buf(),
                });
            }
        };
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        write!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(Self {
            _lock: lock,
            path: path.to_path_buf(),
        })
    }

    /// The pid of the guard holding `path`, if one does.
    pub fn holder(path: &Path) -> Option<u32> {
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(_free) => None,
            Err((mut file, _)) => {
                let mut pid = String::new();
                file.read_to_string(&mut pid).ok()?;
                pid.trim().parse().ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::env::temp_dir().join(format!("pw-lock-test-{}", std::process::id()));
        let first = GuardLock::acquire(&path)?;
        assert_eq!(GuardLock::holder(&path), Some(std::process::id()));
        // flock locks belong to the open file description: a second open in
        // the same process conflicts too, as a second daemon would.
        match GuardLock::acquire(&path) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            Err(e) => return Err(e.into()),
            Ok(_) => return Err("second lock was granted".into()),
        }
        drop(first);
        assert_eq!(GuardLock::holder(&path), None);
        let _again = GuardLock::acquire(&path)?;
        fs::remove_file(&path)?;
        Ok(())
    }
}
