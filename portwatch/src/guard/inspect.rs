//! `explain` and `verify`: the guard asks its XDP program's read-only twin
//! (a probe: the same code and maps, decided, not acted on) and holds the
//! answer against what the policy says. `explain` tells one packet's
//! verdict and why; `verify` probes every listener from sample sources and
//! reports any listener where program and policy disagree — a map written
//! behind the guard's back, a program that is not the guard's on an
//! interface. The guard
//! verifies at start and after every policy change, and within a
//! housekeeping tick (5 s) of an owned port opening or closing or an
//! interface being re-attached; it logs the result.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use tokio::sync::oneshot;

use super::actor::Guard;
use crate::{
    control::{
        protocol::{
            ExplainQuery, Explanation, Response, RuleRef, VerifyProgress, VerifyReport, VerifyRow,
            VerifySample,
        },
        server::Reply,
    },
    datapath::probe::{Answer, Probe, TcpFlags},
    format::endpoint,
    model::{AttachedMode, DropEvent, DropReason, IpProto, Listener, Mode, PassReason},
    pipeline::{Pipeline, exposure::is_link_local},
    policy::{Policy, Rule},
    sys,
};

/// Sources no rule is likely to name (RFC 5737 TEST-NET-2, RFC 3849): what
/// "anywhere" is probed from.
const OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OUTSIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);
/// A client's source port.
const EPHEMERAL: u16 = 40000;
/// Drop reports kept for `explain`'s "last drops".
pub(super) const RECENT_DROPS: usize = 256;
/// How many of a port's last drops `explain` shows.
const SHOWN_DROPS: usize = 5;
/// Networks of one rule probed at their edges (the rest are alike).
const NETS_PER_RULE: usize = 8;
/// Listeners the automatic verify after a change probes; a requested
/// `verify` probes all (each probe is one BPF_PROG_TEST_RUN, ~1-2 µs).
pub(super) const AUTO_VERIFY_LISTENERS: usize = 4096;
/// Listeners a verify probes per turn of the loop (a few milliseconds):
/// on a host with thousands of listeners the stream and the control socket
/// go on between turns instead of waiting for it all (15,000 listeners
/// took 0.3 s at once).
const VERIFY_CHUNK: usize = 256;
/// A requested verify's trigger, in its report and in `status`.
const REQUESTED: &str = "request";

/// A verify under way: its report so far (a row per listener probed), the
/// listeners it probes, as they were when it began, and who asked for it
/// (none: an automatic one, bounded).
pub(super) struct VerifyRun {
    report: VerifyReport,
    listeners: Vec<Listener>,
    waiting: Vec<oneshot::Sender<Reply>>,
}

impl VerifyRun {
    /// Whether someone asked for it (and waits for its answer).
    fn is_requested(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// How far it has got, for `status`.
    pub fn progress(&self) -> VerifyProgress {
        VerifyProgress {
            trigger: self.report.trigger.clone(),
            probed: self.report.rows.len(),
            listeners: self.listeners.len(),
        }
    }
}

/// What the policy alone says of a packet.
struct Prediction {
    pass: bool,
    why: String,
}

/// The policy's verdict, as the program is meant to compute it from the
/// kernel's copy of the policy (`gated`: owned ports only while their
/// owner listens). Flows and rate-limit buckets are the datapath's state,
/// not the policy's: a pass as a reply to the host's own flow, or a drop
/// over a rule's limit, agrees with either prediction (see `agrees`).
fn predict(gated: &Policy, proto: IpProto, port: u16, src: IpAddr, flags: TcpFlags) -> Prediction {
    let says = |pass: bool, why: &str| Prediction {
        pass,
        why: why.to_string(),
    };
    if proto == IpProto::TCP {
        let f = flags.0;
        let opening = f & TcpFlags::SYN != 0 && f & TcpFlags::ACK == 0;
        if !opening && f & (TcpFlags::ACK | TcpFlags::RST) != 0 {
            return says(
                true,
                "a segment of a connection (ACK or RST) passes whatever the port",
            );
        }
    }
    if matches!(proto, IpProto::ICMP | IpProto::ICMPV6 | IpProto::IGMP) {
        return says(true, "ICMP, ICMPv6 and IGMP always pass");
    }
    let port = if proto.has_ports() { port } else { 0 };
    let rules: Vec<&Rule> = gated
        .rules
        .iter()
        .filter(|r| r.ports.contains(proto, port))
        .collect();
    if rules.is_empty() {
        return says(false, "no rule permits the port");
    }
    if gated.permits(proto, port, src) {
        says(true, "a rule permits the port from this source")
    } else {
        says(false, "the rule permits the port, not from this source")
    }
}

/// Whether the program's answer is what the policy predicts.
fn agrees(predicted: &Prediction, observed: Answer) -> bool {
    match observed {
        Answer::Pass(PassReason::OwnFlow) => true,
        Answer::Drop(DropReason::RateLimited) => predicted.pass,
        Answer::Pass(PassReason::Forwarded) => false,
        Answer::Pass(_) => predicted.pass,
        Answer::Drop(_) => !predicted.pass,
    }
}

/// Where a packet from `net` is: `10.0.0.0/8`'s edges and the addresses
/// just outside them.
fn edges(net: &IpNet) -> Vec<IpAddr> {
    let mut out = vec![net.network(), net.broadcast()];
    match net {
        IpNet::V4(n) => {
            let lo = u32::from(n.network());
            let hi = u32::from(n.broadcast());
            out.extend(lo.checked_sub(1).map(|a| IpAddr::V4(a.into())));
            out.extend(hi.checked_add(1).map(|a| IpAddr::V4(a.into())));
        }
        IpNet::V6(n) => {
            let lo = u128::from(n.network());
            let hi = u128::from(n.broadcast());
            out.extend(lo.checked_sub(1).map(|a| IpAddr::V6(a.into())));
            out.extend(hi.checked_add(1).map(|a| IpAddr::V6(a.into())));
        }
    }
    out
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

impl Guard {
    /// One of the host's addresses of `v4`'s family on a guarded interface
    /// (a global one first): a probe's destination must be the host's, or
    /// the program takes it for traffic the host forwards.
    fn host_address(&self, like: &IpAddr) -> Option<IpAddr> {
        let guarded: BTreeSet<&str> = self.attached.iter().map(|a| a.iface.as_str()).collect();
        let addrs: Vec<IpAddr> = self
            .ifaces_now
            .iter()
            .filter(|i| guarded.contains(i.name.as_str()))
            .flat_map(|i| i.addrs.iter().copied())
            .filter(|a| same_family(a, like))
            .collect();
        addrs
            .iter()
            .find(|a| !is_link_local(a))
            .or(addrs.first())
            .copied()
    }

    /// The rule of the policy in force covering the port, if any.
    fn rule_for(&self, proto: IpProto, port: u16) -> Option<&Rule> {
        self.policy
            .rules
            .iter()
            .find(|r| r.ports.contains(proto, port))
    }

    /// Remembers a drop report for `explain`.
    pub(super) fn remember_drop(&mut self, drop: &DropEvent) {
        if self.recent_drops.len() == RECENT_DROPS {
            self.recent_drops.pop_front();
        }
        self.recent_drops.push_back(drop.clone());
    }

    /// The verdict for one packet from the loaded program, and why.
    pub fn explain(&mut self, q: &ExplainQuery) -> Result<Explanation, String> {
        let mut notes = Vec::new();
        let port = if q.proto.has_ports() { q.port } else { 0 };
        let family_of = q.from.or(q.to).unwrap_or(IpAddr::V4(OUTSIDE_V4));
        let from = match q.from {
            Some(from) => from,
            None => {
                let outside = if family_of.is_ipv4() {
                    IpAddr::V4(OUTSIDE_V4)
                } else {
                    IpAddr::V6(OUTSIDE_V6)
                };
                notes.push(format!(
                    "no --from: the packet comes from {outside} (a documentation address no rule is likely to name)"
                ));
                outside
            }
        };
        let to = match q.to {
            Some(to) => to,
            None => {
                let to = self.host_address(&from).ok_or_else(|| {
                    format!(
                        "no guarded interface has an {} address to send the packet to: give --to",
                        if from.is_ipv4() { "IPv4" } else { "IPv6" }
                    )
                })?;
                notes.push(format!("no --to: the packet goes to the host's {to}"));
                to
            }
        };
        let flags = match (q.proto, q.flags) {
            (IpProto::TCP, Some(f)) => f,
            (IpProto::TCP, None) => {
                notes.push("no --flags: a SYN (a connection attempt)".into());
                TcpFlags::OPENING
            }
            _ => TcpFlags(0),
        };
        let source_port = q.source_port.unwrap_or(EPHEMERAL);
        let probe = Probe {
            proto: q.proto,
            src: from,
            dst: to,
            src_port: source_port,
            dst_port: port,
            flags,
        };
        let verdict = self
            .datapath
            .probe_guard(&probe)
            .map_err(|e| format!("asking the XDP guard: {e}"))?;
        let predicted = predict(&self.gated, q.proto, port, from, flags);
        let agree = agrees(&predicted, verdict);
        let mut reasons = Vec::new();
        let rule = self.rule_for(q.proto, port).cloned();
        self.rule_reasons(rule.as_ref(), q.proto, port, from, &mut reasons);
        if matches!(q.proto, IpProto::UDP | IpProto::SCTP) || !q.proto.has_ports() {
            reasons.push(self.flow_reason(&probe));
        }
        match verdict {
            Answer::Pass(PassReason::Connection) => reasons.push(
                "TCP with ACK or RST (and no SYN) belongs to a connection: it passes whatever the port, and the kernel answers one it does not know with a RST".into(),
            ),
            Answer::Pass(PassReason::Forwarded) => reasons.push(format!(
                "{to} is not one of the host's addresses: the packet is routed or bridged on, and judged where it goes (policy `forwarded`)"
            )),
            Answer::Pass(PassReason::Dhcp) => {
                reasons.push("a DHCP reply to the host's own client".into())
            }
            _ => {}
        }
        if !agree {
            reasons.push(format!(
                "the program's answer ({verdict}) is not what the policy predicts ({}): the kernel's maps are not the policy in force; run `portwatch verify`",
                if predicted.pass { "pass" } else { "drop" }
            ));
        }
        let outcome = match (verdict, self.mode) {
            (Answer::Pass(_), _) => "passed".to_string(),
            (Answer::Drop(_), Mode::Enforce) => "dropped".to_string(),
            (Answer::Drop(_), Mode::Audit) => "passed (audit mode: enforce would drop)".to_string(),
        };
        let slot = self.slots.slot_of(q.proto, port);
        let counters = self
            .maps
            .slot_counters(std::iter::once(slot))
            .remove(&slot)
            .unwrap_or_default();
        let last_drops = self.last_drops_of(q.proto, port);
        Ok(Explanation {
            packet: format!(
                "{} {} -> {}{}",
                q.proto,
                if q.proto.has_ports() {
                    endpoint(&from, source_port)
                } else {
                    from.to_string()
                },
                if q.proto.has_ports() {
                    endpoint(&to, port)
                } else {
                    to.to_string()
                },
                if q.proto == IpProto::TCP {
                    format!(" [{flags}]")
                } else {
                    String::new()
                }
            ),
            mode: self.mode,
            verdict,
            outcome,
            rule: rule.map(|r| RuleRef {
                rule: r.to_string(),
                file: self.start.policy_path.display().to_string(),
                line: r.line,
            }),
            reasons,
            predicted: format!(
                "{}: {}",
                if predicted.pass { "pass" } else { "drop" },
                predicted.why
            ),
            agrees: agree,
            pass_packets: counters.pass_packets,
            drop_packets: counters.drop_packets,
            last_drops,
            notes,
        })
    }

    /// Why the policy says what it says of this source: the rule, its
    /// networks, its limit, its owner and the gate.
    fn rule_reasons(
        &self,
        rule: Option<&Rule>,
        proto: IpProto,
        port: u16,
        from: IpAddr,
        reasons: &mut Vec<String>,
    ) {
        let Some(rule) = rule else {
            let listened = self
                .listened
                .iter()
                .any(|(p, lp)| IpProto::from(*p) == proto && *lp == port);
            reasons.push(format!(
                "no rule covers {}{}: default deny",
                crate::policy::PortRange::single(proto, port),
                if listened {
                    " (something listens on it)"
                } else {
                    ""
                }
            ));
            return;
        };
        let src = from.to_canonical();
        if rule.from.is_empty() {
            reasons.push("the rule permits every source".into());
        } else if let Some(net) = rule.from.iter().find(|n| n.contains(&src)) {
            reasons.push(format!(
                "source {src} is in {net}, one of the rule's networks"
            ));
        } else {
            reasons.push(format!(
                "source {src} is in none of the rule's {} network{}",
                rule.from.len(),
                if rule.from.len() == 1 { "" } else { "s" }
            ));
        }
        if let Some(limit) = rule.limit {
            reasons.push(format!(
                "limit {limit} per source: a source over it drops as rate_limited until its bucket refills"
            ));
        }
        if let Some(owner) = &rule.owner {
            match self.gate_open.get(&rule.ports) {
                Some(holder) => reasons.push(format!(
                    "owned by {owner}: open, its owner listens ({}{})",
                    holder.comm.as_deref().unwrap_or("?"),
                    holder.pid.map(|p| format!("[{p}]")).unwrap_or_default()
                )),
                None => reasons.push(format!(
                    "owned by {owner}: closed, its owner does not listen (the port opens when it does)"
                )),
            }
        }
    }

    /// Whether the packet answers a flow the host opened (UDP, SCTP and
    /// port-less protocols pass as replies to those).
    fn flow_reason(&self, probe: &Probe) -> String {
        // Port-less protocols' flows are recorded with ports 0.
        let ports = probe.proto.has_ports();
        let port = |p: u16| if ports { p } else { 0 };
        let local = SocketAddr::new(probe.dst, port(probe.dst_port));
        let remote = SocketAddr::new(probe.src, port(probe.src_port));
        let flow = if ports {
            format!(
                "{} -> {}",
                endpoint(&probe.dst, probe.dst_port),
                endpoint(&probe.src, probe.src_port)
            )
        } else {
            format!("{} -> {}", probe.dst, probe.src)
        };
        match self.maps.flow_last_sent(probe.proto.0, local, remote) {
            Some(last) => {
                let age = sys::monotonic_ns().saturating_sub(last);
                let live = age <= self.flow_timeout.as_nanos() as u64;
                format!(
                    "the host sent on the flow {flow} {:.1} s ago: replies {} (for {} s after the last packet out)",
                    age as f64 / 1e9,
                    if live { "pass" } else { "no longer pass" },
                    self.flow_timeout.as_secs()
                )
            }
            None => format!("the host has no flow {flow}: no reply to pass"),
        }
    }

    fn last_drops_of(&self, proto: IpProto, port: u16) -> Vec<String> {
        let mut drops: Vec<String> = self
            .recent_drops
            .iter()
            .rev()
            .filter(|d| d.proto == proto.0 && d.dst_port == port)
            .take(SHOWN_DROPS)
            .map(|d| {
                let ts = crate::format::time_of_day(d.ts);
                let src = d
                    .src
                    .map(|s| endpoint(&s, d.src_port))
                    .unwrap_or_else(|| "?".into());
                format!(
                    "{ts} from {src} ({}{})",
                    d.reason.as_str(),
                    if d.audit { ", audit" } else { "" }
                )
            })
            .collect();
        drops.reverse();
        drops
    }

    /// A verify: its report head (the interfaces) and the listeners it
    /// will probe, every listener of the guard's namespace (at most
    /// `bound`, when given). Each is probed from sample sources: the edges
    /// of the networks its rule names, and an address outside them, IPv4
    /// and IPv6 as the listener takes them; TCP also with a scan's
    /// FIN/PSH/URG from outside.
    fn start_verify(
        &mut self,
        pipeline: &Pipeline,
        trigger: &str,
        bound: Option<usize>,
    ) -> VerifyRun {
        let mut report = VerifyReport {
            at: now_unix(),
            trigger: trigger.to_string(),
            mode: Some(self.mode),
            ..VerifyReport::default()
        };
        self.verify_interfaces(&mut report);
        let mut listeners: Vec<Listener> = pipeline
            .listeners()
            .filter(|l| l.netns == self.netns)
            .cloned()
            .collect();
        listeners.sort_by_key(|l| (l.proto, l.port, l.addr));
        listeners.dedup_by_key(|l| (l.proto, l.port, l.addr));
        if let Some(bound) = bound
            && listeners.len() > bound
        {
            report.unchecked = listeners.len() - bound;
            listeners.truncate(bound);
        }
        VerifyRun {
            report,
            listeners,
            waiting: Vec::new(),
        }
    }

    /// Probes up to `n` more of `run`'s listeners; whether all are done.
    fn verify_some(&mut self, run: &mut VerifyRun, n: usize) -> bool {
        let done = run.report.rows.len();
        let end = done.saturating_add(n).min(run.listeners.len());
        for l in &run.listeners[done..end] {
            let row = self.verify_listener(l, &mut run.report.probes);
            if !row.ok {
                run.report.disagreements += 1;
            }
            run.report.rows.push(row);
        }
        end == run.listeners.len()
    }

    fn verify_interfaces(&mut self, report: &mut VerifyReport) {
        // What each interface runs now, not at the last link event:
        // replacing a program raises no event.
        let ifaces = match crate::iface::table::dump() {
            Ok(ifaces) => ifaces,
            Err(e) => {
                report
                    .interfaces
                    .push(format!("reading the interfaces' XDP programs: {e}"));
                report.disagreements += 1;
                return;
            }
        };
        for a in self.attached.clone() {
            let problem = match self.datapath.guard_program_id(a.xdp_mode) {
                Err(e) => Some(format!("{}: the guard's program: {e}", a.iface)),
                Ok(ours) => runs_guard(&a, &ifaces, ours).err(),
            };
            if let Some(problem) = problem {
                report.interfaces.push(problem);
                report.disagreements += 1;
            }
        }
    }

    fn verify_listener(&mut self, l: &Listener, probes: &mut usize) -> VerifyRow {
        let proto = IpProto::from(l.proto);
        let label = format!(
            "{} {} {}{}",
            l.proto.as_str(),
            endpoint(&l.addr, l.port),
            l.process.comm.as_deref().unwrap_or("?"),
            l.process.pid.map(|p| format!("[{p}]")).unwrap_or_default()
        );
        let mut row = VerifyRow {
            listener: label,
            proto: l.proto,
            port: l.port,
            predicted: self.predicted_exposure(proto, l.port),
            observed: String::new(),
            ok: true,
            skipped: None,
            samples: Vec::new(),
        };
        if l.addr.is_loopback() {
            row.skipped = Some("loopback only: not reachable from the network".into());
            row.observed = "not probed".into();
            return row;
        }
        // Which families reach it: a specific address its own; 0.0.0.0
        // IPv4; [::] both (unless IPV6_V6ONLY, which the table does not
        // say: probing IPv4 too only asks the program one more question).
        let mut dsts: Vec<IpAddr> = Vec::new();
        if l.addr.is_unspecified() {
            for like in [IpAddr::V4(OUTSIDE_V4), IpAddr::V6(OUTSIDE_V6)] {
                if l.addr.is_ipv4() && !like.is_ipv4() {
                    continue;
                }
                dsts.extend(self.host_address(&like));
            }
        } else {
            dsts.push(l.addr.to_canonical());
        }
        if dsts.is_empty() {
            row.skipped = Some("no guarded interface has an address of its family".into());
            row.observed = "not probed".into();
            return row;
        }
        for dst in dsts {
            for (src, flags) in self.samples(proto, l.port, &dst) {
                let probe = Probe {
                    proto,
                    src,
                    dst,
                    src_port: EPHEMERAL,
                    dst_port: l.port,
                    flags,
                };
                *probes += 1;
                let predicted = predict(&self.gated, proto, l.port, src, flags);
                match self.datapath.probe_guard(&probe) {
                    Ok(observed) => {
                        let agree = agrees(&predicted, observed);
                        row.ok &= agree;
                        row.samples.push(VerifySample {
                            from: src,
                            to: dst,
                            flags: (proto == IpProto::TCP).then(|| flags.to_string()),
                            predicted_pass: predicted.pass,
                            observed,
                            agrees: agree,
                        });
                    }
                    Err(e) => {
                        row.ok = false;
                        row.observed = format!("probe failed: {e}");
                        return row;
                    }
                }
            }
        }
        let passed = row.samples.iter().filter(|s| s.observed.passes()).count();
        let wrong: Vec<String> = row
            .samples
            .iter()
            .filter(|s| !s.agrees)
            .map(|s| format!("{} {}", s.from, s.observed))
            .collect();
        row.observed = if wrong.is_empty() {
            format!(
                "{passed} of {} probes pass, as predicted",
                row.samples.len()
            )
        } else {
            format!(
                "{passed} of {} probes pass; against the policy: {}",
                row.samples.len(),
                wrong.join(", ")
            )
        };
        row
    }

    /// The sources to probe a port from, with the TCP flags to send.
    fn samples(&self, proto: IpProto, port: u16, dst: &IpAddr) -> Vec<(IpAddr, TcpFlags)> {
        let outside = if dst.is_ipv4() {
            IpAddr::V4(OUTSIDE_V4)
        } else {
            IpAddr::V6(OUTSIDE_V6)
        };
        let mut srcs: BTreeSet<IpAddr> = BTreeSet::from([outside]);
        for rule in self
            .policy
            .rules
            .iter()
            .filter(|r| r.ports.contains(proto, port))
        {
            for net in rule
                .from
                .iter()
                .filter(|n| same_family(&n.addr(), dst))
                .take(NETS_PER_RULE)
            {
                srcs.extend(edges(net));
            }
        }
        let syn = if proto == IpProto::TCP {
            TcpFlags::OPENING
        } else {
            TcpFlags(0)
        };
        let mut out: Vec<(IpAddr, TcpFlags)> = srcs.into_iter().map(|s| (s, syn)).collect();
        if proto == IpProto::TCP {
            // A scan segment must fare as a SYN does: no leak of which
            // closed ports have a listener.
            out.push((
                outside,
                TcpFlags(TcpFlags::FIN | TcpFlags::PSH | TcpFlags::URG),
            ));
        }
        out
    }

    /// What the policy in force says of a port, in words.
    fn predicted_exposure(&self, proto: IpProto, port: u16) -> String {
        let Some(rule) = self.rule_for(proto, port) else {
            return "closed (no rule)".into();
        };
        if let Some(owner) = &rule.owner
            && !self.gate_open.contains_key(&rule.ports)
        {
            return format!("closed (owner {owner} not listening)");
        }
        let to = if rule.from.is_empty() {
            "anywhere".to_string()
        } else {
            rule.from
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match rule.limit {
            Some(limit) => format!("open to {to}, limit {limit}"),
            None => format!("open to {to}"),
        }
    }

    /// The automatic verify after a change or at start: bounded, logged,
    /// kept for `status`, `top` and the metrics. It covers whatever was
    /// due.
    ///
    /// Probed a chunk at a time (`continue_verify`); an automatic one
    /// begun before is dropped, as the policy or the datapath it was
    /// checking has changed. A requested one goes on (each listener is
    /// probed against what is in force when its turn comes), and this one
    /// follows it: restarted at every change, it would never answer while
    /// changes keep coming.
    pub fn verify_after(&mut self, pipeline: &Pipeline, trigger: &str) {
        if self
            .verify_run
            .as_ref()
            .is_some_and(VerifyRun::is_requested)
        {
            self.verify_due = Some(trigger.to_string());
            return;
        }
        self.verify_due = None;
        self.verify_run = Some(self.start_verify(pipeline, trigger, Some(AUTO_VERIFY_LISTENERS)));
        self.continue_verify(pipeline);
    }

    /// A `verify` request: every listener, answered when the run is done.
    /// It replaces an automatic run under way (it covers all that one
    /// would); while another requested run is under way it waits for the
    /// next, so that it sees what listens now.
    pub fn request_verify(&mut self, pipeline: &Pipeline, reply: oneshot::Sender<Reply>) {
        match &self.verify_run {
            Some(run) if run.is_requested() => self.verify_next.push(reply),
            _ => {
                self.verify_run = Some(VerifyRun {
                    waiting: vec![reply],
                    ..self.start_verify(pipeline, REQUESTED, None)
                });
                self.continue_verify(pipeline);
            }
        }
    }

    /// The next chunk of the verify under way, if any; when its last is
    /// done the result is kept and whoever asked is answered; then the
    /// requests that came meanwhile get a run of their own, or else a
    /// verify that came due meanwhile runs.
    pub fn continue_verify(&mut self, pipeline: &Pipeline) {
        let Some(mut run) = self.verify_run.take() else {
            return;
        };
        // Who gave up waiting needs no answer; with none left the run goes
        // on as an automatic one would, and a change may replace it.
        run.waiting.retain(|reply| !reply.is_closed());
        if !self.verify_some(&mut run, VERIFY_CHUNK) {
            self.verify_run = Some(run);
            return;
        }
        self.record_verify(&run.report);
        // A report of every listener can be megabytes: the last waiter
        // takes it, the others a copy.
        let mut waiting = run.waiting;
        if let Some(last) = waiting.pop() {
            for reply in waiting {
                // A client that gave up waiting is no concern of ours.
                let _ = reply.send(Reply::Once(Response::Verify(Box::new(run.report.clone()))));
            }
            let _ = last.send(Reply::Once(Response::Verify(Box::new(run.report))));
        }
        if !self.verify_next.is_empty() {
            // Begun after whatever came due: it covers that too.
            self.verify_due = None;
            self.verify_run = Some(VerifyRun {
                waiting: std::mem::take(&mut self.verify_next),
                ..self.start_verify(pipeline, REQUESTED, None)
            });
        } else if let Some(trigger) = self.verify_due.take() {
            self.verify_after(pipeline, &trigger);
        }
    }

    /// Keeps a verify's result and logs it.
    pub fn record_verify(&mut self, report: &VerifyReport) {
        let summary = report.summary();
        if summary.ok {
            log::info!(
                "verify ({}): {} listeners, {} probes: the guard's program agrees with the policy{}",
                summary.trigger,
                summary.listeners,
                summary.probes,
                if summary.unchecked > 0 {
                    format!(
                        " ({} listeners beyond the bound not probed)",
                        summary.unchecked
                    )
                } else {
                    String::new()
                }
            );
        } else {
            log::warn!(
                "verify ({}): the guard's program disagrees with the policy: {}",
                summary.trigger,
                summary.disagreements.join("; ")
            );
        }
        self.last_verify = Some(summary);
    }
}

/// Whether `a`'s interface runs the guard's program `ours` in the hook it
/// was attached to; else what is wrong.
fn runs_guard(
    a: &crate::datapath::attach::Attached,
    ifaces: &[crate::iface::table::Iface],
    ours: u32,
) -> Result<(), String> {
    let Some(iface) = ifaces.iter().find(|i| i.index == a.ifindex) else {
        return Err(format!("{}: the interface is gone", a.iface));
    };
    let (hook, ids) = if a.xdp_mode == AttachedMode::Tc {
        let ids = crate::datapath::attach::tc_ingress_programs(&a.iface)
            .map_err(|e| format!("{}: {e}", a.iface))?;
        ("tc ingress", ids)
    } else {
        ("XDP", iface.xdp_programs.clone())
    };
    if ids.is_empty() {
        return Err(format!("{}: no {hook} program attached", a.iface));
    }
    if !ids.contains(&ours) {
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        return Err(format!(
            "{}: runs {hook} program {}, not the guard's ({ours})",
            a.iface,
            ids.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn edges_are_the_first_and_last_address_and_their_neighbours() {
        let net: IpNet = "10.1.2.0/24".parse().unwrap_or_default();
        assert_eq!(
            edges(&net),
            vec![
                addr("10.1.2.0"),
                addr("10.1.2.255"),
                addr("10.1.1.255"),
                addr("10.1.3.0")
            ]
        );
        let all: IpNet = "0.0.0.0/0".parse().unwrap_or_default();
        assert_eq!(edges(&all).len(), 2, "nothing lies outside 0.0.0.0/0");
    }

    #[test]
    fn predictions_follow_rules_sources_and_tcp_flags() -> Result<(), crate::policy::PolicyError> {
        let policy =
            Policy::parse(r#"allow = ["udp/53", { port = "tcp/5432", from = ["10.0.0.0/8"] }]"#)?;
        let syn = TcpFlags::OPENING;
        let inside = addr("10.9.9.9");
        let outside = addr("192.0.2.1");
        assert!(predict(&policy, IpProto::TCP, 5432, inside, syn).pass);
        assert!(!predict(&policy, IpProto::TCP, 5432, outside, syn).pass);
        assert!(!predict(&policy, IpProto::TCP, 22, inside, syn).pass);
        assert!(predict(&policy, IpProto::TCP, 22, outside, TcpFlags(TcpFlags::ACK)).pass);
        assert!(!predict(&policy, IpProto::TCP, 22, outside, TcpFlags(0x29)).pass);
        assert!(predict(&policy, IpProto::UDP, 53, outside, TcpFlags(0)).pass);
        assert!(!predict(&policy, IpProto(47), 0, outside, TcpFlags(0)).pass);
        let drop = Prediction {
            pass: false,
            why: String::new(),
        };
        assert!(agrees(&drop, Answer::Drop(DropReason::NoRule)));
        assert!(agrees(&drop, Answer::Pass(PassReason::OwnFlow)));
        assert!(!agrees(&drop, Answer::Pass(PassReason::Rule)));
        assert!(!agrees(&drop, Answer::Pass(PassReason::Forwarded)));
        assert!(!agrees(&drop, Answer::Drop(DropReason::RateLimited)));
        Ok(())
    }
}
