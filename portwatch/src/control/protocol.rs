//! The control protocol's requests, and how a line becomes one.
//!
//! The format is described in the module documentation of
//! [`crate::control`]. Decoding never panics, whatever the bytes: every
//! malformed line becomes a [`ProtocolError`] whose message names the
//! problem, and the server sends it back as `{"ok":false,"error":…}`.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use super::inspect::{
    ExplainQuery, Explanation, LearnQuery, Proposal, ProposedRule, RuleRef, VerifyProgress,
    VerifyReport, VerifyRow, VerifySample, VerifySummary,
};

/// The longest `learn --for`: a week.
pub const MAX_RECORD_SECS: u64 = 7 * 86_400;
pub use crate::sinks::Format;
use crate::{
    datapath::{attach::Attached, probe::TcpFlags},
    model::{Exposure, Family, IpProto, Mode, Proto},
    policy::{OwnerSpec, Policy, PolicyError, PortRange, Rule},
};

/// The longest request line accepted, in bytes, without its newline.
pub const MAX_LINE: usize = 64 * 1024;

/// The command names, in the order the documentation lists them.
pub const COMMANDS: &[&str] = &[
    "allow",
    "deny",
    "apply",
    "confirm",
    "diff",
    "policy",
    "reload",
    "status",
    "subscribe",
    "shutdown",
    "explain",
    "verify",
    "learn",
    "record",
];

/// One request. On the wire it is a JSON object whose `cmd` names the
/// command (see [`crate::control`]); specs and sources are parsed by the
/// policy's own parser when the line is decoded, so every sender gets the
/// same answer to the same mistake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Permit `rule.ports` from `rule.from` (from anywhere when empty).
    /// `force`: even if it cuts off an SSH session (lockout protection).
    /// `confirm_within`: revert unless confirmed within so many seconds.
    Allow {
        rule: Rule,
        force: bool,
        confirm_within: Option<u64>,
    },
    /// Stop permitting `ports`; rules that reach past it keep the rest.
    Deny {
        ports: PortRange,
        force: bool,
        confirm_within: Option<u64>,
    },
    /// Make `text` (a whole policy file, valid as `policy`) the policy
    /// file and apply it.
    Apply {
        text: String,
        policy: Box<Policy>,
        force: bool,
        confirm_within: Option<u64>,
    },
    /// Keep the change that awaits confirmation.
    Confirm,
    /// What applying `policy` would change; nothing is applied.
    Diff { policy: Box<Policy> },
    /// The policy in force.
    Policy,
    /// Read the policy file again and apply it.
    Reload { force: bool },
    /// Mode, interfaces, counters and listeners with their exposure.
    Status,
    /// The same, with the listeners sent one line each after the answer
    /// (`listeners_follow` says how many): no answer grows into one line of
    /// megabytes, and the client parses each listener on its own.
    StatusLines,
    /// The guard's event stream, from now on.
    Subscribe { format: Format, colour: bool },
    /// Stop the guard; `detach` also removes its kernel programs.
    Shutdown { detach: bool },
    /// The verdict for one packet, from the loaded program, and why.
    Explain(Box<ExplainQuery>),
    /// Probe every listener through the loaded program against the policy.
    Verify,
    /// A policy proposed from the listeners and the connection attempts
    /// recorded.
    Learn(Box<LearnQuery>),
    /// Record connection attempts for `secs` whatever the mode; `forget`
    /// empties the table first.
    Record { secs: u64, forget: bool },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A request as the JSON carries it: strings where the typed request has
/// parsed values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum Wire {
    Allow {
        spec: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        from: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
        /// The process that must listen for the port to open.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<OwnerSpec>,
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirm_within: Option<u64>,
    },
    Deny {
        spec: String,
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirm_within: Option<u64>,
    },
    Apply {
        /// The policy file's text.
        policy: String,
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirm_within: Option<u64>,
    },
    Confirm,
    Diff {
        policy: String,
    },
    Policy,
    Reload {
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    Status {
        #[serde(default, skip_serializing_if = "is_false")]
        lines: bool,
    },
    Subscribe {
        #[serde(default)]
        format: Format,
        #[serde(default)]
        colour: bool,
    },
    Shutdown {
        #[serde(default)]
        detach: bool,
    },
    Explain {
        /// `tcp/5432`, `udp/53`, `gre`.
        spec: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<IpAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<IpAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source_port: Option<u16>,
        /// `syn`, `ack`, `fin,psh,urg`, `null`, `xmas`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        flags: Option<String>,
    },
    Verify,
    Learn {
        /// Seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix4: Option<u8>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix6: Option<u8>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spread: Option<usize>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        keep: Vec<String>,
    },
    Record {
        /// Seconds.
        #[serde(rename = "for")]
        secs: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        forget: bool,
    },
}

impl Wire {
    fn of(request: &Request) -> Self {
        match request {
            Request::Allow {
                rule,
                force,
                confirm_within,
            } => Wire::Allow {
                spec: rule.ports.to_string(),
                from: rule.from.iter().map(ToString::to_string).collect(),
                limit: rule.limit.map(|l| l.to_string()),
                owner: rule.owner.as_ref().map(OwnerSpec::from),
                force: *force,
                confirm_within: *confirm_within,
            },
            Request::Deny {
                ports,
                force,
                confirm_within,
            } => Wire::Deny {
                spec: ports.to_string(),
                force: *force,
                confirm_within: *confirm_within,
            },
            Request::Apply {
                text,
                force,
                confirm_within,
                ..
            } => Wire::Apply {
                policy: text.clone(),
                force: *force,
                confirm_within: *confirm_within,
            },
            Request::Confirm => Wire::Confirm,
            Request::Diff { policy } => Wire::Diff {
                policy: policy.to_toml(),
            },
            Request::Policy => Wire::Policy,
            Request::Reload { force } => Wire::Reload { force: *force },
            Request::Status => Wire::Status { lines: false },
            Request::StatusLines => Wire::Status { lines: true },
            Request::Subscribe { format, colour } => Wire::Subscribe {
                format: *format,
                colour: *colour,
            },
            Request::Shutdown { detach } => Wire::Shutdown { detach: *detach },
            Request::Explain(q) => Wire::Explain {
                spec: if q.proto.has_ports() {
                    format!("{}/{}", q.proto, q.port)
                } else {
                    q.proto.to_string()
                },
                from: q.from,
                to: q.to,
                source_port: q.source_port,
                flags: q.flags.map(|f| f.to_string()),
            },
            Request::Verify => Wire::Verify,
            Request::Learn(q) => Wire::Learn {
                since: q.since,
                prefix4: Some(q.prefix4),
                prefix6: Some(q.prefix6),
                spread: Some(q.spread),
                keep: q.keep.iter().map(ToString::to_string).collect(),
            },
            Request::Record { secs, forget } => Wire::Record {
                secs: *secs,
                forget: *forget,
            },
        }
    }

    fn parse(self) -> Result<Request, PolicyError> {
        Ok(match self {
            Wire::Allow {
                spec,
                from,
                limit,
                owner,
                force,
                confirm_within,
            } => Request::Allow {
                rule: Rule::parse(&spec, &from, limit.as_deref())?
                    .owned_by(&owner.unwrap_or_default())?,
                force,
                confirm_within,
            },
            Wire::Deny {
                spec,
                force,
                confirm_within,
            } => Request::Deny {
                ports: PortRange::parse(&spec)
                    .map_err(|error| PolicyError::Spec { line: None, error })?,
                force,
                confirm_within,
            },
            Wire::Apply {
                policy,
                force,
                confirm_within,
            } => Request::Apply {
                policy: Box::new(Policy::parse(&policy)?),
                text: policy,
                force,
                confirm_within,
            },
            Wire::Confirm => Request::Confirm,
            Wire::Diff { policy } => Request::Diff {
                policy: Box::new(Policy::parse(&policy)?),
            },
            Wire::Policy => Request::Policy,
            Wire::Reload { force } => Request::Reload { force },
            Wire::Status { lines: false } => Request::Status,
            Wire::Status { lines: true } => Request::StatusLines,
            Wire::Subscribe { format, colour } => Request::Subscribe { format, colour },
            Wire::Shutdown { detach } => Request::Shutdown { detach },
            Wire::Explain {
                spec,
                from,
                to,
                source_port,
                flags,
            } => {
                let shape = |message: String| PolicyError::Shape {
                    line: None,
                    message,
                };
                let ports = PortRange::parse(&spec)
                    .map_err(|error| PolicyError::Spec { line: None, error })?;
                if ports.lo != ports.hi && ports.proto.has_ports() {
                    return Err(shape(format!(
                        "explain asks about one port, not the range {ports}"
                    )));
                }
                let flags = flags
                    .map(|f| f.parse::<TcpFlags>())
                    .transpose()
                    .map_err(shape)?;
                if flags.is_some() && ports.proto != IpProto::TCP {
                    return Err(shape(format!("flags are TCP's; {spec} is not TCP")));
                }
                if let (Some(from), Some(to)) = (from, to)
                    && from.is_ipv4() != to.is_ipv4()
                {
                    return Err(shape(format!(
                        "from {from} and to {to} are not of one address family"
                    )));
                }
                Request::Explain(Box::new(ExplainQuery {
                    proto: ports.proto,
                    port: ports.lo,
                    from,
                    to,
                    source_port,
                    flags,
                }))
            }
            Wire::Verify => Request::Verify,
            Wire::Learn {
                since,
                prefix4,
                prefix6,
                spread,
                keep,
            } => {
                let shape = |message: String| PolicyError::Shape {
                    line: None,
                    message,
                };
                let d = LearnQuery::default();
                let prefix4 = prefix4.unwrap_or(d.prefix4);
                let prefix6 = prefix6.unwrap_or(d.prefix6);
                if !(1..=32).contains(&prefix4) {
                    return Err(shape(format!("prefix4 {prefix4}: expected 1 to 32")));
                }
                if !(1..=128).contains(&prefix6) {
                    return Err(shape(format!("prefix6 {prefix6}: expected 1 to 128")));
                }
                let keep = keep
                    .iter()
                    .map(|k| PortRange::parse(k))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| PolicyError::Spec { line: None, error })?;
                Request::Learn(Box::new(LearnQuery {
                    since,
                    prefix4,
                    prefix6,
                    spread: spread.unwrap_or(d.spread),
                    keep,
                }))
            }
            Wire::Record { secs, forget } => {
                if secs == 0 || secs > MAX_RECORD_SECS {
                    return Err(PolicyError::Shape {
                        line: None,
                        message: format!(
                            "record for {secs} s: expected 1 s to {} days",
                            MAX_RECORD_SECS / 86_400
                        ),
                    });
                }
                Request::Record { secs, forget }
            }
        })
    }
}

impl Request {
    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Allow { .. } => "allow",
            Request::Deny { .. } => "deny",
            Request::Apply { .. } => "apply",
            Request::Confirm => "confirm",
            Request::Diff { .. } => "diff",
            Request::Policy => "policy",
            Request::Reload { .. } => "reload",
            Request::Status | Request::StatusLines => "status",
            Request::Subscribe { .. } => "subscribe",
            Request::Shutdown { .. } => "shutdown",
            Request::Explain(_) => "explain",
            Request::Verify => "verify",
            Request::Learn(_) => "learn",
            Request::Record { .. } => "record",
        }
    }

    /// Whether the command changes the guard (and so needs root or
    /// CAP_NET_ADMIN, not only membership in the read group).
    pub fn needs_write(&self) -> bool {
        match self {
            Request::Allow { .. }
            | Request::Deny { .. }
            | Request::Apply { .. }
            | Request::Confirm
            | Request::Reload { .. }
            | Request::Shutdown { .. }
            // Turns recording on in the datapath.
            | Request::Record { .. } => true,
            // Who connects from where: the writers' business, as `diff`.
            Request::Learn(_) => true,
            // A diff shows whose SSH sessions a policy would cut: the
            // writers' business.
            Request::Diff { .. } => true,
            // Both ask the program, with no side effect on the traffic;
            // what they show, `policy` and `status` show too.
            Request::Policy
            | Request::Status
            | Request::StatusLines
            | Request::Subscribe { .. }
            | Request::Explain(_)
            | Request::Verify => false,
        }
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing strings, bools and an enum of unit variants cannot fail.
        let mut line = serde_json::to_string(&Wire::of(self)).unwrap_or_default();
        line.push('\n');
        line
    }
}

// ---- responses ------------------------------------------------------------

/// What a change (allow, deny, reload, shutdown) did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeResponse {
    /// What changed, e.g. `allow tcp/8080`, `reload`.
    pub change: String,
    /// The policy now in force (not for shutdown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyView>,
}

/// What a policy would change against the one in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiffResponse {
    /// Rules only the new policy has, and only the one in force has.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Settings that change: `mode enforce -> audit`, `forwarded ...`.
    pub settings: Vec<String>,
    /// Listeners of the guard's namespace whose exposure changes.
    pub exposure: Vec<ExposureChange>,
    /// SSH sessions (the asker's, established ones) it would cut off.
    pub ssh: Vec<String>,
}

/// A listener whose exposure a new policy changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureChange {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub pid: Option<u32>,
    pub comm: Option<std::sync::Arc<str>>,
    pub from: Option<Exposure>,
    pub to: Option<Exposure>,
}

/// The policy in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub mode: Mode,
    /// The policy file.
    pub file: String,
    pub interfaces: Vec<String>,
    pub rules: Vec<RuleView>,
    /// The policy as policy file text.
    pub toml: String,
}

/// One rule: its ports and the networks it admits (anywhere when empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub ports: PortRange,
    pub from: Vec<ipnet::IpNet>,
    /// Who must listen for the port to open, e.g. `unit redis.service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl PolicyView {
    pub fn of(policy: &Policy, mode: Mode, file: &std::path::Path) -> Self {
        Self {
            mode,
            file: file.display().to_string(),
            interfaces: policy.interfaces.clone(),
            rules: policy
                .rules
                .iter()
                .map(|r| RuleView {
                    ports: r.ports,
                    from: r.from.clone(),
                    owner: r.owner.as_ref().map(ToString::to_string),
                })
                .collect(),
            toml: policy.to_toml(),
        }
    }
}

/// The guard's state: `portwatch status`, and `top`'s table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub mode: Option<Mode>,
    pub policy_file: Option<String>,
    /// Where the datapath is pinned, when it is.
    pub pinned: Option<String>,
    #[serde(default)]
    pub interfaces: Vec<Attached>,
    #[serde(default)]
    pub totals: Totals,
    /// Ports whose rule names an owner: open or not, and who holds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owned: Vec<OwnedPort>,
    /// The last `verify` (the guard runs one after every policy change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySummary>,
    /// A verify under way (a requested one answers when it is done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifying: Option<VerifyProgress>,
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
    /// How many listener lines follow this answer (`{"cmd":"status",
    /// "lines":true}`); `listeners` is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listeners_follow: Option<usize>,
}

/// Guard-wide counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub passed: u64,
    pub drop_no_rule: u64,
    pub drop_source: u64,
    pub drop_malformed: u64,
    pub drop_fragment: u64,
    pub drop_rate_limited: u64,
    /// New sources of limited rules that found the source table full.
    pub rate_table_full: u64,
    pub reports_suppressed: u64,
    pub reports_lost: u64,
    pub flow_replies: u64,
    /// Frames not addressed to the host passed on (`forwarded = "pass"`).
    pub forwarded: u64,
    pub events_lost: u64,
    /// Binds of owned ports by others: refused, and let through in audit mode.
    #[serde(default)]
    pub binds_refused: u64,
    #[serde(default)]
    pub binds_audited: u64,
    /// Events followers of the stream (watch, top) could not keep up with.
    pub follower_events_missed: u64,
    /// Counters of a newer guard that this client does not know by name.
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, u64>,
}

/// A port that opens only while its owner listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedPort {
    pub port: PortRange,
    /// The owner the rule names, e.g. `unit redis-server.service`.
    pub owner: String,
    /// Open at XDP now (an owner listens).
    pub open: bool,
    /// The owner process holding it open.
    pub pid: Option<u32>,
    pub comm: Option<std::sync::Arc<str>>,
    /// Listeners on the port that are not its owner.
    pub squatters: usize,
}

/// One listener with its exposure and the guard's counters for its port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub proto: Proto,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub pid: Option<u32>,
    pub comm: Option<std::sync::Arc<str>>,
    pub uid: Option<u32>,
    pub exe: Option<std::sync::Arc<str>>,
    pub cmdline: Option<std::sync::Arc<str>>,
    pub netns: Option<u64>,
    pub exposure: Option<Exposure>,
    /// Interfaces that reach this listener without a guard on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_via: Vec<String>,
    /// On an owned port: whether this listener is its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_owner: Option<bool>,
    #[serde(default)]
    pub pass_packets: u64,
    #[serde(default)]
    pub pass_bytes: u64,
    #[serde(default)]
    pub drop_packets: u64,
    #[serde(default)]
    pub drop_bytes: u64,
}

/// The acknowledgement of a subscription; the stream follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    pub subscribed: bool,
}

/// Any answer the guard sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Change(ChangeResponse),
    Diff(DiffResponse),
    Policy(PolicyView),
    Status(Box<StatusResponse>),
    /// The status with its listeners as lines of their own: see
    /// [`Response::following_lines`].
    StatusLines(Box<StatusResponse>),
    Subscribed,
    Explain(Box<Explanation>),
    Verify(Box<VerifyReport>),
    Learn(Box<Proposal>),
    Error(String),
}

/// `{"ok":true,...}` around a body.
#[derive(Serialize)]
struct Ok<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct Err<'a> {
    ok: bool,
    error: &'a str,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error(message.into())
    }

    /// The answer as one line, newline included.
    pub fn to_line(&self) -> String {
        fn ok<T: Serialize>(body: &T) -> serde_json::Result<String> {
            serde_json::to_string(&Ok { ok: true, body })
        }
        let text = match self {
            Response::Change(c) => ok(c),
            Response::Diff(d) => ok(d),
            Response::Policy(p) => ok(p),
            Response::Status(s) => ok(s.as_ref()),
            Response::StatusLines(s) => {
                let head = StatusResponse {
                    mode: s.mode,
                    policy_file: s.policy_file.clone(),
                    pinned: s.pinned.clone(),
                    interfaces: s.interfaces.clone(),
                    totals: s.totals.clone(),
                    owned: s.owned.clone(),
                    verify: s.verify.clone(),
                    verifying: s.verifying.clone(),
                    listeners: Vec::new(),
                    listeners_follow: Some(s.listeners.len()),
                };
                ok(&head)
            }
            Response::Subscribed => ok(&Subscribed { subscribed: true }),
            Response::Explain(e) => ok(e.as_ref()),
            Response::Verify(v) => ok(v.as_ref()),
            Response::Learn(p) => ok(p.as_ref()),
            Response::Error(error) => serde_json::to_string(&Err { ok: false, error }),
        };
        // Plain data: serializing cannot fail; should it, the client gets
        // a line that says so instead of nothing.
        let mut line = text.unwrap_or_else(|e| {
            format!("{{\"ok\":false,\"error\":\"cannot encode the answer: {e}\"}}")
        });
        line.push('\n');
        line
    }

    /// Writes the answer line to `out` as it is encoded (a status with many
    /// listeners is not built as one string first).
    pub fn write_line<W: std::io::Write>(&self, mut out: W) -> std::io::Result<()> {
        match self {
            Response::Status(s) => {
                serde_json::to_writer(
                    &mut out,
                    &Ok {
                        ok: true,
                        body: s.as_ref(),
                    },
                )?;
                out.write_all(b"\n")
            }
            _ => out.write_all(self.to_line().as_bytes()),
        }
    }

    /// The lines that follow the answer line: for a status sent as lines,
    /// one per listener, each ending in a newline; none otherwise.
    pub fn following_lines(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        let listeners = match self {
            Response::StatusLines(s) => s.listeners.as_slice(),
            _ => &[],
        };
        listeners.iter().map(|l| {
            // Plain data (strings, numbers, addresses): cannot fail; the
            // line would otherwise say why it is missing.
            let mut line = serde_json::to_vec(l).unwrap_or_else(|e| {
                format!("{{\"error\":\"cannot encode a listener: {e}\"}}").into_bytes()
            });
            line.push(b'\n');
            line
        })
    }
}

/// Why an answer line is not what was asked for.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// The guard said no; its message.
    #[error("{0}")]
    Refused(String),
    /// Not an answer of the protocol.
    #[error("{0}")]
    Malformed(String),
}

/// Decodes an answer line into the body `T` of an `"ok": true` answer, or
/// the guard's error.
pub fn decode_answer<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, AnswerError> {
    #[derive(Deserialize)]
    struct Envelope {
        ok: Option<bool>,
        error: Option<String>,
        #[serde(flatten)]
        body: serde_json::Map<String, serde_json::Value>,
    }
    let envelope: Envelope = serde_json::from_slice(line)
        .map_err(|e| AnswerError::Malformed(format!("the guard's answer is not JSON: {e}")))?;
    match envelope.ok {
        Some(true) => {
            serde_json::from_value(serde_json::Value::Object(envelope.body)).map_err(|e| {
                AnswerError::Malformed(format!("the guard's answer is not as expected: {e}"))
            })
        }
        Some(false) => Err(AnswerError::Refused(envelope.error.unwrap_or_else(|| {
            "the guard refused the request without saying why".to_owned()
        }))),
        None => Err(AnswerError::Malformed(format!(
            "the guard's answer has no \"ok\" field: {}",
            String::from_utf8_lossy(line).trim_end()
        ))),
    }
}

/// Why a line is not a request. The messages go back to the client as they
/// are, so each one names the problem.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("request too large: {len} bytes (the limit is {MAX_LINE} bytes per line)")]
    TooLarge { len: usize },

    #[error("request is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },

    #[error("empty request: send one JSON object per line, e.g. {{\"cmd\":\"status\"}}")]
    Empty,

    #[error("request is not JSON: {0}")]
    NotJson(String),

    #[error("request is not a JSON object: send one per line, e.g. {{\"cmd\":\"status\"}}")]
    NotObject,

    #[error("request has no \"cmd\" field (expected one of {})", COMMANDS.join(", "))]
    MissingCommand,

    #[error("\"cmd\" must be a string (expected one of {})", COMMANDS.join(", "))]
    CommandNotString,

    #[error("unknown command {0:?} (expected {list})", list = COMMANDS.join(", "))]
    UnknownCommand(String),

    /// A known command with a missing, unknown or mistyped field.
    #[error("bad {cmd:?} request: {message}")]
    BadFields { cmd: String, message: String },

    /// A spec or source the policy's parser refuses; its message as is.
    #[error("{0}")]
    Invalid(String),
}

/// Decodes one request line (a trailing `\n` or `\r\n` is allowed).
pub fn decode_request(line: &[u8]) -> Result<Request, ProtocolError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_LINE {
        return Err(ProtocolError::TooLarge { len: line.len() });
    }
    let text = std::str::from_utf8(line).map_err(|e| ProtocolError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    if text.trim().is_empty() {
        return Err(ProtocolError::Empty);
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
    let serde_json::Value::Object(fields) = &value else {
        return Err(ProtocolError::NotObject);
    };
    let cmd = match fields.get("cmd") {
        None => return Err(ProtocolError::MissingCommand),
        Some(serde_json::Value::String(cmd)) => cmd.clone(),
        Some(_) => return Err(ProtocolError::CommandNotString),
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(ProtocolError::UnknownCommand(cmd));
    }
    let bad = |message: String| ProtocolError::BadFields {
        cmd: cmd.clone(),
        message,
    };
    // serde ignores extra fields of unit variants in an internally tagged
    // enum, whatever `deny_unknown_fields` says: checked here.
    if (cmd == "policy" || cmd == "verify")
        && let Some(extra) = fields.keys().find(|k| *k != "cmd")
    {
        return Err(bad(format!("unknown field `{extra}`, there are no fields")));
    }
    let wire: Wire = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    wire.parse()
        .map_err(|e| ProtocolError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<Request, String> {
        decode_request(s.as_bytes()).map_err(|e| e.to_string())
    }

    fn allow(spec: &str, from: &[&str]) -> Request {
        let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
        Request::Allow {
            rule: Rule::parse(spec, &from, None).expect("a valid rule"),
            force: false,
            confirm_within: None,
        }
    }

    #[test]
    fn every_command_decodes() {
        let cases = [
            (
                r#"{"cmd":"allow","spec":"tcp/8080"}"#,
                allow("tcp/8080", &[]),
            ),
            (
                r#"{"cmd":"allow","spec":"tcp/5432","from":["10.0.0.0/8","fd00::/8"]}"#,
                allow("tcp/5432", &["10.0.0.0/8", "fd00::/8"]),
            ),
            (
                r#"{"spec":"udp/53","cmd":"deny"}"#,
                Request::Deny {
                    ports: PortRange::parse("udp/53").expect("a valid spec"),
                    force: false,
                    confirm_within: None,
                },
            ),
            (r#"{"cmd":"policy"}"#, Request::Policy),
            (r#"{"cmd":"reload"}"#, Request::Reload { force: false }),
            (
                r#"{"cmd":"reload","force":true}"#,
                Request::Reload { force: true },
            ),
            (
                r#"{"cmd":"deny","spec":"tcp/22","force":true,"confirm_within":60}"#,
                Request::Deny {
                    ports: PortRange::parse("tcp/22").expect("a valid spec"),
                    force: true,
                    confirm_within: Some(60),
                },
            ),
            (" {\"cmd\":\"status\"} \r\n", Request::Status),
            (
                r#"{"cmd":"subscribe"}"#,
                Request::Subscribe {
                    format: Format::Json,
                    colour: false,
                },
            ),
            (
                r#"{"cmd":"subscribe","format":"human","colour":true}"#,
                Request::Subscribe {
                    format: Format::Human,
                    colour: true,
                },
            ),
            (r#"{"cmd":"confirm"}"#, Request::Confirm),
            (
                r#"{"cmd":"apply","policy":"allow = [\"tcp/22\"]\n","confirm_within":30}"#,
                Request::Apply {
                    text: "allow = [\"tcp/22\"]\n".into(),
                    policy: Box::new(Policy::parse("allow = [\"tcp/22\"]\n").expect("a policy")),
                    force: false,
                    confirm_within: Some(30),
                },
            ),
            (
                r#"{"cmd":"diff","policy":"mode = \"audit\"\n"}"#,
                Request::Diff {
                    policy: Box::new(Policy::parse("mode = \"audit\"\n").expect("a policy")),
                },
            ),
            (r#"{"cmd":"shutdown"}"#, Request::Shutdown { detach: false }),
            (
                r#"{"cmd":"shutdown","detach":true}"#,
                Request::Shutdown { detach: true },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(decode(line), Ok(want.clone()), "{line}");
            // What the client sends decodes to what it meant.
            assert_eq!(decode(&want.to_line()), Ok(want.clone()), "{want:?}");
            assert_eq!(COMMANDS.iter().filter(|c| **c == want.name()).count(), 1);
        }
    }

    #[test]
    fn write_commands() {
        let writes: Vec<&str> = [
            allow("tcp/1", &[]),
            Request::Deny {
                ports: PortRange::parse("tcp/1").expect("a valid spec"),
                force: false,
                confirm_within: None,
            },
            Request::Confirm,
            Request::Diff {
                policy: Box::default(),
            },
            Request::Policy,
            Request::Reload { force: false },
            Request::Status,
            Request::Subscribe {
                format: Format::Json,
                colour: false,
            },
            Request::Shutdown { detach: false },
        ]
        .iter()
        .filter(|r| r.needs_write())
        .map(Request::name)
        .collect();
        assert_eq!(
            writes,
            ["allow", "deny", "confirm", "diff", "reload", "shutdown"]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (
                r#"{"cmd":"frobnicate"}"#,
                r#"unknown command "frobnicate" (expected allow, deny, apply, confirm, diff, policy, reload, status, subscribe, shutdown, explain, verify, learn, record)"#,
            ),
            (
                r#"{"cmd":"Status"}"#,
                r#"unknown command "Status" (expected allow, deny, apply, confirm, diff, policy, reload, status, subscribe, shutdown, explain, verify, learn, record)"#,
            ),
            (
                r#"{"spec":"tcp/1"}"#,
                r#"request has no "cmd" field (expected one of allow, deny, apply, confirm, diff, policy, reload, status, subscribe, shutdown, explain, verify, learn, record)"#,
            ),
            (
                r#"{"cmd":7}"#,
                r#""cmd" must be a string (expected one of allow, deny, apply, confirm, diff, policy, reload, status, subscribe, shutdown, explain, verify, learn, record)"#,
            ),
            (
                r#"{"cmd":"allow"}"#,
                r#"bad "allow" request: missing field `spec`"#,
            ),
            (
                r#"{"cmd":"deny","spec":"tcp/1","from":[]}"#,
                r#"bad "deny" request: unknown field `from`, expected one of `spec`, `force`, `confirm_within`"#,
            ),
            (
                r#"{"cmd":"allow","spec":"tcp/x"}"#,
                r#""tcp/x": port "x" is not a number"#,
            ),
            (
                r#"{"cmd":"allow","spec":"tcp/1","from":["10.0.0.1/8"]}"#,
                r#""10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#,
            ),
            (
                r#"{"cmd":"deny","spec":"dccp/1"}"#,
                r#""dccp/1": unknown protocol "dccp" (expected tcp, udp, sctp or proto/NAME)"#,
            ),
            (
                r#"{"cmd":"status","verbose":true}"#,
                r#"bad "status" request: unknown field `verbose`, expected `lines`"#,
            ),
            (
                r#"{"cmd":"allow","spec":22}"#,
                r#"bad "allow" request: invalid type: integer `22`, expected a string"#,
            ),
            (
                r#"{"cmd":"explain","spec":"tcp/1-2"}"#,
                "explain asks about one port, not the range tcp/1-2",
            ),
            (
                r#"{"cmd":"explain","spec":"udp/53","flags":"syn"}"#,
                "flags are TCP's; udp/53 is not TCP",
            ),
            (
                r#"{"cmd":"explain","spec":"tcp/22","flags":"sin"}"#,
                "unknown TCP flag `sin` (one of fin, syn, rst, psh, ack, urg, or null, xmas)",
            ),
            (
                r#"{"cmd":"explain","spec":"tcp/22","from":"10.0.0.1","to":"::1"}"#,
                "from 10.0.0.1 and to ::1 are not of one address family",
            ),
            (
                r#"{"cmd":"explain","spec":"tcp/22","from":"10.0.0"}"#,
                r#"bad "explain" request: invalid IP address syntax"#,
            ),
            (
                r#"{"cmd":"learn","prefix4":33}"#,
                "prefix4 33: expected 1 to 32",
            ),
            (
                r#"{"cmd":"learn","keep":["tcp/0"]}"#,
                r#""tcp/0": port 0 is not a valid port (1-65535)"#,
            ),
            (
                r#"{"cmd":"record","for":0}"#,
                "record for 0 s: expected 1 s to 7 days",
            ),
            (
                r#"{"cmd":"record"}"#,
                r#"bad "record" request: missing field `for`"#,
            ),
            (
                r#"{"cmd":"verify","all":true}"#,
                r#"bad "verify" request: unknown field `all`, there are no fields"#,
            ),
            (
                r#"{"cmd":"subscribe","format":"xml"}"#,
                r#"bad "subscribe" request: unknown variant `xml`, expected `json` or `human`"#,
            ),
            (
                r#"{"cmd":"status""#,
                "request is not JSON: EOF while parsing an object at line 1 column 15",
            ),
            (
                "status",
                "request is not JSON: expected value at line 1 column 1",
            ),
            (
                r#"["status"]"#,
                r#"request is not a JSON object: send one per line, e.g. {"cmd":"status"}"#,
            ),
            (
                "",
                r#"empty request: send one JSON object per line, e.g. {"cmd":"status"}"#,
            ),
            (
                r#"{"cmd":"status"} {"cmd":"status"}"#,
                "request is not JSON: trailing characters at line 1 column 18",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(decode(line), Err(want.to_owned()), "{line}");
        }
    }

    #[test]
    fn not_utf8() {
        assert_eq!(
            decode_request(b"{\"cmd\":\"st\xffatus\"}").map_err(|e| e.to_string()),
            Err("request is not UTF-8 (invalid byte at offset 10)".to_owned())
        );
    }

    #[test]
    fn size_limit() {
        // Exactly the limit is fine (padded with JSON whitespace).
        let cmd = r#"{"cmd":"status"}"#;
        let mut line = cmd.to_owned();
        line.push_str(&" ".repeat(MAX_LINE - cmd.len()));
        assert_eq!(line.len(), MAX_LINE);
        assert_eq!(decode(&format!("{line}\n")), Ok(Request::Status));
        line.push(' ');
        assert_eq!(
            decode(&line),
            Err("request too large: 65537 bytes (the limit is 65536 bytes per line)".to_owned())
        );
    }

    #[test]
    fn answers_round_trip() {
        assert_eq!(
            Response::error("no \"x\"").to_line(),
            "{\"ok\":false,\"error\":\"no \\\"x\\\"\"}\n"
        );
        let change = ChangeResponse {
            change: "allow tcp/8080".into(),
            policy: None,
        };
        let line = Response::Change(change.clone()).to_line();
        assert_eq!(line, "{\"ok\":true,\"change\":\"allow tcp/8080\"}\n");
        assert_eq!(decode_answer::<ChangeResponse>(line.as_bytes()), Ok(change));
        assert_eq!(
            decode_answer::<ChangeResponse>(Response::error("nope").to_line().as_bytes()),
            Err(AnswerError::Refused("nope".into()))
        );
        assert!(matches!(
            decode_answer::<ChangeResponse>(b"{\"x\":1}"),
            Err(AnswerError::Malformed(_))
        ));
        assert!(matches!(
            decode_answer::<ChangeResponse>(b"{\"ok\":true}"),
            Err(AnswerError::Malformed(_))
        ));
        let status = StatusResponse {
            mode: Some(Mode::Audit),
            ..StatusResponse::default()
        };
        let line = Response::Status(Box::new(status.clone())).to_line();
        assert!(!line.contains("verifying"), "{line}");
        assert_eq!(decode_answer::<StatusResponse>(line.as_bytes()), Ok(status));
        // A verify under way, in the whole answer and in a head of lines.
        let status = StatusResponse {
            verifying: Some(VerifyProgress {
                trigger: "request".into(),
                probed: 512,
                listeners: 8000,
            }),
            ..StatusResponse::default()
        };
        let line = Response::Status(Box::new(status.clone())).to_line();
        assert_eq!(
            decode_answer::<StatusResponse>(line.as_bytes()),
            Ok(status.clone())
        );
        let head = Response::StatusLines(Box::new(status.clone())).to_line();
        assert_eq!(
            decode_answer::<StatusResponse>(head.as_bytes()).map(|h| h.verifying),
            Ok(status.verifying)
        );
    }

    #[test]
    fn allow_carries_an_owner_both_ways() {
        let line =
            r#"{"cmd":"allow","spec":"tcp/6379","owner":{"user":"0","comm":"redis-server"}}"#;
        let Ok(Request::Allow { rule, .. }) = decode(&format!("{line}\n")) else {
            panic!("an allow request");
        };
        assert_eq!(
            rule.owner.as_ref().map(ToString::to_string).as_deref(),
            Some("uid 0, comm redis-server")
        );
        let request = Request::Allow {
            rule,
            force: false,
            confirm_within: None,
        };
        assert_eq!(decode(&request.to_line()), Ok(request));
        let e = decode(r#"{"cmd":"allow","spec":"tcp/1","owner":{"name":"x"}}"#)
            .expect_err("unknown owner key");
        assert!(e.to_string().contains("unknown field `name`"), "{e}");
        let e = decode(r#"{"cmd":"allow","spec":"tcp/1-2","owner":{"comm":"x"}}"#)
            .expect_err("an owner on a range");
        assert!(
            e.to_string().contains("an owner rule names one port"),
            "{e}"
        );
    }

    #[test]
    fn a_status_as_lines_is_a_head_then_one_line_per_listener() {
        assert_eq!(
            decode("{\"cmd\":\"status\",\"lines\":true}\n"),
            Ok(Request::StatusLines)
        );
        assert_eq!(
            decode(&Request::StatusLines.to_line()),
            Ok(Request::StatusLines)
        );
        let listener = |port: u16| ListenerStatus {
            proto: Proto::Tcp,
            family: Family::Ipv4,
            addr: "10.0.0.1".parse().expect("an address"),
            port,
            pid: Some(7),
            comm: Some("redis\n\"x".into()),
            uid: Some(0),
            exe: None,
            cmdline: None,
            netns: None,
            exposure: Some(Exposure::Blocked),
            exposed_via: Vec::new(),
            is_owner: None,
            pass_packets: 1,
            pass_bytes: 2,
            drop_packets: 3,
            drop_bytes: 4,
        };
        let status = StatusResponse {
            mode: Some(Mode::Enforce),
            listeners: vec![listener(1), listener(2), listener(3)],
            ..StatusResponse::default()
        };
        let answer = Response::StatusLines(Box::new(status.clone()));
        let head =
            decode_answer::<StatusResponse>(answer.to_line().as_bytes()).expect("an ok answer");
        assert_eq!(head.listeners_follow, Some(3));
        assert!(head.listeners.is_empty());
        let lines: Vec<Vec<u8>> = answer.following_lines().collect();
        assert_eq!(lines.len(), 3);
        let back: Vec<ListenerStatus> = lines
            .iter()
            .map(|l| {
                assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
                serde_json::from_slice(l).expect("a listener")
            })
            .collect();
        assert_eq!(back, status.listeners);
        // The one-line form has nothing after its line, and writes what
        // `to_line` builds.
        let whole = Response::Status(Box::new(status));
        assert_eq!(whole.following_lines().count(), 0);
        let mut written = Vec::new();
        whole.write_line(&mut written).expect("writes");
        assert_eq!(written, whole.to_line().into_bytes());
    }
}
