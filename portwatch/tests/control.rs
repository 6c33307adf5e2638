//! The control socket's server and client together, over a real socket,
//! with a fake owner standing in for the guard. The permission tests run
//! clients as `nobody` (setpriv + socat) and need root (CI runs them as
//! root).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle};

use portwatch::{
    control::{
        client::{self, ClientError},
        protocol::{ChangeResponse, Format, PolicyView, Request, Response},
        server::{
            ControlError, ControlRequest, ControlServer, MAX_CONNECTIONS, Reply, resolve_group,
        },
    },
    model::Mode,
    pipeline::subscribers::follower_queue,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn socket_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portwatch-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The policy the fake owner answers `policy` with.
fn policy_view() -> PolicyView {
    PolicyView {
        mode: Mode::Audit,
        file: "/fake/policy.toml".into(),
        interfaces: Vec::new(),
        rules: Vec::new(),
        toml: "mode = \"audit\"\n".into(),
    }
}

/// That answer as the client reads a raw line of it.
fn policy_answer() -> Value {
    serde_json::from_str(&Response::Policy(policy_view()).to_line()).unwrap_or_default()
}

/// What the fake owner says about a peer: its credentials, in `change`.
fn peer_change(answer: &Value) -> String {
    answer["change"].as_str().unwrap_or_default().to_owned()
}

/// Answers as the guard's owner would, with fixed data; `status` gets the
/// peer's credentials back, as a change text.
fn spawn_owner(mut rx: mpsc::Receiver<ControlRequest>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let peer = &req.peer;
            let reply = match req.request {
                Request::Policy => Reply::Once(Response::Policy(policy_view())),
                Request::Subscribe { format, colour } => {
                    let (tx, lines) = follower_queue();
                    tx.send(format!("line one {format:?}\n"));
                    tx.send(format!("line two {colour}\n"));
                    Reply::Stream { lines }
                }
                Request::Status => Reply::Once(Response::Change(ChangeResponse {
                    change: format!(
                        "uid={} gid={} pid={} write={} read={}",
                        peer.uid, peer.gid, peer.pid, peer.can_write, peer.can_read
                    ),
                    policy: None,
                })),
                Request::Allow { rule, .. } => Reply::Once(Response::Change(ChangeResponse {
                    change: format!("allowed {} (from anywhere)", rule.ports),
                    policy: None,
                })),
                other => Reply::Once(Response::error(format!(
                    "{} is not done here",
                    other.name()
                ))),
            };
            let _ = req.reply.send(reply);
        }
    })
}

/// A server on a fresh socket with a fake owner; the socket is 0666 so
/// that `nobody` can connect (the credentials decide, not the mode).
fn start(tag: &str, read_group: Option<u32>) -> Result<(PathBuf, JoinHandle<()>), ControlError> {
    let path = socket_dir(tag).join("control.sock");
    let server = ControlServer::bind(&path, read_group)?;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    let (tx, rx) = mpsc::channel(8);
    let serving = tokio::spawn(server.serve(tx));
    spawn_owner(rx);
    Ok((path, serving))
}

/// Runs blocking client code off the runtime's thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the blocking task runs")
}

/// Sends `input` on one connection and reads `answers` lines (fewer at EOF).
fn converse(path: &Path, input: &[u8], answers: usize) -> std::io::Result<Vec<Value>> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(input)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reader = BufReader::new(stream);
    let mut out = Vec::new();
    for _ in 0..answers {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        out.push(serde_json::from_str(&line).map_err(std::io::Error::other)?);
    }
    Ok(out)
}

fn error_of(v: &Value) -> &str {
    assert_eq!(v["ok"], json!(false), "{v}");
    v["error"].as_str().unwrap_or("")
}

#[tokio::test]
async fn requests_and_subscriptions_end_to_end() -> TestResult {
    let (path, serving) = start("e2e", None)?;
    let p = path.clone();
    blocking(move || -> TestResult {
        assert!(client::guard_running(&p));
        assert_eq!(
            client::request::<PolicyView>(&p, &Request::Policy)?,
            policy_view()
        );
        let status = client::request::<ChangeResponse>(&p, &Request::Status)?;
        // Root, seen by its credentials and the pid of this process.
        let uid = nix::unistd::geteuid();
        assert!(
            status.change.starts_with(&format!("uid={} ", uid.as_raw())),
            "{status:?}"
        );
        assert!(
            status.change.contains(&format!(
                " pid={} write={} ",
                std::process::id(),
                uid.is_root()
            )),
            "{status:?}"
        );
        let e = client::request::<ChangeResponse>(&p, &Request::Reload { force: false })
            .expect_err("the owner refuses");
        assert!(matches!(e, ClientError::Daemon(_)), "{e:?}");
        assert_eq!(e.to_string(), "reload is not done here");

        let lines: Vec<String> =
            client::subscribe(&p, Format::Human, true)?.collect::<Result<_, _>>()?;
        assert_eq!(lines, ["line one Human", "line two true"]);
        Ok(())
    })
    .await?;

    // Aborting the server ends it and removes the socket file.
    serving.abort();
    let _ = serving.await;
    assert!(!path.exists());
    let p = path.clone();
    blocking(move || {
        assert!(!client::guard_running(&p));
        let e = client::request::<ChangeResponse>(&p, &Request::Status).expect_err("gone");
        assert!(matches!(e, ClientError::NoGuard { .. }), "{e:?}");
    })
    .await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    Ok(())
}

#[tokio::test]
async fn bad_lines_get_errors_and_the_connection_goes_on() -> TestResult {
    let (path, serving) = start("bad", None)?;
    let p = path.clone();
    blocking(move || -> TestResult {
        let input = b"not json\n{\"cmd\":\"frobnicate\"}\n\xff\xfe\n{\"cmd\":\"deny\"}\n\
                      {\"cmd\":\"policy\"}\n{\"cmd\":\"policy\"}";
        let answers = converse(&p, input, 10)?;
        assert_eq!(answers.len(), 6, "{answers:?}");
        assert!(error_of(&answers[0]).starts_with("request is not JSON: expected ident"));
        assert_eq!(
            error_of(&answers[1]),
            "unknown command \"frobnicate\" (expected allow, deny, apply, confirm, diff, policy, \
             reload, status, subscribe, shutdown, explain, verify, learn, record)"
        );
        assert_eq!(
            error_of(&answers[2]),
            "request is not UTF-8 (invalid byte at offset 0)"
        );
        assert_eq!(
            error_of(&answers[3]),
            "bad \"deny\" request: missing field `spec`"
        );
        // The next good request works; so does a last line without newline.
        assert_eq!(answers[4], policy_answer());
        assert_eq!(answers[5], policy_answer());

        // 70 KiB without a newline in the first 64 KiB: an error, then the
        // end of the connection.
        let mut big = vec![b'x'; 70 * 1024];
        big.extend_from_slice(b"\n{\"cmd\":\"policy\"}\n");
        let answers = converse(&p, &big, 3)?;
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(
            error_of(&answers[0]),
            "request too large: no newline within 65536 bytes (the limit per line); closing \
             the connection"
        );
        // The server is fine.
        assert_eq!(
            client::request::<PolicyView>(&p, &Request::Policy)?,
            policy_view()
        );
        Ok(())
    })
    .await?;
    serving.abort();
    let _ = serving.await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    Ok(())
}

#[tokio::test]
async fn connections_are_capped() -> TestResult {
    let (path, serving) = start("cap", None)?;
    let p = path.clone();
    blocking(move || -> TestResult {
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = UnixStream::connect(&p)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            // Answered: this connection holds a slot.
            s.write_all(b"{\"cmd\":\"policy\"}\n")?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            held.push(s);
        }
        let answers = converse(&p, b"{\"cmd\":\"policy\"}\n", 2)?;
        assert_eq!(answers.len(), 1);
        assert_eq!(
            error_of(&answers[0]),
            "too many control connections (64 at once); try again later"
        );
        // A slot that frees up is reused.
        drop(held.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match client::request::<PolicyView>(&p, &Request::Policy) {
                Ok(v) => {
                    assert_eq!(v, policy_view());
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().starts_with("too many"), "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    })
    .await?;
    serving.abort();
    let _ = serving.await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    Ok(())
}

#[tokio::test]
async fn a_gone_owner_means_shutting_down() -> TestResult {
    let path = socket_dir("gone").join("control.sock");
    let server = ControlServer::bind(&path, None)?;
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let serving = tokio::spawn(server.serve(tx));
    let p = path.clone();
    let e = blocking(move || client::request::<ChangeResponse>(&p, &Request::Status))
        .await
        .expect_err("nobody answers");
    assert!(matches!(e, ClientError::Daemon(_)), "{e:?}");
    assert_eq!(e.to_string(), "the guard is shutting down");
    serving.abort();
    let _ = serving.await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    Ok(())
}

#[test]
fn bind_replaces_stale_sockets_only() -> TestResult {
    let dir = socket_dir("stale");
    let path = dir.join("deep/er/control.sock");
    // A socket file nobody listens on: no guard, and bind replaces it.
    std::fs::create_dir_all(path.parent().unwrap_or(&dir))?;
    drop(std::os::unix::net::UnixListener::bind(&path)?);
    assert!(path.exists());
    assert!(!client::guard_running(&path));
    let e = client::request::<ChangeResponse>(&path, &Request::Status).expect_err("refused");
    assert!(matches!(e, ClientError::NoGuard { .. }), "{e:?}");
    let server = ControlServer::bind(&path, None)?;
    assert_eq!(
        std::fs::metadata(&path)?.permissions().mode() & 0o777,
        0o660
    );
    drop(server);
    assert!(!path.exists(), "dropping the server removes its socket");

    // Anything else at the path is left alone.
    std::fs::write(&path, "not a socket")?;
    let e = ControlServer::bind(&path, None).expect_err("a regular file");
    assert!(matches!(e, ControlError::NotASocket { .. }), "{e}");
    assert_eq!(std::fs::read_to_string(&path)?, "not a socket");

    // The directory is created 0755.
    let fresh = dir.join("new/control.sock");
    let server = ControlServer::bind(&fresh, resolve_group("nogroup"))?;
    let dir_mode = std::fs::metadata(fresh.parent().unwrap_or(&dir))?
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o755);
    if let Some(gid) = resolve_group("nogroup") {
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::metadata(&fresh)?.gid(), gid);
    }
    drop(server);
    assert_eq!(resolve_group("4242"), Some(4242));
    assert_eq!(resolve_group("no-such-group-here"), None);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Runs socat as `nobody` (no groups, no capabilities unless `caps`),
/// feeding it `input`; returns the lines it printed.
fn socat_as_nobody(path: &Path, input: &str, prefix: &[&str]) -> std::io::Result<Vec<Value>> {
    let mut child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .args(prefix)
        .args(["socat", "-T", "10", "-t", "5", "-"])
        .arg(format!("UNIX-CONNECT:{}", path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let mut text = String::new();
    out.stdout.as_slice().read_to_string(&mut text)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(std::io::Error::other))
        .collect()
}

/// These tests switch users: they need root, setpriv and socat, which CI
/// has (`cargo xtask setup` installs socat). Missing ones fail the test.
fn require_user_switching() -> TestResult {
    if !nix::unistd::geteuid().is_root() {
        return Err("these tests run as root (cargo xtask test does that)".into());
    }
    for tool in ["setpriv", "socat"] {
        Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("{tool} is needed: {e} (cargo xtask setup installs it)"))?;
    }
    Ok(())
}

#[tokio::test]
async fn peers_get_what_their_credentials_allow() -> TestResult {
    require_user_switching()?;
    // No read group: nobody may do nothing.
    let (path, serving) = start("perm", None)?;
    let p = path.clone();
    blocking(move || -> TestResult {
        let answers = socat_as_nobody(&p, "{\"cmd\":\"status\"}\n{\"cmd\":\"policy\"}\n", &[])?;
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(
            error_of(&answers[0]),
            "permission denied: uid 65534 may not read portwatch's status (root or \
             CAP_NET_ADMIN is needed)"
        );

        // CAP_NET_ADMIN makes nobody a writer.
        let caps = ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"];
        let answers = socat_as_nobody(&p, "{\"cmd\":\"allow\",\"spec\":\"tcp/1\"}\n", &caps)?;
        assert_eq!(
            answers,
            [json!({"ok": true, "change": "allowed tcp/1 (from anywhere)"})]
        );

        // All capabilities, but in a user namespace of its own: they count
        // for nothing here.
        let userns = ["unshare", "--user", "--map-root-user"];
        let answers = socat_as_nobody(&p, "{\"cmd\":\"status\"}\n", &userns)?;
        assert!(!answers.is_empty(), "unshare --user failed: no answer");
        assert!(
            error_of(&answers[0]).starts_with("permission denied: uid 65534 may not read"),
            "{answers:?}"
        );
        Ok(())
    })
    .await?;
    serving.abort();
    let _ = serving.await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));

    // Read group nogroup: nobody may read, not write, and goes on after a
    // refused write.
    let nogroup = resolve_group("nogroup").ok_or("Debian's group nogroup is missing")?;
    let (path, serving) = start("group", Some(nogroup))?;
    let p = path.clone();
    blocking(move || -> TestResult {
        let input = "{\"cmd\":\"status\"}\n{\"cmd\":\"allow\",\"spec\":\"tcp/1\"}\n\
                     {\"cmd\":\"policy\"}\n";
        let answers = socat_as_nobody(&p, input, &[])?;
        assert_eq!(answers.len(), 3, "{answers:?}");
        let peer = peer_change(&answers[0]);
        assert!(peer.starts_with("uid=65534 "), "{peer}");
        assert!(peer.ends_with(" write=false read=true"), "{peer}");
        assert!(!peer.contains(" pid=0 "), "{peer}");
        assert_eq!(
            error_of(&answers[1]),
            "permission denied: uid 65534 may not use \"allow\", which changes the guard (root \
             or CAP_NET_ADMIN is needed); this connection may still use policy, status and \
             subscribe"
        );
        assert_eq!(answers[2], policy_answer());

        // A supplementary group counts too.
        let answers = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=4242", "--groups=65534"])
            .args(["socat", "-T", "10", "-"])
            .arg(format!("UNIX-CONNECT:{}", p.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(b"{\"cmd\":\"policy\"}\n")?;
                }
                child.wait_with_output()
            })?;
        assert_eq!(
            String::from_utf8_lossy(&answers.stdout),
            Response::Policy(policy_view()).to_line()
        );
        Ok(())
    })
    .await?;
    serving.abort();
    let _ = serving.await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap_or(&path));
    Ok(())
}
