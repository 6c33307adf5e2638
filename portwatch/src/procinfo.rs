//! Process attribution from /proc: who owns a socket, and what that process is.
//!
//! Everything here is best-effort and returns `Option`s or partial maps rather
//! than errors: a process can exit (or a PID be reused) between any two reads,
//! and some files are unreadable without privileges. Such a race is normal
//! operation, not a failure the caller could act on, so a missing piece of
//! information simply stays `None` (or absent from the map).

use std::{
    collections::HashMap,
    ffi::OsStr,
    fmt::Write as _,
    fs,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::PathBuf,
    thread,
};

use crate::model::ProcessInfo;

/// Everything /proc tells about `pid`; each field is `None` when unreadable.
pub fn process_info(pid: u32) -> ProcessInfo {
    let base = format!("/proc/{pid}");
    ProcessInfo {
        comm: fs::read(format!("{base}/comm"))
            .ok()
            .map(|raw| lossy(trim_newline(&raw)).into()),
        uid: fs::read(format!("{base}/status"))
            .ok()
            .and_then(|raw| real_uid(&raw)),
        ..process_details(pid)
    }
}

/// What only /proc tells about `pid`, for a process whose comm and uid
/// the kernel gave (they are left `None`): its executable, command line
/// and cgroup. The two files it leaves out cost a worker in a burst: one
/// read of /proc/PID/status took 4.7 ms under strace while the process
/// was busy listening.
pub fn process_details(pid: u32) -> ProcessInfo {
    let base = format!("/proc/{pid}");
    ProcessInfo {
        pid: Some(pid),
        comm: None,
        uid: None,
        exe: fs::read_link(format!("{base}/exe"))
            .ok()
            .map(|path| lossy(path.as_os_str().as_bytes()).into()),
        cmdline: fs::read(format!("{base}/cmdline"))
            .ok()
            .and_then(|raw| join_cmdline(&raw))
            .map(Into::into),
        cgroup: cgroup_of(pid).map(Into::into),
    }
}

/// The `SSH_CONNECTION` of the SSH session `pid` runs in: from its own
/// environment, else from its closest ancestor's that has one (`sudo`
/// clears it from the command it runs, not from the shell above).
pub fn ssh_connection_of(pid: u32) -> Option<String> {
    let mut pid = pid;
    // Bounded: a cycle is impossible, a deep tree is not worth walking.
    for _ in 0..32 {
        if pid <= 1 {
            return None;
        }
        if let Ok(environ) = fs::read(format!("/proc/{pid}/environ"))
            && let Some(value) = environ
                .split(|b| *b == 0)
                .find_map(|var| var.strip_prefix(b"SSH_CONNECTION="))
        {
            return Some(lossy(value));
        }
        let status = fs::read(format!("/proc/{pid}/status")).ok()?;
        pid = status
            .split(|&b| b == b'\n')
            .find_map(|line| line.strip_prefix(b"PPid:"))
            .and_then(|v| {
                let digits: Vec<u8> = v.iter().copied().filter(u8::is_ascii_digit).collect();
                parse_u32(&digits)
            })?;
    }
    None
}

/// The SHA-256 (lower-case hex) of the executable `pid` runs: the file it
/// was started from (`/proc/PID/exe`, also when replaced or deleted on disk
/// since). Read once per file: digests are kept by device, inode, size and
/// modification time.
pub fn exe_sha256(pid: u32) -> Option<String> {
    use sha2::Digest;
    use std::{
        collections::HashMap,
        io::Read,
        os::unix::fs::MetadataExt,
        sync::{Mutex, OnceLock},
    };
    type Key = (u64, u64, u64, i64, i64);
    static DIGESTS: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    // A bound on what is kept: a host runs few distinct owner executables.
    const KEEP: usize = 256;

    let mut file = fs::File::open(format!("/proc/{pid}/exe")).ok()?;
    let meta = file.metadata().ok()?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    );
    let digests = DIGESTS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(known) = digests.lock().ok()?.get(&key) {
        return Some(known.clone());
    }
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut map = digests.lock().ok()?;
    if map.len() >= KEEP {
        map.clear();
    }
    map.insert(key, hex.clone());
    Some(hex)
}

/// The cgroup v2 path of `pid`, when it can still be read.
pub fn cgroup_of(pid: u32) -> Option<String> {
    fs::read(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|raw| cgroup_v2_path(&raw))
}

/// The inode of the network namespace `pid` lives in.
pub fn netns_of(pid: u32) -> Option<u64> {
    // metadata() follows the magic link to the nsfs inode, which is the
    // namespace's identity (what `ip netns identify` and `lsns` compare).
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Socket inode -> PID of a process holding it, found the way `ss -p` does:
/// by reading every /proc/PID/fd/N link and keeping the `socket:[INODE]` ones.
///
/// A socket shared by several processes (inherited across fork) maps to the
/// smallest PID, which is usually the parent that created it. Processes and
/// fds that vanish during the scan are skipped.
pub fn socket_owners() -> HashMap<u64, u32> {
    let fds = open_fds();
    // Almost all the time goes to readlink() (the kernel instantiates a /proc
    // inode per fd), so large scans are split across a few threads.
    let workers = thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_WORKERS)
        .min(fds.len() / MIN_FDS_PER_WORKER)
        .max(1);
    let chunk_len = fds.len().div_ceil(workers).max(1);
    thread::scope(|scope| {
        let mut owners = HashMap::new();
        let mut spawned = Vec::new();
        for chunk in fds.chunks(chunk_len) {
            match thread::Builder::new().spawn_scoped(scope, || resolve_sockets(chunk)) {
                Ok(handle) => spawned.push(handle),
                // No thread to be had: do this share here.
                Err(_) => merge_owners(&mut owners, resolve_sockets(chunk)),
            }
        }
        for handle in spawned {
            // resolve_sockets has nothing that panics; if it somehow did,
            // its share is lost like that of a vanished process.
            if let Ok(part) = handle.join() {
                merge_owners(&mut owners, part);
            }
        }
        owners
    })
}

const MAX_WORKERS: usize = 8;
/// Below this a thread costs more than it saves.
const MIN_FDS_PER_WORKER: usize = 2048;

/// Every (PID, fd number) on the host, in PID order.
fn open_fds() -> Vec<(u32, u32)> {
    let mut fds = Vec::new();
    let Ok(proc_dir) = fs::read_dir("/proc") else {
        return fds;
    };
    let mut path = PathBuf::with_capacity(32);
    for entry in proc_dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = parse_u32(name.as_bytes()) else {
            continue; // not a process directory
        };
        path.clear();
        path.push("/proc");
        path.push(&name);
        path.push("fd");
        // Unreadable: exited, or another user's process when not root.
        let Ok(dir) = fs::read_dir(&path) else {
            continue;
        };
        fds.extend(
            dir.flatten()
                .filter_map(|fd| parse_u32(fd.file_name().as_bytes()))
                .map(|fd| (pid, fd)),
        );
    }
    fds
}

/// Socket inode -> smallest PID, for the socket fds among `fds` (in PID
/// order). Each link is read relative to its process's open fd directory:
/// a whole "/proc/PID/fd/N" walked per fd was a fifth of a 45,000-listener
/// snapshot.
fn resolve_sockets(fds: &[(u32, u32)]) -> HashMap<u64, u32> {
    use std::os::fd::AsRawFd as _;
    let mut owners = HashMap::new();
    let mut dir: Option<(u32, Option<fs::File>)> = None;
    let mut name = String::with_capacity(16);
    // "socket:[N]" is at most 19 bytes; a longer link is something else.
    let mut link = [0u8; 64];
    for &(pid, fd) in fds {
        if dir.as_ref().is_none_or(|(p, _)| *p != pid) {
            dir = Some((pid, fs::File::open(format!("/proc/{pid}/fd")).ok()));
        }
        let Some((_, Some(fd_dir))) = &dir else {
            continue;
        };
        name.clear();
        // Writing to a String cannot fail.
        let _ = write!(name, "{fd}\0");
        // SAFETY: `fd_dir` is an open directory for the call's length,
        // `name` is NUL-terminated, and the kernel writes at most
        // `link.len()` bytes into `link`.
        let n = unsafe {
            libc::readlinkat(
                fd_dir.as_raw_fd(),
                name.as_ptr().cast(),
                link.as_mut_ptr().cast(),
                link.len(),
            )
        };
        // -1: the fd is gone; a full buffer: not a socket's link.
        let Some(target) = usize::try_from(n)
            .ok()
            .filter(|n| *n < link.len())
            .map(|n| &link[..n])
        else {
            continue;
        };
        if let Some(inode) = socket_inode(OsStr::from_bytes(target)) {
            owners
                .entry(inode)
                .and_modify(|owner: &mut u32| *owner = (*owner).min(pid))
                .or_insert(pid);
        }
    }
    owners
}

fn merge_owners(into: &mut HashMap<u64, u32>, part: HashMap<u64, u32>) {
    for (inode, pid) in part {
        into.entry(inode)
            .and_modify(|owner| *owner = (*owner).min(pid))
            .or_insert(pid);
    }
}

/// The inode in a "socket:[12345]" fd link target.
fn socket_inode(target: &OsStr) -> Option<u64> {
    let digits = target
        .as_bytes()
        .strip_prefix(b"socket:[")?
        .strip_suffix(b"]")?;
    parse_u64(digits)
}

fn parse_u32(digits: &[u8]) -> Option<u32> {
    parse_u64(digits).and_then(|n| u32::try_from(n).ok())
}

/// Parses plain ASCII decimal digits (no sign, no whitespace).
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn trim_newline(raw: &[u8]) -> &[u8] {
    raw.strip_suffix(b"\n").unwrap_or(raw)
}

fn lossy(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

/// The real UID: the first number of the "Uid:" line of /proc/PID/status.
fn real_uid(status: &[u8]) -> Option<u32> {
    let line = status
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"Uid:"))?;
    let first = line
        .split(|b| b.is_ascii_whitespace())
        .find(|field| !field.is_empty())?;
    parse_u32(first)
}

/// NUL-separated arguments joined with spaces; `None` when there are none
/// (kernel threads, zombies).
fn join_cmdline(raw: &[u8]) -> Option<String> {
    let args = raw.strip_suffix(b"\0").unwrap_or(raw);
    if args.is_empty() {
        return None;
    }
    let joined: Vec<u8> = args
        .iter()
        .map(|&b| if b == 0 { b' ' } else { b })
        .collect();
    Some(String::from_utf8_lossy(&joined).into_owned())
}

/// The unified-hierarchy (cgroup v2) path: the "0::PATH" line.
fn cgroup_v2_path(raw: &[u8]) -> Option<String> {
    raw.split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"0::"))
        .map(lossy)
}

/// Ports of the TCP sockets of `pid` that are in LISTEN, from the pid's own
/// view of /proc/net (its network namespace).
///
/// Used for a socket that calls listen() without bind(): the kernel reports
/// the LISTEN transition before it picks the port, so the event says port 0
/// and the port has to be looked up afterwards.
pub fn listening_tcp_ports(pid: u32, ipv6: bool) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: std::collections::HashSet<u64> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| socket_inode(target.as_os_str()))
        .collect();
    let table = if ipv6 { "tcp6" } else { "tcp" };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return Vec::new();
    };
    // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (cols.get(1)?, cols.get(3)?, cols.get(9)?);
            if *state != "0A" || !inodes.contains(&inode.parse::<u64>().ok()?) {
                return None;
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_digest_of_the_running_executable_is_sha256sums() {
        let exe = std::fs::read_link("/proc/self/exe").expect("our executable");
        let out = std::process::Command::new("sha256sum")
            .arg(&exe)
            .output()
            .expect("sha256sum runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let want = text.split_whitespace().next().expect("a digest");
        let got = exe_sha256(std::process::id()).expect("readable");
        assert_eq!(got, want);
        // Kept: the same answer without reading the file again.
        assert_eq!(exe_sha256(std::process::id()).as_deref(), Some(want));
        assert_eq!(exe_sha256(u32::MAX), None, "no such process");
    }

    use std::{error::Error, net::TcpListener, os::fd::AsRawFd, path::Path};

    use super::*;

    type TestResult = Result<(), Box<dyn Error>>;

    #[test]
    fn process_info_of_self() -> TestResult {
        let pid = std::process::id();
        let info = process_info(pid);
        assert_eq!(info.pid, Some(pid));
        assert!(info.comm.as_deref().is_some_and(|c| !c.is_empty()));
        let exe = info.exe.ok_or("no exe")?;
        assert!(Path::new(&*exe).exists(), "exe {exe} does not exist");
        assert!(info.cmdline.as_deref().is_some_and(|c| !c.is_empty()));
        // Tests run as root in CI, but compare with our real uid anyway.
        assert_eq!(info.uid, Some(nix::unistd::getuid().as_raw()));
        assert!(info.cgroup.as_deref().is_some_and(|c| c.starts_with('/')));
        Ok(())
    }

    #[test]
    fn details_are_what_only_proc_knows() -> TestResult {
        let pid = std::process::id();
        let details = process_details(pid);
        assert_eq!((details.comm, details.uid), (None, None));
        assert_eq!(details.pid, Some(pid));
        // Against what the process knows of itself, read another way.
        let exe = std::env::current_exe()?;
        assert_eq!(details.exe.as_deref(), exe.to_str());
        let first_arg = std::env::args().next().ok_or("no argv[0]")?;
        let cmdline = details.cmdline.ok_or("no cmdline")?;
        assert!(cmdline.starts_with(&first_arg), "{cmdline} vs {first_arg}");
        let own_cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
        let cgroup = details.cgroup.ok_or("no cgroup")?;
        assert!(own_cgroup.contains(&*cgroup), "{cgroup} vs {own_cgroup}");
        Ok(())
    }

    #[test]
    fn process_info_of_missing_pid_is_empty() {
        // Above the kernel's PID_MAX_LIMIT (2^22), so never a live process.
        let info = process_info(u32::MAX);
        assert_eq!(
            info,
            ProcessInfo {
                pid: Some(u32::MAX),
                ..ProcessInfo::default()
            }
        );
    }

    #[test]
    fn ssh_connection_is_found_in_an_ancestor() -> TestResult {
        use std::io::BufRead as _;
        // sh has the variable; the sleep it starts does not (as under sudo).
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "env -u SSH_CONNECTION sleep 5 & echo $!; wait"])
            .env("SSH_CONNECTION", "192.0.2.9 50000 192.0.2.1 22")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = shell.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let sleeper: u32 = line.trim().parse()?;
        // `env` execs sleep with the variable removed: wait for the exec.
        for _ in 0..200 {
            if fs::read_to_string(format!("/proc/{sleeper}/comm"))?.trim() == "sleep" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let own = fs::read(format!("/proc/{sleeper}/environ"))?;
        let found = ssh_connection_of(sleeper);
        shell.kill()?;
        let _ = std::process::Command::new("kill")
            .arg(sleeper.to_string())
            .status();
        shell.wait()?;
        assert!(!own.windows(15).any(|w| w == b"SSH_CONNECTION="));
        assert_eq!(found.as_deref(), Some("192.0.2.9 50000 192.0.2.1 22"));
        assert_eq!(ssh_connection_of(u32::MAX), None);
        Ok(())
    }

    #[test]
    fn netns_of_self() -> TestResult {
        let expected = fs::metadata("/proc/self/ns/net")?.ino();
        assert_eq!(netns_of(std::process::id()), Some(expected));
        assert_eq!(netns_of(u32::MAX), None);
        Ok(())
    }

    #[test]
    fn socket_owners_finds_our_listener() -> TestResult {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let fd = listener.as_raw_fd();
        // The inode of a socket is what fstat() reports for its fd.
        let inode = fs::metadata(format!("/proc/self/fd/{fd}"))?.ino();
        let owners = socket_owners();
        assert_eq!(owners.get(&inode), Some(&std::process::id()));
        Ok(())
    }

    #[test]
    fn parsers() {
        assert_eq!(socket_inode(OsStr::new("socket:[12345]")), Some(12345));
        assert_eq!(socket_inode(OsStr::new("pipe:[12345]")), None);
        assert_eq!(socket_inode(OsStr::new("socket:[]")), None);
        assert_eq!(socket_inode(OsStr::new("socket:[12x]")), None);
        assert_eq!(parse_u32(b"4294967296"), None);
        assert_eq!(parse_u32(b"self"), None);
        assert_eq!(
            real_uid(b"Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n"),
            Some(1000)
        );
        assert_eq!(join_cmdline(b"a\0b c\0d\0"), Some("a b c d".to_owned()));
        assert_eq!(join_cmdline(b""), None);
        assert_eq!(
            cgroup_v2_path(b"1:cpu:/x\n0::/system.slice/ssh.service\n"),
            Some("/system.slice/ssh.service".to_owned())
        );
        assert_eq!(cgroup_v2_path(b"1:cpu:/x\n"), None);
    }
}
