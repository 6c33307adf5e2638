//! Port specs: `tcp/22`, `udp/53`, `tcp/8000-8099` (inclusive).
//!
//! The same syntax serves `--allow`, the policy file and the runtime
//! `allow`/`deny` commands, so every error quotes the spec it was given.

use std::{fmt, str::FromStr};

use crate::model::Proto;

/// A protocol and an inclusive port range; a single port has `lo == hi`.
///
/// The fields are public for matching; values built by hand are checked
/// with [`PortRange::new`] wherever a policy accepts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub proto: Proto,
    pub lo: u16,
    pub hi: u16,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{spec:?}: expected PROTO/PORT or PROTO/LO-HI, e.g. tcp/22")]
    Format { spec: String },
    #[error("{spec:?}: unknown protocol {proto:?} (expected tcp or udp{hint})")]
    UnknownProto {
        spec: String,
        proto: String,
        /// ", in lowercase" when the protocol only has the wrong case.
        hint: &'static str,
    },
    #[error("{spec:?}: port {port:?} is not a number")]
    NotANumber { spec: String, port: String },
    #[error("{spec:?}: port 0 is not a valid port (1-65535)")]
    PortZero { spec: String },
    #[error("{spec:?}: port {port} is out of range (1-65535)")]
    OutOfRange { spec: String, port: String },
    #[error("{spec:?}: range is reversed (did you mean {fixed}?)")]
    Reversed { spec: String, fixed: PortRange },
}

impl PortRange {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let format = || SpecError::Format { spec: s.to_owned() };
        let (proto, ports) = s.split_once('/').ok_or_else(format)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "" => return Err(format()),
            other => {
                let lower = other.to_ascii_lowercase();
                return Err(SpecError::UnknownProto {
                    spec: s.to_owned(),
                    proto: other.to_owned(),
                    hint: if lower == "tcp" || lower == "udp" {
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

    /// Checks a range built by hand: ports 1-65535, `lo <= hi`. The error
    /// quotes the range as it would be written.
    pub fn new(proto: Proto, lo: u16, hi: u16) -> Result<Self, SpecError> {
        let range = PortRange { proto, lo, hi };
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

    /// One port. Port 0 is not checked here: [`PortRange::new`] does that.
    pub fn single(proto: Proto, port: u16) -> Self {
        PortRange {
            proto,
            lo: port,
            hi: port,
        }
    }

    pub fn contains(&self, proto: Proto, port: u16) -> bool {
        self.proto == proto && self.lo <= port && port <= self.hi
    }

    /// Shares at least one port of the same protocol.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.proto == other.proto && self.lo <= other.hi && other.lo <= self.hi
    }

    /// How many ports the range covers.
    pub fn port_count(&self) -> usize {
        usize::from(self.hi.saturating_sub(self.lo)) + 1
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
        if self.lo == self.hi {
            write!(f, "{}/{}", self.proto.as_str(), self.lo)
        } else {
            write!(f, "{}/{}-{}", self.proto.as_str(), self.lo, self.hi)
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
                proto: Proto::Tcp,
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
        for s in ["tcp/22", "udp/53", "tcp/8000-8099", "udp/1-65535"] {
            assert_eq!(PortRange::parse(s)?.to_string(), s);
        }
        Ok(())
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            err("sctp/22"),
            r#""sctp/22": unknown protocol "sctp" (expected tcp or udp)"#
        );
        assert_eq!(
            err("TCP/22"),
            r#""TCP/22": unknown protocol "TCP" (expected tcp or udp, in lowercase)"#
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
        for bad in ["tcp22", "", "/22", "tcp/", "tcp/-5", "tcp/5-"] {
            assert_eq!(
                err(bad),
                format!("{bad:?}: expected PROTO/PORT or PROTO/LO-HI, e.g. tcp/22")
            );
        }
        assert_eq!(
            err("tcp/1-2-3"),
            r#""tcp/1-2-3": port "2-3" is not a number"#
        );
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
