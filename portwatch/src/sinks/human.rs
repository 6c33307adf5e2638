//! One aligned line per event, for people. Colour only on a terminal and
//! when NO_COLOR is unset.

use std::{
    collections::HashMap,
    io::{self, Write},
    net::IpAddr,
};

use super::{Sink, Summary};
use crate::model::{DropReason, Event, EventKind, Exposure, Listener, Origin};

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[1;31m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

pub struct HumanSink<W: Write> {
    out: W,
    colour: bool,
    /// Our own network namespace: others are named on the line.
    host_netns: Option<u64>,
    users: HashMap<u32, String>,
    header_done: bool,
}

impl<W: Write> HumanSink<W> {
    pub fn new(out: W, colour: bool, host_netns: Option<u64>) -> Self {
        Self {
            out,
            colour,
            host_netns,
            users: HashMap::new(),
            header_done: false,
        }
    }

    fn paint(&self, colour: &'static str) -> (&'static str, &'static str) {
        if self.colour {
            (colour, RESET)
        } else {
            ("", "")
        }
    }

    fn user(&mut self, uid: Option<u32>) -> String {
        let Some(uid) = uid else {
            return "-".into();
        };
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_else(|| uid.to_string())
            })
            .clone()
    }

    fn listener_line(
        &mut self,
        time: &str,
        kind: EventKind,
        origin: Origin,
        l: &Listener,
        exposure: Option<Exposure>,
    ) -> io::Result<()> {
        let (on, off) = self.paint(match kind {
            EventKind::Listen => GREEN,
            EventKind::Close => YELLOW,
        });
        let (dim, undim) = self.paint(DIM);
        let kind = match kind {
            EventKind::Listen => "listen",
            EventKind::Close => "close",
        };
        let origin = match origin {
            Origin::Snapshot => "snap",
            Origin::Live => "live",
        };
        let p = &l.process;
        let user = self.user(p.uid);
        let pid = p.pid.map_or_else(|| "-".to_string(), |pid| pid.to_string());
        let comm = p.comm.as_deref().unwrap_or("-");
        let command = p.cmdline.as_deref().or(p.exe.as_deref()).unwrap_or("");
        let exposure = match exposure {
            None => String::new(),
            Some(Exposure::Exposed) => {
                format!("{}exposed{} ", self.paint(RED).0, self.paint(RED).1)
            }
            Some(Exposure::Partial) => "partial ".to_string(),
            Some(Exposure::Blocked) => "blocked ".to_string(),
        };
        let netns = match l.netns {
            Some(ns) if Some(ns) != self.host_netns => format!(" netns={ns}"),
            _ => String::new(),
        };
        writeln!(
            self.out,
            "{dim}{time}{undim} {on}{kind:<6}{off} {origin:<4} {proto:<3} {addr:<26} {pid:>7} {comm:<15} {user:<10} {exposure}{command}{dim}{netns}{undim}",
            proto = l.proto.as_str(),
            addr = endpoint(&l.addr, l.port),
        )
    }
}

fn reason_text(reason: DropReason) -> &'static str {
    match reason {
        DropReason::NoRule => "no rule permits the port",
        DropReason::SourceNotAllowed => "source not allowed",
        DropReason::Malformed => "malformed",
        DropReason::Fragment => "fragment without its first",
    }
}

/// `1.2.3.4:80`, `[::]:80`.
pub fn endpoint(addr: &IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn clock(ts: std::time::SystemTime) -> String {
    let dt = time::OffsetDateTime::from(ts);
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

impl<W: Write> Sink for HumanSink<W> {
    fn event(&mut self, event: &Event) -> io::Result<()> {
        if !self.header_done {
            self.header_done = true;
            let (dim, undim) = self.paint(DIM);
            writeln!(
                self.out,
                "{dim}{:<15} {:<6} {:<4} {:<3} {:<26} {:>7} {:<15} {:<10} COMMAND{undim}",
                "TIME (UTC)", "EVENT", "FROM", "PRO", "ADDRESS", "PID", "COMM", "USER"
            )?;
        }
        match event {
            Event::Listener(ev) => {
                self.listener_line(&clock(ev.ts), ev.kind, ev.origin, &ev.listener, ev.exposure)
            }
            Event::Drop(d) => {
                let (on, off) = self.paint(if d.audit { YELLOW } else { RED });
                let verb = if d.audit { "audit" } else { "drop" };
                let src = d
                    .src
                    .map_or_else(|| "?".to_string(), |a| endpoint(&a, d.src_port));
                writeln!(
                    self.out,
                    "{} {on}{verb:<6}{off} {:<4} {:<3} {src} -> port {} ({}) on {}",
                    clock(d.ts),
                    "",
                    super::json::proto_name(d.proto),
                    d.dst_port,
                    reason_text(d.reason),
                    d.iface.as_deref().unwrap_or("?"),
                )
            }
            Event::Policy(p) => {
                let (on, off) = self.paint(YELLOW);
                let by = match (p.by_uid, p.by_pid) {
                    (Some(uid), Some(pid)) => format!("by uid {uid}, pid {pid}"),
                    (Some(uid), None) => format!("by uid {uid}"),
                    _ => "by SIGHUP".to_string(),
                };
                writeln!(
                    self.out,
                    "{} {on}policy{off} {} ({by}; {} mode, {} rules)",
                    clock(p.ts),
                    p.change,
                    p.mode,
                    p.rules
                )
            }
            Event::Suppressed { ts, count, total } => writeln!(
                self.out,
                "{} {count} more drop reports held back by the rate limit ({total} in all)",
                clock(*ts)
            ),
            Event::Lost { ts, count, total } => {
                let (on, off) = self.paint(RED);
                writeln!(
                    self.out,
                    "{} {on}lost{off}   the kernel dropped {count} events (ring buffer full; {total} in all)",
                    clock(*ts)
                )
            }
            Event::Ready { ts, snapshot } => {
                let (dim, undim) = self.paint(DIM);
                writeln!(
                    self.out,
                    "{dim}{} ---- {snapshot} listeners at start; live events follow ----{undim}",
                    clock(*ts)
                )
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        let (on, off) = self.paint(if s.lost > 0 { RED } else { DIM });
        writeln!(
            self.out,
            "{on}summary: {} events, {} lost, {} malformed, {} listening at exit, {} drop reports ({} held back){off}",
            s.events, s.lost, s.malformed, s.listening, s.drops, s.suppressed
        )?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;
    use crate::model::{ListenerEvent, ProcessInfo, Proto, SockId};

    fn event(netns: u64) -> Event {
        Event::Listener(ListenerEvent {
            ts: UNIX_EPOCH + Duration::from_micros(3_723_000_042),
            kind: EventKind::Listen,
            origin: Origin::Live,
            listener: Listener {
                proto: Proto::Tcp,
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port: 8765,
                sock_id: SockId::KernelAddr(1),
                netns: Some(netns),
                process: ProcessInfo {
                    pid: Some(4242),
                    comm: Some("python3".into()),
                    uid: Some(0),
                    exe: Some("/usr/bin/python3.11".into()),
                    cmdline: Some("python3 -m http.server 8765".into()),
                    cgroup: None,
                },
            },
            exposure: None,
        })
    }

    fn render(colour: bool, ev: &Event) -> String {
        let mut sink = HumanSink::new(Vec::new(), colour, Some(1));
        sink.event(ev).expect("writes");
        String::from_utf8(sink.out).expect("utf-8")
    }

    #[test]
    fn plain_line_has_columns_and_no_escapes() {
        let text = render(false, &event(1));
        let line = text.lines().nth(1).expect("header then event");
        assert!(!text.contains('\x1b'));
        assert!(
            line.starts_with("01:02:03.000042 listen live tcp 0.0.0.0:8765"),
            "{line}"
        );
        assert!(line.contains(" 4242 python3 "), "{line}");
        assert!(line.ends_with("python3 -m http.server 8765"), "{line}");
    }

    #[test]
    fn colour_and_foreign_netns() {
        let text = render(true, &event(99));
        assert!(text.contains(GREEN) && text.contains(RESET));
        assert!(text.contains("netns=99"));
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        assert_eq!(endpoint(&"::1".parse().expect("addr"), 53), "[::1]:53");
    }
}
