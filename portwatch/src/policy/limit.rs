//! Per-source rate limits of rules: `10/minute`, `200/second`, `1/hour`.
//! For TCP a rule's limit counts connection attempts (SYNs) per source,
//! for every other protocol packets per source; a source may send up to
//! the count at once (the burst), then the count per period.

use std::{fmt, str::FromStr, time::Duration};

/// A count per period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateLimit {
    pub count: u32,
    pub per: Per,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Per {
    Second,
    Minute,
    Hour,
}

impl Per {
    pub fn as_str(self) -> &'static str {
        match self {
            Per::Second => "second",
            Per::Minute => "minute",
            Per::Hour => "hour",
        }
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Per::Second => 1,
            Per::Minute => 60,
            Per::Hour => 3600,
        })
    }
}

/// The most a limit may count per period: more is no limit worth keeping
/// per source.
pub const MAX_COUNT: u32 = 1_000_000;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{spec:?}: expected COUNT/PERIOD, e.g. \"10/minute\" or \"200/second\"")]
    Format { spec: String },
    #[error("{spec:?}: {count:?} is not a count from 1 to {MAX_COUNT}")]
    Count { spec: String, count: String },
    #[error("{spec:?}: unknown period {per:?} (expected second, minute or hour)")]
    Per { spec: String, per: String },
}

impl RateLimit {
    pub fn parse(spec: &str) -> Result<Self, LimitError> {
        let (count, per) = spec.split_once('/').ok_or_else(|| LimitError::Format {
            spec: spec.to_owned(),
        })?;
        let count_err = || LimitError::Count {
            spec: spec.to_owned(),
            count: count.to_owned(),
        };
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(count_err());
        }
        let count = count
            .parse::<u32>()
            .ok()
            .filter(|c| (1..=MAX_COUNT).contains(c))
            .ok_or_else(count_err)?;
        let per = match per {
            "second" | "sec" | "s" => Per::Second,
            "minute" | "min" | "m" => Per::Minute,
            "hour" | "h" => Per::Hour,
            other => {
                return Err(LimitError::Per {
                    spec: spec.to_owned(),
                    per: other.to_owned(),
                });
            }
        };
        Ok(RateLimit { count, per })
    }

    /// The kernel's bucket: what one packet costs and what a full bucket
    /// holds, in nanoseconds (the bucket refills a nanosecond a
    /// nanosecond). A full bucket is the count: a burst of that many.
    pub fn bucket(&self) -> portwatch_common::RateLimit {
        let period = u64::try_from(self.per.duration().as_nanos()).unwrap_or(u64::MAX);
        let cost_ns = (period / u64::from(self.count)).max(1);
        portwatch_common::RateLimit {
            cost_ns,
            cap_ns: cost_ns.saturating_mul(u64::from(self.count)),
        }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.as_str())
    }
}

impl FromStr for RateLimit {
    type Err = LimitError;

    fn from_str(s: &str) -> Result<Self, LimitError> {
        RateLimit::parse(s)
    }
}

impl serde::Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RateLimit::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// IPv6 sources share a bucket per prefix of this length unless the
/// policy says otherwise: one per /64, the usual size of a site's subnet,
/// since one host can have as many addresses in it as it wants.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_shows_limits() -> Result<(), LimitError> {
        let l = RateLimit::parse("10/minute")?;
        assert_eq!((l.count, l.per), (10, Per::Minute));
        assert_eq!(l.to_string(), "10/minute");
        assert_eq!(RateLimit::parse("200/s")?.to_string(), "200/second");
        assert_eq!(RateLimit::parse("1/h")?.per, Per::Hour);
        let b = RateLimit::parse("10/minute")?.bucket();
        assert_eq!(b.cost_ns, 6_000_000_000);
        assert_eq!(b.cap_ns, 60_000_000_000);
        let b = RateLimit::parse("3/second")?.bucket();
        assert_eq!((b.cost_ns, b.cap_ns), (333_333_333, 999_999_999));
        Ok(())
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |s: &str| RateLimit::parse(s).map_err(|e| e.to_string()).err();
        assert_eq!(
            err("10"),
            Some(r#""10": expected COUNT/PERIOD, e.g. "10/minute" or "200/second""#.into())
        );
        assert_eq!(
            err("0/second"),
            Some(r#""0/second": "0" is not a count from 1 to 1000000"#.into())
        );
        assert_eq!(
            err("-1/second"),
            Some(r#""-1/second": "-1" is not a count from 1 to 1000000"#.into())
        );
        assert_eq!(
            err("5/fortnight"),
            Some(
                r#""5/fortnight": unknown period "fortnight" (expected second, minute or hour)"#
                    .into()
            )
        );
        assert!(err("1000001/second").is_some());
    }
}
