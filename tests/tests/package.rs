//! The Debian package on this machine: install, the service as its unit
//! describes it, an upgrade under a running guard, and a purge that leaves
//! nothing attached or pinned.
//!
//! PID 1 here is not systemd, so the service is run the way systemd would
//! run it: the unit's ExecStart and ExecReload exactly as installed (read
//! from the unit file), with a NOTIFY_SOCKET the test reads, and with what
//! of the unit's sandbox can be reproduced without systemd
//! (CapabilityBoundingSet, NoNewPrivileges, and LimitMEMLOCK where the
//! test may raise it).
//!
//! The test installs into the real system paths, so it refuses to run where
//! a portwatch package (or a guard on the default paths) already exists,
//! and purges the package at the end even when it fails. The packages come
//! from `cargo xtask test` (PORTWATCH_DEB, and PORTWATCH_DEB_NEXT: the same
//! package with a higher version).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use portwatch_tests::{
    ChildGuard, Netns, Result,
    net::{TRY_BIND, run_bounded},
    run, signal, unique_name,
};

const UNIT: &str = "/lib/systemd/system/portwatch.service";
const BIN: &str = "/usr/bin/portwatch";
const POLICY: &str = "/etc/portwatch/policy.toml";
const PIN_DIR: &str = "/sys/fs/bpf/portwatch";
const SOCKET: &str = "/run/portwatch/control.sock";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/portwatch.service";

fn deb_from_env(var: &str) -> Result<PathBuf> {
    let path = std::env::var_os(var).map(PathBuf::from).with_context(|| {
        format!(
            "{var} is not set: `cargo xtask test` builds the packages and sets it; by hand: \
             PORTWATCH_DEB=$(cargo xtask package --debug | tail -1) \
             PORTWATCH_DEB_NEXT=$(cargo xtask package --debug --deb-version 0.1.0-1+upgrade | tail -1)"
        )
    })?;
    ensure!(path.is_file(), "{var}={} does not exist", path.display());
    Ok(path)
}

/// dpkg's status of the portwatch package ("" when dpkg never heard of it).
fn package_status() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "portwatch"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn installed_version() -> Result<String> {
    Ok(run("dpkg-query", &["-W", "-f=${Version}", "portwatch"])?
        .trim()
        .to_string())
}

/// `dpkg ARGS`, bounded in time, stdin closed (a conffile prompt fails
/// rather than waits); its output for the assertions.
fn dpkg(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("dpkg");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    let out = run_bounded(&mut cmd, None, Duration::from_secs(120), None)?;
    eprintln!("[dpkg {args:?}]\n{}{}", out.stdout, out.stderr);
    ensure!(
        out.success(),
        "dpkg {args:?} failed ({:?}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    Ok(format!("{}{}", out.stdout, out.stderr))
}

/// Refuses to touch a machine where portwatch is installed or guarding
/// through the default paths: this is a CI or development machine, and the
/// test installs and purges the real package.
fn refuse_if_in_use() -> Result {
    let status = package_status();
    ensure!(
        status.is_empty() || status.starts_with("unknown ok not-installed"),
        "a portwatch package is already on this machine (dpkg status: {status}); this test installs \
         and purges the package in the real system paths and will not touch an operator's \
         installation: run it on a CI or development machine without it (or `dpkg --purge portwatch` first)"
    );
    for path in [BIN, POLICY, PIN_DIR, SOCKET, UNIT] {
        ensure!(
            !Path::new(path).exists(),
            "{path} exists although no portwatch package is installed: a portwatch installed or \
             running by hand uses the paths this test installs to; stop it (`portwatch down`) and \
             remove it first, or run the test elsewhere"
        );
    }
    Ok(())
}

/// Purges the package on drop, whatever the test did; `portwatch down`
/// first, should a guard of the test still hold the default paths.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if Path::new(BIN).exists() {
            let _ = Command::new(BIN).arg("down").output();
        }
        if !package_status().is_empty() {
            let _ = Command::new("dpkg")
                .args(["--purge", "portwatch"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .output();
        }
        let _ = std::fs::remove_dir_all(PIN_DIR);
    }
}

/// The installed unit file: `Key=Value` lines per section.
struct Unit {
    entries: HashMap<(String, String), String>,
}

impl Unit {
    fn read(path: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let mut section = String::new();
        let mut entries = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
            } else if let Some((key, value)) = line.split_once('=') {
                let key = (section.clone(), key.trim().to_string());
                ensure!(
                    !entries.contains_key(&key),
                    "{path}: {key:?} is set twice; the test reads one value"
                );
                entries.insert(key, value.trim().to_string());
            }
        }
        Ok(Self { entries })
    }

    fn get(&self, section: &str, key: &str) -> Result<&str> {
        self.entries
            .get(&(section.to_string(), key.to_string()))
            .map(String::as_str)
            .with_context(|| format!("{UNIT} has no {key}= in [{section}]"))
    }

    /// A command line: plain words, no quoting or systemd prefixes (the
    /// test would not run what systemd runs otherwise).
    fn command(&self, key: &str) -> Result<Vec<String>> {
        let line = self.get("Service", key)?;
        ensure!(
            line.starts_with('/') && !line.contains(['"', '\'', '\\']),
            "{key}={line}: expected an absolute path and unquoted words"
        );
        Ok(line.split_whitespace().map(str::to_string).collect())
    }

    /// The wrapper reproducing the unit's process settings, then ExecStart.
    fn exec_start(&self) -> Result<Vec<String>> {
        let mut argv = Vec::new();
        // systemd (PID 1) holds CAP_SYS_RESOURCE to raise the limit; a
        // sandboxed CI root may not, and the limit only matters before
        // Linux 5.11 (memory cgroup accounting of BPF since).
        let can_raise = has_capability(CAP_SYS_RESOURCE);
        if let (Ok(limit), true) = (self.get("Service", "LimitMEMLOCK"), can_raise) {
            let limit = if limit == "infinity" {
                "unlimited"
            } else {
                limit
            };
            argv.push("prlimit".to_string());
            argv.push(format!("--memlock={limit}:{limit}"));
            argv.push("--".into());
        }
        argv.push("setpriv".into());
        if self.get("Service", "NoNewPrivileges").ok() == Some("yes") {
            argv.push("--no-new-privs".into());
        }
        let caps: Vec<String> = self
            .get("Service", "CapabilityBoundingSet")?
            .split_whitespace()
            .map(|c| {
                c.strip_prefix("CAP_")
                    .map(|n| format!("+{}", n.to_lowercase()))
                    .with_context(|| format!("capability {c}"))
            })
            .collect::<Result<_>>()?;
        argv.push("--inh-caps=-all".into());
        argv.push(format!("--bounding-set=-all,{}", caps.join(",")));
        argv.push("--".into());
        argv.extend(self.command("ExecStart")?);
        Ok(argv)
    }
}

const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has `cap` in its effective set.
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

/// A guard run as the service would be, with its notifications and output.
struct Service {
    child: ChildGuard,
    notes: mpsc::Receiver<String>,
    seen: Vec<String>,
    log: Arc<Mutex<String>>,
    stop_reader: Arc<AtomicBool>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_reader.store(true, Ordering::Relaxed);
    }
}

impl Service {
    /// `nsenter [--mount=NS] --net=NETNS -- WRAPPER EXECSTART` with
    /// NOTIFY_SOCKET set; nsenter, prlimit and setpriv exec, so the child's
    /// pid is the guard's ($MAINPID).
    fn start(unit: &Unit, netns: &Netns, mount_ns_of: Option<u32>) -> Result<Self> {
        let dir = TempDir(std::env::temp_dir().join(unique_name("pkg")));
        std::fs::create_dir_all(&dir.0)?;
        let notify_path = dir.0.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (tx, notes) = mpsc::channel();
        let stop_reader = Arc::new(AtomicBool::new(false));
        let stop = stop_reader.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = notify.recv(&mut buf) {
                    for line in String::from_utf8_lossy(&buf[..n]).lines() {
                        if tx.send(line.to_string()).is_err() {
                            return;
                        }
                    }
                }
            }
        });

        let mut cmd = Command::new("nsenter");
        if let Some(pid) = mount_ns_of {
            cmd.arg(format!("--mount=/proc/{pid}/ns/mnt"));
        }
        cmd.arg(format!("--net=/run/netns/{}", netns.name))
            .arg("--")
            .args(unit.exec_start()?)
            .env("NOTIFY_SOCKET", &notify_path)
            // The host's SSH session is not in the test's namespace.
            .env_remove("SSH_CONNECTION")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .0
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .0
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                    eprintln!("[service] {line}");
                    if let Ok(mut buf) = log.lock() {
                        buf.push_str(&line);
                        buf.push('\n');
                    }
                }
            });
        }
        Ok(Self {
            child,
            notes,
            seen: Vec::new(),
            log,
            stop_reader,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for a notification starting with `prefix`.
    fn wait_note(&mut self, prefix: &str, within: Duration) -> Result<String> {
        if let Some(n) = self.seen.iter().find(|n| n.starts_with(prefix)) {
            return Ok(n.clone());
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.notes.recv_timeout(left) {
                Ok(note) => {
                    self.seen.push(note.clone());
                    if note.starts_with(prefix) {
                        return Ok(note);
                    }
                }
                Err(_) => bail!(
                    "no {prefix} notification within {within:?} (got {:?}); exited: {:?}\nlog:\n{}",
                    self.seen,
                    self.child.0.try_wait(),
                    self.log()
                ),
            }
        }
    }

    fn wait_log(&self, text: &str, within: Duration) -> Result {
        let deadline = Instant::now() + within;
        while !self.log().contains(text) {
            ensure!(
                Instant::now() < deadline,
                "`{text}` not logged within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn running(&mut self) -> Result<bool> {
        Ok(self.child.0.try_wait()?.is_none())
    }

    fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.0.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "the guard did not exit within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A veth pair inside `ns` with an address and a default route through the
/// peer, as DHCP would leave a server's interface. Returns the guarded end.
fn network_up(ns: &Netns, tag: &str, net: u8) -> Result<String> {
    let id = std::process::id() % 100_000;
    let (a, b) = (format!("pk{tag}{id}a"), format!("pk{tag}{id}b"));
    let n = ns.name.as_str();
    run(
        "ip",
        &[
            "-n", n, "link", "add", &a, "type", "veth", "peer", "name", &b,
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            n,
            "addr",
            "add",
            &format!("198.18.{net}.1/24"),
            "dev",
            &a,
        ],
    )?;
    run("ip", &["-n", n, "link", "set", &a, "up"])?;
    run("ip", &["-n", n, "link", "set", &b, "up"])?;
    run(
        "ip",
        &[
            "-n",
            n,
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{net}.2"),
            "dev",
            &a,
        ],
    )?;
    Ok(a)
}

/// Whether the guard's verdict is on `iface` in `ns`: in XDP (`ip link`)
/// or at tc ingress (a tcx link, auto's choice on a veth).
fn guard_attached(ns: &Netns, iface: &str) -> Result<bool> {
    Ok(portwatch_lab::tcx::guard_mode(ns, iface)?.is_some())
}

/// What bpftool sees on `iface` in `ns` (XDP and tc programs), as JSON text.
fn bpftool_net(ns: &Netns, iface: &str) -> Result<String> {
    let out = ns
        .command("bpftool")
        .args(["-j", "net", "show", "dev", iface])
        .output()?;
    ensure!(out.status.success(), "bpftool net show: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The id of the pinned guard link of `iface` under `pin_dir` (XDP, or tc
/// ingress): the same id after a restart means the guard adopted the link
/// (no moment without it), not re-created it.
fn guard_link_id(pin_dir: &Path, iface: &str) -> Result<u64> {
    let links = pin_dir.join("links");
    let pin = [
        format!("xdp-native-{iface}"),
        format!("xdp-generic-{iface}"),
        format!("ingress-{iface}"),
    ]
    .iter()
    .map(|name| links.join(name))
    .find(|p| p.exists())
    .with_context(|| format!("no pinned guard link of {iface} in {}", links.display()))?;
    let out = run(
        "bpftool",
        &[
            "-j",
            "link",
            "show",
            "pinned",
            pin.to_str().context("path")?,
        ],
    )?;
    let link: serde_json::Value = serde_json::from_str(&out).context("bpftool's JSON")?;
    link["id"]
        .as_u64()
        .with_context(|| format!("no link id in {out}"))
}

fn gid_of(group: &str) -> Result<Option<u32>> {
    let out = Command::new("getent").args(["group", group]).output()?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(line.split(':').nth(2).and_then(|g| g.trim().parse().ok()))
}

/// A private mount namespace with its own bpffs on /sys/fs/bpf and tmpfs on
/// /run, kept alive by a sleeping process: the service's default paths
/// there are the test's alone, and they outlive a killed guard.
fn private_mounts() -> Result<ChildGuard> {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        "mount -t bpf bpf /sys/fs/bpf && mount -t tmpfs -o mode=0755 pwtest /run && echo ready && exec sleep 900",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut holder = ChildGuard::spawn(&mut cmd)?;
    let stdout = holder.0.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(
        line.trim() == "ready",
        "the private mounts failed: {line:?}"
    );
    Ok(holder)
}

#[test]
fn install_serve_upgrade_and_purge() -> Result {
    let deb = deb_from_env("PORTWATCH_DEB")?;
    let next = deb_from_env("PORTWATCH_DEB_NEXT")?;
    let deb_s = deb.to_str().context("path")?;
    let next_s = next.to_str().context("path")?;
    let first_version = run("dpkg-deb", &["-f", deb_s, "Version"])?
        .trim()
        .to_string();
    let next_version = run("dpkg-deb", &["-f", next_s, "Version"])?
        .trim()
        .to_string();
    run(
        "dpkg",
        &["--compare-versions", &next_version, "gt", &first_version],
    )
    .context("PORTWATCH_DEB_NEXT must have a higher version")?;

    refuse_if_in_use()?;
    let _installed = Installed;

    // ---- install ----
    dpkg(&["-i", deb_s])?;
    assert_eq!(package_status(), "install ok installed");
    assert_eq!(installed_version()?, first_version);
    for path in [
        BIN,
        UNIT,
        POLICY,
        "/usr/share/man/man8/portwatch.8.gz",
        "/usr/share/man/man8/portwatch-guard.8.gz",
        "/usr/share/bash-completion/completions/portwatch",
        "/usr/share/zsh/vendor-completions/_portwatch",
        "/usr/share/fish/vendor_completions.d/portwatch.fish",
    ] {
        ensure!(Path::new(path).is_file(), "{path} is not installed");
    }
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", "portwatch"])?;
    ensure!(conffiles.contains(POLICY), "conffiles: {conffiles}");
    let gid = gid_of("portwatch")?.context("postinst made no portwatch group")?;
    ensure!(gid < 1000, "portwatch is not a system group (gid {gid})");
    let wants = std::fs::read_link(WANTS).context("the unit is not enabled")?;
    assert_eq!(wants, Path::new(UNIT));
    let checked = run(BIN, &["check-policy", POLICY])?;
    ensure!(
        checked.contains("mode audit") && checked.contains("allow tcp/22 from anywhere"),
        "{checked}"
    );
    // As installed, binary and man pages in place: no warning at all.
    let verify = Command::new("systemd-analyze")
        .args(["verify", UNIT])
        .output()?;
    ensure!(
        verify.status.success() && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "systemd-analyze verify: {verify:?}"
    );
    let pages = run("man", &["-w", "portwatch-guard"])?;
    ensure!(
        pages.contains("/usr/share/man/man8/portwatch-guard.8.gz"),
        "{pages}"
    );
    let completion = run(BIN, &["completions", "bash"])?;
    assert_eq!(
        completion,
        std::fs::read_to_string("/usr/share/bash-completion/completions/portwatch")?
    );

    // ---- the service, in a private mount namespace and a fresh netns ----
    let unit = Unit::read(UNIT)?;
    assert_eq!(unit.get("Service", "Type")?, "notify");
    assert_eq!(unit.get("Service", "Restart")?, "on-failure");
    ensure!(
        unit.get("Unit", "Before")?
            .contains("network-online.target"),
        "not ordered before network-online.target"
    );
    let mounts = private_mounts()?;
    let private = |p: &str| PathBuf::from(format!("/proc/{}/root{p}", mounts.pid()));
    let ns = Netns::new("pkg")?;
    let net = u8::try_from(std::process::id() % 200 + 20)?;

    // At boot the default route may come later (DHCP): the guard waits,
    // says so, and is not ready until it has attached.
    let mut svc = Service::start(&unit, &ns, Some(mounts.pid()))?;
    let status = svc.wait_note("STATUS=", Duration::from_secs(20))?;
    ensure!(status.contains("default route"), "{status}");
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !svc.seen.iter().any(|n| n == "READY=1"),
        "READY before any interface: {:?}",
        svc.seen
    );
    ensure!(svc.running()?, "the guard gave up waiting:\n{}", svc.log());
    let iface = network_up(&ns, "s", net)?;
    let waited = Instant::now();
    svc.wait_note("READY=1", Duration::from_secs(30))?;
    ensure!(
        guard_attached(&ns, &iface)?,
        "READY=1 before XDP is on {iface}"
    );
    eprintln!(
        "ready {:?} after the default route appeared",
        waited.elapsed()
    );
    // The unit's bounding set lets the guard raise its priority (the
    // default --priority-boost 5).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", svc.pid()))?;
    let nice = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(16))
        .context("no nice in the guard's stat")?;
    assert_eq!(nice, "-5", "the service's nice value");
    let socket = private(SOCKET);
    let meta = std::fs::metadata(&socket).context("the control socket")?;
    assert_eq!(meta.gid(), gid, "the control socket's group");
    assert_eq!(meta.mode() & 0o777, 0o660);
    let pinned = private(PIN_DIR).join("links");
    ensure!(pinned.is_dir(), "nothing pinned in the service's bpffs");

    // An admin's edit, then ExecReload.
    let edited = std::fs::read_to_string(POLICY)?
        .replace("\"tcp/22\",  # ssh", "\"tcp/22\",  # ssh\n  \"tcp/8080\",");
    ensure!(
        edited.contains("tcp/8080"),
        "the shipped policy changed shape"
    );
    std::fs::write(POLICY, &edited)?;
    let reload: Vec<String> = unit
        .command("ExecReload")?
        .into_iter()
        .map(|w| w.replace("$MAINPID", &svc.pid().to_string()))
        .collect();
    let reload_args: Vec<&str> = reload[1..].iter().map(String::as_str).collect();
    run(&reload[0], &reload_args)?;
    svc.wait_log("reload", Duration::from_secs(10))?;
    let policy = run(
        BIN,
        &[
            "policy",
            "--json",
            "--socket",
            socket.to_str().context("path")?,
        ],
    )?;
    ensure!(policy.contains("tcp/8080"), "not reloaded: {policy}");

    // kill -9: enforcement stays; the restarted service adopts it.
    let link = guard_link_id(&private(PIN_DIR), &iface)?;
    signal(svc.pid(), libc::SIGKILL)?;
    svc.wait_exit(Duration::from_secs(10))?;
    ensure!(
        guard_attached(&ns, &iface)?,
        "the guard's program went with the killed guard"
    );
    ensure!(pinned.is_dir(), "the pins went with the killed guard");
    let mut svc = Service::start(&unit, &ns, Some(mounts.pid()))?;
    svc.wait_note("READY=1", Duration::from_secs(30))?;
    svc.wait_log("adopted the pinned datapath", Duration::from_secs(5))?;
    ensure!(
        guard_attached(&ns, &iface)?,
        "not attached after the restart"
    );
    assert_eq!(
        guard_link_id(&private(PIN_DIR), &iface)?,
        link,
        "the restart replaced the XDP link instead of adopting it"
    );
    // A stop (systemd sends SIGTERM) keeps enforcement; `portwatch down` ends it.
    signal(svc.pid(), libc::SIGTERM)?;
    let stopped = svc.wait_exit(Duration::from_secs(20))?;
    ensure!(stopped.success(), "stop: {stopped}\n{}", svc.log());
    ensure!(guard_attached(&ns, &iface)?, "a stop detached the guard");
    let down = Command::new("nsenter")
        .arg(format!("--mount=/proc/{}/ns/mnt", mounts.pid()))
        .arg(format!("--net=/run/netns/{}", ns.name))
        .args([BIN, "down"])
        .output()?;
    ensure!(down.status.success(), "portwatch down: {down:?}");
    ensure!(!guard_attached(&ns, &iface)?, "still attached after down");
    drop(mounts);

    // ---- upgrade while a guard of the first version runs (host paths) ----
    let ns2 = Netns::new("pku")?;
    let iface2 = network_up(&ns2, "u", net.wrapping_add(1))?;
    let mut old = Service::start(&unit, &ns2, None)?;
    old.wait_note("READY=1", Duration::from_secs(30))?;
    let link = guard_link_id(Path::new(PIN_DIR), &iface2)?;
    let upgrade = dpkg(&["-i", next_s])?;
    assert_eq!(installed_version()?, next_version);
    ensure!(old.running()?, "the upgrade stopped the guard:\n{upgrade}");
    ensure!(
        guard_attached(&ns2, &iface2)?,
        "the upgrade detached the guard"
    );
    assert_eq!(
        std::fs::read_to_string(POLICY)?,
        edited,
        "the upgrade replaced the edited conffile"
    );
    for leftover in [".dpkg-dist", ".dpkg-new", ".dpkg-old"] {
        let path = format!("{POLICY}{leftover}");
        ensure!(!Path::new(&path).exists(), "{path} after the upgrade");
    }
    // What systemd's restart does after an upgrade: stop, start the new one.
    signal(old.pid(), libc::SIGTERM)?;
    ensure!(old.wait_exit(Duration::from_secs(20))?.success());
    old.wait_log("enforcement stays", Duration::from_secs(5))?;
    ensure!(
        guard_attached(&ns2, &iface2)?,
        "detached between the guards"
    );
    let mut new = Service::start(&Unit::read(UNIT)?, &ns2, None)?;
    new.wait_note("READY=1", Duration::from_secs(30))?;
    new.wait_log("adopted the pinned datapath", Duration::from_secs(5))?;
    assert_eq!(
        guard_link_id(Path::new(PIN_DIR), &iface2)?,
        link,
        "the upgraded guard replaced the XDP link instead of adopting it"
    );

    // ---- purge while the new guard runs: nothing attached or pinned ----
    let purge = dpkg(&["--purge", "portwatch"])?;
    let status = new.wait_exit(Duration::from_secs(20))?;
    ensure!(status.success(), "the guard on purge: {status}\n{purge}");
    // prerm's `portwatch down` stopped it (and said so), without a warning.
    ensure!(
        purge.contains(&format!("stopped the guard (pid {})", new.pid()))
            && !purge.contains("warning"),
        "prerm's cleanup: {purge}"
    );
    let left = bpftool_net(&ns2, &iface2)?;
    ensure!(
        !guard_attached(&ns2, &iface2)?
            && !left.contains("xdp_guard")
            && !left.contains("tc_guard")
            && !left.contains("tc_egress"),
        "still attached after purge: {left}"
    );
    for path in [PIN_DIR, SOCKET, BIN, UNIT, WANTS, "/etc/portwatch"] {
        ensure!(!Path::new(path).exists(), "{path} is left after purge");
    }
    ensure!(
        gid_of("portwatch")?.is_none(),
        "the group is left after purge"
    );
    ensure!(
        package_status().is_empty() || package_status().contains("not-installed"),
        "dpkg status after purge: {}",
        package_status()
    );
    for state in [
        "/var/lib/systemd/deb-systemd-helper-enabled/portwatch.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-masked/portwatch.service",
        "/etc/systemd/system/portwatch.service",
    ] {
        ensure!(!Path::new(state).exists(), "{state} is left after purge");
    }
    Ok(())
}

// ---- under a real systemd ----

/// A mount made by the test, lazily unmounted (and its directory removed)
/// on drop.
struct Mount(PathBuf);

impl Mount {
    fn new(path: PathBuf, args: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(&path)?;
        let target = path.to_str().context("path")?.to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.push(&target);
        if let Err(e) = run("mount", &all) {
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        Ok(Self(path))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Parent pid of `pid`, from /proc/PID/stat.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A descendant of `ancestor` whose command name is `comm`.
fn descendant(ancestor: u32, comm: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .find(|&pid| {
            let mut p = pid;
            for _ in 0..16 {
                match ppid(p) {
                    Some(parent) if parent == ancestor => return true,
                    Some(parent) if parent > 1 => p = parent,
                    _ => return false,
                }
            }
            false
        })
}

/// systemd-nspawn booting a container; on drop it is asked to shut down
/// (SIGTERM to nspawn), then killed if it has not within 20 s.
struct Container {
    child: ChildGuard,
    name: String,
}

impl Container {
    /// The container's systemd (PID 1 inside), once it runs.
    fn init(&self, within: Duration) -> Result<u32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(pid) = descendant(self.child.pid(), "systemd") {
                return Ok(pid);
            }
            ensure!(
                Instant::now() < deadline,
                "no systemd in the container within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = signal(self.child.pid(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // ChildGuard kills it if it is still there. nspawn cannot remove
        // its propagation directory when the container's root is an
        // overlay of "/"; it is empty by now.
        let _ = std::fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.name));
    }
}

/// A command run inside the container (all its namespaces).
fn inside(init: u32, args: &[&str]) -> Result<String> {
    let mut all = vec!["-t".to_string(), init.to_string(), "-a".into()];
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    run("nsenter", &all)
}

fn unit_property(init: u32, property: &str) -> Result<String> {
    Ok(inside(
        init,
        &["systemctl", "show", "portwatch", "-p", property, "--value"],
    )?
    .trim()
    .to_string())
}

fn journal(init: u32) -> Result<String> {
    inside(
        init,
        &[
            "journalctl",
            "-b",
            "-u",
            "portwatch",
            "--no-pager",
            "-o",
            "cat",
        ],
    )
}

fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result {
    let deadline = Instant::now() + within;
    while !check()? {
        ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The capability mask of a `CapabilityBoundingSet=` line.
fn capability_mask(set: &str) -> Result<u64> {
    const NAMES: &[(&str, u32)] = &[
        ("CAP_CHOWN", 0),
        ("CAP_DAC_READ_SEARCH", 2),
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_PTRACE", 19),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_SYS_NICE", 23),
        ("CAP_PERFMON", 38),
        ("CAP_BPF", 39),
    ];
    set.split_whitespace().try_fold(0u64, |mask, name| {
        let bit = NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| *b)
            .with_context(|| format!("{name}: add its number to the test"))?;
        Ok(mask | (1 << bit))
    })
}

/// The unit as installed, under a real systemd as PID 1: a container
/// booted (systemd-nspawn) from an overlay of this machine's root file
/// system with the package installed into the overlay (the host's dpkg
/// database is not touched), on a network namespace of the test's, with a
/// bpffs of its own. Checks what only systemd can show: the sandbox as
/// written leaves the guard working, and Type=notify, ExecReload and
/// Restart behave.
#[test]
fn systemd_runs_the_unit_in_a_booted_container() -> Result {
    let deb = deb_from_env("PORTWATCH_DEB")?;
    let base = std::env::temp_dir().join(unique_name("ct"));
    // Declared first, dropped last: removed once the mounts in it are gone
    // (remove_dir, never recursive: it holds an overlay of "/").
    struct EmptyDir(PathBuf);
    impl Drop for EmptyDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _base = EmptyDir(base.clone());
    // Upper and work directories on a tmpfs: nothing of the container's
    // writes reaches this machine's disk.
    let scratch = Mount::new(base.join("scratch"), &["-t", "tmpfs", "tmpfs"])?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(scratch.0.join(d))?;
    }
    let options = format!(
        "lowerdir=/,upperdir={},workdir={}",
        scratch.0.join("upper").display(),
        scratch.0.join("work").display()
    );
    let root = Mount::new(
        base.join("root"),
        &["-t", "overlay", "overlay", "-o", &options],
    )?;
    let bpffs = Mount::new(base.join("bpffs"), &["-t", "bpf", "bpf"])?;
    std::fs::copy(&deb, root.0.join("tmp/portwatch.deb"))?;
    // No systemd in the chroot: postinst only enables the unit.
    run(
        "chroot",
        &[
            root.0.to_str().context("path")?,
            "dpkg",
            "-i",
            "/tmp/portwatch.deb",
        ],
    )?;
    ensure!(
        std::fs::symlink_metadata(root.0.join(WANTS.trim_start_matches('/'))).is_ok(),
        "postinst did not enable the unit"
    );
    // A socket-activated service that owns its port: systemd binds
    // tcp/7070 for pw-echo.socket in its own cgroup, not the service's.
    let units = root.0.join("etc/systemd/system");
    std::fs::write(
        units.join("pw-echo.socket"),
        "[Socket]\nListenStream=7070\n\n[Install]\nWantedBy=sockets.target\n",
    )?;
    std::fs::write(
        units.join("pw-echo.service"),
        "[Service]\nExecStart=/bin/sleep infinity\n",
    )?;
    // No gettys: one forked by PID 1 at boot that never gets to exec
    // holds every socket PID 1 had then, and a restarted socket unit would
    // find its port taken.
    for getty in [
        "console-getty.service",
        "container-getty@.service",
        "getty@.service",
        "serial-getty@.service",
    ] {
        std::os::unix::fs::symlink("/dev/null", units.join(getty))?;
    }
    std::fs::create_dir_all(units.join("sockets.target.wants"))?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/pw-echo.socket",
        units.join("sockets.target.wants/pw-echo.socket"),
    )?;
    std::fs::write(
        root.0.join(POLICY.trim_start_matches('/')),
        "mode = \"enforce\"\nallow = [\n  \"tcp/22\",\n  \
         { port = \"tcp/7070\", owner = { unit = \"pw-echo.service\" } },\n]\n",
    )?;

    let ns = Netns::new("ct")?;
    let net = u8::try_from(std::process::id() % 200 + 22)?;
    let iface = network_up(&ns, "c", net)?;
    let name = unique_name("ct");
    let mut cmd = Command::new("systemd-nspawn");
    cmd.arg("--directory")
        .arg(&root.0)
        .args([
            "--machine",
            &name,
            "--register=no",
            "--keep-unit",
            "--quiet",
        ])
        .args(["--console=passive", "--link-journal=no", "--boot"])
        .arg(format!("--network-namespace-path=/run/netns/{}", ns.name))
        // What the guard needs beyond nspawn's default set and filter.
        .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN")
        .arg("--system-call-filter=bpf perf_event_open")
        .arg(format!("--bind={}:/sys/fs/bpf", bpffs.0.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let container = Container {
        child: ChildGuard::spawn(&mut cmd)?,
        name,
    };
    let init = container.init(Duration::from_secs(30))?;
    // READY=1 (Type=notify) makes the unit active, after XDP is attached.
    wait_until(Duration::from_secs(90), "portwatch.service active", || {
        Ok(unit_property(init, "ActiveState").is_ok_and(|s| s == "active"))
    })
    .with_context(|| journal(init).unwrap_or_default())?;
    ensure!(
        guard_attached(&ns, &iface)?,
        "active, but no guard program on {iface}"
    );
    assert_eq!(unit_property(init, "Type")?, "notify");

    // Socket activation under an owner rule: systemd re-binds the socket
    // unit's port (accepted: it binds for the owner); with the socket unit
    // stopped a stranger's bind of the port is refused (EPERM); the port is
    // open at XDP while systemd listens for the service again.
    inside(init, &["systemctl", "restart", "pw-echo.socket"]).with_context(|| {
        let socket_log = inside(
            init,
            &[
                "journalctl",
                "-b",
                "-u",
                "pw-echo.socket",
                "--no-pager",
                "-o",
                "cat",
            ],
        )
        .unwrap_or_default();
        let ss = inside(init, &["ss", "-ltnpe"]).unwrap_or_default();
        format!("{socket_log}\n{ss}\n{}", journal(init).unwrap_or_default())
    })?;
    let socket_state = inside(
        init,
        &[
            "systemctl",
            "show",
            "pw-echo.socket",
            "-p",
            "ActiveState",
            "--value",
        ],
    )?;
    assert_eq!(socket_state.trim(), "active", "{}", journal(init)?);
    inside(init, &["systemctl", "stop", "pw-echo.socket"])?;
    // The stranger is a unit of the container's (systemd-run), so in its
    // cgroup tree, where the guard's hooks are.
    let stranger = inside(
        init,
        &[
            "systemd-run",
            "--unit",
            "pw-stranger",
            "--wait",
            "--pipe",
            "--quiet",
            "/usr/bin/python3",
            "-c",
            TRY_BIND,
            "tcp",
            "0.0.0.0",
            "7070",
        ],
    )?;
    assert_eq!(
        stranger.trim(),
        "EPERM",
        "a stranger's bind of the owned port"
    );
    inside(init, &["systemctl", "start", "pw-echo.socket"])?;
    let mut owned = serde_json::Value::Null;
    wait_until(Duration::from_secs(10), "tcp/7070 open for systemd", || {
        let status: serde_json::Value =
            serde_json::from_str(&inside(init, &["portwatch", "status", "--json"])?)?;
        owned = status["owned"][0].clone();
        Ok(owned["open"] == true)
    })
    .with_context(|| format!("{owned}"))?;
    assert_eq!(owned["port"], "tcp/7070", "{owned}");
    // PID 1, or the helper it forked to make the socket (gone by now).
    assert!(
        owned["comm"] == "systemd" || owned["comm"] == "(sd-listen)",
        "{owned}"
    );
    wait_until(
        Duration::from_secs(10),
        "the refusal in the journal",
        || Ok(journal(init)?.contains("refused (EPERM): python3")),
    )?;
    ensure!(
        unit_property(init, "Before")?.contains("network-online.target"),
        "not before network-online.target"
    );

    // The sandbox as systemd applied it.
    let unit = Unit::read(
        root.0
            .join(UNIT.trim_start_matches('/'))
            .to_str()
            .context("path")?,
    )?;
    let guard = descendant(init, "portwatch").context("no guard process in the container")?;
    let status = std::fs::read_to_string(format!("/proc/{guard}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        u64::from_str_radix(&field("CapBnd:"), 16)?,
        capability_mask(unit.get("Service", "CapabilityBoundingSet")?)?
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "no system call filter");
    let write_usr = Command::new("nsenter")
        .args([
            "-t",
            &guard.to_string(),
            "-m",
            "touch",
            "/usr/portwatch-test",
        ])
        .output()?;
    ensure!(
        !write_usr.status.success(),
        "ProtectSystem=strict: /usr is writable"
    );
    // ReadWritePaths: a runtime change persists the policy file.
    inside(init, &["portwatch", "allow", "tcp/8080"])?;
    let policy = std::fs::read_to_string(root.0.join(POLICY.trim_start_matches('/')))?;
    ensure!(policy.contains("tcp/8080"), "not persisted: {policy}");

    // ExecReload.
    inside(init, &["systemctl", "reload", "portwatch"])?;
    wait_until(Duration::from_secs(10), "reload logged", || {
        Ok(journal(init)?.contains("policy reload (by SIGHUP"))
    })?;

    // kill -9: Restart=on-failure, and the new guard adopts the pinned link.
    let link = guard_link_id(&bpffs.0.join("portwatch"), &iface)?;
    inside(init, &["systemctl", "kill", "-s", "KILL", "portwatch"])?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        guard_attached(&ns, &iface)?,
        "the guard's program went with the killed guard"
    );
    wait_until(Duration::from_secs(30), "restarted after kill -9", || {
        Ok(unit_property(init, "NRestarts")? == "1"
            && unit_property(init, "ActiveState")? == "active")
    })?;
    assert_eq!(guard_link_id(&bpffs.0.join("portwatch"), &iface)?, link);
    ensure!(
        journal(init)?.contains("adopted the pinned datapath"),
        "the restarted guard did not adopt"
    );

    // systemctl stop keeps enforcement; portwatch down removes it.
    inside(init, &["systemctl", "stop", "portwatch"])?;
    ensure!(guard_attached(&ns, &iface)?, "a stop detached the guard");
    inside(init, &["portwatch", "down"])?;
    ensure!(!guard_attached(&ns, &iface)?, "still attached after down");
    drop(container);
    Ok(())
}
