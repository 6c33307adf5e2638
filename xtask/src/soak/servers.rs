//! The lab's servers, in the server namespace: run by this process on
//! threads (sockets bound after entering the namespace), counting what
//! reaches each port.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::{TCP_DENIED, TCP_FLIP, TCP_OPEN, UDP_DENIED, UDP_OPEN, schedule::signalled};

/// What reached the servers, per port.
#[derive(Default)]
pub struct ServerCounts {
    pub tcp_open: AtomicU64,
    pub tcp_denied: AtomicU64,
    pub tcp_flip: AtomicU64,
    pub udp_open: AtomicU64,
    pub udp_denied: AtomicU64,
}

pub struct Servers {
    pub counts: Arc<ServerCounts>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Binds every server socket in the namespace at `netns` (0.0.0.0) and serves each on a
    /// thread until [`Servers::stop`].
    pub fn start(netns: &Path) -> Result<Self> {
        let (tcp, udp) = std::thread::scope(|s| {
            s.spawn(|| -> Result<_> {
                portwatch_lab::netns::enter(netns)?;
                let any = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
                let tcp = [TCP_OPEN, TCP_DENIED, TCP_FLIP].map(|port| {
                    TcpListener::bind(any(port)).with_context(|| format!("tcp/{port}"))
                });
                let udp = [UDP_OPEN, UDP_DENIED]
                    .map(|port| UdpSocket::bind(any(port)).with_context(|| format!("udp/{port}")));
                Ok((tcp, udp))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the server set-up thread panicked"))?
        })
        .context("binding the lab's servers")?;
        let [tcp_open, tcp_denied, tcp_flip] = tcp;
        let [udp_open, udp_denied] = udp;
        let counts = Arc::new(ServerCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (listener, pick) in [
            (
                tcp_open?,
                (|c| &c.tcp_open) as fn(&ServerCounts) -> &AtomicU64,
            ),
            (tcp_denied?, |c| &c.tcp_denied),
            (tcp_flip?, |c| &c.tcp_flip),
        ] {
            listener.set_nonblocking(true)?;
            let (counts, stop) = (counts.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                serve_tcp(&listener, pick(&counts), &stop);
            }));
        }
        for (socket, pick) in [
            (
                udp_open?,
                (|c| &c.udp_open) as fn(&ServerCounts) -> &AtomicU64,
            ),
            (udp_denied?, |c| &c.udp_denied),
        ] {
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (counts, stop) = (counts.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                serve_udp(&socket, pick(&counts), &stop);
            }));
        }
        Ok(Self {
            counts,
            stop,
            threads,
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts (polling: the listener is non-blocking, so a stop is seen) and
/// says "hi" to every connection.
fn serve_tcp(listener: &TcpListener, accepted: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) && !signalled() {
        match listener.accept() {
            Ok((mut conn, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let _ = conn.set_nonblocking(false);
                let _ = conn.write_all(b"hi\n");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Echoes every datagram back to its sender.
fn serve_udp(socket: &UdpSocket, received: &AtomicU64, stop: &AtomicBool) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) && !signalled() {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            received.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}
