//! Turns ring-buffer bytes into typed records. Length-checked and field by
//! field (no transmute): a short or unknown record is an error, never UB.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Buf;
use portwatch_common::{
    AF_INET, AF_INET6, DropReport, IPPROTO_TCP, IPPROTO_UDP, ListenEvent, ListenKind,
    drop_report_offsets as doff, listen_event_offsets as off,
};
use portwatch_common::{BIND_AUDITED, BIND_DENIED, BindReport, bind_report_offsets as boff};

use crate::model::{DropReason, EventKind, PassReason, Proto, SockId};

/// A listener event as the kernel reported it, before user space enrichment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawListen {
    pub ts_ns: u64,
    pub kind: EventKind,
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub sock_id: SockId,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub comm: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {got} bytes is shorter than a listener event ({need} bytes)")]
    Short { got: usize, need: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown protocol {0}")]
    Proto(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown drop reason {0}")]
    Reason(u8),
    #[error("unknown bind verdict {0}")]
    Verdict(u8),
}

/// Decodes one `ListenEvent` record (native byte order, as the kernel wrote it).
pub fn decode_listen(record: &[u8]) -> Result<RawListen, DecodeError> {
    if record.len() < ListenEvent::SIZE {
        return Err(DecodeError::Short {
            got: record.len(),
            need: ListenEvent::SIZE,
        });
    }
    let u64_at = |o: usize| (&record[o..o + 8]).get_u64_ne();
    let u32_at = |o: usize| (&record[o..o + 4]).get_u32_ne();
    let u16_at = |o: usize| (&record[o..o + 2]).get_u16_ne();

    let kind = match ListenKind::from_u8(record[off::KIND]) {
        Some(ListenKind::Listen) => EventKind::Listen,
        Some(ListenKind::Close) => EventKind::Close,
        None => return Err(DecodeError::Kind(record[off::KIND])),
    };
    let proto = match record[off::PROTO] {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        other => return Err(DecodeError::Proto(other)),
    };
    let family = u16_at(off::FAMILY);
    let addr =
        ip_of(family, &record[off::ADDR..off::ADDR + 16]).ok_or(DecodeError::Family(family))?;
    let raw_id = u64_at(off::SOCK_ID);
    let sock_id = match proto {
        Proto::Tcp => SockId::KernelAddr(raw_id),
        Proto::Udp => SockId::Cookie(raw_id),
    };
    Ok(RawListen {
        ts_ns: u64_at(off::TS_NS),
        kind,
        proto,
        addr,
        port: u16_at(off::PORT),
        sock_id,
        tgid: u32_at(off::TGID),
        tid: u32_at(off::TID),
        uid: u32_at(off::UID),
        comm: c_string(&record[off::COMM..off::COMM + 16]),
    })
}

/// A drop report as the kernel wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDrop {
    pub ts_ns: u64,
    pub ifindex: u32,
    pub reason: DropReason,
    pub proto: u8,
    /// None for frames without IP addresses (a malformed frame).
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    pub audit: bool,
}

/// Decodes one `DropReport` record.
/// An address as the kernel records it (family, then 16 bytes with an
/// IPv4 address in the first 4); None for another family.
pub fn ip_of(family: u16, raw: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            *raw.first()?,
            *raw.get(1)?,
            *raw.get(2)?,
            *raw.get(3)?,
        ))),
        AF_INET6 => {
            let octets: [u8; 16] = raw.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// An address as the kernel's keys hold it: the family, and 16 bytes with
/// IPv4 in the first 4.
pub fn kernel_addr(addr: &IpAddr) -> (u8, [u8; 16]) {
    match addr {
        IpAddr::V4(a) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&a.octets());
            (AF_INET as u8, out)
        }
        IpAddr::V6(a) => (AF_INET6 as u8, a.octets()),
    }
}

/// The kernel's drop reason code.
pub fn drop_reason(code: u8) -> Option<DropReason> {
    use portwatch_common::DropReason as K;
    Some(match K::from_u8(code)? {
        K::NoRule => DropReason::NoRule,
        K::Source => DropReason::SourceNotAllowed,
        K::Malformed => DropReason::Malformed,
        K::Fragment => DropReason::Fragment,
        K::RateLimited => DropReason::RateLimited,
    })
}

/// The kernel's pass reason code (a probe's answer).
pub fn pass_reason(code: u8) -> Option<PassReason> {
    use portwatch_common::PassReason as K;
    Some(match K::from_u8(code)? {
        K::Rule => PassReason::Rule,
        K::Connection => PassReason::Connection,
        K::OwnFlow => PassReason::OwnFlow,
        K::NotIp => PassReason::NotIp,
        K::Control => PassReason::Control,
        K::Dhcp => PassReason::Dhcp,
        K::Fragment => PassReason::Fragment,
        K::Forwarded => PassReason::Forwarded,
    })
}

pub fn decode_drop(record: &[u8]) -> Result<RawDrop, DecodeError> {
    if record.len() < DropReport::SIZE {
        return Err(DecodeError::Short {
            got: record.len(),
            need: DropReport::SIZE,
        });
    }
    let reason =
        drop_reason(record[doff::REASON]).ok_or(DecodeError::Reason(record[doff::REASON]))?;
    let addr = |at: usize| ip_of(u16::from(record[doff::FAMILY]), &record[at..at + 16]);
    Ok(RawDrop {
        ts_ns: (&record[doff::TS_NS..doff::TS_NS + 8]).get_u64_ne(),
        ifindex: (&record[doff::IFINDEX..doff::IFINDEX + 4]).get_u32_ne(),
        reason,
        proto: record[doff::PROTO],
        src: addr(doff::SRC),
        dst: addr(doff::DST),
        src_port: (&record[doff::SRC_PORT..doff::SRC_PORT + 2]).get_u16_ne(),
        dst_port: (&record[doff::DST_PORT..doff::DST_PORT + 2]).get_u16_ne(),
        audit: record[doff::AUDIT] != 0,
    })
}

/// A bind of an owned port by a task that is not its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawBind {
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub uid: u32,
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    /// Let through and reported (audit mode); otherwise refused.
    pub audit: bool,
    pub comm: String,
}

/// Decodes one `BindReport` record.
pub fn decode_bind(record: &[u8]) -> Result<RawBind, DecodeError> {
    if record.len() < BindReport::SIZE {
        return Err(DecodeError::Short {
            got: record.len(),
            need: BindReport::SIZE,
        });
    }
    let u64_at = |o: usize| (&record[o..o + 8]).get_u64_ne();
    let u32_at = |o: usize| (&record[o..o + 4]).get_u32_ne();
    let u16_at = |o: usize| (&record[o..o + 2]).get_u16_ne();
    let audit = match record[boff::VERDICT] {
        BIND_DENIED => false,
        BIND_AUDITED => true,
        other => return Err(DecodeError::Verdict(other)),
    };
    let proto = match record[boff::PROTO] {
        IPPROTO_TCP => Proto::Tcp,
        IPPROTO_UDP => Proto::Udp,
        other => return Err(DecodeError::Proto(other)),
    };
    let family = u16_at(boff::FAMILY);
    let addr =
        ip_of(family, &record[boff::ADDR..boff::ADDR + 16]).ok_or(DecodeError::Family(family))?;
    Ok(RawBind {
        ts_ns: u64_at(boff::TS_NS),
        cgroup_id: u64_at(boff::CGROUP_ID),
        tgid: u32_at(boff::TGID),
        uid: u32_at(boff::UID),
        proto,
        addr,
        port: u16_at(boff::PORT),
        audit,
        comm: c_string(&record[boff::COMM..boff::COMM + 16]),
    })
}

/// A `BindReport` record as the kernel lays it out (native byte order).
#[cfg(any(test, feature = "test-helpers", feature = "fuzzing"))]
pub fn encode_bind(r: &BindReport) -> Vec<u8> {
    let mut out = vec![0u8; BindReport::SIZE];
    out[boff::TS_NS..boff::TS_NS + 8].copy_from_slice(&r.ts_ns.to_ne_bytes());
    out[boff::CGROUP_ID..boff::CGROUP_ID + 8].copy_from_slice(&r.cgroup_id.to_ne_bytes());
    out[boff::TGID..boff::TGID + 4].copy_from_slice(&r.tgid.to_ne_bytes());
    out[boff::UID..boff::UID + 4].copy_from_slice(&r.uid.to_ne_bytes());
    out[boff::PORT..boff::PORT + 2].copy_from_slice(&r.port.to_ne_bytes());
    out[boff::FAMILY..boff::FAMILY + 2].copy_from_slice(&r.family.to_ne_bytes());
    out[boff::PROTO] = r.proto;
    out[boff::VERDICT] = r.verdict;
    out[boff::ADDR..boff::ADDR + 16].copy_from_slice(&r.addr);
    out[boff::COMM..boff::COMM + 16].copy_from_slice(&r.comm);
    out
}

/// A NUL-padded kernel string, lossily as UTF-8.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Builds a record exactly as the kernel lays it out; for tests, benches
/// and the fuzz checks.
#[cfg(any(test, feature = "test-helpers", feature = "fuzzing"))]
pub fn encode_listen(ev: &ListenEvent) -> Vec<u8> {
    let mut out = vec![0u8; ListenEvent::SIZE];
    out[off::TS_NS..off::TS_NS + 8].copy_from_slice(&ev.ts_ns.to_ne_bytes());
    out[off::SOCK_ID..off::SOCK_ID + 8].copy_from_slice(&ev.sock_id.to_ne_bytes());
    out[off::TGID..off::TGID + 4].copy_from_slice(&ev.tgid.to_ne_bytes());
    out[off::TID..off::TID + 4].copy_from_slice(&ev.tid.to_ne_bytes());
    out[off::UID..off::UID + 4].copy_from_slice(&ev.uid.to_ne_bytes());
    out[off::PORT..off::PORT + 2].copy_from_slice(&ev.port.to_ne_bytes());
    out[off::FAMILY..off::FAMILY + 2].copy_from_slice(&ev.family.to_ne_bytes());
    out[off::PROTO] = ev.proto;
    out[off::KIND] = ev.kind;
    out[off::ADDR..off::ADDR + 16].copy_from_slice(&ev.addr);
    out[off::COMM..off::COMM + 16].copy_from_slice(&ev.comm);
    out
}

/// A `DropReport` record as the kernel lays it out (native byte order).
#[cfg(any(test, feature = "test-helpers", feature = "fuzzing"))]
pub fn encode_drop(r: &DropReport) -> Vec<u8> {
    let mut out = vec![0u8; DropReport::SIZE];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = out.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(doff::TS_NS, &r.ts_ns.to_ne_bytes());
    put(doff::IFINDEX, &r.ifindex.to_ne_bytes());
    put(doff::REASON, &[r.reason]);
    put(doff::PROTO, &[r.proto]);
    put(doff::FAMILY, &[r.family]);
    put(doff::AUDIT, &[r.audit]);
    put(doff::SRC_PORT, &r.src_port.to_ne_bytes());
    put(doff::DST_PORT, &r.dst_port.to_ne_bytes());
    put(doff::SRC, &r.src);
    put(doff::DST, &r.dst);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_drop_reports() {
        let mut rec = vec![0u8; DropReport::SIZE];
        rec[doff::REASON] = 2;
        rec[doff::PROTO] = IPPROTO_TCP;
        rec[doff::FAMILY] = AF_INET as u8;
        rec[doff::AUDIT] = 1;
        rec[doff::IFINDEX..doff::IFINDEX + 4].copy_from_slice(&7u32.to_ne_bytes());
        rec[doff::SRC_PORT..doff::SRC_PORT + 2].copy_from_slice(&40000u16.to_ne_bytes());
        rec[doff::DST_PORT..doff::DST_PORT + 2].copy_from_slice(&6379u16.to_ne_bytes());
        rec[doff::SRC..doff::SRC + 4].copy_from_slice(&[203, 0, 113, 7]);
        let d = decode_drop(&rec).expect("valid");
        assert_eq!(d.reason, DropReason::SourceNotAllowed);
        assert_eq!(d.src, Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))));
        assert_eq!(
            (d.src_port, d.dst_port, d.ifindex, d.audit),
            (40000, 6379, 7, true)
        );
        rec[doff::REASON] = 0;
        assert_eq!(decode_drop(&rec), Err(DecodeError::Reason(0)));
        assert!(matches!(
            decode_drop(&rec[..10]),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn decodes_bind_reports() {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"python3");
        let report = BindReport {
            ts_ns: 77,
            cgroup_id: 0x1234,
            tgid: 4242,
            uid: 1000,
            port: 6379,
            family: AF_INET6,
            proto: IPPROTO_UDP,
            verdict: BIND_DENIED,
            _pad: [0; 2],
            addr: Ipv6Addr::LOCALHOST.octets(),
            comm,
        };
        let b = decode_bind(&encode_bind(&report)).expect("valid");
        assert_eq!(
            (b.ts_ns, b.cgroup_id, b.tgid, b.uid, b.port),
            (77, 0x1234, 4242, 1000, 6379)
        );
        assert_eq!(
            (b.proto, b.addr, b.audit, b.comm.as_str()),
            (
                Proto::Udp,
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                false,
                "python3"
            )
        );
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[127, 0, 0, 1]);
        let audited = BindReport {
            verdict: BIND_AUDITED,
            family: AF_INET,
            addr: v4,
            ..report
        };
        let b = decode_bind(&encode_bind(&audited)).expect("valid");
        assert!(b.audit);
        assert_eq!(b.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        for (bad, err) in [
            (
                BindReport {
                    verdict: 0,
                    ..report
                },
                DecodeError::Verdict(0),
            ),
            (BindReport { proto: 1, ..report }, DecodeError::Proto(1)),
            (
                BindReport {
                    family: 1,
                    ..report
                },
                DecodeError::Family(1),
            ),
        ] {
            assert_eq!(decode_bind(&encode_bind(&bad)), Err(err));
        }
        assert!(matches!(
            decode_bind(&encode_bind(&report)[..BindReport::SIZE - 1]),
            Err(DecodeError::Short { .. })
        ));
    }

    fn sample() -> ListenEvent {
        let mut comm = [0u8; 16];
        comm[..7].copy_from_slice(b"python3");
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ListenEvent {
            ts_ns: 123_456_789,
            sock_id: 0xffff_8880_1234_5678,
            tgid: 4242,
            tid: 4243,
            uid: 1000,
            port: 8765,
            family: AF_INET,
            proto: IPPROTO_TCP,
            kind: ListenKind::Listen as u8,
            _pad: [0; 6],
            addr,
            comm,
        }
    }

    #[test]
    fn decodes_every_field() {
        let raw = decode_listen(&encode_listen(&sample())).expect("valid record");
        assert_eq!(raw.ts_ns, 123_456_789);
        assert_eq!(raw.kind, EventKind::Listen);
        assert_eq!(raw.proto, Proto::Tcp);
        assert_eq!(raw.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(raw.port, 8765);
        assert_eq!(raw.sock_id, SockId::KernelAddr(0xffff_8880_1234_5678));
        assert_eq!((raw.tgid, raw.tid, raw.uid), (4242, 4243, 1000));
        assert_eq!(raw.comm, "python3");
    }

    #[test]
    fn decodes_ipv6_udp_close_with_cookie() {
        let mut ev = sample();
        ev.family = AF_INET6;
        ev.proto = IPPROTO_UDP;
        ev.kind = ListenKind::Close as u8;
        ev.addr = Ipv6Addr::LOCALHOST.octets();
        ev.comm = [b'x'; 16]; // no NUL at all: all 16 bytes are the name
        let raw = decode_listen(&encode_listen(&ev)).expect("valid record");
        assert_eq!(raw.kind, EventKind::Close);
        assert_eq!(raw.addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(raw.sock_id, SockId::Cookie(0xffff_8880_1234_5678));
        assert_eq!(raw.comm, "x".repeat(16));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let bytes = encode_listen(&sample());
        for len in [0, 1, ListenEvent::SIZE - 1] {
            assert_eq!(
                decode_listen(&bytes[..len]),
                Err(DecodeError::Short {
                    got: len,
                    need: ListenEvent::SIZE
                })
            );
        }
        let mut bad = sample();
        bad.kind = 9;
        assert_eq!(
            decode_listen(&encode_listen(&bad)),
            Err(DecodeError::Kind(9))
        );
        let mut bad = sample();
        bad.proto = 1;
        assert_eq!(
            decode_listen(&encode_listen(&bad)),
            Err(DecodeError::Proto(1))
        );
        let mut bad = sample();
        bad.family = 1;
        assert_eq!(
            decode_listen(&encode_listen(&bad)),
            Err(DecodeError::Family(1))
        );
    }
}
