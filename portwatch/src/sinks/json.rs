//! JSON Lines: one object per event, for machines. The schema is in README.md.

use std::io::{self, Write};

use serde::Serialize;

use super::{Sink, Summary, rfc3339_micros};
use crate::model::{DropReason, Event, EventKind, Exposure, Family, Origin, Proto};

#[derive(Serialize)]
struct ListenerLine<'a> {
    ts: String,
    event: EventKind,
    origin: Origin,
    proto: Proto,
    family: Family,
    addr: String,
    port: u16,
    pid: Option<u32>,
    comm: Option<&'a str>,
    uid: Option<u32>,
    exe: Option<&'a str>,
    cmdline: Option<&'a str>,
    cgroup: Option<&'a str>,
    netns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exposure: Option<Exposure>,
}

#[derive(Serialize)]
struct DropLine<'a> {
    ts: String,
    event: &'static str,
    reason: DropReason,
    proto: String,
    src: Option<String>,
    src_port: u16,
    dst: Option<String>,
    dst_port: u16,
    iface: Option<&'a str>,
    audit: bool,
}

#[derive(Serialize)]
struct LostLine {
    ts: String,
    event: &'static str,
    count: u64,
    total: u64,
}

#[derive(Serialize)]
struct PolicyLine<'a> {
    ts: String,
    event: &'static str,
    change: &'a str,
    by_uid: Option<u32>,
    by_pid: Option<u32>,
    mode: crate::policy::Mode,
    rules: usize,
}

#[derive(Serialize)]
struct InterfaceLine<'a> {
    ts: String,
    event: &'static str,
    iface: &'a str,
    change: &'a str,
    xdp_mode: Option<&'static str>,
}

#[derive(Serialize)]
struct ReadyLine {
    ts: String,
    event: &'static str,
    snapshot: usize,
}

#[derive(Serialize)]
struct SummaryLine {
    event: &'static str,
    events: u64,
    lost: u64,
    malformed: u64,
    listening: usize,
    drops: u64,
    suppressed: u64,
}

/// `tcp`, `udp`, or the IP protocol number for others.
pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    fn line(&mut self, value: &impl Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")
    }
}

/// The JSON object of one event (exposed for tests and benches).
pub fn to_json(event: &Event) -> serde_json::Result<String> {
    let mut sink = JsonSink::new(Vec::new());
    sink.event(event).map_err(serde_json::Error::io)?;
    let mut text = String::from_utf8_lossy(&sink.out).into_owned();
    text.truncate(text.trim_end().len());
    Ok(text)
}

impl<W: Write> Sink for JsonSink<W> {
    fn event(&mut self, event: &Event) -> io::Result<()> {
        match event {
            Event::Listener(ev) => {
                let l = &ev.listener;
                let p = &l.process;
                self.line(&ListenerLine {
                    ts: rfc3339_micros(ev.ts),
                    event: ev.kind,
                    origin: ev.origin,
                    proto: l.proto,
                    family: l.family(),
                    addr: l.addr.to_string(),
                    port: l.port,
                    pid: p.pid,
                    comm: p.comm.as_deref(),
                    uid: p.uid,
                    exe: p.exe.as_deref(),
                    cmdline: p.cmdline.as_deref(),
                    cgroup: p.cgroup.as_deref(),
                    netns: l.netns,
                    exposure: ev.exposure,
                })
            }
            Event::Lost { ts, count, total } => self.line(&LostLine {
                ts: rfc3339_micros(*ts),
                event: "lost",
                count: *count,
                total: *total,
            }),
            Event::Ready { ts, snapshot } => self.line(&ReadyLine {
                ts: rfc3339_micros(*ts),
                event: "ready",
                snapshot: *snapshot,
            }),
            Event::Drop(d) => self.line(&DropLine {
                ts: rfc3339_micros(d.ts),
                event: "drop",
                reason: d.reason,
                proto: proto_name(d.proto),
                src: d.src.map(|a| a.to_string()),
                src_port: d.src_port,
                dst: d.dst.map(|a| a.to_string()),
                dst_port: d.dst_port,
                iface: d.iface.as_deref(),
                audit: d.audit,
            }),
            Event::Interface {
                ts,
                iface,
                change,
                xdp_mode,
            } => self.line(&InterfaceLine {
                ts: rfc3339_micros(*ts),
                event: "interface",
                iface,
                change,
                xdp_mode: *xdp_mode,
            }),
            Event::Policy(p) => self.line(&PolicyLine {
                ts: rfc3339_micros(p.ts),
                event: "policy",
                change: &p.change,
                by_uid: p.by_uid,
                by_pid: p.by_pid,
                mode: p.mode,
                rules: p.rules,
            }),
            Event::Suppressed { ts, count, total } => self.line(&LostLine {
                ts: rfc3339_micros(*ts),
                event: "suppressed",
                count: *count,
                total: *total,
            }),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        self.line(&SummaryLine {
            event: "summary",
            events: s.events,
            lost: s.lost,
            malformed: s.malformed,
            listening: s.listening,
            drops: s.drops,
            suppressed: s.suppressed,
        })?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv6Addr},
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;
    use crate::model::{Listener, ListenerEvent, ProcessInfo, SockId};

    #[test]
    fn listener_line_has_the_documented_fields() {
        let ev = Event::Listener(ListenerEvent {
            ts: UNIX_EPOCH + Duration::from_micros(1_795_000_000_000_001),
            kind: EventKind::Close,
            origin: Origin::Snapshot,
            listener: Listener {
                proto: Proto::Udp,
                addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                port: 5353,
                sock_id: SockId::Cookie(7),
                netns: Some(4026531840),
                process: ProcessInfo {
                    pid: Some(42),
                    comm: Some("avahi".into()),
                    uid: Some(0),
                    exe: None,
                    cmdline: Some("avahi-daemon -s".into()),
                    cgroup: None,
                },
            },
            exposure: None,
        });
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&ev).expect("serialises")).expect("valid JSON");
        assert_eq!(v["ts"], "2026-11-18T11:06:40.000001Z");
        assert_eq!(v["event"], "close");
        assert_eq!(v["origin"], "snapshot");
        assert_eq!(v["proto"], "udp");
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["addr"], "::");
        assert_eq!(v["port"], 5353);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "avahi");
        assert_eq!(v["uid"], 0);
        assert!(v["exe"].is_null());
        assert_eq!(v["cmdline"], "avahi-daemon -s");
        assert_eq!(v["netns"], 4026531840u64);
    }

    #[test]
    fn lost_and_summary_lines() {
        let ev = Event::Lost {
            ts: UNIX_EPOCH,
            count: 3,
            total: 10,
        };
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&ev).expect("serialises")).expect("valid JSON");
        assert_eq!(
            (
                v["event"].as_str(),
                v["count"].as_u64(),
                v["total"].as_u64()
            ),
            (Some("lost"), Some(3), Some(10))
        );

        let mut sink = JsonSink::new(Vec::new());
        sink.summary(&Summary {
            events: 5,
            lost: 1,
            malformed: 0,
            listening: 2,
            drops: 0,
            suppressed: 0,
        })
        .expect("writes");
        let v: serde_json::Value = serde_json::from_slice(&sink.out).expect("valid JSON");
        assert_eq!(v["event"], "summary");
        assert_eq!(v["events"], 5);
        assert_eq!(v["lost"], 1);
    }
}
