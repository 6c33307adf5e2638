//! The client's end of the control socket: one request and its answer, or a
//! subscription. Blocking (std), for the short-lived CLI commands.

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt},
        time::TimeVal,
    },
};
use serde::de::DeserializeOwned;

use super::protocol::{AnswerError, Format, Request, StatusResponse, Subscribed, decode_answer};

/// How long `request` waits to connect and for the answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The longest answer read, a guard with a great many listeners included.
const MAX_RESPONSE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket file, or nobody listening on it.
    #[error("no portwatch guard is running (no control socket at {})", .path.display())]
    NoGuard { path: PathBuf },

    /// The socket's mode, or the guard, refused us.
    #[error("{0}")]
    PermissionDenied(String),

    /// The guard answered `"ok": false`; its error message.
    #[error("{0}")]
    Daemon(String),

    // The cause is printed by the error chain (`{:#}`), not repeated here.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// The guard's answer is not what the protocol says.
    #[error("{0}")]
    Protocol(String),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClientError {
    let what = what.into();
    move |source| ClientError::Io { what, source }
}

/// Connects, waiting at most `timeout` when the guard's backlog is full.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let shown = path.display();
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io_error("cannot create a socket")(io::Error::from(e)))?;
    let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
    let tv = TimeVal::new(micros / 1_000_000, (micros % 1_000_000) as _);
    // A unix socket's connect() waits for a full backlog at most SO_SNDTIMEO.
    socket::setsockopt(&fd, sockopt::SendTimeout, &tv)
        .map_err(|e| io_error("cannot set the socket's timeout")(io::Error::from(e)))?;
    let addr = UnixAddr::new(path)
        .map_err(|e| io_error(format!("{shown} cannot be a socket address"))(io::Error::from(e)))?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(UnixStream::from(fd)),
        Err(Errno::ENOENT | Errno::ECONNREFUSED | Errno::ENOTDIR) => Err(ClientError::NoGuard {
            path: path.to_owned(),
        }),
        Err(Errno::EACCES | Errno::EPERM) => Err(ClientError::PermissionDenied(format!(
            "permission denied: cannot connect to the guard's control socket {shown} (root, \
             CAP_NET_ADMIN or membership in the socket's group is needed)"
        ))),
        Err(Errno::EAGAIN) => Err(io_error(format!(
            "the guard did not accept a connection on {shown} within {} s",
            timeout.as_secs()
        ))(io::Error::from(Errno::EAGAIN))),
        Err(e) => Err(io_error(format!("cannot connect to {shown}"))(
            io::Error::from(e),
        )),
    }
}

/// Sends `req` and reads one answer line; returns the body of the
/// `"ok": true` answer. A peer refused outright may have closed before
/// reading: its answer is read even when sending failed.
fn exchange<T: DeserializeOwned>(
    reader: &mut BufReader<UnixStream>,
    req: &Request,
) -> Result<T, ClientError> {
    let sent = reader.get_mut().write_all(req.to_line().as_bytes());
    let mut line = Vec::new();
    let read = reader
        .by_ref()
        .take(MAX_RESPONSE)
        .read_until(b'\n', &mut line);
    match (read, sent) {
        (Ok(0), Err(e)) | (Err(_), Err(e)) => {
            return Err(io_error("cannot send the request to the guard")(e));
        }
        (Ok(0), Ok(())) => {
            return Err(ClientError::Protocol(
                "the guard closed the connection without answering".to_owned(),
            ));
        }
        (Err(e), Ok(())) => {
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Io {
                    what: format!("the guard did not answer within {} s", TIMEOUT.as_secs()),
                    source: e,
                },
                _ => io_error("cannot read the guard's answer")(e),
            });
        }
        (Ok(_), _) => {}
    }
    parse_response(&line)
}

/// An answer line: the body of an `"ok": true` answer, else the guard's
/// error.
pub fn parse_response<T: DeserializeOwned>(line: &[u8]) -> Result<T, ClientError> {
    decode_answer(line).map_err(|e| match e {
        AnswerError::Refused(error) if error.starts_with("permission denied") => {
            ClientError::PermissionDenied(error)
        }
        AnswerError::Refused(error) => ClientError::Daemon(error),
        AnswerError::Malformed(why) => ClientError::Protocol(why),
    })
}

fn timeouts(stream: &UnixStream, timeout: Option<Duration>) -> Result<(), ClientError> {
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(io_error("cannot set the socket's timeout"))
}

/// Sends one request and returns the body of the guard's `"ok": true`
/// answer, as the type the request is answered with. Connecting and
/// answering each have [`TIMEOUT`].
pub fn request<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<T, ClientError> {
    let stream = connect(path, TIMEOUT)?;
    timeouts(&stream, Some(TIMEOUT))?;
    exchange(&mut BufReader::new(stream), req)
}

/// The guard's status, its listeners read one line each (`{"cmd":"status",
/// "lines":true}`): no answer line grows with the number of listeners.
pub fn status(path: &Path) -> Result<StatusResponse, ClientError> {
    let stream = connect(path, TIMEOUT)?;
    timeouts(&stream, Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut status: StatusResponse = exchange(&mut reader, &Request::StatusLines)?;
    let count = status.listeners_follow.take().ok_or_else(|| {
        ClientError::Protocol("the guard's status does not say how many listeners follow".into())
    })?;
    // The count comes from the guard; reserve no more than a sane amount up
    // front, the vector grows if there are truly more.
    status.listeners.reserve(count.min(1 << 16));
    let mut line = Vec::new();
    for n in 0..count {
        line.clear();
        let read = reader
            .by_ref()
            .take(MAX_LISTENER_LINE)
            .read_until(b'\n', &mut line)
            .map_err(io_error("cannot read the guard's listeners"))?;
        if read == 0 || line.last() != Some(&b'\n') {
            return Err(ClientError::Protocol(format!(
                "the guard's status ended after {n} of {count} listeners"
            )));
        }
        let listener = serde_json::from_slice(&line).map_err(|e| {
            ClientError::Protocol(format!("listener {} of {count} is malformed: {e}", n + 1))
        })?;
        status.listeners.push(listener);
    }
    Ok(status)
}

/// The longest listener line read (a command line of the kernel's maximum
/// length, escaped, with room to spare).
const MAX_LISTENER_LINE: u64 = 1 << 20;

/// Where copying the guard's stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading the guard's stream")]
    Read(#[source] io::Error),
    #[error("writing the stream out")]
    Write(#[source] io::Error),
}

/// The guard's event stream, one line at a time (without the newline),
/// until the guard ends it.
#[derive(Debug)]
pub struct Subscription {
    reader: BufReader<UnixStream>,
    done: bool,
}

impl Subscription {
    /// Copies the stream to `out` as it comes, whole lines only (a line
    /// cut by a read waits for its end), flushing after each read: a burst
    /// costs a write per read of up to 256 KiB, not a line's parse and
    /// write each. Returns when the guard ends the stream (a last line
    /// without its newline gets one).
    pub fn copy_lines(&mut self, out: &mut impl io::Write) -> Result<(), CopyError> {
        let mut partial = Vec::new();
        while !self.done {
            let read = match self.reader.fill_buf() {
                Ok(read) => read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.done = true;
                    return Err(CopyError::Read(e));
                }
            };
            if read.is_empty() {
                self.done = true;
                if !partial.is_empty() {
                    partial.push(b'\n');
                    out.write_all(&partial).map_err(CopyError::Write)?;
                }
                break;
            }
            let n = read.len();
            let written = match read.iter().rposition(|&b| b == b'\n') {
                Some(last) => {
                    let whole = &read[..=last];
                    let w = if partial.is_empty() {
                        out.write_all(whole)
                    } else {
                        // The cut line's end, in the same write as its start.
                        partial.extend_from_slice(whole);
                        let w = out.write_all(&partial);
                        partial.clear();
                        w
                    };
                    partial.extend_from_slice(&read[last + 1..]);
                    w
                }
                None => {
                    partial.extend_from_slice(read);
                    Ok(())
                }
            };
            self.reader.consume(n);
            written
                .and_then(|()| out.flush())
                .map_err(CopyError::Write)?;
        }
        out.flush().map_err(CopyError::Write)
    }
}

impl Iterator for Subscription {
    type Item = io::Result<String>;

    fn next(&mut self) -> Option<io::Result<String>> {
        if self.done {
            return None;
        }
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => {
                self.done = true;
                None
            }
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                Some(
                    String::from_utf8(line)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.utf8_error())),
                )
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Subscribes to the guard's events. The acknowledgement must come within
/// [`TIMEOUT`]; the stream itself has no timeout.
pub fn subscribe(path: &Path, format: Format, colour: bool) -> Result<Subscription, ClientError> {
    let stream = connect(path, TIMEOUT)?;
    timeouts(&stream, Some(TIMEOUT))?;
    // A burst arrives in chunks of up to 64 KiB: read them whole.
    let mut reader = BufReader::with_capacity(256 << 10, stream);
    exchange::<Subscribed>(&mut reader, &Request::Subscribe { format, colour })?;
    timeouts(reader.get_ref(), None)?;
    Ok(Subscription {
        reader,
        done: false,
    })
}

/// Whether a guard listens on `path`: something accepts connections there
/// (even if it would refuse us).
pub fn guard_running(path: &Path) -> bool {
    !matches!(
        connect(path, Duration::from_secs(1)),
        Err(ClientError::NoGuard { .. })
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::control::protocol::ChangeResponse;

    /// Writes, each kept as it came.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl io::Write for Writes {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.push(data.to_vec());
            Ok(data.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_copied_stream_is_written_in_whole_lines() {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        // A buffer shorter than the lines: each is cut by reads.
        let mut sub = Subscription {
            reader: BufReader::with_capacity(7, ours),
            done: false,
        };
        let sent = b"{\"event\":\"listen\",\"port\":1}\nshort\n\n{\"event\":\"close\"}\nno newline";
        let writer = std::thread::spawn(move || {
            let mut theirs = theirs;
            for piece in sent.chunks(5) {
                theirs.write_all(piece).expect("write");
            }
        });
        let mut out = Writes::default();
        sub.copy_lines(&mut out).expect("copied");
        writer.join().expect("writer");
        let all: Vec<u8> = out.0.concat();
        let mut want = sent.to_vec();
        want.push(b'\n');
        assert_eq!(
            String::from_utf8_lossy(&all),
            String::from_utf8_lossy(&want)
        );
        // Every write ends a line: a line is never cut between two.
        for w in &out.0 {
            let whole = w.last() == Some(&b'\n');
            assert!(
                whole,
                "a write left a line open: {:?}",
                String::from_utf8_lossy(w)
            );
        }
        assert!(sub.done);
    }

    #[test]
    fn responses() {
        let ok = parse_response::<ChangeResponse>(br#"{"ok":true,"change":"x"}"#)
            .map_err(|e| e.to_string());
        assert_eq!(
            ok,
            Ok(ChangeResponse {
                change: "x".into(),
                policy: None
            })
        );
        let cases = [
            (
                &br#"{"ok":false,"error":"tcp/9 is not permitted by any rule"}"#[..],
                "daemon",
            ),
            (
                br#"{"ok":false,"error":"permission denied: uid 65534 may not"}"#,
                "permission",
            ),
            (br#"{"ok":false}"#, "daemon"),
            (br#"{"x":1}"#, "protocol"),
            (b"nope", "protocol"),
        ];
        for (line, kind) in cases {
            let e = parse_response::<ChangeResponse>(line).expect_err("not ok");
            let got = match e {
                ClientError::Daemon(_) => "daemon",
                ClientError::PermissionDenied(_) => "permission",
                ClientError::Protocol(_) => "protocol",
                _ => "other",
            };
            assert_eq!(got, kind, "{e}");
        }
    }

    #[test]
    fn no_guard() {
        let path = Path::new("/nonexistent/portwatch/control.sock");
        assert!(!guard_running(path));
        let e = request::<ChangeResponse>(path, &Request::Status).expect_err("nothing there");
        assert_eq!(
            e.to_string(),
            "no portwatch guard is running (no control socket at /nonexistent/portwatch/control.sock)"
        );
        assert!(matches!(e, ClientError::NoGuard { .. }));
    }
}
