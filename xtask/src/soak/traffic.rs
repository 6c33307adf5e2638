//! Bounded-rate probes from the client namespace to the server's ports,
//! sent by this process from threads that entered the namespace, and how
//! they ended.

use std::{
    io::{ErrorKind, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    sync::{Arc, atomic::Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::{
    ANSWER_WAIT, DROP_WAIT, PROBE_EVERY, Progress, TCP_DENIED, TCP_FLIP, TCP_OPEN, UDP_DENIED,
    UDP_OPEN,
    schedule::{next_tick, sleep_until},
};

/// How probes of one kind ended.
#[derive(Default, Debug)]
pub struct Tally {
    pub attempts: u64,
    /// Connected and the server's "hi" came / the datagram came back.
    pub answered: u64,
    /// Connected, but no "hi".
    pub connected: u64,
    /// A reset: the SYN reached the server's stack.
    pub refused: u64,
    /// No handshake / no echo in time.
    pub timed_out: u64,
    pub other: u64,
    pub other_example: Option<String>,
}

impl Tally {
    pub fn json(&self) -> Value {
        json!({
            "attempts": self.attempts,
            "answered": self.answered,
            "connected_without_answer": self.connected,
            "refused": self.refused,
            "timed_out": self.timed_out,
            "other_errors": self.other,
            "other_example": self.other_example,
        })
    }

    /// Probes that got past the XDP program.
    pub fn through(&self) -> u64 {
        self.answered + self.connected + self.refused
    }

    fn tcp(&mut self, to: SocketAddr, wait: Duration) {
        self.attempts += 1;
        match TcpStream::connect_timeout(&to, wait) {
            Ok(mut conn) => {
                let _ = conn.set_read_timeout(Some(ANSWER_WAIT));
                let mut got = Vec::new();
                let mut buf = [0u8; 16];
                while !got.starts_with(b"hi") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if got.starts_with(b"hi") {
                    self.answered += 1;
                } else {
                    self.connected += 1;
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => self.refused += 1,
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                self.timed_out += 1;
            }
            Err(e) => {
                self.other += 1;
                self.other_example.get_or_insert_with(|| e.to_string());
            }
        }
    }

    /// Sends datagram `seq` from `socket` to `to`; with `wait`, waits that
    /// long for it to come back (older echoes are skipped).
    fn udp(&mut self, socket: &UdpSocket, to: SocketAddr, seq: u64, wait: Option<Duration>) {
        self.attempts += 1;
        let payload = format!("soak {seq}");
        if let Err(e) = socket.send_to(payload.as_bytes(), to) {
            self.other += 1;
            self.other_example.get_or_insert_with(|| e.to_string());
            return;
        }
        let Some(wait) = wait else {
            return;
        };
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
                self.timed_out += 1;
                return;
            }
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == payload.as_bytes() => {
                    self.answered += 1;
                    return;
                }
                Ok(_) => {}
                Err(_) => {
                    self.timed_out += 1;
                    return;
                }
            }
        }
    }

    /// Echoes that arrived for datagrams sent without waiting (a denied
    /// port must send none: they would mean the datagram got through).
    fn drain_echoes(&mut self, socket: &UdpSocket) {
        let mut buf = [0u8; 512];
        while socket.recv_from(&mut buf).is_ok() {
            self.answered += 1;
        }
    }
}

/// Probes of every kind, from the client namespace.
#[derive(Default, Debug)]
pub struct Traffic {
    pub tcp_open: Tally,
    pub tcp_denied: Tally,
    pub tcp_flip: Tally,
    pub udp_open: Tally,
    pub udp_denied: Tally,
}

/// One thread per probe kind in the namespace at `netns`, until the run
/// stops.
pub fn spawn_traffic(
    netns: &Path,
    server: IpAddr,
    progress: &Arc<Progress>,
) -> Vec<JoinHandle<Result<(&'static str, Tally)>>> {
    let at = |port| SocketAddr::new(server, port);
    let kinds: [(&'static str, SocketAddr); 5] = [
        ("tcp_open", at(TCP_OPEN)),
        ("tcp_denied", at(TCP_DENIED)),
        ("tcp_flip", at(TCP_FLIP)),
        ("udp_open", at(UDP_OPEN)),
        ("udp_denied", at(UDP_DENIED)),
    ];
    kinds
        .into_iter()
        .map(|(kind, to)| {
            let netns = netns.to_path_buf();
            let progress = progress.clone();
            std::thread::spawn(move || -> Result<(&'static str, Tally)> {
                portwatch_lab::netns::enter(&netns)?;
                let mut tally = Tally::default();
                let any = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
                let socket = UdpSocket::bind(any).context("a UDP client socket")?;
                if kind == "udp_denied" {
                    socket.set_nonblocking(true)?;
                }
                let mut tick = Instant::now();
                let mut seq = 0;
                while sleep_until(tick) {
                    match kind {
                        "tcp_open" => tally.tcp(to, ANSWER_WAIT),
                        "tcp_denied" | "tcp_flip" => tally.tcp(to, DROP_WAIT),
                        "udp_open" => tally.udp(&socket, to, seq, Some(ANSWER_WAIT)),
                        _ => {
                            tally.udp(&socket, to, seq, None);
                            tally.drain_echoes(&socket);
                        }
                    }
                    seq += 1;
                    progress.probes.fetch_add(1, Ordering::Relaxed);
                    tick = next_tick(tick, PROBE_EVERY);
                }
                if kind == "udp_denied" {
                    // A last look for late echoes.
                    std::thread::sleep(Duration::from_millis(300));
                    tally.drain_echoes(&socket);
                }
                Ok((kind, tally))
            })
        })
        .collect()
}

/// Waits for the probe threads; their tallies, or the last error one of
/// them ended with.
pub fn join_traffic(threads: Vec<JoinHandle<Result<(&'static str, Tally)>>>) -> Result<Traffic> {
    let mut probes = Traffic::default();
    let mut error = None;
    for t in threads {
        match t.join() {
            Ok(Ok((kind, tally))) => match kind {
                "tcp_open" => probes.tcp_open = tally,
                "tcp_denied" => probes.tcp_denied = tally,
                "tcp_flip" => probes.tcp_flip = tally,
                "udp_open" => probes.udp_open = tally,
                _ => probes.udp_denied = tally,
            },
            Ok(Err(e)) => error = Some(e),
            Err(_) => error = Some(anyhow::anyhow!("a traffic thread panicked")),
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(probes),
    }
}
