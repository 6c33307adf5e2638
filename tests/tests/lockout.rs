//! Lockout protection at run time: from a real SSH session into the
//! guard's namespace (dropbear in the lab's server namespace, OpenSSH's
//! client in its client namespace), a change that would cut that session
//! off is refused without `--force`, says which session, and leaves the
//! port reachable; with `--force` it applies.

use std::{
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use portwatch_lab::TempDir;
use portwatch_tests::{
    ChildGuard, Result,
    net::{Connect, Lab, TempFile, run_bounded, start_guard, tcp_probe, wait_listening},
    portwatch_bin, run,
};

const WAIT: Duration = Duration::from_secs(10);

/// An SSH server in the lab's server namespace that lets root in with a
/// key of the test's own. Root's `~/.ssh` is a directory of the test's,
/// bind-mounted in a mount namespace of dropbear's alone, so the machine's
/// own keys are neither read nor touched.
struct SshServer {
    _daemon: ChildGuard,
    dir: TempDir,
}

impl SshServer {
    /// dropbear on the lab's server address, port 22.
    fn start(lab: &Lab) -> Result<Self> {
        let listen = format!("{}:22", lab.server_v4());
        Self::start_with(lab, |key, pid| {
            format!("exec dropbear -F -E -s -r {key} -p {listen} -P {pid}")
        })
    }

    /// dropbear started per connection on a socket that another process
    /// listens on, as systemd's ssh.socket does on Debian and Ubuntu
    /// (`ListenStream=22`): one dual-stack socket on `[::]:22`, so an IPv4
    /// client's session is an IPv4-mapped IPv6 connection to the kernel,
    /// and the listener is not an SSH daemon.
    fn start_socket_activated(lab: &Lab) -> Result<Self> {
        Self::start_with(lab, |key, _| {
            format!("exec systemd-socket-activate -l 22 --inetd -a dropbear -i -s -r {key}")
        })
    }

    /// `serve(host key, pid file)`: the shell command that serves SSH.
    fn start_with(lab: &Lab, serve: impl Fn(&str, &str) -> String) -> Result<Self> {
        let dir = TempDir::new("ssh")?;
        // dropbear reads root's ~/.ssh: a home of the test's own is mounted
        // over /root in a private mount namespace (/root/.ssh need not exist).
        let home = dir.join("home");
        let ssh_dir = home.join(".ssh");
        std::fs::create_dir_all(&ssh_dir)?;
        std::fs::set_permissions(&ssh_dir, std::fs::Permissions::from_mode(0o700))?;
        let key = dir.join("id");
        run(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", path(&key)?],
        )?;
        let public = std::fs::read_to_string(dir.join("id.pub"))?;
        let authorized = ssh_dir.join("authorized_keys");
        std::fs::write(&authorized, public)?;
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600))?;
        let host_key = dir.join("host_key");
        run("dropbearkey", &["-t", "ed25519", "-f", path(&host_key)?])?;
        let script = format!(
            "mount --bind {} /root && {}",
            path(&home)?,
            serve(path(&host_key)?, path(&dir.join("dropbear.pid"))?),
        );
        let mut cmd = lab.server.command("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let daemon = ChildGuard::spawn(&mut cmd)?;
        wait_listening(&lab.server, "tcp", 22)?;
        Ok(Self {
            _daemon: daemon,
            dir,
        })
    }

    /// Runs `command` as root over SSH from the client namespace; the
    /// session's SSH_CONNECTION names the lab's addresses and port 22.
    fn run(&self, lab: &Lab, command: &str) -> Result<portwatch_tests::net::Outcome> {
        let mut ssh = lab.client.command("ssh");
        ssh.args([
            "-i",
            path(&self.dir.join("id"))?,
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(format!("root@{}", lab.server_v4()))
        .arg(command);
        run_bounded(&mut ssh, None, Duration::from_secs(30), None)
    }
}

impl SshServer {
    /// An SSH session left open in the background, running `command`.
    fn background(&self, lab: &Lab, command: &str) -> Result<ChildGuard> {
        let mut ssh = lab.client.command("ssh");
        ssh.args(["-i", path(&self.dir.join("id"))?])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .arg(format!("root@{}", lab.server_v4()))
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        ChildGuard::spawn(&mut ssh)
    }
}

/// Waits until the server namespace has an established connection to port
/// 22 (the background session is up).
fn wait_established(lab: &Lab) -> Result {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &lab.server.name,
                "ss",
                "-Htn",
                "state",
                "established",
                "sport",
                "= :22",
            ],
        )?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no SSH session established within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn path(p: &std::path::Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

#[test]
fn a_change_that_would_cut_off_the_operators_ssh_session_is_refused() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new(
        "lockout",
        "allow = [{ port = \"tcp/22\", from = [\"198.18.0.0/15\"] }, \"tcp/8080\"]\n",
    )?;
    let socket = lab.socket()?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let ssh = SshServer::start(&lab)?;
    let portwatch = portwatch_bin();
    let portwatch = path(&portwatch)?;

    // The session works, and says where it comes from.
    let hello = ssh.run(&lab, "echo $SSH_CONNECTION")?;
    ensure!(hello.success(), "ssh: {hello:?}");
    ensure!(
        hello
            .stdout
            .trim_end()
            .ends_with(&format!("{} 22", lab.server_v4())),
        "SSH_CONNECTION {:?}",
        hello.stdout
    );

    // deny tcp/22 from inside the session: refused, naming it.
    let deny = ssh.run(&lab, &format!("{portwatch} deny tcp/22 --socket {socket}"))?;
    ensure!(!deny.success(), "deny tcp/22 was applied: {deny:?}");
    ensure!(
        deny.stderr.contains(&format!(
            "runs over SSH from {} to port 22",
            lab.client_v4()
        )) && deny.stderr.contains("--force"),
        "{deny:?}"
    );
    // Narrowing its `from` away from the session by reload: refused too.
    std::fs::write(
        policy.as_str()?,
        "allow = [{ port = \"tcp/22\", from = [\"192.0.2.0/24\"] }, \"tcp/8080\"]\n",
    )?;
    let reload = ssh.run(&lab, &format!("{portwatch} reload --socket {socket}"))?;
    ensure!(!reload.success(), "the reload was applied: {reload:?}");
    ensure!(reload.stderr.contains("refusing the change"), "{reload:?}");
    // SIGHUP cannot be forced: with a session open (an established one,
    // not the signal's sender), the guard logs the refusal and the policy
    // stays.
    let open = ssh.background(&lab, "sleep 30")?;
    wait_established(&lab)?;
    portwatch_tests::signal(pw.pid(), libc::SIGHUP)?;
    let deadline = std::time::Instant::now() + WAIT;
    while !pw
        .stderr()
        .contains("SIGHUP: reload failed: refusing the change")
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "no refusal of the SIGHUP reload in the log:\n{}",
            pw.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let policy_now = Command::new(portwatch_bin())
        .args(["policy", "--socket", &socket])
        .output()?;
    let text = String::from_utf8_lossy(&policy_now.stdout);
    ensure!(text.contains("198.18.0.0/15"), "policy in force: {text}");
    drop(open);
    // Nothing was cut off: a new login still works.
    ensure!(ssh.run(&lab, "true")?.success(), "a new SSH login fails");
    // A change that does not touch the session goes through.
    let other = ssh.run(
        &lab,
        &format!("{portwatch} deny tcp/8080 --socket {socket}"),
    )?;
    ensure!(other.success(), "deny tcp/8080: {other:?}");

    // --force applies it: the guard stops admitting new sessions.
    let forced = ssh.run(
        &lab,
        &format!("{portwatch} deny tcp/22 --force --socket {socket}"),
    )?;
    ensure!(forced.success(), "deny tcp/22 --force: {forced:?}");
    let probe = tcp_probe(&lab.client, lab.server_v4(), 22, None)?;
    ensure!(
        probe.result == Connect::TimedOut,
        "tcp/22 after the forced deny: {:?}",
        probe.result
    );
    pw.wait_for(WAIT, |v| {
        v["event"] == "policy" && v["change"] == "deny tcp/22"
    })?;
    let status = pw.stop()?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// The same protection when sshd is socket-activated on a dual-stack
/// `[::]:22` (systemd's ssh.socket): the kernel lists the IPv4 session as
/// an IPv4-mapped IPv6 connection, and the listener is systemd's, not an
/// SSH daemon's, so only the session's own `SSH_CONNECTION` tells.
/// dropbear names the ends as mapped addresses too; OpenSSH names them
/// by IPv4, and then the session was not found at all (the guard compared
/// IPv4 with the kernel's mapped address) and the change went through.
/// Both forms are refused, naming the client by its IPv4 address.
#[test]
fn an_ipv4_session_through_a_dual_stack_ssh_socket_is_protected() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new(
        "lockout6",
        "allow = [{ port = \"tcp/22\", from = [\"198.18.0.0/15\"] }, \"tcp/8080\"]\n",
    )?;
    let socket = lab.socket()?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let ssh = SshServer::start_socket_activated(&lab)?;
    let portwatch = portwatch_bin();
    let portwatch = path(&portwatch)?;

    let sockets = run(
        "ip",
        &[
            "netns",
            "exec",
            &lab.server.name,
            "ss",
            "-Htln",
            "sport",
            "= :22",
        ],
    )?;
    ensure!(
        sockets.contains("[::]:22") || sockets.contains("*:22"),
        "{sockets}"
    );
    let hello = ssh.run(&lab, "echo $SSH_CONNECTION")?;
    ensure!(hello.success(), "ssh: {hello:?}");
    ensure!(
        hello
            .stdout
            .starts_with(&format!("::ffff:{} ", lab.client_v4()))
            && hello.stdout.trim_end().ends_with(" 22"),
        "SSH_CONNECTION {:?}",
        hello.stdout
    );

    // As dropbear names the session (mapped), and as OpenSSH would (IPv4):
    // the guard reads the asking process's own environment.
    let deny = format!("{portwatch} deny tcp/22 --socket {socket}");
    let as_openssh = format!(
        "set -- $SSH_CONNECTION; \
         SSH_CONNECTION=\"${{1#::ffff:}} $2 ${{3#::ffff:}} $4\" {deny}"
    );
    for (form, command) in [("mapped", deny.clone()), ("IPv4", as_openssh)] {
        let refused = ssh.run(&lab, &command)?;
        ensure!(
            !refused.success(),
            "deny tcp/22 was applied ({form} SSH_CONNECTION): {refused:?}"
        );
        ensure!(
            refused.stderr.contains(&format!(
                "runs over SSH from {} to port 22",
                lab.client_v4()
            )),
            "{form} SSH_CONNECTION: {refused:?}"
        );
    }
    // Nothing was cut off: a new login still works.
    ensure!(ssh.run(&lab, "true")?.success(), "a new SSH login fails");
    let status = pw.stop()?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// `learn` run over SSH keeps the session's port in its proposal, with the
/// session's network, even when nothing was recorded (enforce mode).
#[test]
fn learn_over_ssh_keeps_the_sessions_port() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new("learnssh", "allow = [\"tcp/22\"]\n")?;
    let socket = lab.socket()?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    let ssh = SshServer::start(&lab)?;
    let portwatch = portwatch_bin();
    let portwatch = path(&portwatch)?;
    let out = ssh.run(&lab, &format!("{portwatch} learn --json --socket {socket}"))?;
    ensure!(out.success(), "learn over ssh: {out:?}");
    let p: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let rules = p["rules"].as_array().context("rules")?;
    ensure!(rules.len() == 1, "only the SSH port: {p}");
    let rule = &rules[0];
    ensure!(rule["port"] == "tcp/22" && rule["ssh"] == true, "{rule}");
    let net = format!("198.18.{}.0/24", lab.net);
    ensure!(
        rule["toml"]
            .as_str()
            .is_some_and(|t| t.contains(&net) && t.contains("owner = {")),
        "the session's network and dropbear as owner: {rule}"
    );
    ensure!(
        rule["comment"]
            .to_string()
            .contains(&format!("from {}", lab.client_v4())),
        "{rule}"
    );
    pw.stop()?;
    Ok(())
}
