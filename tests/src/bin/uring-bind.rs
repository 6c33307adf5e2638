//! `uring-bind tcp|udp ADDR PORT`: binds a socket through io_uring
//! (IORING_OP_BIND, Linux 6.11+; then IORING_OP_LISTEN for TCP) and prints
//! `bound` or the errno's name, as the tests' python binder does for the
//! bind(2) system call. The owned-port tests run it to show that io_uring's
//! bind meets the same kernel hooks.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use io_uring::{IoUring, opcode, types};

fn main() -> ExitCode {
    match run() {
        Ok(answer) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("uring-bind: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [proto, addr, port] = args.as_slice() else {
        bail!("usage: uring-bind tcp|udp ADDR PORT");
    };
    let kind = match proto.as_str() {
        "tcp" => libc::SOCK_STREAM,
        "udp" => libc::SOCK_DGRAM,
        other => bail!("{other}: not tcp or udp"),
    };
    let target: SocketAddr = format!("{}:{port}", bracketed(addr))
        .parse()
        .with_context(|| format!("{addr} port {port}"))?;
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket() takes no pointers; a negative result is checked.
    let raw = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: `raw` is a descriptor this process just opened and owns alone.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let (storage, len) = sockaddr(&target);
    let mut ring = IoUring::new(4).context("io_uring_setup")?;
    let bind = opcode::Bind::new(
        types::Fd(socket.as_raw_fd()),
        (&raw const storage).cast::<libc::sockaddr>(),
        len,
    )
    .build();
    if let Some(errno) = submit(&mut ring, &bind)? {
        return Ok(errno);
    }
    if kind == libc::SOCK_STREAM {
        let listen = opcode::Listen::new(types::Fd(socket.as_raw_fd()), 16).build();
        if let Some(errno) = submit(&mut ring, &listen)? {
            return Ok(errno);
        }
    }
    Ok("bound".into())
}

/// Runs one entry to completion; the errno's name when it failed.
fn submit(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> Result<Option<String>> {
    // SAFETY: the entry points at memory (the address, the socket) that
    // lives until its completion is read below, before this returns.
    unsafe { ring.submission().push(entry) }.context("the submission queue is full")?;
    ring.submit_and_wait(1).context("io_uring_enter")?;
    let done = ring.completion().next().context("no completion")?;
    Ok((done.result() < 0).then(|| errno_name(-done.result())))
}

fn errno_name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EADDRINUSE => "EADDRINUSE".into(),
        libc::EINVAL => "EINVAL (is IORING_OP_BIND supported? Linux 6.11+)".into(),
        other => format!("errno {other}"),
    }
}

fn bracketed(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    }
}

/// The address as the kernel takes it.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in; the write stays inside it.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
