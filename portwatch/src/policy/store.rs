//! The policy file on disk: read (a missing file is an empty policy) and
//! replaced atomically, so that a reader or a crash sees the old file or the
//! new one, never a mix. Runtime changes and offline edits both write here.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use super::{Policy, PolicyError};

/// Where the guard and the client commands look when told nothing else.
pub const DEFAULT_POLICY: &str = "/etc/portwatch/policy.toml";

/// The policy in `path`; a file that does not exist is an empty policy
/// (default deny), any other problem is an error.
pub fn load_or_empty(path: &Path) -> Result<Policy, PolicyError> {
    match Policy::load(path) {
        Err(PolicyError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {
            Ok(Policy::default())
        }
        other => other,
    }
}

/// Replaces `path` with `contents` so that a reader (or a crash) sees the old
/// file or the new one, never a mix: writes `FILE.tmp-PID` in the same
/// directory, syncs it, renames it over `FILE` and syncs the directory.
///
/// A symbolic link at `path` is followed (the link stays). A file that
/// exists keeps its mode and, where permitted, its owner; a new one is 0644.
/// On error the file is unchanged and the temporary file is gone. Errors
/// are the system's; the caller names the path.
pub fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    let path = match fs::canonicalize(path) {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => path.to_owned(),
        Err(e) => return Err(e),
    };
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path does not name a file",
        ));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let old = match fs::metadata(&path) {
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut tmp_name = name.to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    // A leftover of an earlier run with the same pid.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(old.as_ref().map_or(0o644, |m| m.mode() & 0o7777))
            .open(&tmp)?;
        if let Some(meta) = &old {
            // The mode again, past the umask; the owner where we may.
            file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
        }
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn temp_dir(tag: &str) -> io::Result<PathBuf> {
        let dir =
            std::env::temp_dir().join(format!("portwatch-control-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn leftovers(dir: &Path) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        names.sort();
        Ok(names)
    }

    #[test]
    fn write_atomically_creates_and_replaces() -> TestResult {
        let dir = temp_dir("atomic")?;
        let file = dir.join("policy.toml");
        write_atomically(&file, "allow = []\n")?;
        assert_eq!(fs::read_to_string(&file)?, "allow = []\n");
        assert_eq!(fs::metadata(&file)?.mode() & 0o777, 0o644);

        fs::set_permissions(&file, fs::Permissions::from_mode(0o600))?;
        write_atomically(&file, "allow = [\"tcp/22\"]\n")?;
        assert_eq!(fs::read_to_string(&file)?, "allow = [\"tcp/22\"]\n");
        assert_eq!(fs::metadata(&file)?.mode() & 0o777, 0o600, "mode kept");
        assert_eq!(leftovers(&dir)?, Vec::<String>::new());

        // Through a symbolic link: the target changes, the link stays.
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&file, &link)?;
        write_atomically(&link, "mode = \"audit\"\n")?;
        assert!(fs::symlink_metadata(&link)?.file_type().is_symlink());
        assert_eq!(fs::read_to_string(&file)?, "mode = \"audit\"\n");
        assert_eq!(leftovers(&dir)?, Vec::<String>::new());
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// Clears the immutable attribute again, also when the test panics.
    struct Immutable<'a>(&'a Path);

    impl Drop for Immutable<'_> {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(self.0).status();
        }
    }

    /// Root passes every permission check, so a mode of 0555 proves nothing
    /// here. An immutable directory (`chattr +i`, ext4 and most disk file
    /// systems) refuses new entries and renames even to root; where the
    /// attribute is not supported, /proc (where nobody creates files) stands
    /// in.
    #[test]
    fn write_atomically_fails_cleanly_where_it_cannot_write() -> TestResult {
        let dir = temp_dir("immutable")?;
        let file = dir.join("policy.toml");
        fs::write(&file, "before\n")?;
        let made_immutable = Command::new("chattr")
            .arg("+i")
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if made_immutable {
            let _guard = Immutable(&dir);
            let e = write_atomically(&file, "after\n").expect_err("immutable directory");
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert_eq!(fs::read_to_string(&file)?, "before\n");
            assert_eq!(leftovers(&dir)?, Vec::<String>::new());
        } else {
            eprintln!("chattr +i is not supported here; testing on /proc only");
        }
        let e = write_atomically(Path::new("/proc/portwatch-policy.toml"), "x")
            .expect_err("/proc takes no new files");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
            ),
            "{e}"
        );
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
