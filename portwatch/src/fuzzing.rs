//! The checks behind the cargo-fuzz targets in `portwatch/fuzz/`, kept here
//! so that `tests/fuzz_regressions.rs` replays the seeds and every crash ever
//! found through exactly the same code, in the ordinary unit-test step.
//!
//! Each check takes the raw input bytes and returns a [`Violation`] when a
//! property does not hold; the fuzz targets panic on it, which is how
//! libFuzzer records a crash. A panic inside the code under test propagates
//! as it is. Every check runs the input two ways: as the raw bytes the
//! parser or decoder would meet (text, a request line, a ring-buffer
//! record), and read through [`Cursor`] as a structured value (a policy, a
//! request, an event) that is serialized and must come back unchanged.
//! `Cursor` is total and deterministic, so a saved input replays the same way
//! everywhere without a dependency on `arbitrary`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use portwatch_common::{
    AF_INET, AF_INET6, BIND_AUDITED, BIND_DENIED, BindReport, DropReport, IPPROTO_TCP, IPPROTO_UDP,
    ListenEvent, ListenKind,
};

use crate::{
    control::protocol::{self, Format, MAX_LINE, ProtocolError, Request},
    datapath::decode::{self, DecodeError, RawDrop, RawListen, encode_drop},
    model::{DropReason, EventKind, Exposure, IpProto, Mode, Proto, SockId},
    policy::{Policy, PolicyError, PortRange, RateLimit, Rule, SpecError},
};

/// A property that did not hold, with the input it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Violation(String);

/// A check: `Ok` when every property holds for the input.
pub type Check = fn(&[u8]) -> Result<(), Violation>;

/// The fuzz targets by name (the file names in `portwatch/fuzz/fuzz_targets`
/// and the directories under `seeds/` and `regressions/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("policy_file", policy_file),
    ("allow_spec", allow_spec),
    ("control_request", control_request),
    ("ring_event", ring_event),
];

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Violation(format!($($msg)+)));
        }
    };
}

/// Reads values out of fuzzer bytes; past the end every read is zero, so any
/// input, even an empty one, yields a value.
pub struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor(data)
    }

    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_ne_bytes(self.bytes())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.bytes())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.bytes())
    }

    pub fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// Up to `max` bytes as text (lossy: any bytes make some string).
    pub fn string(&mut self, max: usize) -> String {
        let len = usize::from(self.byte()) % (max + 1);
        let raw: Vec<u8> = (0..len).map(|_| self.byte()).collect();
        String::from_utf8_lossy(&raw).into_owned()
    }

    /// One of `items` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T], fallback: T) -> T {
        let i = usize::from(self.byte()) % items.len().max(1);
        items.get(i).copied().unwrap_or(fallback)
    }
}

/// Text as the parsers get it; invalid UTF-8 is replaced rather than
/// skipped so that every input exercises the parser.
fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

// ---------------------------------------------------------------- allow_spec

/// `PortRange::parse` (`--allow SPEC`, the policy file, allow/deny): agrees
/// with a reference grammar, prints back to itself, and every error quotes
/// the spec.
pub fn allow_spec(data: &[u8]) -> Result<(), Violation> {
    let s = text(data);
    check_spec(&s)?;
    // The same bytes as a hand-built range, for `new` and `Display`.
    let mut c = Cursor::new(data);
    let proto = c.pick(
        &[IpProto::TCP, IpProto::UDP, IpProto::SCTP, IpProto(47)],
        IpProto::TCP,
    );
    let (lo, hi) = (c.u16(), c.u16());
    match PortRange::new(proto, lo, hi) {
        Ok(r) if !proto.has_ports() => {
            ensure!(
                (lo, hi) == (0, 0),
                "new({proto}, {lo}, {hi}) accepted {r:?}"
            );
        }
        Err(e) if !proto.has_ports() => {
            ensure!((lo, hi) != (0, 0), "new({proto}, 0, 0) refused: {e}");
        }
        Ok(r) => {
            ensure!(lo >= 1 && lo <= hi, "new({lo}, {hi}) accepted {r:?}");
            ensure!(
                PortRange::parse(&r.to_string()) == Ok(r),
                "{r:?} does not parse back from {r}"
            );
        }
        Err(e) => ensure!(lo == 0 || lo > hi, "new({lo}, {hi}) refused: {e}"),
    }
    Ok(())
}

fn check_spec(s: &str) -> Result<(), Violation> {
    let parsed = PortRange::parse(s);
    let reference = reference_spec(s);
    match &parsed {
        Ok(r) => {
            ensure!(
                reference == Some((r.proto, r.lo, r.hi)),
                "{s:?} parsed as {r:?}, the reference says {reference:?}"
            );
            ensure!(
                (r.lo >= 1 && r.lo <= r.hi) || (r.is_whole_protocol() && (r.lo, r.hi) == (0, 0)),
                "{s:?} -> {r:?}"
            );
            let shown = r.to_string();
            ensure!(
                PortRange::parse(&shown).as_ref() == Ok(r),
                "{s:?} -> {r:?} -> {shown:?} parses differently"
            );
            ensure!(
                shown.parse::<PortRange>().as_ref() == Ok(r),
                "FromStr disagrees on {shown:?}"
            );
            ensure!(
                PortRange::new(r.proto, r.lo, r.hi).as_ref() == Ok(r),
                "new refuses {r:?}"
            );
            ensure!(
                r.contains(r.proto, r.lo) && r.contains(r.proto, r.hi),
                "{r:?} does not contain its ends"
            );
            ensure!(
                r.port_count() == usize::from(r.hi - r.lo) + 1,
                "{r:?}: port_count {}",
                r.port_count()
            );
        }
        Err(e) => {
            ensure!(
                reference.is_none(),
                "{s:?} refused ({e}), the reference says {reference:?}"
            );
            let msg = e.to_string();
            ensure!(
                msg.starts_with(&format!("{s:?}: ")),
                "the error for {s:?} does not quote it: {msg}"
            );
            if let SpecError::Reversed { fixed, .. } = e {
                ensure!(
                    PortRange::parse(&fixed.to_string()).as_ref() == Ok(fixed),
                    "{s:?}: the suggested {fixed} does not parse"
                );
            }
        }
    }
    ensure!(
        PortRange::parse(s) == parsed,
        "{s:?} parses differently twice"
    );
    Ok(())
}

/// The spec grammar written out independently: `tcp|udp`, `/`, a port or
/// `LO-HI`, ports as ASCII digits (leading zeros allowed) from 1 to 65535.
fn reference_spec(s: &str) -> Option<(IpProto, u16, u16)> {
    let (proto, ports) = s.split_once('/')?;
    let proto = match proto {
        "tcp" => IpProto::TCP,
        "udp" => IpProto::UDP,
        "sctp" => IpProto::SCTP,
        "proto" => {
            // A whole protocol: by number (digits only, at most 255) or by
            // its well-known name; never one with ports, one always
            // permitted, or one the guard looks through.
            let number = if !ports.is_empty() && ports.bytes().all(|b| b.is_ascii_digit()) {
                u8::try_from(ports.bytes().fold(0u32, |acc, b| {
                    acc.saturating_mul(10).saturating_add(u32::from(b - b'0'))
                }))
                .ok()?
            } else {
                IpProto::from_name_or_number(ports)?.0
            };
            let refused = [0, 1, 2, 6, 17, 43, 44, 51, 58, 60, 132];
            return (!refused.contains(&number)).then_some((IpProto(number), 0, 0));
        }
        _ => return None,
    };
    let (lo, hi) = ports.split_once('-').unwrap_or((ports, ports));
    let port = |digits: &str| -> Option<u16> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value = digits.bytes().fold(0u32, |acc, b| {
            acc.saturating_mul(10).saturating_add(u32::from(b - b'0'))
        });
        u16::try_from(value).ok().filter(|p| *p != 0)
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    (lo <= hi).then_some((proto, lo, hi))
}

// --------------------------------------------------------------- policy_file

/// `Policy::parse`: deterministic; what parses is internally consistent,
/// survives `to_toml` and is accepted again rule by rule by `add_rule`;
/// errors point at a line of the file. A policy built from the bytes
/// through `add_rule` also survives `to_toml`.
pub fn policy_file(data: &[u8]) -> Result<(), Violation> {
    let text = text(data);
    let first = Policy::parse(&text);
    let again = Policy::parse(&text);
    ensure!(
        describe(&first) == describe(&again),
        "{text:?} parses differently twice: {:?} then {:?}",
        describe(&first),
        describe(&again)
    );
    match first {
        Ok(p) => check_policy(&text, &p)?,
        Err(e) => {
            let msg = e.to_string();
            ensure!(!msg.trim().is_empty(), "{text:?}: empty error message");
            if let Some(line) = e.line() {
                ensure!(
                    line >= 1 && line <= text.lines().count() + 1,
                    "{text:?}: line {line} is outside the file: {msg}"
                );
            }
        }
    }
    let built = structured_policy(&mut Cursor::new(data));
    let what = format!("policy built from {data:?}");
    check_rules(&what, &built)?;
    round_trip(&what, &built)
}

fn describe(r: &Result<Policy, PolicyError>) -> Result<&Policy, (String, Option<usize>)> {
    r.as_ref().map_err(|e| (e.to_string(), e.line()))
}

fn check_policy(text: &str, p: &Policy) -> Result<(), Violation> {
    let last_line = text.lines().count() + 1;
    for rule in &p.rules {
        ensure!(
            rule.line.is_some_and(|n| n >= 1 && n <= last_line),
            "{text:?}: rule {rule} has line {:?}",
            rule.line
        );
    }
    let what = format!("{text:?}");
    check_rules(&what, p)?;
    round_trip(&what, p)
}

/// What every policy the guard can hold satisfies, however it was made.
fn check_rules(what: &str, p: &Policy) -> Result<(), Violation> {
    for (i, name) in p.interfaces.iter().enumerate() {
        ensure!(
            !p.interfaces[..i].contains(name),
            "{what}: interface {name:?} twice"
        );
    }
    let mut fresh = Policy::default();
    for (i, rule) in p.rules.iter().enumerate() {
        let PortRange { proto, lo, hi } = rule.ports;
        ensure!(
            PortRange::new(proto, lo, hi).is_ok(),
            "{what}: invalid range {:?}",
            rule.ports
        );
        for other in &p.rules[..i] {
            ensure!(
                !rule.ports.overlaps(&other.ports),
                "{what}: {rule} overlaps {other}"
            );
        }
        for (j, net) in rule.from.iter().enumerate() {
            ensure!(net.trunc() == *net, "{what}: {net} has host bits");
            for other in &rule.from[..j] {
                ensure!(
                    !net.contains(other) && !other.contains(net),
                    "{what}: {net} and {other} overlap in one rule"
                );
            }
        }
        let want = if rule.from.is_empty() {
            Exposure::Exposed
        } else {
            Exposure::Partial
        };
        for port in [lo, hi] {
            ensure!(
                p.exposure(proto, port) == want,
                "{what}: {proto:?}/{port} is not {want:?}"
            );
        }
        // Every source a rule names is one it admits: its first and last
        // addresses, except IPv4-mapped ones, which `permits` matches as
        // IPv4 as the kernel does. And since no packet comes from a mapped
        // address, no network may lie inside ::ffff:0:0/96.
        for net in &rule.from {
            ensure!(
                !matches!(net, IpNet::V6(v6) if v6.prefix_len() >= 96
                    && v6.addr().to_ipv4_mapped().is_some()),
                "{what}: {rule}: {net} is IPv4-mapped and admits nobody"
            );
        }
        let sources: Vec<IpAddr> = if rule.from.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]
        } else {
            rule.from
                .iter()
                .flat_map(|n| [n.network(), n.broadcast()])
                .filter(|a| a.to_canonical() == *a)
                .collect()
        };
        for src in sources {
            ensure!(
                p.permits(proto, lo, src) && p.permits(proto, hi, src),
                "{what}: {rule} does not permit {src}"
            );
        }
        // What the parser accepted, the runtime path accepts too.
        if let Err(e) = fresh.add_rule(rule.clone()) {
            return Err(Violation(format!(
                "{what}: add_rule refuses {rule}, which is in the policy: {e}"
            )));
        }
    }
    Ok(())
}

/// `to_toml` parses back to the same policy (lines aside), and is a fixed
/// point: what the guard writes and reads back, it writes the same way.
fn round_trip(what: &str, p: &Policy) -> Result<(), Violation> {
    let toml = p.to_toml();
    let back = match Policy::parse(&toml) {
        Ok(back) => back,
        Err(e) => {
            return Err(Violation(format!(
                "{what}: to_toml gives {toml:?}, which does not parse: {e}"
            )));
        }
    };
    ensure!(
        without_lines(&back) == without_lines(p),
        "{what}: to_toml {toml:?} parses to {back:?}, not {p:?}"
    );
    ensure!(
        back.to_toml() == toml,
        "{what}: to_toml is not stable: {toml:?} then {:?}",
        back.to_toml()
    );
    Ok(())
}

fn without_lines(p: &Policy) -> Policy {
    let mut p = p.clone();
    for rule in &mut p.rules {
        rule.line = None;
    }
    p
}

/// Pieces of interface names the kernel accepts (no '/', ':', whitespace or
/// control characters), with TOML's special characters among them.
/// Limits, valid and not, for generated rules and requests.
const LIMITS: &[&str] = &[
    "10/minute",
    "1/second",
    "200/s",
    "3/hour",
    "0/second",
    "5/week",
];

const IFACE_PIECES: &[&str] = &[
    "eth", "0", "1", "wg", "-", "_", ".", "\"", "\\", "'", "#", "[", "]", "=", ",", "é", "{",
];

fn structured_policy(c: &mut Cursor) -> Policy {
    let mut p = Policy {
        mode: c.pick(&[None, Some(Mode::Enforce), Some(Mode::Audit)], None),
        ..Policy::default()
    };
    for _ in 0..c.byte() % 4 {
        let mut name = String::new();
        for _ in 0..1 + c.byte() % 6 {
            let piece = c.pick(IFACE_PIECES, "x");
            if name.len() + piece.len() <= 15 {
                name.push_str(piece);
            }
        }
        if name != "." && name != ".." && !p.interfaces.contains(&name) {
            p.interfaces.push(name);
        }
    }
    for _ in 0..c.byte() % 8 {
        let proto = c.pick(
            &[
                IpProto::TCP,
                IpProto::UDP,
                IpProto::SCTP,
                IpProto(112),
                IpProto(47),
            ],
            IpProto::TCP,
        );
        let (lo, hi) = if proto.has_ports() {
            let lo = c.u16();
            (lo, if c.flag() { lo } else { c.u16() })
        } else {
            (0, 0)
        };
        let from = (0..c.byte() % 4).map(|_| source(c)).collect();
        // Refused rules (port 0, overlaps, redundant sources) are left out:
        // what is left is a policy the guard could hold.
        let limit = c
            .flag()
            .then(|| RateLimit::parse(c.pick(LIMITS, "1/second")).ok())
            .flatten();
        let _ = p.add_rule(Rule {
            ports: PortRange { proto, lo, hi },
            from,
            limit,
            owner: None,
            line: None,
        });
    }
    p
}

fn source(c: &mut Cursor) -> IpNet {
    let (addr, max) = if c.flag() {
        (IpAddr::V6(Ipv6Addr::from(c.bytes::<16>())), 128)
    } else {
        (IpAddr::V4(Ipv4Addr::from(c.bytes::<4>())), 32)
    };
    let net = IpNet::new(addr, c.byte() % (max + 1)).unwrap_or_else(|_| IpNet::from(addr));
    // Mostly networks with their host bits clear, as a valid file has them.
    if c.byte().is_multiple_of(8) {
        net
    } else {
        net.trunc()
    }
}

// ----------------------------------------------------------- control_request

/// `decode_request`: never panics; a request decodes the same with `\n` or
/// `\r\n` after it; what decodes re-encodes (`to_line`) to itself; and a
/// request built from the bytes survives `to_line` then `decode_request`.
pub fn control_request(data: &[u8]) -> Result<(), Violation> {
    let decoded = protocol::decode_request(data);
    match &decoded {
        Ok(req) => {
            ensure!(
                protocol::COMMANDS.contains(&req.name()),
                "{data:?}: {req:?} has no command name"
            );
            request_round_trip(req)?;
        }
        Err(ProtocolError::TooLarge { len }) => {
            ensure!(*len > MAX_LINE, "{data:?}: {len} bytes called too large");
        }
        Err(e) => ensure!(!e.to_string().is_empty(), "{data:?}: empty error"),
    }
    // The line ending is framing, not content.
    if !data.ends_with(b"\n") && !data.ends_with(b"\r") {
        for ending in [&b"\n"[..], b"\r\n"] {
            let mut line = data.to_vec();
            line.extend_from_slice(ending);
            let with = protocol::decode_request(&line);
            ensure!(
                with == decoded,
                "{data:?}: {decoded:?} alone but {with:?} with {ending:?}"
            );
        }
    }
    request_round_trip(&structured_request(&mut Cursor::new(data)))
}

fn request_round_trip(req: &Request) -> Result<(), Violation> {
    let line = req.to_line();
    ensure!(
        line.find('\n') == Some(line.len() - 1),
        "{req:?}: to_line {line:?} is not one line"
    );
    let back = protocol::decode_request(line.as_bytes());
    ensure!(
        back.as_ref() == Ok(req),
        "{req:?}: to_line {line:?} decodes to {back:?}"
    );
    Ok(())
}

/// A range, valid or not (`PortRange::new` decides).
fn structured_range(c: &mut Cursor) -> Result<PortRange, SpecError> {
    let proto = c.pick(
        &[IpProto::TCP, IpProto::UDP, IpProto::SCTP, IpProto(112)],
        IpProto::TCP,
    );
    if !proto.has_ports() && c.flag() {
        return PortRange::new(proto, 0, 0);
    }
    let lo = c.u16();
    let hi = if c.flag() { lo } else { c.u16() };
    PortRange::new(proto, lo, hi)
}

/// A request from the bytes; a rule the policy refuses (port 0, host bits,
/// redundant sources) becomes `status`, which has nothing to get wrong.
fn structured_request(c: &mut Cursor) -> Request {
    match c.byte() % 10 {
        0 => {
            let ports = structured_range(c);
            let from: Vec<String> = (0..c.byte() % 4).map(|_| source(c).to_string()).collect();
            let limit = c.flag().then(|| c.pick(LIMITS, "1/second"));
            match ports.map(|p| Rule::parse(&p.to_string(), &from, limit)) {
                Ok(Ok(rule)) => Request::Allow {
                    rule,
                    force: c.flag(),
                    confirm_within: c.flag().then(|| u64::from(c.byte())),
                },
                _ => Request::Status,
            }
        }
        1 => match structured_range(c) {
            Ok(ports) => Request::Deny {
                ports,
                force: c.flag(),
                confirm_within: c.flag().then(|| u64::from(c.byte())),
            },
            Err(_) => Request::Status,
        },
        7 => Request::Confirm,
        8 | 9 => {
            // A small policy of generated rules, as `apply` or `diff`.
            let mut policy = Policy::default();
            for _ in 0..c.byte() % 4 {
                if let Ok(ports) = structured_range(c) {
                    let _ = policy.add_rule(Rule::anywhere(ports));
                }
            }
            // As a file gives it: rules know their lines.
            let text = policy.to_toml();
            let Ok(policy) = Policy::parse(&text) else {
                return Request::Status;
            };
            if c.byte().is_multiple_of(2) {
                Request::Diff {
                    policy: Box::new(policy),
                }
            } else {
                Request::Apply {
                    text,
                    policy: Box::new(policy),
                    force: c.flag(),
                    confirm_within: c.flag().then(|| u64::from(c.byte())),
                }
            }
        }
        2 => Request::Policy,
        3 => Request::Reload { force: c.flag() },
        4 => Request::Status,
        5 => Request::Subscribe {
            format: if c.flag() {
                Format::Human
            } else {
                Format::Json
            },
            colour: c.flag(),
        },
        _ => Request::Shutdown { detach: c.flag() },
    }
}

// ---------------------------------------------------------------- ring_event

/// `decode_listen`, `decode_drop` and `decode_bind`: never panic; refuse exactly the
/// records that are too short; read only the record's own bytes; what
/// decodes re-encodes to itself; and events built from the bytes come back
/// field for field from `decode(encode(ev))`.
pub fn ring_event(data: &[u8]) -> Result<(), Violation> {
    let listen = decode::decode_listen(data);
    check_record(data, ListenEvent::SIZE, &listen, decode::decode_listen)?;
    if let Ok(raw) = &listen {
        ensure!(!raw.comm.contains('\0'), "{data:?}: comm {:?}", raw.comm);
        // comm is read lossily: only valid UTF-8 can come back byte-exact.
        if let Some(ev) = listen_event_of(raw) {
            let again = decode::decode_listen(&decode::encode_listen(&ev));
            ensure!(
                again.as_ref() == Ok(raw),
                "{data:?}: {raw:?} re-encodes to {again:?}"
            );
        }
    }
    let dropped = decode::decode_drop(data);
    check_record(data, DropReport::SIZE, &dropped, decode::decode_drop)?;
    if let Ok(raw) = &dropped {
        let again = decode::decode_drop(&encode_drop(&drop_report_of(raw)));
        ensure!(
            again.as_ref() == Ok(raw),
            "{data:?}: {raw:?} re-encodes to {again:?}"
        );
    }
    let bound = decode::decode_bind(data);
    check_record(data, BindReport::SIZE, &bound, decode::decode_bind)?;
    if let Ok(raw) = &bound
        && raw.comm.bytes().all(|b| b != 0 && b < 0x80)
        && raw.comm.len() <= 16
    {
        let mut report = BindReport {
            ts_ns: raw.ts_ns,
            cgroup_id: raw.cgroup_id,
            tgid: raw.tgid,
            uid: raw.uid,
            port: raw.port,
            family: if raw.addr.is_ipv4() {
                AF_INET
            } else {
                AF_INET6
            },
            proto: if raw.proto == Proto::Tcp {
                IPPROTO_TCP
            } else {
                IPPROTO_UDP
            },
            verdict: if raw.audit { BIND_AUDITED } else { BIND_DENIED },
            ..BindReport::default()
        };
        match raw.addr {
            std::net::IpAddr::V4(a) => report.addr[..4].copy_from_slice(&a.octets()),
            std::net::IpAddr::V6(a) => report.addr = a.octets(),
        }
        report.comm[..raw.comm.len()].copy_from_slice(raw.comm.as_bytes());
        let again = decode::decode_bind(&decode::encode_bind(&report));
        ensure!(
            again.as_ref() == Ok(raw),
            "{data:?}: {raw:?} re-encodes to {again:?}"
        );
    }

    let mut c = Cursor::new(data);
    let ev = structured_listen(&mut c);
    let got = decode::decode_listen(&decode::encode_listen(&ev));
    let want = expected_listen(&ev);
    ensure!(got == want, "{ev:?}: decoded {got:?}, expected {want:?}");
    let report = structured_drop(&mut c);
    let got = decode::decode_drop(&encode_drop(&report));
    let want = expected_drop(&report);
    ensure!(
        got == want,
        "{report:?}: decoded {got:?}, expected {want:?}"
    );
    Ok(())
}

/// Short exactly when under `size` bytes; bytes past `size` (ring-buffer
/// records are padded) change nothing.
fn check_record<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    size: usize,
    result: &Result<T, DecodeError>,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
) -> Result<(), Violation> {
    match data.get(..size) {
        None => ensure!(
            *result
                == Err(DecodeError::Short {
                    got: data.len(),
                    need: size
                }),
            "{data:?}: {} bytes of {size} gave {result:?}",
            data.len()
        ),
        Some(record) => {
            ensure!(
                !matches!(result, Err(DecodeError::Short { .. })),
                "{data:?}: a full record called short"
            );
            let exact = decode(record);
            ensure!(
                exact == *result,
                "{data:?}: trailing bytes change {exact:?} into {result:?}"
            );
        }
    }
    Ok(())
}

fn listen_event_of(raw: &RawListen) -> Option<ListenEvent> {
    let mut comm = [0u8; 16];
    comm.get_mut(..raw.comm.len())?
        .copy_from_slice(raw.comm.as_bytes());
    let (family, addr) = addr_bytes(Some(raw.addr));
    let sock_id = match raw.sock_id {
        SockId::Cookie(id) | SockId::KernelAddr(id) => id,
        // The decoder never makes one.
        SockId::Unknown => return None,
    };
    Some(ListenEvent {
        ts_ns: raw.ts_ns,
        sock_id,
        tgid: raw.tgid,
        tid: raw.tid,
        uid: raw.uid,
        port: raw.port,
        family,
        proto: raw.proto.number(),
        kind: match raw.kind {
            EventKind::Listen => ListenKind::Listen as u8,
            EventKind::Close => ListenKind::Close as u8,
        },
        _pad: [0; 6],
        addr,
        comm,
    })
}

fn drop_report_of(raw: &RawDrop) -> DropReport {
    let (family, src) = addr_bytes(raw.src);
    let (_, dst) = addr_bytes(raw.dst);
    DropReport {
        ts_ns: raw.ts_ns,
        ifindex: raw.ifindex,
        reason: match raw.reason {
            DropReason::NoRule => 1,
            DropReason::SourceNotAllowed => 2,
            DropReason::Malformed => 3,
            DropReason::RateLimited => 5,
            DropReason::Fragment => 4,
        },
        proto: raw.proto,
        family: u8::try_from(family).unwrap_or(0),
        audit: u8::from(raw.audit),
        src_port: raw.src_port,
        dst_port: raw.dst_port,
        _pad: 0,
        src,
        dst,
    }
}

fn addr_bytes(addr: Option<IpAddr>) -> (u16, [u8; 16]) {
    let mut out = [0u8; 16];
    match addr {
        Some(IpAddr::V4(a)) => {
            out[..4].copy_from_slice(&a.octets());
            (AF_INET, out)
        }
        Some(IpAddr::V6(a)) => (AF_INET6, a.octets()),
        None => (0, out),
    }
}

/// Mostly valid events (so decoding gets past the checks), now and then an
/// unknown kind, protocol or family.
fn structured_listen(c: &mut Cursor) -> ListenEvent {
    ListenEvent {
        ts_ns: c.u64(),
        sock_id: c.u64(),
        tgid: c.u32(),
        tid: c.u32(),
        uid: c.u32(),
        port: c.u16(),
        family: c.pick(&[AF_INET, AF_INET6, AF_INET, AF_INET6, 0, 1], AF_INET),
        proto: c.pick(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_TCP, 1], IPPROTO_TCP),
        kind: c.pick(&[1, 2, 1, 2, 0, 3], 1),
        _pad: c.bytes(),
        addr: c.bytes(),
        comm: c.bytes(),
    }
}

fn structured_drop(c: &mut Cursor) -> DropReport {
    let v4 = u8::try_from(AF_INET).unwrap_or(2);
    let v6 = u8::try_from(AF_INET6).unwrap_or(10);
    DropReport {
        ts_ns: c.u64(),
        ifindex: c.u32(),
        reason: c.pick(&[1, 2, 3, 4, 0, 5], 1),
        proto: c.byte(),
        family: c.pick(&[v4, v6, v4, v6, 0], v4),
        audit: c.byte(),
        src_port: c.u16(),
        dst_port: c.u16(),
        _pad: c.u32(),
        src: c.bytes(),
        dst: c.bytes(),
    }
}

/// What `decode_listen` must make of `ev`, worked out from the struct
/// rather than from bytes.
fn expected_listen(ev: &ListenEvent) -> Result<RawListen, DecodeError> {
    let kind = match ListenKind::from_u8(ev.kind) {
        Some(ListenKind::Listen) => EventKind::Listen,
        Some(ListenKind::Close) => EventKind::Close,
        None => return Err(DecodeError::Kind(ev.kind)),
    };
    let (proto, sock_id) = match ev.proto {
        IPPROTO_TCP => (Proto::Tcp, SockId::KernelAddr(ev.sock_id)),
        IPPROTO_UDP => (Proto::Udp, SockId::Cookie(ev.sock_id)),
        other => return Err(DecodeError::Proto(other)),
    };
    let addr = ip_of(ev.family, &ev.addr).ok_or(DecodeError::Family(ev.family))?;
    let comm = ev.comm.split(|b| *b == 0).next().unwrap_or(&[]);
    Ok(RawListen {
        ts_ns: ev.ts_ns,
        kind,
        proto,
        addr,
        port: ev.port,
        sock_id,
        tgid: ev.tgid,
        tid: ev.tid,
        uid: ev.uid,
        comm: String::from_utf8_lossy(comm).into_owned(),
    })
}

fn expected_drop(r: &DropReport) -> Result<RawDrop, DecodeError> {
    let reason = match r.reason {
        1 => DropReason::NoRule,
        2 => DropReason::SourceNotAllowed,
        3 => DropReason::Malformed,
        4 => DropReason::Fragment,
        5 => DropReason::RateLimited,
        other => return Err(DecodeError::Reason(other)),
    };
    Ok(RawDrop {
        ts_ns: r.ts_ns,
        ifindex: r.ifindex,
        reason,
        proto: r.proto,
        src: ip_of(u16::from(r.family), &r.src),
        dst: ip_of(u16::from(r.family), &r.dst),
        src_port: r.src_port,
        dst_port: r.dst_port,
        audit: r.audit != 0,
    })
}

fn ip_of(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks reach past their first branch: a valid input of each kind
    /// passes, and the structured side builds non-trivial values.
    #[test]
    fn checks_accept_valid_inputs() -> Result<(), Violation> {
        allow_spec(b"tcp/8000-8099")?;
        policy_file(b"allow = [\"tcp/22\", { port = \"udp/53\", from = [\"10.0.0.0/8\"] }]\n")?;
        control_request(b"{\"cmd\":\"allow\",\"spec\":\"tcp/1\",\"from\":[\"::1\"]}\n")?;
        let mut ev = vec![0u8; ListenEvent::SIZE.max(DropReport::SIZE)];
        ev.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        ring_event(&ev)?;
        // Audit; one interface of two pieces, "eth" and "0"; one rule: tcp,
        // port 22 (native byte order), single, from anywhere.
        let port = u16::from_ne_bytes([22, 0]);
        let p = structured_policy(&mut Cursor::new(&[2, 1, 1, 0, 1, 1, 0, 22, 0, 1, 0]));
        assert_eq!(p.mode, Some(Mode::Audit));
        assert_eq!(p.interfaces, ["eth0"]);
        assert_eq!(
            p.rules,
            [Rule::anywhere(PortRange::single(Proto::Tcp, port))]
        );
        Ok(())
    }

    #[test]
    fn the_reference_grammar() {
        assert_eq!(reference_spec("tcp/022"), Some((IpProto::TCP, 22, 22)));
        assert_eq!(
            reference_spec("udp/1-65535"),
            Some((IpProto::UDP, 1, 65535))
        );
        assert_eq!(reference_spec("proto/vrrp"), Some((IpProto(112), 0, 0)));
        assert_eq!(reference_spec("proto/6"), None);
        assert_eq!(reference_spec("proto/256"), None);
        for bad in ["tcp/0", "tcp/65536", "tcp/2-1", "TCP/1", "tcp/+1", "tcp/1-"] {
            assert_eq!(reference_spec(bad), None, "{bad}");
        }
    }

    #[test]
    fn violations_are_reported() {
        assert!(check_record(&[0; 3], 8, &Ok(()), |_| Ok(())).is_err());
        assert!(round_trip("x", &Policy::default()).is_ok());
        let bad = Policy {
            interfaces: vec!["a b".into()],
            ..Policy::default()
        };
        assert!(round_trip("bad interface", &bad).is_err());
    }
}

/// The fuzz targets' checks, run in the unit tests on inputs proptest
/// generates: byte soup (the structured side reads it through `Cursor`),
/// and text shaped like what each parser expects, so that most inputs get
/// past the first check.
#[cfg(test)]
mod generated {
    use proptest::prelude::*;

    use super::*;

    fn holds(check: fn(&[u8]) -> Result<(), Violation>, input: &[u8]) -> Result<(), TestCaseError> {
        check(input).map_err(|v| TestCaseError::fail(v.to_string()))
    }

    /// A policy file: well-formed rules, specs and sources most of the time.
    fn policy_text() -> impl Strategy<Value = String> {
        // Mostly valid values, one in ten not.
        let spec = prop_oneof![
            9 => "(tcp|udp)/(1|22|53|443|8000|9000|65535)",
            1 => "(sctp|TCP|tcp)/(0|70000|x|8099-80)",
        ];
        let source = prop_oneof![
            9 => "(10\\.0\\.0\\.0/8|192\\.0\\.2\\.1|fd00::/8|::1)",
            1 => "(10\\.0\\.0\\.1/8|::ffff:10\\.0\\.0\\.0/104|nope)",
        ];
        let entry = prop_oneof![
            spec.clone().prop_map(|s| format!("\"{s}\"")),
            (spec, prop::collection::vec(source, 0..3)).prop_map(|(s, from)| {
                let from: Vec<String> = from.iter().map(|f| format!("\"{f}\"")).collect();
                format!("{{ port = \"{s}\", from = [{}] }}", from.join(", "))
            }),
        ];
        (
            "(mode = \"(audit|enforce|x)\"\n)?",
            "(interfaces = \\[\"eth0\"(, \"lo\")?\\]\n)?",
            prop::collection::vec(entry, 0..4),
        )
            .prop_map(|(mode, ifaces, rules)| {
                format!("{mode}{ifaces}allow = [\n  {}\n]\n", rules.join(",\n  "))
            })
    }

    /// The text generator must reach the checks after parsing, not only
    /// the parser's errors.
    #[test]
    fn the_policy_generator_makes_valid_files_too() -> Result<(), proptest::test_runner::Reason> {
        use proptest::{strategy::ValueTree as _, test_runner::TestRunner};
        let mut runner = TestRunner::deterministic();
        let strategy = policy_text();
        let mut with_rules = 0;
        for _ in 0..500 {
            let text = strategy.new_tree(&mut runner)?.current();
            with_rules += usize::from(Policy::parse(&text).is_ok_and(|p| !p.rules.is_empty()));
        }
        assert!(with_rules > 50, "{with_rules} of 500 with rules");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn policy_files(text in policy_text()) {
            holds(policy_file, text.as_bytes())?;
        }

        #[test]
        fn policy_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            holds(policy_file, &bytes)?;
        }

        #[test]
        fn allow_specs(text in "[a-zA-Z]{0,4}/?[0-9+ -]{0,12}") {
            holds(allow_spec, text.as_bytes())?;
        }

        #[test]
        fn control_requests(
            cmd in "(allow|deny|policy|reload|status|subscribe|shutdown|x)",
            spec in "(tcp|udp|x)/[0-9]{1,6}",
            from in prop::collection::vec("(10\\.0\\.0\\.0/8|fd00::/8|::1|x)", 0..3),
            tail in "[ \r\n]{0,2}",
        ) {
            let line = serde_json::json!({"cmd": cmd, "spec": spec, "from": from}).to_string();
            holds(control_request, format!("{line}{tail}").as_bytes())?;
        }

        #[test]
        fn control_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            holds(control_request, &bytes)?;
        }

        #[test]
        fn ring_records(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
            holds(ring_event, &bytes)?;
        }
    }
}
