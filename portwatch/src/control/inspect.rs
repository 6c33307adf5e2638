//! What `explain` and `verify` ask and answer. Both ask the loaded XDP
//! program itself (a probe, see [`crate::datapath::probe`]); the policy
//! supplies the reasons and the prediction the program's answer is held to.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    datapath::probe::{Answer, TcpFlags},
    model::{IpProto, Mode, Proto},
};

/// `explain PROTO/PORT`: the packet to ask about. Unset fields get what a
/// client's packet would carry: a source no rule names, the host's own
/// address, an ephemeral source port, a SYN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainQuery {
    pub proto: IpProto,
    pub port: u16,
    pub from: Option<IpAddr>,
    pub to: Option<IpAddr>,
    pub source_port: Option<u16>,
    pub flags: Option<TcpFlags>,
}

/// The rule that covers a port, as the policy file has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// e.g. `tcp/5432 from 10.0.0.0/8 limit 10/s owner unit postgresql.service`.
    pub rule: String,
    /// The policy file and the rule's line in it (rules added at run time
    /// have none until the file is read again).
    pub file: String,
    pub line: Option<usize>,
}

/// `explain`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The packet asked about, e.g. `tcp 198.51.100.7:40000 -> 10.0.0.1:5432 [syn]`.
    pub packet: String,
    pub mode: Mode,
    /// What the loaded XDP program decided, and its reason.
    pub verdict: Answer,
    /// What happens to such a packet: `dropped`, `passed`, or
    /// `passed (audit mode: enforce would drop)`.
    pub outcome: String,
    /// The rule covering the port, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    /// Why, from the policy and the guard's state: the source against the
    /// rule's networks, the limit, the owner and the gate, the flow.
    pub reasons: Vec<String>,
    /// What the policy alone predicts (`pass`/`drop`), and whether the
    /// program agrees. A disagreement means the datapath is not what the
    /// policy says: `verify` checks every listener this way.
    pub predicted: String,
    pub agrees: bool,
    /// The port's counters (its rule's or listener's slot).
    pub pass_packets: u64,
    pub drop_packets: u64,
    /// The last drops reported for this port (newest last).
    #[serde(default)]
    pub last_drops: Vec<String>,
    /// Assumptions made for fields the question left out.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One probe of a listener: a source, what the policy predicts, what the
/// program answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySample {
    pub from: IpAddr,
    pub to: IpAddr,
    /// TCP flags sent (a SYN, and a scan's FIN/PSH/URG from outside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    pub predicted_pass: bool,
    pub observed: Answer,
    pub agrees: bool,
}

/// A listener and what its probes found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRow {
    /// e.g. `tcp 0.0.0.0:22 sshd[812]`.
    pub listener: String,
    pub proto: Proto,
    pub port: u16,
    /// From the policy: `open to anywhere`, `open to 10.0.0.0/8`, `closed`,
    /// `closed (owner unit x.service not listening)`.
    pub predicted: String,
    /// From the program: `passes 3 of 5 sources`, ...
    pub observed: String,
    pub ok: bool,
    /// Not probed, and why (loopback only, no address of its family on a
    /// guarded interface).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    #[serde(default)]
    pub samples: Vec<VerifySample>,
}

/// `verify`'s answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyReport {
    /// Unix time of the run, seconds.
    pub at: u64,
    /// What started it: `request`, `start`, `allow tcp/80`, ...
    pub trigger: String,
    pub mode: Option<Mode>,
    pub rows: Vec<VerifyRow>,
    /// Guarded interfaces whose XDP program is not the guard's, or missing.
    pub interfaces: Vec<String>,
    pub probes: usize,
    /// Listeners and interfaces that disagree.
    pub disagreements: usize,
    /// Listeners beyond the automatic run's bound, not probed (a requested
    /// `verify` probes them all).
    pub unchecked: usize,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.disagreements == 0
    }

    /// The short form `status`, `top` and the log show.
    pub fn summary(&self) -> VerifySummary {
        VerifySummary {
            at: self.at,
            trigger: self.trigger.clone(),
            ok: self.ok(),
            listeners: self.rows.iter().filter(|r| r.skipped.is_none()).count(),
            probes: self.probes,
            disagreements: self
                .rows
                .iter()
                .filter(|r| !r.ok)
                .map(|r| {
                    format!(
                        "{}: predicted {}, observed {}",
                        r.listener, r.predicted, r.observed
                    )
                })
                .chain(self.interfaces.iter().cloned())
                .collect(),
            unchecked: self.unchecked,
        }
    }
}

/// The last verify, in `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifySummary {
    pub at: u64,
    pub trigger: String,
    pub ok: bool,
    pub listeners: usize,
    pub probes: usize,
    /// One line per disagreeing listener or interface.
    pub disagreements: Vec<String>,
    pub unchecked: usize,
}

/// A verify under way, in `status`: it probes a chunk of listeners per
/// turn of the guard's loop.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyProgress {
    pub trigger: String,
    /// Listeners probed so far, of `listeners`.
    pub probed: usize,
    pub listeners: usize,
}

/// `learn`: what to propose from. Networks are sources aggregated to
/// `prefix4`/`prefix6`; more than `spread` networks on one port make the
/// rule "from anywhere".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnQuery {
    /// Only what was seen in the last so many seconds; None: everything
    /// recorded.
    pub since: Option<u64>,
    pub prefix4: u8,
    pub prefix6: u8,
    pub spread: usize,
    /// Listeners to propose a rule for even without traffic.
    pub keep: Vec<crate::policy::PortRange>,
}

impl Default for LearnQuery {
    fn default() -> Self {
        Self {
            since: None,
            prefix4: 24,
            prefix6: 64,
            spread: 8,
            keep: Vec::new(),
        }
    }
}

/// One rule of a proposal, with what it is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposedRule {
    /// The `allow` item, e.g. `{ port = "tcp/22", from = [...], owner = {...} }`.
    pub toml: String,
    /// Comment lines (without `#`): the process, first and last seen,
    /// attempts per network.
    pub comment: Vec<String>,
    /// `tcp/22`, for views that list rules.
    pub port: String,
    /// Kept because the operator's SSH session comes in through it.
    #[serde(default)]
    pub ssh: bool,
}

/// `learn`'s answer: a policy file, rule by rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Proposal {
    /// Comment lines at the top: where it comes from, what was left out.
    pub header: Vec<String>,
    /// Settings lines (`mode = "enforce"`, `interfaces = [...]`).
    pub settings: Vec<String>,
    pub rules: Vec<ProposedRule>,
    /// Listeners and ports not proposed, and why.
    pub left_out: Vec<String>,
    /// Connection attempts the proposal stands on, and (port, source)
    /// pairs recorded of the table's capacity.
    pub attempts: u64,
    pub pairs: usize,
    pub capacity: u32,
    /// Whether the guard records now, and until when.
    pub recording: String,
}

impl Proposal {
    /// The policy file with the rules `keep` says yes to.
    pub fn render(&self, keep: impl Fn(usize) -> bool) -> String {
        let mut out = String::new();
        for line in &self.header {
            out.push_str(&format!("# {line}\n"));
        }
        for line in &self.settings {
            out.push_str(line);
            out.push('\n');
        }
        let rules: Vec<&ProposedRule> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(i, _)| keep(*i))
            .map(|(_, r)| r)
            .collect();
        if rules.is_empty() {
            out.push_str("allow = []\n");
            return out;
        }
        out.push_str("allow = [\n");
        for rule in rules {
            for line in &rule.comment {
                out.push_str(&format!("  # {line}\n"));
            }
            out.push_str(&format!("  {},\n", rule.toml));
        }
        out.push_str("]\n");
        out
    }

    /// The whole proposal as a policy file.
    pub fn text(&self) -> String {
        self.render(|_| true)
    }
}
