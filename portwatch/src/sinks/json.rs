//! JSON Lines: one object per event, for machines. The schema is in
//! README.md. [`Line`] is the same schema read back: `watch` and `top`
//! following a guard turn its lines into [`Event`]s with it.

use std::{
    collections::HashMap,
    io::{self, Write},
    net::IpAddr,
    sync::Arc,
    time::SystemTime,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Sink, Summary};
use crate::{
    format::{Rfc3339Micros, parse_rfc3339, proto_name, rfc3339_micros},
    model::{
        AttachedMode, BindEvent, DropEvent, DropReason, Event, EventKind, Exposure, Family,
        GateEvent, Listener, ListenerEvent, Mode, NotOwnerEvent, Origin, PolicyEvent, ProcessInfo,
        Proto, Reach, Requester, SockId,
    },
};

/// A timestamp as RFC 3339 UTC with microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ts(SystemTime);

impl Serialize for Ts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&rfc3339_micros(self.0))
    }
}

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_rfc3339(&text)
            .map(Ts)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time")))
    }
}

/// An IP protocol as the stream names it: `tcp`, `udp`, `icmp`, `icmpv6`,
/// or its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IpProto(u8);

impl Serialize for IpProto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&proto_name(self.0))
    }
}

impl<'de> Deserialize<'de> for IpProto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        (0..=u8::MAX)
            .find(|n| proto_name(*n) == text)
            .map(IpProto)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown protocol {text:?}")))
    }
}

/// A listener line as read back (and, in the tests, the reference the
/// writer's fast path is checked against).
#[derive(Serialize, Deserialize)]
struct ListenerLine {
    ts: Ts,
    event: EventKind,
    origin: Origin,
    proto: Proto,
    family: Family,
    addr: IpAddr,
    port: u16,
    pid: Option<u32>,
    comm: Option<Arc<str>>,
    uid: Option<u32>,
    exe: Option<Arc<str>>,
    cmdline: Option<Arc<str>>,
    cgroup: Option<Arc<str>>,
    netns: Option<u64>,
    /// Who can reach it over every way in (absent: not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exposure: Option<Exposure>,
    /// What the policy alone says, when ways in without a guard widen it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy_exposure: Option<Exposure>,
    /// Interfaces that reach it with no guard on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    exposed_via: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct DropLine {
    ts: Ts,
    event: Tag,
    reason: DropReason,
    proto: IpProto,
    src: Option<IpAddr>,
    src_port: u16,
    dst: Option<IpAddr>,
    dst_port: u16,
    iface: Option<String>,
    audit: bool,
}

#[derive(Serialize, Deserialize)]
struct CountLine {
    ts: Ts,
    event: Tag,
    count: u64,
    total: u64,
}

#[derive(Serialize, Deserialize)]
struct PolicyLine {
    ts: Ts,
    event: Tag,
    change: String,
    by_uid: Option<u32>,
    by_pid: Option<u32>,
    mode: Mode,
    rules: usize,
}

#[derive(Serialize, Deserialize)]
struct GateLine {
    ts: Ts,
    event: Tag,
    port: String,
    open: bool,
    pid: Option<u32>,
    comm: Option<Arc<str>>,
    owner: String,
}

/// `"event": "not_owner"`: a listener on an owned port that is not its owner.
#[derive(Serialize, Deserialize)]
struct NotOwnerLine {
    ts: Ts,
    event: Tag,
    port: String,
    pid: Option<u32>,
    comm: Option<Arc<str>>,
    exe: Option<Arc<str>>,
    owner: String,
}

/// `"event": "bind_denied"`: a bind of an owned port by another process.
#[derive(Serialize, Deserialize)]
struct BindLine {
    ts: Ts,
    event: Tag,
    port: String,
    addr: IpAddr,
    pid: u32,
    comm: Arc<str>,
    uid: u32,
    cgroup: Option<Arc<str>>,
    owner: String,
    audit: bool,
}

#[derive(Serialize, Deserialize)]
struct InterfaceLine {
    ts: Ts,
    event: Tag,
    iface: String,
    change: String,
    xdp_mode: Option<AttachedMode>,
}

#[derive(Serialize, Deserialize)]
struct ReadyLine {
    ts: Ts,
    event: Tag,
    snapshot: usize,
}

#[derive(Serialize, Deserialize)]
struct SummaryLine {
    event: Tag,
    events: u64,
    lost: u64,
    #[serde(default)]
    inferred: u64,
    malformed: u64,
    listening: usize,
    drops: u64,
    suppressed: u64,
}

/// The `event` field of lines that are not listener events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Tag {
    Drop,
    Lost,
    Suppressed,
    Missed,
    Policy,
    Gate,
    #[serde(rename = "bind_denied")]
    BindDenied,
    #[serde(rename = "not_owner")]
    NotOwner,
    Interface,
    Ready,
    Summary,
}

impl ListenerLine {
    /// The line of `ev` as serde writes it.
    #[cfg(test)]
    fn of(ev: &ListenerEvent) -> Self {
        let l = &ev.listener;
        let p = &l.process;
        Self {
            ts: Ts(ev.ts),
            event: ev.kind,
            origin: ev.origin,
            proto: l.proto,
            family: l.family(),
            addr: l.addr,
            port: l.port,
            pid: p.pid,
            comm: p.comm.clone(),
            uid: p.uid,
            exe: p.exe.clone(),
            cmdline: p.cmdline.clone(),
            cgroup: p.cgroup.clone(),
            netns: l.netns,
            exposure: ev.reach.as_ref().map(|r| r.exposure),
            policy_exposure: ev
                .reach
                .as_ref()
                .filter(|r| r.policy != r.exposure)
                .map(|r| r.policy),
            exposed_via: ev
                .reach
                .as_ref()
                .map(|r| r.unguarded.clone())
                .unwrap_or_default(),
        }
    }

    fn into_event(self) -> ListenerEvent {
        ListenerEvent {
            ts: self.ts.0,
            kind: self.event,
            origin: self.origin,
            listener: Listener {
                proto: self.proto,
                addr: self.addr,
                port: self.port,
                // The stream does not carry the kernel's socket identity.
                sock_id: SockId::Unknown,
                netns: self.netns,
                process: Arc::new(ProcessInfo {
                    pid: self.pid,
                    comm: self.comm,
                    uid: self.uid,
                    exe: self.exe,
                    cmdline: self.cmdline,
                    cgroup: self.cgroup,
                }),
            },
            reach: self.exposure.map(|exposure| Reach {
                exposure,
                policy: self.policy_exposure.unwrap_or(exposure),
                unguarded: self.exposed_via,
            }),
        }
    }
}

/// One line of the stream, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    Event(Event),
    /// The last line: the stream's totals.
    Summary(Summary),
}

/// Any line, by its `event` field: listener lines say `listen` or `close`.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyLine {
    Listener(ListenerLine),
    Drop(DropLine),
    Count(CountLine),
    Policy(PolicyLine),
    Gate(GateLine),
    Bind(BindLine),
    NotOwner(NotOwnerLine),
    Interface(InterfaceLine),
    Ready(ReadyLine),
    Summary(SummaryLine),
}

/// Reads one line of `--json` output (or a guard's JSON stream).
pub fn parse_line(text: &str) -> Result<Line, serde_json::Error> {
    let line: AnyLine = serde_json::from_str(text)?;
    let tag = match &line {
        AnyLine::Listener(_) => None,
        AnyLine::Drop(l) => Some((l.event, Tag::Drop)),
        AnyLine::Count(l) if matches!(l.event, Tag::Suppressed | Tag::Missed) => None,
        AnyLine::Count(l) => Some((l.event, Tag::Lost)),
        AnyLine::Policy(l) => Some((l.event, Tag::Policy)),
        AnyLine::Gate(l) => Some((l.event, Tag::Gate)),
        AnyLine::Bind(l) => Some((l.event, Tag::BindDenied)),
        AnyLine::NotOwner(l) => Some((l.event, Tag::NotOwner)),
        AnyLine::Interface(l) => Some((l.event, Tag::Interface)),
        AnyLine::Ready(l) => Some((l.event, Tag::Ready)),
        AnyLine::Summary(l) => Some((l.event, Tag::Summary)),
    };
    if let Some((got, want)) = tag
        && got != want
    {
        return Err(serde::de::Error::custom(format!(
            "a {want:?} line cannot have \"event\": {got:?}"
        )));
    }
    Ok(match line {
        AnyLine::Listener(l) => Line::Event(Event::Listener(l.into_event())),
        AnyLine::Drop(d) => Line::Event(Event::Drop(DropEvent {
            ts: d.ts.0,
            iface: d.iface,
            reason: d.reason,
            proto: d.proto.0,
            src: d.src,
            dst: d.dst,
            src_port: d.src_port,
            dst_port: d.dst_port,
            audit: d.audit,
        })),
        AnyLine::Count(c) if c.event == Tag::Suppressed => Line::Event(Event::Suppressed {
            ts: c.ts.0,
            count: c.count,
            total: c.total,
        }),
        AnyLine::Count(c) if c.event == Tag::Missed => Line::Event(Event::Missed {
            ts: c.ts.0,
            count: c.count,
            total: c.total,
        }),
        AnyLine::Count(c) => Line::Event(Event::Lost {
            ts: c.ts.0,
            count: c.count,
            total: c.total,
        }),
        AnyLine::Policy(p) => Line::Event(Event::Policy(PolicyEvent {
            ts: p.ts.0,
            change: p.change,
            by: Requester {
                uid: p.by_uid,
                pid: p.by_pid,
            },
            mode: p.mode,
            rules: p.rules,
        })),
        AnyLine::Gate(g) => Line::Event(Event::Gate(GateEvent {
            ts: g.ts.0,
            port: g.port,
            open: g.open,
            pid: g.pid,
            comm: g.comm,
            owner: g.owner,
        })),
        AnyLine::Bind(b) => Line::Event(Event::Bind(BindEvent {
            ts: b.ts.0,
            port: b.port,
            addr: b.addr,
            pid: b.pid,
            comm: b.comm,
            uid: b.uid,
            cgroup: b.cgroup,
            owner: b.owner,
            audit: b.audit,
        })),
        AnyLine::NotOwner(n) => Line::Event(Event::NotOwner(NotOwnerEvent {
            ts: n.ts.0,
            port: n.port,
            pid: n.pid,
            comm: n.comm,
            exe: n.exe,
            owner: n.owner,
        })),
        AnyLine::Interface(i) => Line::Event(Event::Interface {
            ts: i.ts.0,
            iface: i.iface,
            change: i.change,
            xdp_mode: i.xdp_mode,
        }),
        AnyLine::Ready(r) => Line::Event(Event::Ready {
            ts: r.ts.0,
            snapshot: r.snapshot,
        }),
        AnyLine::Summary(s) => Line::Summary(Summary {
            events: s.events,
            lost: s.lost,
            inferred: s.inferred,
            malformed: s.malformed,
            listening: s.listening,
            drops: s.drops,
            suppressed: s.suppressed,
        }),
    })
}

/// Each process's part of a listener line (`"pid":..,"comm":..,...,
/// "cgroup":..`), rendered once per process rather than once per line: in a
/// burst, thousands of lines carry the same process, and escaping its
/// command line byte by byte was the stream's largest cost after the writes
/// themselves. Keyed by the address of the shared details, which no other
/// details can take while the entry holds them.
#[derive(Default)]
struct ProcessParts {
    parts: HashMap<usize, ProcessPartEntry, foldhash::fast::RandomState>,
}

/// The details (held, so their address stays theirs) and their part.
type ProcessPartEntry = (Arc<ProcessInfo>, Box<[u8]>);

/// Bound on [`ProcessParts`]; cleared when full (the next lines refill it).
const PARTS_MAX: usize = 256;

/// The fields of a process in a listener line, in the line's order.
#[derive(Serialize)]
struct ProcessPart<'a> {
    pid: Option<u32>,
    comm: &'a Option<Arc<str>>,
    uid: Option<u32>,
    exe: &'a Option<Arc<str>>,
    cmdline: &'a Option<Arc<str>>,
    cgroup: &'a Option<Arc<str>>,
}

impl ProcessParts {
    fn get(&mut self, process: &Arc<ProcessInfo>) -> io::Result<&[u8]> {
        let key = Arc::as_ptr(process) as usize;
        if !self.parts.contains_key(&key) {
            if self.parts.len() >= PARTS_MAX {
                self.parts.clear();
            }
            let object = serde_json::to_vec(&ProcessPart {
                pid: process.pid,
                comm: &process.comm,
                uid: process.uid,
                exe: &process.exe,
                cmdline: &process.cmdline,
                cgroup: &process.cgroup,
            })?;
            // The object's members without its braces.
            let inner = object
                .get(1..object.len().saturating_sub(1))
                .unwrap_or_default();
            self.parts.insert(key, (Arc::clone(process), inner.into()));
        }
        Ok(self
            .parts
            .get(&key)
            .map(|(_, part)| &**part)
            .unwrap_or_default())
    }
}

pub struct JsonSink<W: Write> {
    out: W,
    processes: ProcessParts,
    clock: Rfc3339Micros,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            processes: ProcessParts::default(),
            clock: Rfc3339Micros::default(),
        }
    }

    /// What it writes to.
    pub fn out_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// A listener line, the stream's hot path: written field by field
    /// (the same text serde makes of [`ListenerLine`], checked in the
    /// tests), the process's part from [`ProcessParts`], the time from
    /// [`Rfc3339Micros`]. About a fifth of what the derived serializer
    /// costs per line.
    fn listener_line(&mut self, ev: &ListenerEvent) -> io::Result<()> {
        let l = &ev.listener;
        let out = &mut self.out;
        out.write_all(b"{\"ts\":\"")?;
        self.clock.write(ev.ts, out)?;
        out.write_all(b"\",\"event\":")?;
        serde_json::to_writer(&mut *out, &ev.kind)?;
        out.write_all(b",\"origin\":")?;
        serde_json::to_writer(&mut *out, &ev.origin)?;
        out.write_all(b",\"proto\":")?;
        serde_json::to_writer(&mut *out, &l.proto)?;
        out.write_all(b",\"family\":")?;
        serde_json::to_writer(&mut *out, &l.family())?;
        out.write_all(b",\"addr\":")?;
        serde_json::to_writer(&mut *out, &l.addr)?;
        out.write_all(b",\"port\":")?;
        serde_json::to_writer(&mut *out, &l.port)?;
        out.write_all(b",")?;
        out.write_all(self.processes.get(&l.process)?)?;
        out.write_all(b",\"netns\":")?;
        serde_json::to_writer(&mut *out, &l.netns)?;
        if let Some(reach) = &ev.reach {
            out.write_all(b",\"exposure\":")?;
            serde_json::to_writer(&mut *out, &reach.exposure)?;
            if reach.policy != reach.exposure {
                out.write_all(b",\"policy_exposure\":")?;
                serde_json::to_writer(&mut *out, &reach.policy)?;
            }
            if !reach.unguarded.is_empty() {
                out.write_all(b",\"exposed_via\":")?;
                serde_json::to_writer(&mut *out, &reach.unguarded)?;
            }
        }
        out.write_all(b"}\n")
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
    fn writes_json(&self) -> bool {
        true
    }

    fn event_as_json(&mut self, _event: &Event, line: &[u8]) -> io::Result<()> {
        self.out.write_all(line)
    }

    fn event(&mut self, event: &Event) -> io::Result<()> {
        match event {
            Event::Listener(ev) => self.listener_line(ev),
            Event::Lost { ts, count, total } => self.line(&CountLine {
                ts: Ts(*ts),
                event: Tag::Lost,
                count: *count,
                total: *total,
            }),
            Event::Missed { ts, count, total } => self.line(&CountLine {
                ts: Ts(*ts),
                event: Tag::Missed,
                count: *count,
                total: *total,
            }),
            Event::Suppressed { ts, count, total } => self.line(&CountLine {
                ts: Ts(*ts),
                event: Tag::Suppressed,
                count: *count,
                total: *total,
            }),
            Event::Ready { ts, snapshot } => self.line(&ReadyLine {
                ts: Ts(*ts),
                event: Tag::Ready,
                snapshot: *snapshot,
            }),
            Event::Drop(d) => self.line(&DropLine {
                ts: Ts(d.ts),
                event: Tag::Drop,
                reason: d.reason,
                proto: IpProto(d.proto),
                src: d.src,
                src_port: d.src_port,
                dst: d.dst,
                dst_port: d.dst_port,
                iface: d.iface.clone(),
                audit: d.audit,
            }),
            Event::Interface {
                ts,
                iface,
                change,
                xdp_mode,
            } => self.line(&InterfaceLine {
                ts: Ts(*ts),
                event: Tag::Interface,
                iface: iface.clone(),
                change: change.clone(),
                xdp_mode: *xdp_mode,
            }),
            Event::Gate(g) => self.line(&GateLine {
                ts: Ts(g.ts),
                event: Tag::Gate,
                port: g.port.clone(),
                open: g.open,
                pid: g.pid,
                comm: g.comm.clone(),
                owner: g.owner.clone(),
            }),
            Event::NotOwner(n) => self.line(&NotOwnerLine {
                ts: Ts(n.ts),
                event: Tag::NotOwner,
                port: n.port.clone(),
                pid: n.pid,
                comm: n.comm.clone(),
                exe: n.exe.clone(),
                owner: n.owner.clone(),
            }),
            Event::Bind(b) => self.line(&BindLine {
                ts: Ts(b.ts),
                event: Tag::BindDenied,
                port: b.port.clone(),
                addr: b.addr,
                pid: b.pid,
                comm: b.comm.clone(),
                uid: b.uid,
                cgroup: b.cgroup.clone(),
                owner: b.owner.clone(),
                audit: b.audit,
            }),
            Event::Policy(p) => self.line(&PolicyLine {
                ts: Ts(p.ts),
                event: Tag::Policy,
                change: p.change.clone(),
                by_uid: p.by.uid,
                by_pid: p.by.pid,
                mode: p.mode,
                rules: p.rules,
            }),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        self.line(&SummaryLine {
            event: Tag::Summary,
            events: s.events,
            lost: s.lost,
            inferred: s.inferred,
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
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;

    fn ts() -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_795_000_000_000_001)
    }

    fn listener_event() -> Event {
        listener_event_reaching(Some(Reach {
            exposure: Exposure::Exposed,
            policy: Exposure::Partial,
            unguarded: vec!["eth1".into()],
        }))
    }

    fn listener_event_reaching(reach: Option<Reach>) -> Event {
        Event::Listener(ListenerEvent {
            ts: ts(),
            kind: EventKind::Close,
            origin: Origin::Snapshot,
            listener: Listener {
                proto: Proto::Udp,
                addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                port: 5353,
                sock_id: SockId::Unknown,
                netns: Some(4026531840),
                process: ProcessInfo {
                    pid: Some(42),
                    comm: Some("avahi".into()),
                    uid: Some(0),
                    exe: None,
                    cmdline: Some("avahi-daemon -s".into()),
                    cgroup: None,
                }
                .into(),
            },
            reach,
        })
    }

    #[test]
    fn listener_line_has_the_documented_fields() {
        let text = to_json(&listener_event()).expect("serialises");
        assert!(text.starts_with("{\"ts\":\"2026-11-18T11:06:40.000001Z\",\"event\":\"close\""));
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
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
        assert_eq!(v["exposure"], "exposed");
        assert_eq!(v["policy_exposure"], "partial");
        assert_eq!(v["exposed_via"], serde_json::json!(["eth1"]));
    }

    #[test]
    fn a_listener_only_the_guard_reaches_has_one_exposure_field() {
        let ev = listener_event_reaching(Some(Reach {
            exposure: Exposure::Blocked,
            policy: Exposure::Blocked,
            unguarded: vec![],
        }));
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&ev).expect("serialises")).expect("valid JSON");
        assert_eq!(v["exposure"], "blocked");
        assert!(v.get("policy_exposure").is_none(), "{v}");
        assert!(v.get("exposed_via").is_none(), "{v}");
        let unknown = listener_event_reaching(None);
        let v: serde_json::Value =
            serde_json::from_str(&to_json(&unknown).expect("serialises")).expect("valid JSON");
        assert!(v.get("exposure").is_none(), "{v}");
    }

    /// The hand-written listener line is the text serde makes of
    /// [`ListenerLine`], whatever the strings, addresses, times and reach,
    /// first time and from the caches.
    #[test]
    fn listener_lines_are_what_serde_writes() {
        let awkward: [&str; 4] = [
            "python3 -c \"print('a\\b')\"\n\t\u{1}",
            "/usr/bin/caf\u{e9} \u{2028}",
            "plain",
            "",
        ];
        let reaches = [
            None,
            Some(Reach {
                exposure: Exposure::Blocked,
                policy: Exposure::Blocked,
                unguarded: vec![],
            }),
            Some(Reach {
                exposure: Exposure::Exposed,
                policy: Exposure::Partial,
                unguarded: vec!["eth1".into(), "we\"ird".into()],
            }),
        ];
        let times = [
            ts(),
            ts() + Duration::from_micros(999_999),
            ts() + Duration::from_secs(86_399),
            UNIX_EPOCH,
            UNIX_EPOCH - Duration::from_micros(1),
        ];
        let addrs: [IpAddr; 3] = [
            Ipv4Addr::new(192, 0, 2, 10).into(),
            Ipv6Addr::UNSPECIFIED.into(),
            "2001:db8::1:0:0:1".parse().expect("an address"),
        ];
        let mut sink = JsonSink::new(Vec::new());
        let mut expected = Vec::new();
        let mut n = 0usize;
        for text in awkward {
            for (i, reach) in reaches.iter().enumerate() {
                let Event::Listener(mut ev) = listener_event_reaching(reach.clone()) else {
                    unreachable!("a listener event");
                };
                n += 1;
                ev.ts = times[n % times.len()];
                ev.listener.addr = addrs[n % addrs.len()];
                ev.listener.netns = (i != 1).then_some(4026531840);
                let process = Arc::make_mut(&mut ev.listener.process);
                process.cmdline = Some(text.into());
                process.exe = (i != 0).then(|| format!("{text}!").into());
                process.pid = (i != 2).then_some(7);
                // Twice: the second time from the caches.
                for _ in 0..2 {
                    expected
                        .extend(serde_json::to_vec(&ListenerLine::of(&ev)).expect("serialises"));
                    expected.push(b'\n');
                    sink.event(&Event::Listener(ev.clone())).expect("written");
                }
            }
            // Past the cache's bound: it starts over.
            for n in 0..=PARTS_MAX {
                let other = Arc::new(ProcessInfo {
                    pid: u32::try_from(n).ok(),
                    ..ProcessInfo::default()
                });
                sink.processes.get(&other).expect("renders");
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&sink.out),
            String::from_utf8_lossy(&expected)
        );
        for line in String::from_utf8_lossy(&sink.out).lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
            let cmdline = v["cmdline"].as_str().expect("a string");
            assert!(awkward.contains(&cmdline), "{cmdline:?}");
        }
    }

    #[test]
    fn every_line_reads_back_as_what_was_written() {
        let events = [
            listener_event(),
            Event::Lost {
                ts: ts(),
                count: 3,
                total: 10,
            },
            Event::Suppressed {
                ts: ts(),
                count: 1,
                total: 2,
            },
            Event::Missed {
                ts: ts(),
                count: 4,
                total: 9,
            },
            Event::Ready {
                ts: ts(),
                snapshot: 7,
            },
            Event::Drop(DropEvent {
                ts: ts(),
                iface: Some("eth0".into()),
                reason: DropReason::NoRule,
                proto: 47,
                src: Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))),
                dst: None,
                src_port: 0,
                dst_port: 0,
                audit: true,
            }),
            Event::Policy(PolicyEvent {
                ts: ts(),
                change: "allow tcp/8080".into(),
                by: Requester {
                    uid: Some(0),
                    pid: None,
                },
                mode: Mode::Audit,
                rules: 2,
            }),
            Event::Interface {
                ts: ts(),
                iface: "veth0".into(),
                change: "attached".into(),
                xdp_mode: Some(AttachedMode::Generic),
            },
            Event::Gate(GateEvent {
                ts: ts(),
                port: "tcp/6379".into(),
                open: true,
                pid: Some(812),
                comm: Some("redis-server".into()),
                owner: "unit redis-server.service".into(),
            }),
            Event::Gate(GateEvent {
                ts: ts(),
                port: "udp/51820".into(),
                open: false,
                pid: None,
                comm: None,
                owner: "exe /usr/bin/wireguard-go".into(),
            }),
            Event::Bind(BindEvent {
                ts: ts(),
                port: "tcp/6379".into(),
                addr: "::".parse().expect("an address"),
                pid: 4242,
                comm: "python3".into(),
                uid: 1000,
                cgroup: Some("/user.slice/user-1000.slice/session-4.scope".into()),
                owner: "unit redis-server.service".into(),
                audit: false,
            }),
            Event::NotOwner(NotOwnerEvent {
                ts: ts(),
                port: "tcp/6379".into(),
                pid: Some(4242),
                comm: Some("socat".into()),
                exe: Some("/tmp/socat".into()),
                owner: "exe /usr/bin/socat".into(),
            }),
            Event::Bind(BindEvent {
                ts: ts(),
                port: "udp/53".into(),
                addr: "127.0.0.1".parse().expect("an address"),
                pid: 7,
                comm: "dnsmasq".into(),
                uid: 0,
                cgroup: None,
                owner: "comm unbound".into(),
                audit: true,
            }),
        ];
        for event in events {
            let text = to_json(&event).expect("serialises");
            assert_eq!(
                parse_line(&text).map_err(|e| e.to_string()),
                Ok(Line::Event(event.clone())),
                "{text}"
            );
        }
        let summary = Summary {
            events: 5,
            lost: 1,
            inferred: 0,
            malformed: 0,
            listening: 2,
            drops: 3,
            suppressed: 4,
        };
        let mut sink = JsonSink::new(Vec::new());
        sink.summary(&summary).expect("writes");
        let text = String::from_utf8_lossy(&sink.out).into_owned();
        assert!(text.starts_with("{\"event\":\"summary\",\"events\":5,\"lost\":1"));
        assert_eq!(
            parse_line(text.trim_end()).map_err(|e| e.to_string()),
            Ok(Line::Summary(summary))
        );
        assert!(parse_line("{\"event\":\"frobnicated\"}").is_err());
        assert!(parse_line("not json").is_err());
    }
}
