//! How values read to people, written once: addresses, protocols, byte
//! counts, times, user names, and cutting text to a width. The sinks, the
//! status table and `top` all use these, so the same listener reads the
//! same everywhere.

use std::{collections::HashMap, net::IpAddr, time::SystemTime};

/// `redis-server (pid 812)`: a process as the stream names it, with what
/// is known of it.
pub fn process(comm: Option<&str>, pid: Option<u32>) -> String {
    match (comm, pid) {
        (Some(comm), Some(pid)) => format!("{comm} (pid {pid})"),
        (Some(comm), None) => comm.to_owned(),
        (None, Some(pid)) => format!("pid {pid}"),
        (None, None) => "an unknown process".to_owned(),
    }
}

/// What a refused (or audited) bind of an owned port says, in the stream
/// and the journal.
pub fn bind(b: &crate::model::BindEvent) -> String {
    let verdict = if b.audit {
        "would have been refused (audit)"
    } else {
        "refused (EPERM)"
    };
    let cgroup = b
        .cgroup
        .as_deref()
        .map(|c| format!(", cgroup {c}"))
        .unwrap_or_default();
    format!(
        "port {} bind of {} {verdict}: {} (pid {}, uid {}{cgroup}) is not its owner ({})",
        b.port,
        endpoint(&b.addr, port_of(&b.port)),
        b.comm,
        b.pid,
        b.uid,
        b.owner
    )
}

/// What a listener on an owned port that is not its owner says.
pub fn not_owner(e: &crate::model::NotOwnerEvent) -> String {
    let who = process(e.comm.as_deref(), e.pid);
    let exe = e
        .exe
        .as_deref()
        .map(|x| format!(", exe {x}"))
        .unwrap_or_default();
    format!(
        "port {} stays closed: {who}{exe} listens but is not its owner ({})",
        e.port, e.owner
    )
}

/// The number of `tcp/6379`.
fn port_of(port: &str) -> u16 {
    port.rsplit('/')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// `1.2.3.4:80`, `[::]:80`.
pub fn endpoint(addr: &IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// `tcp`, `udp`, `icmp`, `icmpv6`, or the IP protocol number for others.
/// An exposure with the unguarded interfaces that widen it:
/// `exposed via eth1,wg0 (not guarded)`, or just `blocked`.
pub fn exposure(exposure: crate::model::Exposure, unguarded: &[String]) -> String {
    if unguarded.is_empty() {
        exposure.as_str().to_owned()
    } else {
        format!(
            "{} via {} (not guarded)",
            exposure.as_str(),
            unguarded.join(",")
        )
    }
}

pub fn proto_name(proto: u8) -> String {
    crate::model::IpProto(proto).to_string()
}

/// `900 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("PiB"))
}

/// `text` cut to `max` characters, the last one an ellipsis when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    if max == 0 {
        return String::new();
    }
    let mut cut: String = text.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// An `address:port` cut to `width`, keeping the port: the host part is
/// what gives way.
pub fn truncate_endpoint(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    match s.rfind(':') {
        Some(colon) => {
            let (host, port) = s.split_at(colon);
            let port_len = port.chars().count();
            if width > port_len + 1 {
                let mut out = truncate(host, width - port_len);
                out.push_str(port);
                out
            } else {
                truncate(s, width)
            }
        }
        None => truncate(s, width),
    }
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-25T01:02:03.456789Z`.
pub fn rfc3339_micros(ts: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(ts);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// [`rfc3339_micros`] for a stream of times: the calendar part, to the
/// second, is rendered once per second and the microseconds appended, so a
/// burst of lines does not pay for a calendar conversion and a `format!`
/// each.
#[derive(Debug, Default)]
pub struct Rfc3339Micros {
    /// Seconds since the epoch, and `YYYY-MM-DDTHH:MM:SS` of them.
    second: Option<(u64, String)>,
}

impl Rfc3339Micros {
    pub fn write(&mut self, ts: SystemTime, out: &mut impl std::io::Write) -> std::io::Result<()> {
        // Times before the epoch (a clock set back far) take the long way.
        let Ok(since) = ts.duration_since(std::time::UNIX_EPOCH) else {
            return out.write_all(rfc3339_micros(ts).as_bytes());
        };
        let secs = since.as_secs();
        let prefix = match &self.second {
            Some((s, prefix)) if *s == secs => prefix,
            _ => {
                let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
                let mut text = rfc3339_micros(whole);
                text.truncate(text.rfind('.').unwrap_or(text.len()));
                &self.second.insert((secs, text)).1
            }
        };
        let mut tail = *b".000000Z";
        let mut micros = since.subsec_micros();
        for digit in tail[1..7].iter_mut().rev() {
            // micros % 10 < 10: the cast cannot truncate.
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out.write_all(prefix.as_bytes())?;
        out.write_all(&tail)
    }
}

/// Parses what [`rfc3339_micros`] writes (any RFC 3339 time, in fact).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// `HH:MM:SS.micros` (UTC).
pub fn time_of_day_micros(ts: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(ts);
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond()
    )
}

/// `HH:MM:SS` (UTC).
pub fn time_of_day(ts: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(ts);
    format!("{:02}:{:02}:{:02}", dt.hour(), dt.minute(), dt.second())
}

/// User names by uid, each looked up once (NSS lookups can be slow).
#[derive(Debug, Default)]
pub struct UserNames(HashMap<u32, Option<String>>);

impl UserNames {
    /// The name of `uid`, if the system has one.
    pub fn lookup(&mut self, uid: u32) -> Option<String> {
        self.0
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    /// The name of `uid`, or the number when it has none.
    pub fn name(&mut self, uid: u32) -> String {
        self.lookup(uid).unwrap_or_else(|| uid.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn endpoints() {
        let v6: IpAddr = "::1".parse().unwrap_or(IpAddr::from([0u8; 16]));
        assert_eq!(endpoint(&v6, 53), "[::1]:53");
        assert_eq!(endpoint(&IpAddr::from([10, 0, 0, 1]), 80), "10.0.0.1:80");
        assert_eq!(
            truncate_endpoint("192.168.100.200:8080", 12),
            "192.16…:8080"
        );
        assert_eq!(truncate_endpoint("[::]:8080", 20), "[::]:8080");
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate("abcdef", 6), "abcdef");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcdef", 0), "");
    }

    #[test]
    fn times() {
        let ts = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        assert_eq!(rfc3339_micros(ts), "2026-11-18T11:06:40.123456Z");
        assert_eq!(parse_rfc3339("2026-11-18T11:06:40.123456Z"), Some(ts));
        assert_eq!(time_of_day_micros(ts), "11:06:40.123456");
        assert_eq!(time_of_day(ts), "11:06:40");
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn protocols() {
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(17), "udp");
        assert_eq!(proto_name(47), "gre");
        assert_eq!(proto_name(253), "253");
    }
}
