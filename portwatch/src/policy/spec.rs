//! Rule specs: `tcp/22`, `udp/53`, `sctp/8000-8099` (inclusive ranges),
//! and whole protocols without ports: `proto/vrrp`, `proto/112`.
//!
//! The same syntax serves `--allow`, the policy file and the runtime
//! `allow`/`deny` commands, so every error quotes the spec it was given.

use std::{fmt, str::FromStr};

use crate::model::IpProto;

/// An IP protocol and an inclusive port range; a single port has
/// `lo == hi`. A protocol without ports (`proto/gre`) has the one range
/// 0-0: the whole protocol.
///
/// The fields are public for matching; values built by hand are checked
/// with [`PortRange::new`] wherever a policy accepts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub proto: IpProto,
    pub lo: u16,
    pub hi: u16,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "{spec:?}: expected PROTO/PORT, PROTO/LO-HI or proto/NAME, e.g. tcp/22, sctp/3868 or \
         proto/vrrp"
    )]
    Format { spec: String },
    #[error("{spec:?}: unknown protocol {proto:?} (expected tcp, udp, sctp or proto/NAME{hint})")]
    UnknownProto {
        spec: String,
        proto: String,
        /// ", in lowercase" when the protocol only has the wrong case.
        hint: &'static str,
    },
    #[error(
        "{spec:?}: unknown IP protocol {name:?} (a number 0-255 or a name such as vrrp, gre, \
         esp, ospf, ipip, pim, l2tp)"
    )]
    UnknownIpProto { spec: String, name: String },
    #[error("{spec:?}: {proto} has ports: write {proto}/PORT or {proto}/1-65535")]
    HasPorts { spec: String, proto: IpProto },
    #[error("{spec:?}: {proto} is always permitted (the host needs it), so no rule can name it")]
    AlwaysPermitted { spec: String, proto: IpProto },
    #[error(
        "{spec:?}: {number} is an IPv6 extension header (or AH): the guard looks through it and \
         judges what it carries"
    )]
    LookedThrough { spec: String, number: u8 },
    #[error("{spec:?}: port {port:?} is not a number")]
    NotANumber { spec: String, port: String },
    #[error("{spec:?}: port 0 is not a valid port (1-65535)")]
    PortZero { spec: String },
    #[error("{spec:?}: port {port} is out of range (1-65535)")]
    OutOfRange { spec: String, port: String },
    #[error("{spec:?}: range is reversed (did you mean {fixed}?)")]
    Reversed { spec: String, fixed: PortRange },
}

/// Transport protocols with ports, as specs name them.
fn port_proto(name: &str) -> Option<IpProto> {
    match name {
        "tcp" => Some(IpProto::TCP),
        "udp" => Some(IpProto::UDP),
        "sctp" => Some(IpProto::SCTP),
        _ => None,
    }
}

/// Protocol numbers the guard walks through instead of judging: IPv6
/// hop-by-hop, routing, fragment, destination options, and AH.
const LOOKED_THROUGH: [u8; 5] = [0, 43, 44, 51, 60];

impl PortRange {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let format = || SpecError::Format { spec: s.to_owned() };
        let (proto, ports) = s.split_once('/').ok_or_else(format)?;
        if proto == "proto" {
            return Self::protocol(s, ports);
        }
        let proto = match port_proto(proto) {
            Some(p) => p,
            None if proto.is_empty() => return Err(format()),
            None => {
                let lower = proto.to_ascii_lowercase();
                return Err(SpecError::UnknownProto {
                    spec: s.to_owned(),
                    proto: proto.to_owned(),
                    hint: if port_proto(&lower).is_some() || lower == "proto" {
                        ", in lowercase"
                    } else {
                        ""
                    },
                });
            }
        };
        let (lo, hi) = match ports.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (ports, ports),
        };
        if lo.is_empty() || hi.is_empty() {
            return Err(format());
        }
        let (lo, hi) = (parse_port(s, lo)?, parse_port(s, hi)?);
        if lo > hi {
            return Err(SpecError::Reversed {
                spec: s.to_owned(),
                fixed: PortRange {
                    proto,
                    lo: hi,
                    hi: lo,
                },
            });
        }
        Ok(PortRange { proto, lo, hi })
    }

    /// `proto/NAME` or `proto/NUMBER`: a whole protocol without ports.
    fn protocol(s: &str, name: &str) -> Result<Self, SpecError> {
        if name.is_empty() {
            return Err(SpecError::Format { spec: s.to_owned() });
        }
        let proto =
            IpProto::from_name_or_number(name).ok_or_else(|| SpecError::UnknownIpProto {
                spec: s.to_owned(),
                name: name.to_owned(),
            })?;
        Self::whole(proto).map_err(|e| e.with_spec(s))
    }

    /// Every packet of a protocol without ports.
    pub fn whole(proto: IpProto) -> Result<Self, SpecError> {
        let spec = || format!("proto/{proto}");
        if proto.has_ports() {
            return Err(SpecError::HasPorts {
                spec: spec(),
                proto,
            });
        }
        if matches!(proto, IpProto::ICMP | IpProto::ICMPV6 | IpProto::IGMP) {
            return Err(SpecError::AlwaysPermitted {
                spec: spec(),
                proto,
            });
        }
        if LOOKED_THROUGH.contains(&proto.0) {
            return Err(SpecError::LookedThrough {
                spec: spec(),
                number: proto.0,
            });
        }
        Ok(PortRange {
            proto,
            lo: 0,
            hi: 0,
        })
    }

    /// Checks a range built by hand: ports 1-65535 and `lo <= hi` for a
    /// protocol with ports, 0-0 for one without. The error quotes the
    /// range as it would be written.
    pub fn new(proto: impl Into<IpProto>, lo: u16, hi: u16) -> Result<Self, SpecError> {
        let proto = proto.into();
        let range = PortRange { proto, lo, hi };
        if !proto.has_ports() {
            let whole = Self::whole(proto)?;
            return if (lo, hi) == (0, 0) {
                Ok(whole)
            } else {
                Err(SpecError::Format {
                    spec: format!("proto/{proto}/{lo}-{hi}"),
                })
            };
        }
        if lo == 0 {
            Err(SpecError::PortZero {
                spec: range.to_string(),
            })
        } else if lo > hi {
            Err(SpecError::Reversed {
                spec: range.to_string(),
                fixed: PortRange {
                    proto,
                    lo: hi,
                    hi: lo,
                },
            })
        } else {
            Ok(range)
        }
    }

    /// One port (0 for a protocol without ports). Port 0 of a protocol
    /// with ports is not checked here: [`PortRange::new`] does that.
    pub fn single(proto: impl Into<IpProto>, port: u16) -> Self {
        PortRange {
            proto: proto.into(),
            lo: port,
            hi: port,
        }
    }

    /// Whether it covers `port` of `proto` (any packet of a protocol
    /// without ports is port 0).
    pub fn contains(&self, proto: impl Into<IpProto>, port: u16) -> bool {
        self.proto == proto.into() && self.lo <= port && port <= self.hi
    }

    /// Shares at least one port of the same protocol.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.proto == other.proto && self.lo <= other.hi && other.lo <= self.hi
    }

    /// How many ports the range covers (1 for a whole protocol).
    pub fn port_count(&self) -> usize {
        usize::from(self.hi.saturating_sub(self.lo)) + 1
    }

    /// Whether it names a whole protocol without ports.
    pub fn is_whole_protocol(&self) -> bool {
        !self.proto.has_ports()
    }
}

impl SpecError {
    /// The same error about the spec as the user wrote it.
    fn with_spec(self, s: &str) -> Self {
        let spec = s.to_owned();
        match self {
            SpecError::HasPorts { proto, .. } => SpecError::HasPorts { spec, proto },
            SpecError::AlwaysPermitted { proto, .. } => SpecError::AlwaysPermitted { spec, proto },
            SpecError::LookedThrough { number, .. } => SpecError::LookedThrough { spec, number },
            other => other,
        }
    }
}

/// Digits only: `u16::from_str` would also take "+22".
fn parse_port(spec: &str, digits: &str) -> Result<u16, SpecError> {
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SpecError::NotANumber {
            spec: spec.to_owned(),
            port: digits.to_owned(),
        });
    }
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Err(SpecError::PortZero {
            spec: spec.to_owned(),
        });
    }
    // More than five significant digits cannot fit, however many there are.
    match significant.parse::<u16>() {
        Ok(port) if significant.len() <= 5 => Ok(port),
        _ => Err(SpecError::OutOfRange {
            spec: spec.to_owned(),
            port: significant.to_owned(),
        }),
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.proto.has_ports() {
            write!(f, "proto/{}", self.proto)
        } else if self.lo == self.hi {
            write!(f, "{}/{}", self.proto, self.lo)
        } else {
            write!(f, "{}/{}-{}", self.proto, self.lo, self.hi)
        }
    }
}

impl FromStr for PortRange {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        PortRange::parse(s)
    }
}

/// As the spec string, so JSON output and control messages read like the CLI.
impl serde::Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// From the spec string, by the one parser of specs.
impl<'de> serde::Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        PortRange::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    fn err(s: &str) -> String {
        match PortRange::parse(s) {
            Ok(r) => panic!("{s:?} parsed as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_ports_and_ranges() -> Result<(), SpecError> {
        assert_eq!(
            PortRange::parse("tcp/22")?,
            PortRange::single(Proto::Tcp, 22)
        );
        assert_eq!(
            PortRange::parse("udp/53")?,
            PortRange::single(Proto::Udp, 53)
        );
        assert_eq!(
            "tcp/8000-8099".parse::<PortRange>()?,
            PortRange {
                proto: IpProto::TCP,
                lo: 8000,
                hi: 8099
            }
        );
        assert_eq!(PortRange::parse("udp/1-65535")?.port_count(), 65535);
        assert_eq!(
            PortRange::parse("tcp/022")?,
            PortRange::single(Proto::Tcp, 22)
        );
        // A one-port range is the port.
        assert_eq!(PortRange::parse("tcp/22-22")?.to_string(), "tcp/22");
        Ok(())
    }

    #[test]
    fn displays_as_written() -> Result<(), SpecError> {
        for s in [
            "tcp/22",
            "udp/53",
            "tcp/8000-8099",
            "udp/1-65535",
            "sctp/3868",
            "proto/vrrp",
            "proto/gre",
            "proto/253",
        ] {
            assert_eq!(PortRange::parse(s)?.to_string(), s);
        }
        Ok(())
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            err("icmp/22"),
            r#""icmp/22": unknown protocol "icmp" (expected tcp, udp, sctp or proto/NAME)"#
        );
        assert_eq!(
            err("TCP/22"),
            r#""TCP/22": unknown protocol "TCP" (expected tcp, udp, sctp or proto/NAME, in lowercase)"#
        );
        assert_eq!(
            err("proto/vrrrp"),
            r#""proto/vrrrp": unknown IP protocol "vrrrp" (a number 0-255 or a name such as vrrp, gre, esp, ospf, ipip, pim, l2tp)"#
        );
        assert_eq!(
            err("proto/256"),
            r#""proto/256": unknown IP protocol "256" (a number 0-255 or a name such as vrrp, gre, esp, ospf, ipip, pim, l2tp)"#
        );
        assert_eq!(
            err("proto/6"),
            r#""proto/6": tcp has ports: write tcp/PORT or tcp/1-65535"#
        );
        assert_eq!(
            err("proto/sctp"),
            r#""proto/sctp": sctp has ports: write sctp/PORT or sctp/1-65535"#
        );
        assert_eq!(
            err("proto/icmp"),
            r#""proto/icmp": icmp is always permitted (the host needs it), so no rule can name it"#
        );
        assert_eq!(
            err("proto/ah"),
            r#""proto/ah": 51 is an IPv6 extension header (or AH): the guard looks through it and judges what it carries"#
        );
        assert_eq!(
            err("tcp/0"),
            r#""tcp/0": port 0 is not a valid port (1-65535)"#
        );
        assert_eq!(
            err("tcp/0-10"),
            r#""tcp/0-10": port 0 is not a valid port (1-65535)"#
        );
        assert_eq!(
            err("tcp/70000"),
            r#""tcp/70000": port 70000 is out of range (1-65535)"#
        );
        assert_eq!(
            err("tcp/1-99999999999999999999999"),
            r#""tcp/1-99999999999999999999999": port 99999999999999999999999 is out of range (1-65535)"#
        );
        assert_eq!(err("tcp/ssh"), r#""tcp/ssh": port "ssh" is not a number"#);
        assert_eq!(err("tcp/+22"), r#""tcp/+22": port "+22" is not a number"#);
        assert_eq!(err("tcp/22 "), r#""tcp/22 ": port "22 " is not a number"#);
        assert_eq!(
            err("tcp/9000-8000"),
            r#""tcp/9000-8000": range is reversed (did you mean tcp/8000-9000?)"#
        );
        for bad in ["tcp22", "", "/22", "tcp/", "tcp/-5", "tcp/5-", "proto/"] {
            assert_eq!(
                err(bad),
                format!(
                    "{bad:?}: expected PROTO/PORT, PROTO/LO-HI or proto/NAME, e.g. tcp/22, \
                     sctp/3868 or proto/vrrp"
                )
            );
        }
        assert_eq!(
            err("tcp/1-2-3"),
            r#""tcp/1-2-3": port "2-3" is not a number"#
        );
    }

    #[test]
    fn whole_protocols_by_name_or_number() -> Result<(), SpecError> {
        let vrrp = PortRange::parse("proto/vrrp")?;
        assert_eq!(vrrp, PortRange::parse("proto/112")?);
        assert_eq!(vrrp, PortRange::parse("proto/VRRP")?);
        assert_eq!((vrrp.proto, vrrp.lo, vrrp.hi), (IpProto(112), 0, 0));
        assert!(vrrp.is_whole_protocol() && vrrp.contains(IpProto(112), 0));
        assert!(!vrrp.contains(IpProto(47), 0));
        assert_eq!(PortRange::parse("proto/ospfigp")?.to_string(), "proto/ospf");
        assert_eq!(
            PortRange::parse("sctp/3868")?,
            PortRange::single(IpProto::SCTP, 3868)
        );
        assert!(PortRange::new(IpProto(47), 0, 0).is_ok());
        assert!(PortRange::new(IpProto(47), 1, 2).is_err());
        Ok(())
    }

    #[test]
    fn new_checks_hand_built_ranges() {
        assert!(PortRange::new(Proto::Tcp, 1, 65535).is_ok());
        assert_eq!(
            PortRange::new(Proto::Udp, 0, 5).map_err(|e| e.to_string()),
            Err(r#""udp/0-5": port 0 is not a valid port (1-65535)"#.to_owned())
        );
        assert_eq!(
            PortRange::new(Proto::Tcp, 9, 8).map_err(|e| e.to_string()),
            Err(r#""tcp/9-8": range is reversed (did you mean tcp/8-9?)"#.to_owned())
        );
    }

    #[test]
    fn contains_and_overlaps() -> Result<(), SpecError> {
        let r = PortRange::parse("tcp/20-30")?;
        assert!(r.contains(Proto::Tcp, 20) && r.contains(Proto::Tcp, 30));
        assert!(!r.contains(Proto::Tcp, 19) && !r.contains(Proto::Tcp, 31));
        assert!(!r.contains(Proto::Udp, 22));
        assert!(r.overlaps(&PortRange::parse("tcp/22")?));
        assert!(r.overlaps(&PortRange::parse("tcp/30-40")?));
        assert!(!r.overlaps(&PortRange::parse("tcp/31-40")?));
        assert!(!r.overlaps(&PortRange::parse("udp/22")?));
        Ok(())
    }
}
