//! The control socket: steer a running guard.
//!
//! `portwatch guard` listens on a Unix stream socket,
//! `/run/portwatch/control.sock` by default. `portwatch allow`, `deny`,
//! `policy`, `reload` and `status` (and `watch`, while a guard runs) are its
//! clients, and so is anything that can write a line to a socket:
//!
//! ```text
//! $ echo '{"cmd":"policy"}' | socat - UNIX-CONNECT:/run/portwatch/control.sock
//! {"ok":true,"toml":"# managed by portwatch; edits are kept\nmode = \"enforce\"\n…"}
//! ```
//!
//! # Who may do what
//!
//! The socket file is mode 0660, in the guard's read group when one is
//! configured. On each connection the guard reads the peer's credentials
//! (`SO_PEERCRED`, as they were at `connect()`):
//!
//! | peer | may use |
//! |---|---|
//! | uid 0, or a process with `CAP_NET_ADMIN` in the guard's user namespace | every command |
//! | a member of the read group (primary or supplementary group) | `policy`, `status`, `subscribe` |
//! | anyone else | nothing: one error line, then the guard closes the connection |
//!
//! A read-only peer that sends `allow`, `deny`, `reload` or `shutdown` gets
//! a permission error, and the connection stays usable.
//!
//! # Framing
//!
//! Requests are JSON objects, one per line: UTF-8, ended by `\n`, at most
//! 65,536 bytes without the newline. A connection carries any number of
//! requests; each gets one response line, in order. `subscribe` is the
//! exception: its acknowledgement line is followed by the event stream until
//! either side closes, and nothing else is read on that connection.
//!
//! Every response is a JSON object with `"ok": true`, or `"ok": false` and an
//! `"error"` string that says what went wrong:
//!
//! ```json
//! {"ok":false,"error":"unknown command \"frobnicate\" (expected allow, deny, policy, reload, status, subscribe, shutdown)"}
//! ```
//!
//! # Requests
//!
//! Fields not listed are errors (so is a missing `cmd`).
//!
//! | request | may | answer, besides `"ok": true` |
//! |---|---|---|
//! | `{"cmd":"allow","spec":"tcp/8080"}`, optionally `"from":["10.0.0.0/8","fd00::/8"]` | write | `change`: what changed, e.g. `"allow tcp/8080"`; `policy`: the policy now in force (as for `policy`) |
//! | `{"cmd":"deny","spec":"tcp/8080"}` | write | `change` |
//! | `{"cmd":"policy"}` | read | `mode`, `file`, `interfaces`, `rules` (`[{"ports":"tcp/22","from":[]}]`) and `toml`: the policy in force, as policy file text |
//! | `{"cmd":"reload"}` | write | `change`: the policy file was read again and applied |
//! | `{"cmd":"status"}` | read | the guard's state, below |
//! | `{"cmd":"subscribe"}`, optionally `"format":"json"` (default) or `"human"`, `"colour":true` | read | an acknowledgement, then one line per event as `portwatch guard` prints them (`--json` for `json`) |
//! | `{"cmd":"shutdown"}`, optionally `"detach":true` | write | the guard stops; its pinned datapath keeps enforcing, unless `detach` (what `portwatch down` sends): then it detaches and unpins everything |
//!
//! `spec` is `tcp/PORT`, `udp/PORT` or `tcp/LO-HI`, as in the policy file.
//! The status answer (clients render what is there and ignore what is not):
//!
//! ```json
//! {"ok":true,"mode":"enforce","policy_file":"/etc/portwatch/policy.toml","pinned":true,
//!  "interfaces":[{"iface":"eth0","ifindex":2,"xdp_mode":"native"}],
//!  "totals":{"passed":1,"drop_no_rule":2,"drop_source":0,"drop_malformed":0,
//!            "drop_fragment":0,"reports_suppressed":0,"events_lost":0},
//!  "listeners":[{"proto":"tcp","family":"ipv4","addr":"0.0.0.0","port":22,"pid":812,
//!                "comm":"sshd","uid":0,"exe":"/usr/sbin/sshd","cmdline":"sshd -D",
//!                "netns":4026531833,"exposure":"exposed","pass_packets":10,
//!                "pass_bytes":900,"drop_packets":0,"drop_bytes":0}]}
//! ```
//!
//! # Limits
//!
//! - A line that is not a request gets an error; the connection stays
//!   usable.
//! - A line over 65,536 bytes gets an error, then the connection is closed
//!   (where the next request starts is unknown). No connection buffers more
//!   than that.
//! - At most 64 connections at once; one more gets an error and is closed.
//! - A connection that sends nothing for 120 s while a request is awaited
//!   is closed.
//! - A subscriber that does not keep up with its stream is not waited for:
//!   the guard ends its stream (the connection closes).
//!
//! # Modules
//!
//! [`protocol`]: requests and their decoding; [`server`]: the socket in the
//! guard, which hands each request to the task that owns the guard's state;
//! [`client`]: the other end, used by the commands in [`crate::commands`].

pub mod client;
#[cfg(test)]
mod end_to_end;
pub mod protocol;
pub mod server;

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

pub use protocol::{Format, Request};
pub use server::DEFAULT_SOCKET;

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
