//! The guard's end of the control socket.
//!
//! [`ControlServer::serve`] accepts connections, checks each peer's
//! credentials, reads its request lines and hands each request, with the
//! peer, to the task that owns the guard's state (the "owner") through an
//! mpsc channel. The owner answers on a oneshot channel; this module writes
//! the answer back. Every connection is its own task: one that fails,
//! stalls or panics affects nobody else.

use std::{
    fs, io,
    os::{
        fd::AsFd,
        unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    task::JoinSet,
};

use super::protocol::{MAX_LINE, Request, Response, decode_request};

pub const DEFAULT_SOCKET: &str = "/run/portwatch/control.sock";

/// Connections served at once; one more is told so and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may stay silent while a request is awaited.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Refusals (no permission, too many connections) in progress at once;
/// beyond that a connection is closed without a word.
const MAX_REFUSALS: usize = 16;

/// After a refusal: how long to wait for the client to finish sending, so
/// that it reads the error and a clean end of stream.
const LINGER: Duration = Duration::from_secs(1);

const CAP_NET_ADMIN: u32 = 12;

/// Who is on the other end of a connection, and what they may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// 0 when the peer's process is not visible from here.
    pub pid: u32,
    /// Root, or `CAP_NET_ADMIN` in our user namespace: every command.
    pub can_write: bool,
    /// `can_write`, or a member of the read group: `policy`, `status`,
    /// `subscribe`.
    pub can_read: bool,
}

/// The owner's answer to a request.
#[derive(Debug)]
pub enum Reply {
    /// One response line.
    Once(Response),
    /// An acknowledgement line, then each string from `lines` (each ends in
    /// a newline) until the sender is dropped (then the connection closes)
    /// or the client goes away. The owner should `try_send`, so that a
    /// subscriber that does not read cannot stall the guard.
    Stream {
        lines: crate::pipeline::subscribers::FollowerQueue,
    },
}

/// One request for the owner, with the peer it came from and where the
/// answer goes. The server has already checked that the peer may send it.
#[derive(Debug)]
pub struct ControlRequest {
    pub peer: Peer,
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    // The cause is printed by the error chain (`{:#}`), not repeated here.
    #[error("cannot create {}, the control socket's directory", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{} exists and is not a socket; remove it or choose another control socket path",
        .path.display()
    )]
    NotASocket { path: PathBuf },

    #[error("cannot remove the stale control socket {}", .path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot listen on the control socket {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot set the mode or group of the control socket {}", .path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The read group: its id, and its name for messages.
#[derive(Clone, Debug)]
struct ReadGroup {
    gid: u32,
    name: String,
}

/// The listening socket. Dropping it (or the future of [`Self::serve`])
/// removes the socket file, if it is still the one bound here.
#[derive(Debug)]
pub struct ControlServer {
    /// Taken by `serve`.
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own.
    file_id: Option<(u64, u64)>,
    read_group: Option<ReadGroup>,
}

/// A group id by name (or a number that is not a name), for the read group.
pub fn resolve_group(name: &str) -> Option<u32> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Some(group.gid.as_raw()),
        _ => name.parse().ok(),
    }
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

impl ControlServer {
    /// Binds the socket: creates its directory (0755) when missing, removes
    /// a stale socket file first (the caller guarantees a single guard),
    /// then sets the mode to 0660 and the group to `read_group` when given.
    /// Needs no runtime; [`Self::serve`] does.
    pub fn bind(path: &Path, read_group: Option<u32>) -> Result<Self, ControlError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| ControlError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                fs::remove_file(path).map_err(|source| ControlError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })?;
            }
            Ok(_) => {
                return Err(ControlError::NotASocket {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ControlError::Bind {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let bind_error = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_error)?;
        // From here on, dropping `server` removes the file.
        let mut server = ControlServer {
            listener: None,
            path: path.to_owned(),
            file_id: fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino())),
            read_group: read_group.map(|gid| ReadGroup {
                gid,
                name: group_name(gid),
            }),
        };
        listener.set_nonblocking(true).map_err(bind_error)?;
        server.listener = Some(listener);

        let perm_error = |source| ControlError::Permissions {
            path: path.to_owned(),
            source,
        };
        fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(perm_error)?;
        if let Some(gid) = read_group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(perm_error)?;
        }
        Ok(server)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until the future is dropped (the task aborted);
    /// that also ends every connection and removes the socket file. Each
    /// request goes to `tx`.
    pub async fn serve(self, tx: mpsc::Sender<ControlRequest>) {
        // The sender gone, the receiver never reports a stop.
        let (_, never) = watch::channel(false);
        self.serve_until(tx, never).await;
    }

    /// As [`serve`](Self::serve), and once `stop` turns true: stops
    /// accepting, lets every connection finish writing the reply it owes
    /// (a `shutdown` answer among them) instead of reading more, then
    /// returns and removes the socket file.
    pub async fn serve_until(
        mut self,
        tx: mpsc::Sender<ControlRequest>,
        mut stop: watch::Receiver<bool>,
    ) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let listener = match UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!(
                    "control socket {}: cannot serve it: {e}",
                    self.path.display()
                );
                return;
            }
        };
        let context = Arc::new(Context {
            read_group: self.read_group.clone(),
            tx,
            stop: stop.clone(),
        });
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
        // Dropping the set (with this future) aborts every connection.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let peer = peer_of(&stream, context.read_group.as_ref().map(|g| g.gid));
                        let refusal = if !peer.can_read {
                            denied_message(&peer, context.read_group.as_ref())
                        } else {
                            match Arc::clone(&slots).try_acquire_owned() {
                                Ok(slot) => {
                                    connections.spawn(connection(
                                        stream,
                                        peer,
                                        Arc::clone(&context),
                                        slot,
                                    ));
                                    continue;
                                }
                                Err(_) => format!(
                                    "too many control connections ({MAX_CONNECTIONS} at once); \
                                     try again later"
                                ),
                            }
                        };
                        if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                            connections.spawn(refuse(stream, refusal, permit));
                        }
                    }
                    Err(e) => {
                        // EMFILE and the like: wait instead of spinning.
                        log::warn!("control socket: accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        log::error!("a control connection failed: {e}");
                    }
                }
            }
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.file_id {
            let _ = fs::remove_file(&self.path);
        }
    }
}

struct Context {
    read_group: Option<ReadGroup>,
    tx: mpsc::Sender<ControlRequest>,
    stop: watch::Receiver<bool>,
}

/// Completes once `stop` turns true; never if its sender is gone first.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn denied_message(peer: &Peer, group: Option<&ReadGroup>) -> String {
    let needed = match group {
        Some(g) => format!("root, CAP_NET_ADMIN or membership in group {}", g.name),
        None => "root or CAP_NET_ADMIN".to_owned(),
    };
    format!(
        "permission denied: uid {} may not read portwatch's status ({needed} is needed)",
        peer.uid
    )
}

fn write_denied_message(peer: &Peer, request: &Request) -> String {
    format!(
        "permission denied: uid {} may not use \"{}\", which changes the guard (root or \
         CAP_NET_ADMIN is needed); this connection may still use policy, status and subscribe",
        peer.uid,
        request.name()
    )
}

const SHUTTING_DOWN: &str = "the guard is shutting down";

// ---- peer credentials -------------------------------------------------

/// What /proc says about the peer's process.
#[derive(Debug, Default, PartialEq, Eq)]
struct ProcStatus {
    /// Effective uid.
    euid: Option<u32>,
    cap_eff: u64,
    groups: Vec<u32>,
}

fn parse_status(text: &str) -> ProcStatus {
    let mut status = ProcStatus::default();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            status.euid = v.split_whitespace().nth(1).and_then(|u| u.parse().ok());
        } else if let Some(v) = line.strip_prefix("CapEff:") {
            status.cap_eff = u64::from_str_radix(v.trim(), 16).unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Groups:") {
            status.groups = v
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect();
        }
    }
    status
}

/// The pid a pidfd refers to, while that process lives (`Pid: -1` after).
fn pid_of_pidfd(fd: &impl std::os::fd::AsRawFd) -> Option<u32> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
}

fn user_namespace(pid: &str) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/ns/user"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The peer's process, if it can be trusted to be the one that connected:
/// its effective uid is the connecting uid, it is in our user namespace
/// (capabilities in another one mean nothing here) and, where the kernel
/// gives a pidfd (6.5+), it has not exited (so its pid was not reused).
fn peer_process(stream: &UnixStream, uid: u32, cred_pid: Option<i32>) -> (u32, Option<ProcStatus>) {
    let pidfd =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerPidfd).ok();
    let pid = match &pidfd {
        Some(fd) => pid_of_pidfd(fd),
        None => cred_pid
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0),
    };
    let Some(pid) = pid else {
        return (0, None);
    };
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .map(|text| parse_status(&text));
    let same_userns = user_namespace("self").is_some()
        && user_namespace("self") == user_namespace(&pid.to_string());
    let alive = pidfd
        .as_ref()
        .is_none_or(|fd| pid_of_pidfd(fd) == Some(pid));
    let status = status.filter(|s| s.euid == Some(uid) && same_userns && alive);
    (pid, status)
}

fn peer_of(stream: &UnixStream, read_group: Option<u32>) -> Peer {
    let Ok(cred) = stream.peer_cred() else {
        return Peer {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: 0,
            can_write: false,
            can_read: false,
        };
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    let (pid, status) = peer_process(stream, uid, cred.pid());
    let can_write = uid == 0
        || status
            .as_ref()
            .is_some_and(|s| s.cap_eff & (1 << CAP_NET_ADMIN) != 0);
    let can_read = can_write
        || read_group
            .is_some_and(|g| gid == g || status.as_ref().is_some_and(|s| s.groups.contains(&g)));
    Peer {
        uid,
        gid,
        pid,
        can_write,
        can_read,
    }
}

// ---- connections --------------------------------------------------------

enum Read {
    Line(Vec<u8>),
    /// No newline within `MAX_LINE` bytes.
    TooLong,
    Eof,
}

/// Splits a byte stream into lines, holding at most `MAX_LINE + 1` bytes.
struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// How much of `buf` is known to have no newline.
    scanned: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            scanned: 0,
        }
    }

    async fn next_line(&mut self) -> io::Result<Read> {
        loop {
            if let Some(i) = self
                .buf
                .get(self.scanned..)
                .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
            {
                let end = self.scanned + i;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(Read::Line(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Ok(Read::TooLong);
            }
            let mut chunk = [0u8; 4096];
            let room = (MAX_LINE + 1 - self.buf.len()).min(chunk.len());
            let n = self.inner.read(&mut chunk[..room]).await?;
            if n == 0 {
                // A last line without its newline still counts.
                self.scanned = 0;
                return Ok(if self.buf.is_empty() {
                    Read::Eof
                } else {
                    Read::Line(std::mem::take(&mut self.buf))
                });
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }

    /// Reads and throws away what the client sends; `Ok(0)` at its end.
    async fn discard(&mut self) -> io::Result<usize> {
        self.buf.clear();
        self.scanned = 0;
        let mut chunk = [0u8; 1024];
        self.inner.read(&mut chunk).await
    }
}

async fn write_answer<W: AsyncWrite + Unpin>(out: &mut W, answer: &Response) -> io::Result<()> {
    out.write_all(answer.to_line().as_bytes()).await?;
    // Lines that follow (a status's listeners) go out in batches of about
    // this size: each write is bounded, the socket drains as we go.
    const BATCH: usize = 64 << 10;
    let mut batch = Vec::with_capacity(BATCH);
    for line in answer.following_lines() {
        batch.extend_from_slice(&line);
        if batch.len() >= BATCH {
            out.write_all(&batch).await?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        out.write_all(&batch).await?;
    }
    Ok(())
}

async fn write_error<W: AsyncWrite + Unpin>(out: &mut W, message: &str) -> io::Result<()> {
    write_answer(out, &Response::error(message)).await
}

/// Sends one error line, then lets the client finish sending (up to
/// `LINGER` and `MAX_LINE` bytes) so that it sees the error and a clean
/// end of stream rather than a reset.
async fn refuse_with<R, W>(reader: &mut LineReader<R>, out: &mut W, message: &str)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if write_error(out, message).await.is_err() {
        return;
    }
    let _ = out.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut drained = 0;
        while drained < MAX_LINE {
            match reader.discard().await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

async fn refuse(stream: UnixStream, message: String, _permit: OwnedSemaphorePermit) {
    let (read, mut write) = stream.into_split();
    refuse_with(&mut LineReader::new(read), &mut write, &message).await;
}

async fn connection(
    stream: UnixStream,
    peer: Peer,
    context: Arc<Context>,
    _slot: OwnedSemaphorePermit,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = LineReader::new(read);
    if let Err(e) = serve_connection(&mut reader, &mut write, &peer, &context).await {
        log::debug!(
            "control connection of uid {} (pid {}): {e}",
            peer.uid,
            peer.pid
        );
    }
}

async fn serve_connection<R, W>(
    reader: &mut LineReader<R>,
    out: &mut W,
    peer: &Peer,
    context: &Context,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut stop = context.stop.clone();
    loop {
        let next = tokio::select! {
            () = stopped(&mut stop) => return Ok(()),
            next = tokio::time::timeout(IDLE_TIMEOUT, reader.next_line()) => next,
        };
        let line = match next {
            Err(_) => {
                let message = format!(
                    "no request for {} s; closing the connection",
                    IDLE_TIMEOUT.as_secs()
                );
                return write_error(out, &message).await;
            }
            Ok(line) => line?,
        };
        let line = match line {
            Read::Eof => return Ok(()),
            Read::TooLong => {
                let message = format!(
                    "request too large: no newline within {MAX_LINE} bytes (the limit per \
                     line); closing the connection"
                );
                refuse_with(reader, out, &message).await;
                return Ok(());
            }
            Read::Line(line) => line,
        };
        let request = match decode_request(&line) {
            Ok(request) => request,
            Err(e) => {
                write_error(out, &e.to_string()).await?;
                continue;
            }
        };
        if request.needs_write() && !peer.can_write {
            write_error(out, &write_denied_message(peer, &request)).await?;
            continue;
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = context
            .tx
            .send(ControlRequest {
                peer: peer.clone(),
                request,
                reply: reply_tx,
            })
            .await;
        let reply = match sent {
            Ok(()) => reply_rx.await.ok(),
            Err(_) => None,
        };
        match reply {
            None => return write_error(out, SHUTTING_DOWN).await,
            Some(Reply::Once(answer)) => write_answer(out, &answer).await?,
            Some(Reply::Stream { lines }) => {
                write_answer(out, &Response::Subscribed).await?;
                return stream_lines(reader, out, lines, stop).await;
            }
        }
    }
}

/// Copies `lines` to the client until the owner closes the channel or the
/// client goes away (what it sends meanwhile is ignored).
async fn stream_lines<R, W>(
    reader: &mut LineReader<R>,
    out: &mut W,
    mut lines: crate::pipeline::subscribers::FollowerQueue,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut client_open = true;
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return out.shutdown().await,
            line = lines.recv() => match line {
                Some(line) => out.write_all(line.as_bytes()).await?,
                None => return out.shutdown().await,
            },
            read = reader.discard(), if client_open => match read {
                // The client closed its side: it may still read, but it
                // can also be gone; a write error will tell.
                Ok(0) => client_open = false,
                Ok(_) => {}
                Err(e) => return Err(e),
            },
        }
    }
}
