//! One aligned line per event, for people. Colour only on a terminal and
//! when NO_COLOR is unset; the last column is cut to the terminal's width.
//! Drop reports are summed per source, port and reason over 5-second
//! windows ("12 SYNs from 203.0.113.7 to tcp/6379 dropped in the last 5 s"):
//! a scan must not scroll everything else away. Listeners the policy blocks
//! are flagged at once for a process's first in a window, and its others
//! summed at the window's end ("python3 (pid 11394): 14999 more listeners
//! blocked by policy in the last 5 s"); `--json` keeps every one.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::{Sink, Summary};
use crate::{
    format::{UserNames, endpoint, proto_name, time_of_day_micros as clock, truncate},
    model::{DropEvent, DropReason, Event, EventKind, Exposure, Listener, Origin, Reach},
};

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[1;31m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// How long drop reports are summed before a line is written.
pub const DROP_WINDOW: Duration = Duration::from_secs(5);

/// What drop reports are summed by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DropKey {
    src: Option<IpAddr>,
    proto: u8,
    port: u16,
    reason: DropReason,
    audit: bool,
    iface: Option<String>,
}

pub struct HumanSink<W: Write> {
    out: W,
    colour: bool,
    /// Our own network namespace: others are named on the line.
    host_netns: Option<u64>,
    users: UserNames,
    header_done: bool,
    /// Terminal width to cut lines to; None when not a terminal.
    width: Option<usize>,
    drops: BTreeMap<DropKey, u64>,
    /// Processes flagged for a blocked listener in this window, with the
    /// ones not written since; the first of each is written at once.
    violators: BTreeMap<Violator, u64>,
    /// Drop reports the kernel held back in this window, and its count
    /// since start: one line a window, not one per batch of reports read
    /// (ten a second in a flood).
    held_back: u64,
    held_back_total: u64,
    /// When the window of what is summed (drops, violations, reports held
    /// back) began.
    window_start: Option<SystemTime>,
}

/// Whose blocked listeners are summed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Violator {
    pid: u32,
    comm: std::sync::Arc<str>,
}

/// Column widths: the full layout, or a compact one for narrow terminals
/// (seconds only, no FROM column, shorter names) so 80 columns still fit.
struct Columns {
    time: usize,
    origin: bool,
    addr: usize,
    pid: usize,
    comm: usize,
    user: usize,
}

impl Columns {
    const FULL: Columns = Columns {
        time: 15,
        origin: true,
        addr: 26,
        pid: 7,
        comm: 15,
        user: 10,
    };
    const COMPACT: Columns = Columns {
        time: 8,
        origin: false,
        addr: 22,
        pid: 6,
        comm: 12,
        user: 8,
    };

    /// Visible width of everything before the command.
    fn fixed(&self) -> usize {
        self.time
            + 1
            + 6
            + 1
            + if self.origin { 5 } else { 0 }
            + 3
            + 1
            + self.addr
            + 1
            + self.pid
            + 1
            + self.comm
            + 1
            + self.user
            + 1
    }
}

/// Columns of stdout when it is a terminal.
pub fn terminal_width() -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass; it fails
    // harmlessly (ENOTTY) when stdout is not a terminal.
    let ret = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (ret == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

impl<W: Write> HumanSink<W> {
    pub fn new(out: W, colour: bool, host_netns: Option<u64>) -> Self {
        Self {
            out,
            colour,
            host_netns,
            users: UserNames::default(),
            header_done: false,
            width: None,
            drops: BTreeMap::new(),
            violators: BTreeMap::new(),
            held_back: 0,
            held_back_total: 0,
            window_start: None,
        }
    }

    /// Cut lines to `width` columns (a terminal's).
    pub fn with_width(mut self, width: Option<usize>) -> Self {
        self.width = width;
        self
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
        self.users.name(uid)
    }

    fn columns(&self) -> &'static Columns {
        match self.width {
            Some(w) if w < 130 => &Columns::COMPACT,
            _ => &Columns::FULL,
        }
    }

    /// Writes `fixed` (already aligned, maybe coloured, `visible` columns
    /// wide) followed by `tail` cut to what is left of the width.
    fn line(&mut self, fixed: &str, visible: usize, tail: &str) -> io::Result<()> {
        let tail = match self.width {
            Some(width) => truncate(tail, width.saturating_sub(visible)),
            None => tail.to_string(),
        };
        writeln!(self.out, "{fixed}{tail}")
    }

    fn listener_line(
        &mut self,
        ts: SystemTime,
        kind: EventKind,
        origin: Origin,
        l: &Listener,
        reach: Option<&Reach>,
    ) -> io::Result<()> {
        let time = &clock(ts);
        let exposure = reach.map(|r| r.exposure);
        let unguarded = reach.map(|r| r.unguarded.join(",")).unwrap_or_default();
        let (on, off) = self.paint(match kind {
            EventKind::Listen => GREEN,
            EventKind::Close => YELLOW,
        });
        let (dim, undim) = self.paint(DIM);
        let kind_text = match kind {
            EventKind::Listen => "listen",
            EventKind::Close => "close",
        };
        let origin = match origin {
            Origin::Snapshot => "snap",
            Origin::Live => "live",
            Origin::Inferred => "late",
        };
        let p = &l.process;
        let c = self.columns();
        let user = truncate(&self.user(p.uid), c.user);
        let pid = p.pid.map_or_else(|| "-".to_string(), |pid| pid.to_string());
        let comm = truncate(p.comm.as_deref().unwrap_or("-"), c.comm);
        let (exp_on, exp_off) = self.paint(match exposure {
            Some(Exposure::Exposed) => RED,
            Some(Exposure::Partial) => YELLOW,
            _ => "",
        });
        let exposure_text = match exposure {
            None => "",
            Some(Exposure::Exposed) => "exposed",
            Some(Exposure::Partial) => "partial",
            Some(Exposure::Blocked) => "blocked",
        };
        let addr = truncate(&endpoint(&l.addr, l.port), c.addr);
        let time = &time[..c.time.min(time.len())];
        let origin = if c.origin {
            format!("{origin:<4} ")
        } else {
            String::new()
        };
        let mut fixed = format!(
            "{dim}{time}{undim} {on}{kind_text:<6}{off} {origin}{proto:<3} {addr:<aw$} {pid:>pw$} {comm:<cw$} {user:<uw$} ",
            proto = l.proto.as_str(),
            aw = c.addr,
            pw = c.pid,
            cw = c.comm,
            uw = c.user,
        );
        let mut visible = c.fixed();
        if exposure.is_some() {
            fixed.push_str(&format!("{exp_on}{exposure_text:<7}{exp_off} "));
            visible += 8;
        }
        let netns = match l.netns {
            Some(ns) if Some(ns) != self.host_netns => format!(" netns={ns}"),
            _ => String::new(),
        };
        let via = if unguarded.is_empty() {
            String::new()
        } else {
            format!(" via {unguarded} (not guarded)")
        };
        let command = p.cmdline.as_deref().or(p.exe.as_deref()).unwrap_or("");
        self.line(&fixed, visible, &format!("{command}{netns}{via}"))?;
        // A listener the policy blocks is a violation: someone started a
        // service the network cannot (or should not) reach.
        let policy_blocks = reach.map(|r| r.policy) == Some(Exposure::Blocked);
        if kind == EventKind::Listen && policy_blocks && !l.addr.is_loopback() {
            let violator = Violator {
                pid: p.pid.unwrap_or(0),
                comm: p.comm.clone().unwrap_or_else(|| "?".into()),
            };
            self.window_start.get_or_insert(ts);
            if let Some(more) = self.violators.get_mut(&violator) {
                // Flagged once in this window: summed at its end.
                *more += 1;
                return Ok(());
            }
            self.violators.insert(violator, 0);
            let (on, off) = self.paint(RED);
            let but = if unguarded.is_empty() {
                String::new()
            } else {
                format!(", but reachable via {unguarded} where no guard runs")
            };
            let text = format!(
                "{} (pid {pid}) listens on {}: blocked by policy{but}",
                p.comm.as_deref().unwrap_or("?"),
                endpoint(&l.addr, l.port)
            );
            let fixed = format!("{dim}{time}{undim} {on}! ");
            let visible = 15 + 1 + 2;
            let text = match self.width {
                Some(width) => truncate(&text, width.saturating_sub(visible)),
                None => text,
            };
            writeln!(self.out, "{fixed}{text}{off}")?;
        }
        Ok(())
    }

    fn add_drop(&mut self, d: &DropEvent) {
        self.window_start.get_or_insert(d.ts);
        let key = DropKey {
            src: d.src,
            proto: d.proto,
            port: d.dst_port,
            reason: d.reason,
            audit: d.audit,
            iface: d.iface.clone(),
        };
        *self.drops.entry(key).or_insert(0) += 1;
    }

    /// Writes one line per (source, port, reason) summed since the window
    /// began, and one per process with blocked listeners not yet written.
    fn flush_window(&mut self, now: SystemTime) -> io::Result<()> {
        let Some(start) = self.window_start.take() else {
            return Ok(());
        };
        let window = now
            .duration_since(start)
            .unwrap_or_default()
            .max(DROP_WINDOW);
        for (v, more) in std::mem::take(&mut self.violators) {
            if more == 0 {
                continue;
            }
            let (on, off) = self.paint(RED);
            let fixed = format!("{} {on}! ", clock(now));
            let noun = if more == 1 { "listener" } else { "listeners" };
            let text = format!(
                "{} (pid {}): {more} more {noun} blocked by policy in the last {} s{off}",
                v.comm,
                v.pid,
                window.as_secs()
            );
            self.line(&fixed, 15 + 1 + 2, &text)?;
        }
        let mut rows: Vec<(DropKey, u64)> = std::mem::take(&mut self.drops).into_iter().collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (key, count) in rows {
            let (on, off) = self.paint(if key.audit { YELLOW } else { RED });
            let what = match (key.proto, count) {
                (6, 1) => "SYN",
                (6, _) => "SYNs",
                (17, 1) => "datagram",
                (17, _) => "datagrams",
                (_, 1) => "packet",
                _ => "packets",
            };
            let src = key.src.map_or_else(|| "?".to_string(), |a| a.to_string());
            let verb = if key.audit {
                "would have been dropped (audit)"
            } else {
                "dropped"
            };
            let why = match key.reason {
                DropReason::NoRule => String::new(),
                other => format!(", {}", reason_text(other)),
            };
            let on_iface = key
                .iface
                .as_deref()
                .map(|i| format!(" on {i}"))
                .unwrap_or_default();
            let tag = if key.audit { "audit" } else { "drop" };
            let fixed = format!("{} {on}{tag:<6}{off} ", clock(now));
            let text = format!(
                "{count} {what} from {src} to {}/{} {verb} in the last {} s{why}{on_iface}",
                proto_name(key.proto),
                key.port,
                window.as_secs()
            );
            self.line(&fixed, 15 + 1 + 6 + 1, &text)?;
        }
        let held_back = std::mem::take(&mut self.held_back);
        if held_back > 0 {
            let fixed = format!("{} {:<6} ", clock(now), "drop");
            let text = format!(
                "{held_back} more drop reports held back by the kernel's rate limit in the last {} s ({} in all)",
                window.as_secs(),
                self.held_back_total
            );
            self.line(&fixed, 15 + 1 + 6 + 1, &text)?;
        }
        Ok(())
    }
}

fn reason_text(reason: DropReason) -> &'static str {
    match reason {
        DropReason::NoRule => "no rule permits the port",
        DropReason::SourceNotAllowed => "source not allowed",
        DropReason::Malformed => "malformed",
        DropReason::Fragment => "fragment without its first",
        DropReason::RateLimited => "over the rule's limit",
    }
}

impl<W: Write> Sink for HumanSink<W> {
    fn event(&mut self, event: &Event) -> io::Result<()> {
        if !self.header_done {
            self.header_done = true;
            let (dim, undim) = self.paint(DIM);
            let c = self.columns();
            let from = if c.origin { "FROM " } else { "" };
            let header = format!(
                "{:<tw$} {:<6} {from}{:<3} {:<aw$} {:>pw$} {:<cw$} {:<uw$} COMMAND",
                if c.origin { "TIME (UTC)" } else { "TIME" },
                "EVENT",
                "PRO",
                "ADDRESS",
                "PID",
                "COMM",
                "USER",
                tw = c.time,
                aw = c.addr,
                pw = c.pid,
                cw = c.comm,
                uw = c.user,
            );
            let header = match self.width {
                Some(width) => truncate(&header, width),
                None => header,
            };
            writeln!(self.out, "{dim}{header}{undim}")?;
        }
        match event {
            Event::Listener(ev) => {
                self.listener_line(ev.ts, ev.kind, ev.origin, &ev.listener, ev.reach.as_ref())
            }
            Event::Drop(d) => {
                self.add_drop(d);
                Ok(())
            }
            Event::Interface {
                ts,
                iface,
                change,
                xdp_mode,
            } => {
                let (on, off) = self.paint(RED);
                let fixed = format!("{} {on}iface{off}  ", clock(*ts));
                let text = match xdp_mode {
                    Some(mode) => format!("{iface}: {change} ({})", mode.hook()),
                    None => format!("{iface}: {change}"),
                };
                self.line(&fixed, 15 + 1 + 6 + 1, &text)
            }
            Event::Policy(p) => {
                let (on, off) = self.paint(YELLOW);
                let by = match (p.by.uid, p.by.pid) {
                    (Some(uid), Some(pid)) => format!("by uid {uid}, pid {pid}"),
                    (Some(uid), None) => format!("by uid {uid}"),
                    _ => "by SIGHUP".to_string(),
                };
                let fixed = format!("{} {on}policy{off} ", clock(p.ts));
                let text = format!("{} ({by}; {} mode, {} rules)", p.change, p.mode, p.rules);
                self.line(&fixed, 15 + 1 + 6 + 1, &text)
            }
            Event::Gate(g) => {
                let (on, off) = self.paint(if g.open { GREEN } else { YELLOW });
                let fixed = format!("{} {on}{:<6}{off} ", clock(g.ts), "gate");
                let text = if g.open {
                    let who = crate::format::process(g.comm.as_deref(), g.pid);
                    format!("port {} opened: {who} listens (owner {})", g.port, g.owner)
                } else {
                    format!("port {} closed: owner gone (owner {})", g.port, g.owner)
                };
                self.line(&fixed, 15 + 1 + 6 + 1, &text)
            }
            Event::NotOwner(n) => {
                let (on, off) = self.paint(YELLOW);
                let fixed = format!("{} {on}{:<6}{off} ", clock(n.ts), "owner");
                self.line(&fixed, 15 + 1 + 6 + 1, &crate::format::not_owner(n))
            }
            Event::Bind(b) => {
                let (on, off) = self.paint(if b.audit { YELLOW } else { RED });
                let fixed = format!("{} {on}{:<6}{off} ", clock(b.ts), "bind");
                self.line(&fixed, 15 + 1 + 6 + 1, &crate::format::bind(b))
            }
            Event::Suppressed { ts, count, total } => {
                self.window_start.get_or_insert(*ts);
                self.held_back += count;
                self.held_back_total = *total;
                Ok(())
            }
            Event::Missed { ts, count, total } => {
                let (on, off) = self.paint(RED);
                let fixed = format!("{} {on}missed{off} ", clock(*ts));
                let text = format!(
                    "this stream could not keep up and missed {count} events ({total} in all); \
                     the listeners now follow"
                );
                self.line(&fixed, 15 + 1 + 6 + 1, &text)
            }
            Event::Lost { ts, count, total } => {
                let (on, off) = self.paint(RED);
                let fixed = format!("{} {on}lost{off}   ", clock(*ts));
                let text =
                    format!("the kernel dropped {count} events (ring buffer full; {total} in all)");
                self.line(&fixed, 15 + 1 + 6 + 1, &text)
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

    fn next_tick(&self) -> Option<SystemTime> {
        self.window_start.map(|start| start + DROP_WINDOW)
    }

    fn tick(&mut self, now: SystemTime) -> io::Result<()> {
        if self.next_tick().is_some_and(|due| now >= due) {
            self.flush_window(now)?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        self.flush_window(SystemTime::now())?;
        let (on, off) = self.paint(if s.lost > 0 { RED } else { DIM });
        writeln!(
            self.out,
            "{on}summary: {} events ({} inferred), {} lost, {} malformed, {} listening at exit, {} drop reports ({} held back){off}",
            s.events, s.inferred, s.lost, s.malformed, s.listening, s.drops, s.suppressed
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

    fn guarded(e: Exposure) -> Option<Reach> {
        Some(Reach::guarded(e))
    }

    fn listen(netns: u64, reach: Option<Reach>) -> Event {
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
                }
                .into(),
            },
            reach,
        })
    }

    fn drop_event(secs: u64, src: [u8; 4], port: u16) -> Event {
        Event::Drop(DropEvent {
            ts: UNIX_EPOCH + Duration::from_secs(secs),
            iface: Some("eth0".into()),
            reason: DropReason::NoRule,
            proto: 6,
            src: Some(IpAddr::V4(Ipv4Addr::from(src))),
            dst: None,
            src_port: 40000,
            dst_port: port,
            audit: false,
        })
    }

    fn render(colour: bool, width: Option<usize>, events: &[Event]) -> String {
        let mut sink = HumanSink::new(Vec::new(), colour, Some(1)).with_width(width);
        for ev in events {
            sink.event(ev).expect("writes");
        }
        String::from_utf8(sink.out).expect("utf-8")
    }

    #[test]
    fn an_owned_port_says_who_opened_it_and_when_it_closed() {
        let gate = |open: bool| {
            Event::Gate(crate::model::GateEvent {
                ts: UNIX_EPOCH + Duration::from_secs(1),
                port: "tcp/6379".into(),
                open,
                pid: open.then_some(812),
                comm: open.then(|| "redis-server".into()),
                owner: "unit redis-server.service".into(),
            })
        };
        let text = render(false, None, &[gate(true), gate(false)]);
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert!(
            lines[0].ends_with(
                "gate   port tcp/6379 opened: redis-server (pid 812) listens (owner unit \
                 redis-server.service)"
            ),
            "{text}"
        );
        assert!(
            lines[1].ends_with(
                "gate   port tcp/6379 closed: owner gone (owner unit redis-server.service)"
            ),
            "{text}"
        );
    }

    #[test]
    fn plain_line_has_columns_and_no_escapes() {
        let text = render(false, None, &[listen(1, None)]);
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
        let text = render(true, None, &[listen(99, None)]);
        assert!(text.contains(GREEN) && text.contains(RESET));
        assert!(text.contains("netns=99"));
    }

    #[test]
    fn lines_fit_the_terminal_width() {
        for width in [80, 100, 200] {
            let text = render(false, Some(width), &[listen(1, guarded(Exposure::Exposed))]);
            for line in text.lines() {
                let cols = line.chars().count();
                assert!(cols <= width, "{cols} columns at width {width}: {line}");
            }
            assert!(text.contains("exposed"), "{text}");
            // The command is what gives way: cut (with a mark) or whole.
            let whole = text.contains("python3 -m http.server 8765");
            assert_eq!(whole, width == 200, "{text}");
            if width == 100 {
                assert!(text.contains('…'), "{text}");
            }
        }
    }

    #[test]
    fn a_blocked_listener_is_flagged_as_a_violation() {
        let text = render(false, None, &[listen(1, guarded(Exposure::Blocked))]);
        let flag = text.lines().nth(2).expect("listen line, then the flag");
        assert!(
            flag.ends_with("! python3 (pid 4242) listens on 0.0.0.0:8765: blocked by policy"),
            "{flag}"
        );
        let exposed = render(false, None, &[listen(1, guarded(Exposure::Exposed))]);
        assert!(!exposed.contains("blocked by policy"));
    }

    #[test]
    fn a_way_in_without_a_guard_is_named() {
        let reach = Reach {
            exposure: Exposure::Exposed,
            policy: Exposure::Blocked,
            unguarded: vec!["eth1".into(), "wg0".into()],
        };
        let text = render(false, None, &[listen(1, Some(reach))]);
        let mut lines = text.lines().skip(1);
        let line = lines.next().expect("listen line");
        assert!(line.contains(" exposed "), "{line}");
        assert!(line.ends_with("via eth1,wg0 (not guarded)"), "{line}");
        let flag = lines.next().expect("flag line");
        assert!(
            flag.ends_with("blocked by policy, but reachable via eth1,wg0 where no guard runs"),
            "{flag}"
        );
    }

    #[test]
    fn drops_are_summed_per_source_and_port_over_the_window() {
        let mut sink = HumanSink::new(Vec::new(), false, Some(1));
        for i in 0..12 {
            sink.event(&drop_event(100 + i % 3, [203, 0, 113, 7], 6379))
                .expect("writes");
        }
        sink.event(&drop_event(101, [198, 51, 100, 1], 22))
            .expect("writes");
        assert_eq!(
            sink.next_tick(),
            Some(UNIX_EPOCH + Duration::from_secs(105))
        );
        // Before the window ends nothing is written but the header.
        sink.tick(UNIX_EPOCH + Duration::from_secs(104))
            .expect("ticks");
        assert_eq!(String::from_utf8_lossy(&sink.out).lines().count(), 1);
        sink.tick(UNIX_EPOCH + Duration::from_secs(105))
            .expect("ticks");
        let text = String::from_utf8(sink.out.clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0]
                .ends_with("12 SYNs from 203.0.113.7 to tcp/6379 dropped in the last 5 s on eth0"),
            "{text}"
        );
        assert!(
            lines[1].contains("1 SYN from 198.51.100.1 to tcp/22"),
            "{text}"
        );
        assert_eq!(sink.next_tick(), None, "the window closed");
    }

    #[test]
    fn a_burst_of_blocked_listeners_is_flagged_once_then_summed_per_process() {
        let blocked = |pid: u32, port: u16| {
            let Event::Listener(mut ev) = listen(1, guarded(Exposure::Blocked)) else {
                unreachable!("listen() makes a listener event")
            };
            std::sync::Arc::make_mut(&mut ev.listener.process).pid = Some(pid);
            ev.listener.port = port;
            Event::Listener(ev)
        };
        let mut sink = HumanSink::new(Vec::new(), false, Some(1));
        for port in 0..1000 {
            sink.event(&blocked(11394, 10_000 + port)).expect("writes");
        }
        sink.event(&blocked(77, 9000)).expect("writes");
        let flags = |sink: &HumanSink<Vec<u8>>| {
            String::from_utf8_lossy(&sink.out)
                .lines()
                .filter(|l| l.contains(" ! "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        // Each process's first at once, with its address.
        let now = flags(&sink);
        assert_eq!(now.len(), 2, "{now:?}");
        assert!(
            now[0].ends_with("python3 (pid 11394) listens on 0.0.0.0:10000: blocked by policy")
        );
        assert!(now[1].ends_with("python3 (pid 77) listens on 0.0.0.0:9000: blocked by policy"));
        // The rest summed when the window ends; every listener still has its line.
        let due = sink.next_tick().expect("a window is open");
        sink.tick(due).expect("ticks");
        let all = flags(&sink);
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(
            all[2].ends_with(
                "python3 (pid 11394): 999 more listeners blocked by policy in the last 5 s"
            ),
            "{all:?}"
        );
        let listens = String::from_utf8_lossy(&sink.out)
            .lines()
            .filter(|l| l.contains(" listen "))
            .count();
        assert_eq!(listens, 1001);
        // A new window flags the process's next one at once again.
        sink.event(&blocked(11394, 20_000)).expect("writes");
        assert_eq!(flags(&sink).len(), 4);
    }

    #[test]
    fn reports_held_back_are_summed_per_window_with_the_drops() {
        let held = |secs: u64, count: u64, total: u64| Event::Suppressed {
            ts: UNIX_EPOCH + Duration::from_secs(secs),
            count,
            total,
        };
        let mut sink = HumanSink::new(Vec::new(), false, Some(1));
        // A flood: reports read ten times a second, each batch with some held back.
        for (i, count) in [40, 35, 50].into_iter().enumerate() {
            sink.event(&drop_event(1, [198, 51, 100, 7], 6379))
                .expect("writes");
            sink.event(&held(1, count, 1000 + i as u64))
                .expect("writes");
        }
        assert!(!String::from_utf8_lossy(&sink.out).contains("held back"));
        let due = sink.next_tick().expect("a window is open");
        sink.tick(due).expect("ticks");
        let text = String::from_utf8_lossy(&sink.out).to_string();
        let held_lines: Vec<&str> = text.lines().filter(|l| l.contains("held back")).collect();
        assert_eq!(held_lines.len(), 1, "{text}");
        assert!(
            held_lines[0].ends_with(
                "drop   125 more drop reports held back by the kernel's rate limit in the last 5 s \
                 (1002 in all)"
            ),
            "{text}"
        );
        assert!(
            text.contains("3 SYNs from 198.51.100.7 to tcp/6379 dropped"),
            "{text}"
        );
        // Nothing held back since: the next window says nothing of it.
        sink.event(&drop_event(20, [198, 51, 100, 7], 6379))
            .expect("writes");
        let due = sink.next_tick().expect("a window is open");
        sink.tick(due).expect("ticks");
        let text = String::from_utf8_lossy(&sink.out).to_string();
        assert_eq!(text.lines().filter(|l| l.contains("held back")).count(), 1);
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        assert_eq!(endpoint(&"::1".parse().expect("addr"), 53), "[::1]:53");
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(truncate("abc", 0), "");
    }
}
