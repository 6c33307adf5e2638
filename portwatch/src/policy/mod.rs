//! The guard's allowlist: which ports the network may reach, and from where.
//!
//! Rules come from the policy file (TOML), from `--allow SPEC` and from the
//! runtime `allow`/`deny` commands. Every (protocol, port) is covered by at
//! most one rule, so what a port admits is decided in one place and the
//! kernel tables need no precedence. A file is checked whole before
//! anything from it is used, and every error names the line it is about.

pub mod compile;
mod file;
pub mod limit;
mod owner;
pub mod slots;
mod spec;
pub mod store;

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

pub use limit::{LimitError, RateLimit};
pub use owner::{
    Activation, Owner, OwnerError, OwnerSpec, OwnerUser, SYSTEMD_LISTEN_HELPER, cgroup_under,
};
pub use spec::{PortRange, SpecError};

use crate::model::IpProto;
pub use crate::model::{Exposure, Forwarded, Mode, UnknownMode};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub ports: PortRange,
    /// Networks that may connect; empty means from anywhere.
    pub from: Vec<IpNet>,
    /// At most this much per source (TCP: connection attempts).
    pub limit: Option<RateLimit>,
    /// The process that must listen for the port to open (one port only).
    pub owner: Option<Owner>,
    /// Where the rule is in the policy file; `None` for `--allow` and
    /// runtime rules.
    pub line: Option<usize>,
}

impl Rule {
    /// A rule as people type it (the command line, the control socket): a
    /// spec and sources, parsed by the same parser as the policy file and
    /// checked as a rule on its own (no host bits, no redundant or
    /// IPv4-mapped source).
    pub fn parse(spec: &str, from: &[String], limit: Option<&str>) -> Result<Rule, PolicyError> {
        let ports =
            PortRange::parse(spec).map_err(|error| PolicyError::Spec { line: None, error })?;
        let limit = limit
            .map(RateLimit::parse)
            .transpose()
            .map_err(|error| PolicyError::Limit { line: None, error })?;
        let nets = from
            .iter()
            .map(|value| parse_source(value, None).map(|net| (net, None)))
            .collect::<Result<Vec<_>, _>>()?;
        check_sources(&nets)?;
        Ok(Rule {
            ports,
            from: nets.into_iter().map(|(net, _)| net).collect(),
            limit,
            owner: None,
            line: None,
        })
    }

    /// The rule with `owner` (as typed), checked as the policy file checks
    /// it: the user exists, one port only.
    pub fn owned_by(self, owner: &OwnerSpec) -> Result<Rule, PolicyError> {
        if owner.is_empty() {
            return Ok(self);
        }
        let line = self.line;
        let owner = owner
            .resolve()
            .map_err(|error| PolicyError::Owner { line, error })?;
        let PortRange { lo, hi, proto } = self.ports;
        if lo != hi || !proto.has_ports() {
            return Err(PolicyError::Owner {
                line,
                error: OwnerError::NotOnePort(self.ports.to_string()),
            });
        }
        Ok(Rule {
            owner: Some(owner),
            ..self
        })
    }

    /// A rule open to everyone, as `--allow SPEC` gives.
    pub fn anywhere(ports: PortRange) -> Self {
        Rule {
            ports,
            from: Vec::new(),
            limit: None,
            owner: None,
            line: None,
        }
    }
}

/// `tcp/22`, `tcp/5432 from 10.0.0.0/8, fd00::/8`, `tcp/22 limit 10/minute`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ports)?;
        for (i, net) in self.from.iter().enumerate() {
            f.write_str(if i == 0 { " from " } else { ", " })?;
            write!(f, "{net}")?;
        }
        if let Some(limit) = self.limit {
            write!(f, " limit {limit}")?;
        }
        if let Some(owner) = &self.owner {
            write!(f, " owner {owner}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `None`: the file does not say; the caller picks.
    pub mode: Option<Mode>,
    /// Frames the host routes or bridges elsewhere; `None`: the file does
    /// not say, which is `pass`.
    pub forwarded: Option<Forwarded>,
    /// How IPv6 sources of limited rules are grouped (a prefix length);
    /// `None`: /64.
    pub limit_ipv6_prefix: Option<u8>,
    /// Where the guard attaches; empty: the caller picks.
    pub interfaces: Vec<String>,
    pub rules: Vec<Rule>,
}

/// Display helper: "line N: " before a message, or nothing.
struct At(Option<usize>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "line {n}: "),
            None => Ok(()),
        }
    }
}

/// Display helper: " on line N" when N is not the line of the error.
struct OnLine(Option<usize>);

impl OnLine {
    fn unless_same(other: &Option<usize>, line: &Option<usize>) -> Self {
        OnLine(other.filter(|n| Some(*n) != *line))
    }
}

impl fmt::Display for OnLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, " on line {n}"),
            None => Ok(()),
        }
    }
}

/// Display helper: where the other rule of a conflict comes from.
struct Where(Option<usize>);

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "on line {n}"),
            None => f.write_str("in a rule added with --allow or at run time"),
        }
    }
}

/// Display helper for [`PolicyError::Duplicate`].
struct Duplicate(Option<usize>, PortRange, Option<usize>);

impl fmt::Display for Duplicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Duplicate(line, ports, other) = *self;
        match line {
            Some(n) => write!(
                f,
                "line {n}: {ports} is listed twice (also {}); remove one of them",
                Where(other)
            ),
            None => write!(f, "{ports} is already allowed {}", Where(other)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not TOML. toml's own message already has the line, column and the
    /// offending text.
    #[error("{}", .error.to_string().trim_end())]
    Syntax {
        line: Option<usize>,
        error: toml::de::Error,
    },

    /// TOML, but not shaped like a policy: an unknown key, a wrong type, a
    /// mode that does not exist.
    #[error("{}{message}", At(*.line))]
    Shape {
        line: Option<usize>,
        message: String,
    },

    #[error("{}{error}", At(*.line))]
    Spec {
        line: Option<usize>,
        error: SpecError,
    },

    #[error("{}limit {error}", At(*.line))]
    Limit {
        line: Option<usize>,
        error: LimitError,
    },

    #[error("{}owner: {error}", At(*.line))]
    Owner {
        line: Option<usize>,
        error: OwnerError,
    },

    #[error("{}limit_ipv6_prefix = {value}: expected a prefix length from 1 to 128", At(*.line))]
    LimitPrefix { line: Option<usize>, value: i64 },

    #[error("{}{value:?} is not an address or CIDR: {reason}", At(*.line))]
    BadSource {
        line: Option<usize>,
        value: String,
        reason: String,
    },

    #[error("{}{value:?} has host bits set (did you mean {network}?)", At(*.line))]
    HostBits {
        line: Option<usize>,
        value: String,
        network: IpNet,
    },

    /// Inside `::ffff:0:0/96`: IPv4 clients reach the guard as IPv4
    /// packets and are matched as such, so such a network admits nobody.
    #[error(
        "{}{net} is an IPv4-mapped IPv6 network, which no packet comes from: IPv4 \
         clients are matched by their IPv4 address, so write {ipv4}",
        At(*.line)
    )]
    MappedSource {
        line: Option<usize>,
        net: IpNet,
        ipv4: IpNet,
    },

    #[error(
        "{}`from` is empty, so the rule admits nobody: remove the rule, or drop `from` \
         to allow everyone",
        At(*.line)
    )]
    EmptyFrom { line: Option<usize> },

    #[error(
        "{}{net} is already covered by {covered_by}{} in the same `from` list; remove it",
        At(*.line),
        OnLine::unless_same(.other_line, .line)
    )]
    RedundantSource {
        line: Option<usize>,
        net: IpNet,
        covered_by: IpNet,
        other_line: Option<usize>,
    },

    /// The same rule again: in a file, a line to delete; from `--allow` or
    /// at run time, nothing to do.
    #[error("{}", Duplicate(*.line, *.ports, *.other_line))]
    Duplicate {
        line: Option<usize>,
        ports: PortRange,
        other_line: Option<usize>,
    },

    #[error(
        "{}{ports} overlaps {other} {}; a port can be in only one rule: merge them or \
         narrow one",
        At(*.line),
        Where(*.other_line)
    )]
    Overlap {
        line: Option<usize>,
        ports: PortRange,
        other: PortRange,
        other_line: Option<usize>,
    },

    #[error(
        "{}{ports} is given once with `from` and once without (the other {}); merge them \
         into one rule: without `from` it admits everyone",
        At(*.line),
        Where(*.other_line)
    )]
    FromAndAnywhere {
        line: Option<usize>,
        ports: PortRange,
        other_line: Option<usize>,
    },

    #[error(
        "{}{ports} is given twice with different `from` lists (the other {}); merge them \
         into one rule with one `from` list",
        At(*.line),
        Where(*.other_line)
    )]
    DifferentFrom {
        line: Option<usize>,
        ports: PortRange,
        other_line: Option<usize>,
    },

    #[error("{}interface {name:?} {reason}", At(*.line))]
    BadInterface {
        line: Option<usize>,
        name: String,
        reason: &'static str,
    },

    #[error(
        "{}interface {name:?} is listed twice (also {})",
        At(*.line),
        Where(*.other_line)
    )]
    DuplicateInterface {
        line: Option<usize>,
        name: String,
        other_line: Option<usize>,
    },

    /// `remove_port` found nothing to remove.
    #[error("{ports} is not permitted by any rule")]
    NotPermitted { ports: PortRange },

    // The two below embed the inner message instead of exposing it as
    // `source()`: `{:#}` would print it twice.
    #[error("{}: cannot read the policy: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// An error in a file read by [`Policy::load`].
    #[error("{}: {error}", .path.display())]
    InFile {
        path: PathBuf,
        error: Box<PolicyError>,
    },
}

impl PolicyError {
    /// The line of the policy file the error is about, where there is one.
    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::Syntax { line, .. }
            | PolicyError::Shape { line, .. }
            | PolicyError::Spec { line, .. }
            | PolicyError::Limit { line, .. }
            | PolicyError::Owner { line, .. }
            | PolicyError::LimitPrefix { line, .. }
            | PolicyError::BadSource { line, .. }
            | PolicyError::HostBits { line, .. }
            | PolicyError::MappedSource { line, .. }
            | PolicyError::EmptyFrom { line }
            | PolicyError::RedundantSource { line, .. }
            | PolicyError::Duplicate { line, .. }
            | PolicyError::Overlap { line, .. }
            | PolicyError::FromAndAnywhere { line, .. }
            | PolicyError::DifferentFrom { line, .. }
            | PolicyError::BadInterface { line, .. }
            | PolicyError::DuplicateInterface { line, .. } => *line,
            PolicyError::NotPermitted { .. } | PolicyError::Io { .. } => None,
            PolicyError::InFile { error, .. } => error.line(),
        }
    }
}

/// 1-based line of a byte offset; offsets past the end count as the end.
fn line_of(text: &str, offset: usize) -> usize {
    Lines::new(text).of(offset)
}

/// Where each line of a text starts, to find the line of many offsets in
/// log time each (a policy may hold thousands of sources).
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        let starts = text
            .bytes()
            .enumerate()
            .filter(|&(_, b)| b == b'\n')
            .map(|(i, _)| i + 1);
        Lines(std::iter::once(0).chain(starts).collect())
    }

    /// 1-based line of a byte offset.
    fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset).max(1)
    }
}

/// An address (a /32 or /128) or a CIDR whose host bits are clear.
fn parse_source(value: &str, line: Option<usize>) -> Result<IpNet, PolicyError> {
    let bad = |reason: String| PolicyError::BadSource {
        line,
        value: value.to_owned(),
        reason,
    };
    let Some((addr, len)) = value.split_once('/') else {
        return value.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
            bad("expected an address like 10.0.0.1 or a CIDR like 10.0.0.0/8".to_owned())
        });
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| bad(format!("{addr:?} is not an IPv4 or IPv6 address")))?;
    let (family, max) = match addr {
        IpAddr::V4(_) => ("IPv4", 32),
        IpAddr::V6(_) => ("IPv6", 128),
    };
    let len = match len.parse::<u8>() {
        Ok(n) if n <= max && len.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => {
            return Err(bad(format!(
                "the prefix length {len:?} is not a number from 0 to {max} ({family})"
            )));
        }
    };
    let net = IpNet::new(addr, len)
        .map_err(|_| bad(format!("the prefix length must be 0 to {max} ({family})")))?;
    if net.trunc() != net {
        return Err(PolicyError::HostBits {
            line,
            value: value.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// Host bits clear, no IPv4-mapped network, and no network listed twice or
/// inside another one of the list (each would mean the author expects
/// something they do not get).
///
/// The first problem in list order is reported, as a reader going down the
/// list would meet it; O(n log n), for lists of thousands of sources.
fn check_sources(nets: &[(IpNet, Option<usize>)]) -> Result<(), PolicyError> {
    for (net, line) in nets {
        if net.trunc() != *net {
            return Err(PolicyError::HostBits {
                line: *line,
                value: net.to_string(),
                network: net.trunc(),
            });
        }
        if let Some(ipv4) = ipv4_of_mapped(net) {
            return Err(PolicyError::MappedSource {
                line: *line,
                net: *net,
                ipv4,
            });
        }
    }
    let Some(i) = first_covered(nets.iter().map(|(n, _)| *n)) else {
        return Ok(());
    };
    let (net, line) = &nets[i];
    // The first one before it that it covers or that covers it.
    for (other, other_line) in &nets[..i] {
        // Whichever is the wider one covers the other.
        let (inner, outer) = if other.contains(net) {
            (net, other)
        } else if net.contains(other) {
            (other, net)
        } else {
            continue;
        };
        return Err(PolicyError::RedundantSource {
            line: *line,
            net: *inner,
            covered_by: *outer,
            other_line: *other_line,
        });
    }
    Ok(())
}

/// The smallest index `i` such that the network at `i` covers or is
/// covered by one before it, if any.
///
/// Networks nest or are disjoint, so in address order (wider first on a
/// tie) the networks that cover one are exactly those on a stack of open
/// ones when it comes. A pair's index is that of its later member: for each
/// network, the best pair is with the earliest network covering it.
fn first_covered(nets: impl Iterator<Item = IpNet>) -> Option<usize> {
    let mut order: Vec<(IpNet, usize)> = nets.enumerate().map(|(i, n)| (n, i)).collect();
    order.sort_unstable_by_key(|(n, i)| (n.network(), n.prefix_len(), *i));
    // Open networks, each with the smallest index among it and those below.
    let mut open: Vec<(IpNet, usize)> = Vec::new();
    let mut first: Option<usize> = None;
    for (net, i) in order {
        while open.last().is_some_and(|(outer, _)| !outer.contains(&net)) {
            open.pop();
        }
        if let Some(&(_, earliest)) = open.last() {
            let pair = earliest.max(i);
            first = Some(first.map_or(pair, |f| f.min(pair)));
        }
        let earliest = open.last().map_or(i, |&(_, e)| e.min(i));
        open.push((net, earliest));
    }
    first
}

/// The IPv4 network a network inside `::ffff:0:0/96` stands for.
fn ipv4_of_mapped(net: &IpNet) -> Option<IpNet> {
    let IpNet::V6(v6) = net else {
        return None;
    };
    let len = v6.prefix_len().checked_sub(96)?;
    let addr = v6.addr().to_ipv4_mapped()?;
    ipnet::Ipv4Net::new(addr, len).ok().map(IpNet::V4)
}

fn same_sources(a: &[IpNet], b: &[IpNet]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// A TOML basic string, escaped by toml itself.
pub fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl Policy {
    /// Parses and checks a policy file's text. Nothing is returned unless
    /// the whole file is valid.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let raw = file::read(text).map_err(|e| match e {
            file::ReadError::Syntax(error) => PolicyError::Syntax {
                line: error.span().map(|s| line_of(text, s.start)),
                error,
            },
            file::ReadError::Shape(e) => PolicyError::Shape {
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().to_owned(),
            },
        })?;
        let lines = Lines::new(text);
        let line = |span: std::ops::Range<usize>| Some(lines.of(span.start));

        let limit_ipv6_prefix = match raw.limit_ipv6_prefix {
            None => None,
            Some(value) => {
                let at = line(value.span());
                let value = value.into_inner();
                Some(
                    u8::try_from(value)
                        .ok()
                        .filter(|p| (1..=128).contains(p))
                        .ok_or(PolicyError::LimitPrefix { line: at, value })?,
                )
            }
        };
        let mut policy = Policy {
            mode: raw.mode,
            forwarded: raw.forwarded,
            limit_ipv6_prefix,
            ..Policy::default()
        };
        let mut iface_lines = Vec::new();
        for name in raw.interfaces {
            let line = line(name.span());
            let name = name.into_inner();
            check_interface(&name, line)?;
            if let Some(i) = policy.interfaces.iter().position(|n| *n == name) {
                return Err(PolicyError::DuplicateInterface {
                    line,
                    name,
                    other_line: iface_lines.get(i).copied().flatten(),
                });
            }
            policy.interfaces.push(name);
            iface_lines.push(line);
        }

        for entry in raw.allow {
            let entry_line = line(entry.span());
            let rule = match entry.into_inner() {
                file::RawEntry::Spec(spec) => Rule {
                    ports: PortRange::parse(&spec).map_err(|error| PolicyError::Spec {
                        line: entry_line,
                        error,
                    })?,
                    from: Vec::new(),
                    limit: None,
                    owner: None,
                    line: entry_line,
                },
                file::RawEntry::Table {
                    port,
                    from,
                    limit,
                    owner,
                } => {
                    let rule_line = line(port.span());
                    let ports =
                        PortRange::parse(port.get_ref()).map_err(|error| PolicyError::Spec {
                            line: rule_line,
                            error,
                        })?;
                    let mut nets = Vec::new();
                    if let Some(from) = from {
                        if from.get_ref().is_empty() {
                            return Err(PolicyError::EmptyFrom {
                                line: line(from.span()),
                            });
                        }
                        for value in from.into_inner() {
                            let at = line(value.span());
                            nets.push((parse_source(value.get_ref(), at)?, at));
                        }
                        // Checked here, where each network has its own line.
                        check_sources(&nets)?;
                    }
                    let limit = match limit {
                        None => None,
                        Some(limit) => {
                            let at = line(limit.span());
                            Some(
                                RateLimit::parse(limit.get_ref())
                                    .map_err(|error| PolicyError::Limit { line: at, error })?,
                            )
                        }
                    };
                    let owner = owner
                        .map(|owner| {
                            let at = line(owner.span());
                            owner_of(owner.into_inner())
                                .map_err(|error| PolicyError::Owner { line: at, error })
                        })
                        .transpose()?;
                    Rule {
                        ports,
                        from: nets.into_iter().map(|(net, _)| net).collect(),
                        limit,
                        owner,
                        line: rule_line,
                    }
                }
            };
            policy.add_rule(rule)?;
        }
        Ok(policy)
    }

    /// Reads and parses a policy file; errors start with the path.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Io {
            path: path.to_owned(),
            error,
        })?;
        Policy::parse(&text).map_err(|error| PolicyError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// Adds a rule unless it is malformed or shares a port with an existing
    /// rule (the error says whether to drop it or merge the two).
    pub fn add_rule(&mut self, rule: Rule) -> Result<(), PolicyError> {
        let line = rule.line;
        let PortRange { proto, lo, hi } = rule.ports;
        PortRange::new(proto, lo, hi).map_err(|error| PolicyError::Spec { line, error })?;
        let nets: Vec<_> = rule.from.iter().map(|n| (*n, line)).collect();
        check_sources(&nets)?;
        if let Some(owner) = &rule.owner {
            owner
                .check()
                .map_err(|error| PolicyError::Owner { line, error })?;
            if lo != hi || !rule.ports.proto.has_ports() {
                return Err(PolicyError::Owner {
                    line,
                    error: OwnerError::NotOnePort(rule.ports.to_string()),
                });
            }
        }

        let ports = rule.ports;
        if let Some(other) = self.rules.iter().find(|r| r.ports.overlaps(&ports)) {
            let other_line = other.line;
            return Err(if other.ports != ports {
                PolicyError::Overlap {
                    line,
                    ports,
                    other: other.ports,
                    other_line,
                }
            } else if same_sources(&other.from, &rule.from) {
                PolicyError::Duplicate {
                    line,
                    ports,
                    other_line,
                }
            } else if other.from.is_empty() || rule.from.is_empty() {
                PolicyError::FromAndAnywhere {
                    line,
                    ports,
                    other_line,
                }
            } else {
                PolicyError::DifferentFrom {
                    line,
                    ports,
                    other_line,
                }
            });
        }
        self.rules.push(rule);
        Ok(())
    }

    /// Stops permitting `ports`: rules inside the range go, rules that
    /// reach past it keep the ports outside it (with their `from` and line).
    /// Returns the rules as they were before the change.
    pub fn remove_port(&mut self, ports: PortRange) -> Result<Vec<Rule>, PolicyError> {
        let PortRange { proto, lo, hi } = ports;
        PortRange::new(proto, lo, hi).map_err(|error| PolicyError::Spec { line: None, error })?;
        if !self.rules.iter().any(|r| r.ports.overlaps(&ports)) {
            return Err(PolicyError::NotPermitted { ports });
        }
        let mut changed = Vec::new();
        let mut kept = Vec::with_capacity(self.rules.len() + 1);
        for rule in std::mem::take(&mut self.rules) {
            if !rule.ports.overlaps(&ports) {
                kept.push(rule);
                continue;
            }
            let piece = |lo, hi| Rule {
                ports: PortRange { proto, lo, hi },
                ..rule.clone()
            };
            // The overlap guarantees lo <= rule.hi and hi >= rule.lo, so
            // these bounds cannot wrap.
            if rule.ports.lo < lo {
                kept.push(piece(rule.ports.lo, lo - 1));
            }
            if hi < rule.ports.hi {
                kept.push(piece(hi + 1, rule.ports.hi));
            }
            changed.push(rule);
        }
        self.rules = kept;
        Ok(changed)
    }

    /// Exposed if a rule without `from` covers the port, Partial if only
    /// rules with `from` do, else Blocked.
    pub fn exposure(&self, proto: impl Into<IpProto>, port: u16) -> Exposure {
        let proto = proto.into();
        // `add_rule` keeps one rule per port; the loop is for hand-built
        // policies, where an open rule wins.
        let mut exposure = Exposure::Blocked;
        for rule in self.rules.iter().filter(|r| r.ports.contains(proto, port)) {
            if rule.from.is_empty() {
                return Exposure::Exposed;
            }
            exposure = Exposure::Partial;
        }
        exposure
    }

    /// Whether a packet from `src` to `port` gets through. An IPv4-mapped
    /// IPv6 source is matched as the IPv4 address it is, as the kernel
    /// sees it.
    pub fn permits(&self, proto: impl Into<IpProto>, port: u16, src: IpAddr) -> bool {
        let proto = proto.into();
        let src = src.to_canonical();
        self.rules.iter().any(|r| {
            r.ports.contains(proto, port)
                && (r.from.is_empty() || r.from.iter().any(|net| net.contains(&src)))
        })
    }

    /// Whether any rule has an owner (and so opens only while it listens).
    pub fn has_owners(&self) -> bool {
        self.rules.iter().any(|r| r.owner.is_some())
    }

    /// The policy the kernel gets: a rule with an owner only while one of
    /// its owners listens (`open` holds those rules' ports).
    pub fn gated(&self, open: &std::collections::BTreeSet<PortRange>) -> Policy {
        Policy {
            rules: self
                .rules
                .iter()
                .filter(|r| r.owner.is_none() || open.contains(&r.ports))
                .cloned()
                .collect(),
            interfaces: self.interfaces.clone(),
            ..*self
        }
    }

    /// The policy as file text, in rule order, that parses back to the same
    /// policy (except `line`). Used to persist runtime changes.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# managed by portwatch; edits are kept\n");
        if let Some(mode) = self.mode {
            out.push_str(&format!("mode = {}\n", toml_str(mode.as_str())));
        }
        if let Some(forwarded) = self.forwarded {
            out.push_str(&format!("forwarded = {}\n", toml_str(forwarded.as_str())));
        }
        if let Some(prefix) = self.limit_ipv6_prefix {
            out.push_str(&format!("limit_ipv6_prefix = {prefix}\n"));
        }
        let names: Vec<String> = self.interfaces.iter().map(|n| toml_str(n)).collect();
        out.push_str(&format!("interfaces = [{}]\n", names.join(", ")));
        if self.rules.is_empty() {
            out.push_str("allow = []\n");
            return out;
        }
        out.push_str("allow = [\n");
        for rule in &self.rules {
            out.push_str(&format!("  {},\n", rule.to_toml()));
        }
        out.push_str("]\n");
        out
    }
}

impl Rule {
    /// The rule as an item of the policy file's `allow` list:
    /// `"tcp/22"`, or `{ port = "tcp/5432", from = [...], ... }`.
    pub fn to_toml(&self) -> String {
        let port = toml_str(&self.ports.to_string());
        if self.from.is_empty() && self.limit.is_none() && self.owner.is_none() {
            return port;
        }
        let mut table = format!("{{ port = {port}");
        if !self.from.is_empty() {
            let from: Vec<String> = self.from.iter().map(|n| toml_str(&n.to_string())).collect();
            table.push_str(&format!(", from = [{}]", from.join(", ")));
        }
        if let Some(limit) = self.limit {
            table.push_str(&format!(", limit = {}", toml_str(&limit.to_string())));
        }
        if let Some(owner) = &self.owner {
            table.push_str(&format!(", owner = {}", owner.to_toml()));
        }
        table.push_str(" }");
        table
    }
}

/// An owner as the file wrote it, each value checked where it stands.
fn owner_of(raw: file::RawOwner) -> Result<Owner, OwnerError> {
    let user = match raw.user {
        None => None,
        Some(user) => Some(match user.into_inner() {
            file::RawUser::Name(name) => OwnerUser::named(&name)?,
            file::RawUser::Id(uid) => OwnerUser::id(uid)?,
        }),
    };
    let owner = Owner {
        unit: raw.unit.map(toml::Spanned::into_inner),
        cgroup: raw.cgroup.map(toml::Spanned::into_inner),
        user,
        comm: raw.comm.map(toml::Spanned::into_inner),
        exe: raw.exe.map(toml::Spanned::into_inner),
        sha256: raw.sha256.map(|d| d.into_inner().to_ascii_lowercase()),
    };
    owner.check()?;
    Ok(owner)
}

/// The kernel's rules for a device name (`dev_valid_name`), so that a bad
/// name fails here and not when the guard attaches.
fn check_interface(name: &str, line: Option<usize>) -> Result<(), PolicyError> {
    let reason = if name.is_empty() {
        "is empty"
    } else if name.len() > 15 {
        "is longer than 15 bytes, the kernel's limit"
    } else if name == "." || name == ".." {
        "is not a valid interface name"
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        "contains '/', ':', a space or a control character"
    } else {
        return Ok(());
    };
    Err(PolicyError::BadInterface {
        line,
        name: name.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::model::Proto;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const EXAMPLE: &str = r#"mode = "enforce"                 # or "audit"
interfaces = ["eth0"]
allow = [
  "tcp/22",
  "udp/53",
  "tcp/8000-8099",
  { port = "tcp/5432", from = ["10.0.0.0/8", "fd00::/8"] },
]
"#;

    fn range(s: &str) -> PortRange {
        PortRange::parse(s).expect("a valid spec in the test")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("a valid CIDR in the test")
    }

    fn err(text: &str) -> String {
        match Policy::parse(text) {
            Ok(p) => panic!("{text:?} parsed: {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn without_lines(p: &Policy) -> Policy {
        let mut p = p.clone();
        for rule in &mut p.rules {
            rule.line = None;
        }
        p
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn example_file() -> TestResult {
        let p = Policy::parse(EXAMPLE)?;
        assert_eq!(p.mode, Some(Mode::Enforce));
        assert_eq!(p.interfaces, ["eth0"]);
        let rule = |s: &str, from: &[&str], line| Rule {
            ports: range(s),
            from: from.iter().map(|s| net(s)).collect(),
            limit: None,
            owner: None,
            line: Some(line),
        };
        assert_eq!(
            p.rules,
            [
                rule("tcp/22", &[], 4),
                rule("udp/53", &[], 5),
                rule("tcp/8000-8099", &[], 6),
                rule("tcp/5432", &["10.0.0.0/8", "fd00::/8"], 7),
            ]
        );
        Ok(())
    }

    #[test]
    fn empty_file_is_default_deny() -> TestResult {
        let p = Policy::parse("")?;
        assert_eq!(p, Policy::default());
        assert_eq!(p.exposure(Proto::Tcp, 22), Exposure::Blocked);
        assert!(!p.permits(Proto::Tcp, 22, v4(127, 0, 0, 1)));
        assert_eq!(
            Policy::parse("# nothing\n\nallow = []\n")?,
            Policy::default()
        );
        Ok(())
    }

    #[test]
    fn exposure_and_permits() -> TestResult {
        let p = Policy::parse(EXAMPLE)?;
        assert_eq!(p.exposure(Proto::Tcp, 22), Exposure::Exposed);
        assert_eq!(p.exposure(Proto::Tcp, 8050), Exposure::Exposed);
        assert_eq!(p.exposure(Proto::Udp, 53), Exposure::Exposed);
        assert_eq!(p.exposure(Proto::Tcp, 5432), Exposure::Partial);
        assert_eq!(p.exposure(Proto::Tcp, 8100), Exposure::Blocked);
        assert_eq!(p.exposure(Proto::Udp, 22), Exposure::Blocked);
        assert_eq!(p.exposure(Proto::Tcp, 53), Exposure::Blocked);

        assert!(p.permits(Proto::Tcp, 22, v4(192, 0, 2, 1)));
        assert!(p.permits(Proto::Tcp, 5432, v4(10, 1, 2, 3)));
        assert!(!p.permits(Proto::Tcp, 5432, v4(192, 0, 2, 1)));
        assert!(p.permits(Proto::Tcp, 5432, "fd00::1".parse()?));
        assert!(!p.permits(Proto::Tcp, 5432, "fe80::1".parse()?));
        // An IPv4-mapped address is the IPv4 address.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert!(p.permits(Proto::Tcp, 5432, mapped));
        assert!(!p.permits(Proto::Udp, 5432, v4(10, 1, 2, 3)));
        assert!(!p.permits(Proto::Tcp, 23, IpAddr::V6(Ipv6Addr::LOCALHOST)));
        Ok(())
    }

    #[test]
    fn bare_addresses_are_hosts() -> TestResult {
        let p = Policy::parse(
            r#"allow = [{ port = "udp/161", from = ["192.0.2.7", "2001:db8::7"] }]"#,
        )?;
        let from = &p.rules.first().expect("one rule").from;
        assert_eq!(*from, [net("192.0.2.7/32"), net("2001:db8::7/128")]);
        assert!(p.permits(Proto::Udp, 161, v4(192, 0, 2, 7)));
        assert!(!p.permits(Proto::Udp, 161, v4(192, 0, 2, 8)));
        Ok(())
    }

    #[test]
    fn spec_errors_name_the_line() {
        let file = |spec: &str| format!("allow = [\n  \"tcp/1\",\n  \"{spec}\",\n]\n");
        assert_eq!(
            err(&file("dccp/22")),
            r#"line 3: "dccp/22": unknown protocol "dccp" (expected tcp, udp, sctp or proto/NAME)"#
        );
        assert_eq!(
            err(&file("tcp/0")),
            r#"line 3: "tcp/0": port 0 is not a valid port (1-65535)"#
        );
        assert_eq!(
            err(&file("tcp/70000")),
            r#"line 3: "tcp/70000": port 70000 is out of range (1-65535)"#
        );
        assert_eq!(
            err(&file("tcp/ssh")),
            r#"line 3: "tcp/ssh": port "ssh" is not a number"#
        );
        assert_eq!(
            err(&file("tcp/9000-8000")),
            r#"line 3: "tcp/9000-8000": range is reversed (did you mean tcp/8000-9000?)"#
        );
        assert_eq!(
            err(&file("tcp22")),
            r#"line 3: "tcp22": expected PROTO/PORT, PROTO/LO-HI or proto/NAME, e.g. tcp/22, sctp/3868 or proto/vrrp"#
        );
        // In a table, the line of `port`.
        assert_eq!(
            err("[[allow]]\nfrom = [\"10.0.0.0/8\"]\nport = \"udp/99999\"\n"),
            r#"line 3: "udp/99999": port 99999 is out of range (1-65535)"#
        );
    }

    #[test]
    fn source_errors() {
        let file =
            |from: &str| format!("allow = [\n  {{ port = \"tcp/22\", from = [{from}] }},\n]");
        assert_eq!(
            err(&file(r#""10.0.0.1/8""#)),
            r#"line 2: "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#
        );
        assert_eq!(
            err(&file(r#""fd00::1/8""#)),
            r#"line 2: "fd00::1/8" has host bits set (did you mean fd00::/8?)"#
        );
        assert_eq!(
            err(&file(r#""10.0.0.300/8""#)),
            r#"line 2: "10.0.0.300/8" is not an address or CIDR: "10.0.0.300" is not an IPv4 or IPv6 address"#
        );
        assert_eq!(
            err(&file(r#""10.0.0.0/33""#)),
            r#"line 2: "10.0.0.0/33" is not an address or CIDR: the prefix length "33" is not a number from 0 to 32 (IPv4)"#
        );
        assert_eq!(
            err(&file(r#""fd00::/+8""#)),
            r#"line 2: "fd00::/+8" is not an address or CIDR: the prefix length "+8" is not a number from 0 to 128 (IPv6)"#
        );
        assert_eq!(
            err(&file(r#""example.com""#)),
            r#"line 2: "example.com" is not an address or CIDR: expected an address like 10.0.0.1 or a CIDR like 10.0.0.0/8"#
        );
        assert_eq!(
            err(&file("")),
            "line 2: `from` is empty, so the rule admits nobody: remove the rule, or drop `from` \
             to allow everyone"
        );
        // Found by fuzzing: a mapped network was accepted and admitted nobody.
        assert_eq!(
            err(&file(r#""::ffff:10.0.0.0/104""#)),
            "line 2: ::ffff:10.0.0.0/104 is an IPv4-mapped IPv6 network, which no packet comes \
             from: IPv4 clients are matched by their IPv4 address, so write 10.0.0.0/8"
        );
        assert!(Policy::parse(&file(r#""::fffe:0:0/96", "8000::/1""#)).is_ok());
        assert_eq!(
            err(&file(r#""10.0.0.0/8", "10.1.0.0/16""#)),
            "line 2: 10.1.0.0/16 is already covered by 10.0.0.0/8 in the same `from` list; \
             remove it"
        );
        // Each CIDR on its own line: the error names that line.
        assert_eq!(
            err(
                "[[allow]]\nport = \"tcp/22\"\nfrom = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/8\",\n]\n"
            ),
            "line 5: 10.0.0.0/8 is already covered by 10.0.0.0/8 on line 4 in the same `from` \
             list; remove it"
        );
        assert_eq!(
            err(
                "[[allow]]\nport = \"tcp/22\"\nfrom = [\n  \"10.0.0.0/8\",\n  \"10.0.0.7/8\",\n]\n"
            ),
            r#"line 5: "10.0.0.7/8" has host bits set (did you mean 10.0.0.0/8?)"#
        );
    }

    #[test]
    fn duplicates_and_overlaps_name_both_lines() {
        let text = "allow = [\n  \"udp/22\",\n  \"tcp/21\",\n  \"tcp/22\",\n  \"tcp/40\",\n  \"tcp/41\",\n  \"tcp/20-30\",\n]\n";
        assert_eq!(
            err(text),
            "line 7: tcp/20-30 overlaps tcp/21 on line 3; a port can be in only one rule: \
             merge them or narrow one"
        );
        assert_eq!(
            err("allow = [\n  \"tcp/22\",\n  \"tcp/22\",\n]"),
            "line 3: tcp/22 is listed twice (also on line 2); remove one of them"
        );
        assert_eq!(
            err(
                "allow = [\n  \"tcp/5432\",\n  { port = \"tcp/5432\", from = [\"10.0.0.0/8\"] },\n]"
            ),
            "line 3: tcp/5432 is given once with `from` and once without (the other on line 2); \
             merge them into one rule: without `from` it admits everyone"
        );
        assert_eq!(
            err(
                "allow = [\n  { port = \"tcp/5432\", from = [\"10.0.0.0/8\"] },\n  { port = \"tcp/5432\", from = [\"192.0.2.0/24\"] },\n]"
            ),
            "line 3: tcp/5432 is given twice with different `from` lists (the other on line 2); \
             merge them into one rule with one `from` list"
        );
        // The same lists in another order are the same rule.
        assert_eq!(
            err(
                "allow = [\n  { port = \"tcp/1\", from = [\"10.0.0.0/8\", \"fd00::/8\"] },\n  { port = \"tcp/1\", from = [\"fd00::/8\", \"10.0.0.0/8\"] },\n]"
            ),
            "line 3: tcp/1 is listed twice (also on line 2); remove one of them"
        );
    }

    #[test]
    fn tcp_and_udp_do_not_overlap() -> TestResult {
        let p = Policy::parse(r#"allow = ["tcp/22", "udp/22", "udp/1-100", "tcp/23-100"]"#);
        assert!(matches!(p, Err(PolicyError::Overlap { .. })));
        let p = Policy::parse(r#"allow = ["tcp/22", "udp/22", "tcp/23-100"]"#)?;
        assert_eq!(p.rules.len(), 3);
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_line() {
        assert_eq!(
            err("mode = \"audit\"\nbogus = 1\n"),
            r#"line 2: unknown key "bogus" in the policy (expected mode, forwarded, limit_ipv6_prefix, interfaces or allow)"#
        );
        assert_eq!(
            err("allow = [\n  \"tcp/1\",\n  { port = \"tcp/2\", form = [\"10.0.0.0/8\"] },\n]"),
            r#"line 3: unknown key "form" in an allow rule (expected port, from, limit or owner)"#
        );
        assert_eq!(
            err("\n\nallow = \"tcp/22\"\n"),
            r#"line 3: invalid type: string "tcp/22", expected an array of rules, e.g. allow = ["tcp/22", "udp/53"]"#
        );
        assert_eq!(
            err("mode = \"block\""),
            r#"line 1: unknown mode "block" (expected "enforce" or "audit")"#
        );
        assert_eq!(
            err("allow = [\n  \"tcp/1\",\n  { from = [\"10.0.0.0/8\"] },\n]"),
            r#"line 3: this allow rule has no `port`: write e.g. { port = "tcp/22", from = ["10.0.0.0/8"] }"#
        );
    }

    #[test]
    fn syntax_errors_keep_tomls_message() {
        let e =
            Policy::parse("mode = \"audit\"\nallow = [\"tcp/22\"\n").expect_err("unclosed array");
        assert!(matches!(e, PolicyError::Syntax { .. }), "{e:?}");
        assert_eq!(e.line(), Some(2));
        let msg = e.to_string();
        assert!(
            msg.starts_with("TOML parse error at line 2, column 18"),
            "{msg}"
        );
        assert!(msg.contains("unclosed array"), "{msg}");

        let e = Policy::parse("allow = []\nallow = []\n").expect_err("key twice");
        assert!(e.to_string().contains("duplicate key"), "{e}");
        assert_eq!(e.line(), Some(2));
    }

    #[test]
    fn owner_rules_parse_round_trip_and_name_their_errors() {
        let text = "allow = [\n  \"tcp/22\",\n  { port = \"tcp/6379\", from = [\"10.0.0.0/8\"], \
                    owner = { unit = \"redis-server.service\" } },\n  { port = \"tcp/443\", \
                    owner = { user = \"root\", comm = \"nginx\" } },\n  { port = \"udp/51820\", \
                    owner = { exe = \"/usr/bin/wireguard-go\", user = 0 } },\n  { port = \"udp/53\", \
                    owner = { exe = \"/usr/sbin/unbound\", sha256 = \"ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789\" } },\n]\n";
        let policy = Policy::parse(text).expect("valid");
        assert!(policy.has_owners());
        let owners: Vec<String> = policy
            .rules
            .iter()
            .map(|r| {
                r.owner
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            owners,
            [
                "",
                "unit redis-server.service",
                "user root, comm nginx",
                "uid 0, exe /usr/bin/wireguard-go",
                "exe /usr/sbin/unbound, sha256 abcdef0123456789…"
            ]
        );
        assert_eq!(
            policy.rules[1].to_string(),
            "tcp/6379 from 10.0.0.0/8 owner unit redis-server.service"
        );
        // Persisted and read back: the same rules.
        let again = Policy::parse(&policy.to_toml()).expect("its own text parses");
        let strip = |p: &Policy| -> Vec<Rule> {
            p.rules
                .iter()
                .map(|r| Rule {
                    line: None,
                    ..r.clone()
                })
                .collect()
        };
        assert_eq!(strip(&again), strip(&policy));

        assert_eq!(
            err("allow = [\n  { port = \"tcp/1\", owner = { user = \"no-such-user-pw\" } },\n]"),
            r#"line 2: owner: user "no-such-user-pw" does not exist on this host"#
        );
        assert_eq!(
            err("allow = [{ port = \"tcp/1-9\", owner = { comm = \"x\" } }]"),
            "line 1: owner: an owner rule names one port (e.g. \"tcp/6379\"), not tcp/1-9: the \
             port opens while its owner listens on it"
        );
        assert!(err("allow = [{ port = \"tcp/1\", owner = {} }]").contains("at least one of unit"));
        assert!(
            err("allow = [{ port = \"tcp/1\", owner = { name = \"x\" } }]").contains(
                r#"unknown key "name" in an owner (expected unit, cgroup, user, comm, exe or sha256)"#
            )
        );
        assert!(
            err("allow = [{ port = \"tcp/1\", owner = { comm = \"a-very-long-command\" } }]")
                .contains("1 to 15 bytes")
        );
        assert!(err("allow = [{ port = \"tcp/1\", owner = { user = -5 } }]").contains("not a uid"));
    }

    #[test]
    fn interface_errors() {
        assert_eq!(
            err("interfaces = [\n  \"eth0\",\n  \"eth0\",\n]"),
            r#"line 3: interface "eth0" is listed twice (also on line 2)"#
        );
        assert_eq!(
            err("interfaces = [\"a-very-long-interface\"]"),
            r#"line 1: interface "a-very-long-interface" is longer than 15 bytes, the kernel's limit"#
        );
        assert_eq!(
            err("interfaces = [\"eth 0\"]"),
            r#"line 1: interface "eth 0" contains '/', ':', a space or a control character"#
        );
        assert_eq!(
            err("interfaces = [\"\"]"),
            r#"line 1: interface "" is empty"#
        );
    }

    /// A file that is wrong anywhere yields nothing, whatever came first.
    #[test]
    fn nothing_from_an_invalid_file() {
        let e = Policy::parse(&format!("{EXAMPLE}\n# late\nbogus = true\n"));
        assert_eq!(e.map_err(|e| e.line()).expect_err("invalid"), Some(11));
    }

    #[test]
    fn load_prefixes_the_path() -> TestResult {
        let dir =
            std::env::temp_dir().join(format!("portwatch-policy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let good = dir.join("good.toml");
        std::fs::write(&good, EXAMPLE)?;
        assert_eq!(Policy::load(&good)?, Policy::parse(EXAMPLE)?);

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "allow = [\n  \"tcp/22\",\n  \"dccp/9\",\n]\n")?;
        let e = Policy::load(&bad).expect_err("bad spec");
        assert_eq!(
            e.to_string(),
            format!(
                r#"{}: line 3: "dccp/9": unknown protocol "dccp" (expected tcp, udp, sctp or proto/NAME)"#,
                bad.display()
            )
        );
        assert_eq!(e.line(), Some(3));

        std::fs::write(&bad, "allow = [\n")?;
        let msg = Policy::load(&bad).expect_err("syntax").to_string();
        assert!(
            msg.starts_with(&format!("{}: TOML parse error at line 1", bad.display())),
            "{msg}"
        );

        let missing = dir.join("missing.toml");
        let msg = Policy::load(&missing).expect_err("no file").to_string();
        assert!(
            msg.starts_with(&format!("{}: cannot read the policy: ", missing.display())),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn to_toml_round_trips() -> TestResult {
        let p = Policy::parse(EXAMPLE)?;
        let text = p.to_toml();
        assert!(
            text.starts_with("# managed by portwatch; edits are kept\n"),
            "{text}"
        );
        assert_eq!(without_lines(&Policy::parse(&text)?), without_lines(&p));
        assert_eq!(
            text,
            r#"# managed by portwatch; edits are kept
mode = "enforce"
interfaces = ["eth0"]
allow = [
  "tcp/22",
  "udp/53",
  "tcp/8000-8099",
  { port = "tcp/5432", from = ["10.0.0.0/8", "fd00::/8"] },
]
"#
        );

        for p in [
            Policy::default(),
            Policy {
                mode: Some(Mode::Audit),
                forwarded: Some(Forwarded::Judge),
                limit_ipv6_prefix: Some(56),
                interfaces: vec!["eth0".into(), "wg\"0\\".into()],
                rules: vec![
                    Rule {
                        ports: range("udp/1-65535"),
                        from: vec![net("192.0.2.7/32"), net("::/0")],
                        limit: Some(RateLimit::parse("10/minute").expect("a valid limit")),
                        owner: None,
                        line: None,
                    },
                    Rule::anywhere(range("tcp/65535")),
                ],
            },
        ] {
            let text = p.to_toml();
            assert_eq!(without_lines(&Policy::parse(&text)?), p, "{text}");
        }
        Ok(())
    }

    #[test]
    fn add_rule_rejects_overlaps() -> TestResult {
        let mut p = Policy::parse(EXAMPLE)?;
        let e = p
            .add_rule(Rule::anywhere(range("tcp/8090-8200")))
            .expect_err("overlaps tcp/8000-8099");
        assert_eq!(
            e.to_string(),
            "tcp/8090-8200 overlaps tcp/8000-8099 on line 6; a port can be in only one rule: \
             merge them or narrow one"
        );
        let e = p
            .add_rule(Rule::anywhere(range("tcp/5432")))
            .expect_err("tcp/5432 has `from`");
        assert!(matches!(e, PolicyError::FromAndAnywhere { .. }), "{e}");
        let e = p
            .add_rule(Rule::anywhere(range("tcp/22")))
            .expect_err("already there");
        assert!(matches!(e, PolicyError::Duplicate { .. }), "{e}");
        assert_eq!(e.to_string(), "tcp/22 is already allowed on line 4");

        p.add_rule(Rule::anywhere(range("tcp/8100-8200")))?;
        p.add_rule(Rule::anywhere(range("udp/22")))?;
        let e = p
            .add_rule(Rule::anywhere(range("udp/22")))
            .expect_err("added just before");
        assert_eq!(
            e.to_string(),
            "udp/22 is already allowed in a rule added with --allow or at run time"
        );
        let e = p
            .add_rule(Rule::anywhere(range("tcp/8150")))
            .expect_err("overlaps a runtime rule");
        assert_eq!(
            e.to_string(),
            "tcp/8150 overlaps tcp/8100-8200 in a rule added with --allow or at run time; a \
             port can be in only one rule: merge them or narrow one"
        );
        assert_eq!(p.rules.len(), 6);
        Ok(())
    }

    #[test]
    fn add_rule_checks_hand_built_rules() {
        let mut p = Policy::default();
        let bad = [
            Rule::anywhere(PortRange::single(Proto::Tcp, 0)),
            Rule::anywhere(PortRange {
                proto: IpProto::UDP,
                lo: 9,
                hi: 8,
            }),
            Rule {
                ports: range("tcp/1"),
                from: vec![IpNet::new(v4(10, 0, 0, 1), 8).expect("valid prefix")],
                limit: None,
                owner: None,
                line: None,
            },
            Rule {
                ports: range("tcp/1"),
                from: vec![net("10.0.0.0/8"), net("10.2.0.0/16")],
                limit: None,
                owner: None,
                line: None,
            },
        ];
        for rule in bad {
            assert!(p.add_rule(rule.clone()).is_err(), "{rule:?} was accepted");
        }
        assert_eq!(p, Policy::default());
    }

    #[test]
    fn remove_port_splits_ranges() -> TestResult {
        let mut p = Policy::parse(EXAMPLE)?;
        let removed = p.remove_port(range("tcp/8050"))?;
        assert_eq!(removed.len(), 1);
        assert_eq!(
            removed.first().map(|r| r.ports),
            Some(range("tcp/8000-8099"))
        );
        let ports: Vec<String> = p.rules.iter().map(|r| r.ports.to_string()).collect();
        assert_eq!(
            ports,
            [
                "tcp/22",
                "udp/53",
                "tcp/8000-8049",
                "tcp/8051-8099",
                "tcp/5432"
            ]
        );
        assert_eq!(p.exposure(Proto::Tcp, 8050), Exposure::Blocked);
        assert_eq!(p.exposure(Proto::Tcp, 8049), Exposure::Exposed);
        assert_eq!(p.exposure(Proto::Tcp, 8051), Exposure::Exposed);

        // The ends of a range, then a range over several rules.
        p.remove_port(range("tcp/8000"))?;
        p.remove_port(range("tcp/8099"))?;
        let removed = p.remove_port(range("tcp/8040-8060"))?;
        let removed: Vec<String> = removed.iter().map(|r| r.ports.to_string()).collect();
        assert_eq!(removed, ["tcp/8001-8049", "tcp/8051-8098"]);
        let ports: Vec<String> = p.rules.iter().map(|r| r.ports.to_string()).collect();
        assert_eq!(
            ports,
            [
                "tcp/22",
                "udp/53",
                "tcp/8001-8039",
                "tcp/8061-8098",
                "tcp/5432"
            ]
        );

        // Whole rules go, with or without `from`.
        let removed = p.remove_port(range("tcp/1-8045"))?;
        let removed: Vec<String> = removed.iter().map(ToString::to_string).collect();
        assert_eq!(
            removed,
            [
                "tcp/22",
                "tcp/8001-8039",
                "tcp/5432 from 10.0.0.0/8, fd00::/8"
            ]
        );
        let ports: Vec<String> = p.rules.iter().map(|r| r.ports.to_string()).collect();
        assert_eq!(ports, ["udp/53", "tcp/8061-8098"]);

        // The pieces of a rule keep its `from`.
        let mut q = Policy::parse(r#"allow = [{ port = "tcp/1-10", from = ["10.0.0.0/8"] }]"#)?;
        q.remove_port(range("tcp/5"))?;
        assert!(q.rules.iter().all(|r| r.from == [net("10.0.0.0/8")]));
        assert_eq!(q.rules.len(), 2);
        Ok(())
    }

    #[test]
    fn remove_port_of_nothing_is_an_error() -> TestResult {
        let mut p = Policy::parse(EXAMPLE)?;
        let before = p.clone();
        let e = p.remove_port(range("tcp/8100")).expect_err("not permitted");
        assert_eq!(e.to_string(), "tcp/8100 is not permitted by any rule");
        let e = p.remove_port(range("udp/22")).expect_err("only tcp/22 is");
        assert_eq!(e.to_string(), "udp/22 is not permitted by any rule");
        assert_eq!(p, before);
        Ok(())
    }

    #[test]
    fn mode_strings() -> TestResult {
        assert_eq!("audit".parse::<Mode>()?, Mode::Audit);
        assert_eq!(Mode::Enforce.to_string(), "enforce");
        assert_eq!(
            "Audit".parse::<Mode>().map_err(|e| e.to_string()),
            Err(r#"unknown mode "Audit" (expected "enforce" or "audit")"#.to_owned())
        );
        assert_eq!(serde_json::to_string(&Exposure::Partial)?, r#""partial""#);
        assert_eq!(serde_json::to_string(&range("tcp/1-2"))?, r#""tcp/1-2""#);
        Ok(())
    }

    #[test]
    fn lines_of_offsets() {
        for text in ["", "a", "\n", "ab\ncd\n\nef", "x\n\n"] {
            let lines = Lines::new(text);
            for offset in 0..text.len() + 3 {
                let naive = text.as_bytes()[..offset.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                assert_eq!(lines.of(offset), naive, "{text:?} at {offset}");
            }
        }
    }

    /// The sweep finds the pair a reader going down the list would, as
    /// comparing every pair does.
    mod covered {
        use proptest::prelude::*;

        use super::super::first_covered;
        use ipnet::{IpNet, Ipv4Net, Ipv6Net};

        fn brute(nets: &[IpNet]) -> Option<usize> {
            (0..nets.len()).find(|&i| {
                nets[..i]
                    .iter()
                    .any(|o| o.contains(&nets[i]) || nets[i].contains(o))
            })
        }

        fn net() -> impl Strategy<Value = IpNet> {
            // A small space, so that nesting and duplicates are common.
            prop_oneof![
                (0u8..16, 0u8..=8).prop_map(|(a, len)| {
                    let n = Ipv4Net::new([10, a, 0, 0].into(), 8 + len).unwrap_or_default();
                    IpNet::V4(n.trunc())
                }),
                (0u16..16, 0u8..=8).prop_map(|(a, len)| {
                    let addr = std::net::Ipv6Addr::new(0xfd00, a << 8, 0, 0, 0, 0, 0, 0);
                    let n = Ipv6Net::new(addr, 16 + len).unwrap_or_default();
                    IpNet::V6(n.trunc())
                }),
            ]
        }

        proptest! {
            #[test]
            fn as_every_pair_says(nets in proptest::collection::vec(net(), 0..24)) {
                prop_assert_eq!(first_covered(nets.iter().copied()), brute(&nets));
            }
        }
    }
}
