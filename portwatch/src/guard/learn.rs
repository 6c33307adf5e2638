//! `portwatch learn`: a policy proposed from what listens and who came to
//! it. The XDP program records connection attempts (TCP SYNs; packets of
//! other protocols, replies to the host's own flows left out) per
//! (protocol, port, source) in `LEARN` while the guard is in audit mode or
//! `learn --for` runs. The table is pinned with the rest of the datapath:
//! it survives a guard restart, and the kernel goes on recording while no
//! daemon runs. It is an LRU table of `MAX_LEARNED` pairs (about 2 MB): the
//! least recently seen (port, source) is forgotten first.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use portwatch_common::{LearnStats, MAX_LEARNED};

use super::{actor::Guard, lockout};
use crate::{
    control::protocol::{ChangeResponse, LearnQuery, Proposal, ProposedRule},
    datapath::decode::ip_of,
    format::{self, UserNames, endpoint},
    model::{IpProto, Listener, Mode, ProcessInfo, Proto, Requester},
    pipeline::Pipeline,
    policy::{OwnerSpec, PortRange, Rule, toml_str},
    procinfo, sys,
};

/// Ports without a listener that got traffic, listed in the proposal.
const SHOWN_UNLISTENED: usize = 10;
/// The kernel's default `ip_local_port_range`.
const EPHEMERAL_DEFAULT: (u16, u16) = (32768, 60999);

/// The ports the kernel picks client ports from, in the guard's namespace.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(str::parse::<u16>);
            match (it.next(), it.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) => Some((lo, hi)),
                _ => None,
            }
        })
        .unwrap_or(EPHEMERAL_DEFAULT)
}

/// The network of `addr` at the proposal's prefix lengths.
fn network_of(addr: IpAddr, prefix4: u8, prefix6: u8) -> IpNet {
    match addr {
        IpAddr::V4(a) => Ipv4Net::new(a, prefix4.min(32))
            .map(|n| IpNet::V4(n.trunc()))
            .unwrap_or_else(|_| IpNet::from(addr)),
        IpAddr::V6(a) => Ipv6Net::new(a, prefix6.min(128))
            .map(|n| IpNet::V6(n.trunc()))
            .unwrap_or_else(|_| IpNet::from(addr)),
    }
}

/// The systemd system unit a cgroup path is in, if any
/// (`/system.slice/nginx.service` → `nginx.service`).
fn system_unit(cgroup: &str) -> Option<String> {
    if !cgroup.starts_with("/system.slice/") {
        return None;
    }
    cgroup
        .rsplit('/')
        .find(|c| c.ends_with(".service"))
        .map(str::to_owned)
}

/// Who should own a port: the listener's unit when it has one, else its
/// user and command name.
fn owner_for(p: &ProcessInfo, users: &mut UserNames) -> OwnerSpec {
    if let Some(unit) = p.cgroup.as_deref().and_then(system_unit) {
        return OwnerSpec {
            unit: Some(unit),
            ..OwnerSpec::default()
        };
    }
    OwnerSpec {
        user: p
            .uid
            .map(|uid| users.lookup(uid).unwrap_or_else(|| uid.to_string())),
        comm: p.comm.as_deref().map(str::to_owned),
        ..OwnerSpec::default()
    }
}

/// Seconds-precision RFC 3339.
fn when(ts: SystemTime) -> String {
    let text = format::rfc3339_micros(ts);
    format!("{}Z", &text[..19.min(text.len())])
}

/// What was recorded for one (protocol, port).
#[derive(Default)]
struct Seen {
    sources: BTreeMap<IpAddr, LearnStats>,
}

impl Seen {
    fn attempts(&self) -> u64 {
        self.sources.values().map(|s| s.passed + s.dropped).sum()
    }
}

impl Guard {
    /// Whether the datapath records connection attempts under `mode`:
    /// always in audit mode, and while a `learn --for` runs.
    pub(super) fn learning(&self, mode: Mode) -> bool {
        mode == Mode::Audit
            || self
                .recording_until
                .is_some_and(|until| until > tokio::time::Instant::now())
    }

    /// `learn --for`: record connection attempts for `secs` whatever the
    /// mode (`forget`: start from an empty table).
    pub fn record(&mut self, secs: u64, forget: bool) -> Result<ChangeResponse, String> {
        if forget {
            let n = self
                .maps
                .forget_learned()
                .map_err(|e| format!("forgetting what was learned: {e}"))?;
            log::info!("learn: forgot {n} recorded (port, source) pairs");
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        self.recording_until = Some(self.recording_until.map_or(until, |t| t.max(until)));
        self.maps
            .set_learning(true)
            .map_err(|e| format!("turning recording on: {e}"))?;
        let change = format!("recording connection attempts for {secs} s");
        log::info!("learn: {change}");
        Ok(ChangeResponse {
            change,
            policy: None,
        })
    }

    /// Stops a `learn --for` recording whose time is up (audit mode goes
    /// on recording).
    pub(super) fn recording_expired(&mut self) {
        let Some(until) = self.recording_until else {
            return;
        };
        if until > tokio::time::Instant::now() {
            return;
        }
        self.recording_until = None;
        if self.mode != Mode::Audit {
            match self.maps.set_learning(false) {
                Ok(()) => log::info!("learn: recording ended"),
                Err(e) => log::warn!("learn: turning recording off failed: {e}"),
            }
        }
    }

    fn recording_state(&self) -> String {
        if self.mode == Mode::Audit {
            return "on (audit mode)".into();
        }
        match self.recording_until {
            Some(until) if until > tokio::time::Instant::now() => {
                let left = until - tokio::time::Instant::now();
                format!("on for {} s more (learn --for)", left.as_secs())
            }
            _ => "off (enforce mode; `portwatch learn --for DURATION` records)".into(),
        }
    }

    /// The proposal: one rule per listener reachable from the network that
    /// received connection attempts (or that `keep` names), owner filled,
    /// sources aggregated; the port of `by`'s SSH session always kept.
    pub fn propose(
        &self,
        pipeline: &Pipeline,
        q: &LearnQuery,
        by: Requester,
    ) -> Result<Proposal, String> {
        let now = sys::monotonic_ns();
        let start = q
            .since
            .map(|s| now.saturating_sub(s.saturating_mul(1_000_000_000)));
        let mut seen: BTreeMap<(u8, u16), Seen> = BTreeMap::new();
        let learned = self.maps.learned();
        let pairs = learned.len();
        for (key, stats) in learned {
            if start.is_some_and(|start| stats.last_ns < start) {
                continue;
            }
            let Some(src) = ip_of(u16::from(key.family), &key.src) else {
                continue;
            };
            seen.entry((key.proto, key.port))
                .or_default()
                .sources
                .insert(src, stats);
        }
        let attempts: u64 = seen.values().map(Seen::attempts).sum();
        let mut by_port: BTreeMap<(Proto, u16), Vec<&Listener>> = BTreeMap::new();
        for l in pipeline.listeners().filter(|l| l.netns == self.netns) {
            by_port.entry((l.proto, l.port)).or_default().push(l);
        }
        let ssh = self.ssh_sessions(by, pipeline);
        let ephemeral = ephemeral_range();
        let mut users = UserNames::default();
        let mut rules = Vec::new();
        let mut left_out = Vec::new();
        for ((proto, port), mut listeners) in by_port {
            listeners.sort_by_key(|l| (l.process.pid, l.addr));
            let Some(first) = listeners.first() else {
                continue;
            };
            let label = format!(
                "{} {} {}",
                proto.as_str(),
                endpoint(&first.addr, port),
                format::process(first.process.comm.as_deref(), first.process.pid)
            );
            let traffic = seen.remove(&(proto.number(), port));
            if listeners.iter().all(|l| l.addr.is_loopback()) {
                left_out.push(format!("{label}: loopback only"));
                continue;
            }
            let marked = q.keep.iter().any(|k| k.contains(proto, port));
            let ssh_clients: Vec<IpAddr> = if proto == Proto::Tcp {
                ssh.get(&port).cloned().unwrap_or_default()
            } else {
                Vec::new()
            };
            if proto == Proto::Udp && (ephemeral.0..=ephemeral.1).contains(&port) && !marked {
                left_out.push(format!(
                    "{label}: a client port (in ip_local_port_range {}-{})",
                    ephemeral.0, ephemeral.1
                ));
                continue;
            }
            if traffic.is_none() && !marked && ssh_clients.is_empty() {
                left_out.push(format!(
                    "{label}: no connection attempts seen (keep it with --keep {}/{port})",
                    proto.as_str()
                ));
                continue;
            }
            let rule = self.rule_for_listener(
                q,
                proto,
                port,
                first,
                traffic.as_ref(),
                &ssh_clients,
                &mut users,
                pipeline,
            )?;
            rules.push(rule);
        }
        for rule in self.policy.rules.iter().filter(|r| {
            !r.ports.is_whole_protocol()
                && !rules.iter().any(|p: &ProposedRule| {
                    PortRange::parse(&p.port).is_ok_and(|pr| r.ports.overlaps(&pr))
                })
        }) {
            left_out.push(format!(
                "the policy in force's rule {rule}: not proposed (no listener there received connection attempts)"
            ));
        }
        // Protocols without ports have no listener to learn from: what the
        // policy in force permits of them stays.
        for rule in self
            .policy
            .rules
            .iter()
            .filter(|r| r.ports.is_whole_protocol())
        {
            rules.push(ProposedRule {
                toml: rule.to_toml(),
                comment: vec![
                    "kept from the policy in force: a protocol without ports has no listener to learn from".into(),
                ],
                port: rule.ports.to_string(),
                ssh: false,
            });
        }
        let mut unlistened: Vec<((u8, u16), &Seen)> = seen.iter().map(|(k, v)| (*k, v)).collect();
        unlistened.sort_by_key(|(_, s)| std::cmp::Reverse(s.attempts()));
        for ((proto, port), s) in unlistened.iter().take(SHOWN_UNLISTENED) {
            left_out.push(format!(
                "{}: {} attempts from {} sources, nothing listens",
                PortRange::single(IpProto(*proto), *port),
                s.attempts(),
                s.sources.len()
            ));
        }
        if unlistened.len() > SHOWN_UNLISTENED {
            left_out.push(format!(
                "and {} more ports without a listener that got traffic",
                unlistened.len() - SHOWN_UNLISTENED
            ));
        }
        let mut header = vec![
            format!(
                "proposed by `portwatch learn` at {}: {} rules from {attempts} connection attempts{}",
                when(SystemTime::now()),
                rules.len(),
                match q.since {
                    Some(s) => format!(" in the last {s} s"),
                    None => " (everything recorded)".into(),
                }
            ),
            "review it, then: portwatch diff FILE; portwatch apply FILE --confirm-within 120; portwatch confirm; portwatch verify".into(),
        ];
        for line in &left_out {
            header.push(format!("left out: {line}"));
        }
        let mut settings = vec!["mode = \"enforce\"".to_string()];
        if let Some(forwarded) = self.policy.forwarded {
            settings.push(format!("forwarded = {}", toml_str(forwarded.as_str())));
        }
        if let Some(prefix) = self.policy.limit_ipv6_prefix {
            settings.push(format!("limit_ipv6_prefix = {prefix}"));
        }
        if !self.policy.interfaces.is_empty() {
            let names: Vec<String> = self.policy.interfaces.iter().map(|n| toml_str(n)).collect();
            settings.push(format!("interfaces = [{}]", names.join(", ")));
        }
        let proposal = Proposal {
            header,
            settings,
            rules,
            left_out,
            attempts,
            pairs,
            capacity: MAX_LEARNED,
            recording: self.recording_state(),
        };
        // What is proposed must be a policy portwatch takes.
        crate::policy::Policy::parse(&proposal.text())
            .map_err(|e| format!("the proposal is not a valid policy ({e}): please report this"))?;
        Ok(proposal)
    }

    #[allow(clippy::too_many_arguments)]
    fn rule_for_listener(
        &self,
        q: &LearnQuery,
        proto: Proto,
        port: u16,
        listener: &Listener,
        traffic: Option<&Seen>,
        ssh_clients: &[IpAddr],
        users: &mut UserNames,
        pipeline: &Pipeline,
    ) -> Result<ProposedRule, String> {
        let spec = format!("{}/{port}", proto.as_str());
        let in_force = self
            .policy
            .rules
            .iter()
            .find(|r| r.ports.contains(proto, port));
        let mut nets: BTreeMap<IpNet, u64> = BTreeMap::new();
        if let Some(seen) = traffic {
            for (src, stats) in &seen.sources {
                *nets
                    .entry(network_of(*src, q.prefix4, q.prefix6))
                    .or_default() += stats.passed + stats.dropped;
            }
        }
        for client in ssh_clients {
            nets.entry(network_of(*client, q.prefix4, q.prefix6))
                .or_default();
        }
        let mut comment = Vec::new();
        let p = &listener.process;
        let owner = owner_for(p, users);
        comment.push(format!(
            "{}, uid {}{}, listening on {}",
            format::process(p.comm.as_deref(), p.pid),
            p.uid.map_or_else(|| "?".into(), |u| u.to_string()),
            p.cgroup
                .as_deref()
                .and_then(system_unit)
                .map(|u| format!(", {u}"))
                .unwrap_or_default(),
            endpoint(&listener.addr, port)
        ));
        let from: Vec<String> = if nets.is_empty() {
            // Kept without traffic: the rule in force says from where.
            match in_force {
                Some(rule) => {
                    comment.push("no connection attempts seen; kept (--keep), sources as the policy in force has them".into());
                    rule.from.iter().map(ToString::to_string).collect()
                }
                None => {
                    comment
                        .push("no connection attempts seen; kept (--keep), from anywhere".into());
                    Vec::new()
                }
            }
        } else if nets.len() > q.spread {
            comment.push(format!(
                "from anywhere: sources in {} networks, more than --spread {}",
                nets.len(),
                q.spread
            ));
            Vec::new()
        } else {
            let counts: Vec<String> = nets.iter().map(|(n, c)| format!("{n} ({c})")).collect();
            comment.push(format!("attempts per network: {}", counts.join(", ")));
            nets.keys().map(ToString::to_string).collect()
        };
        if let Some(seen) = traffic {
            let first = seen.sources.values().map(|s| s.first_ns).min().unwrap_or(0);
            let last = seen.sources.values().map(|s| s.last_ns).max().unwrap_or(0);
            let passed: u64 = seen.sources.values().map(|s| s.passed).sum();
            comment.push(format!(
                "{} attempts ({passed} permitted by the policy then, {} not) from {} sources, first {}, last {}",
                seen.attempts(),
                seen.attempts() - passed,
                seen.sources.len(),
                when(pipeline.wall(first)),
                when(pipeline.wall(last))
            ));
        }
        if !ssh_clients.is_empty() {
            let clients: Vec<String> = ssh_clients.iter().map(ToString::to_string).collect();
            comment.push(format!(
                "an SSH session comes in through it (from {}): always kept",
                clients.join(", ")
            ));
        }
        let limit = in_force.and_then(|r| r.limit).map(|l| l.to_string());
        if let Some(limit) = &limit {
            comment.push(format!("limit {limit} kept from the policy in force"));
        }
        let rule = Rule::parse(&spec, &from, limit.as_deref())
            .and_then(|r| r.owned_by(&owner))
            .map_err(|e| format!("proposing a rule for {spec}: {e}"))?;
        Ok(ProposedRule {
            toml: rule.to_toml(),
            comment,
            port: spec,
            ssh: !ssh_clients.is_empty(),
        })
    }

    /// SSH ports and the clients whose sessions come in through them: the
    /// asker's own session, and every established one to an SSH daemon.
    fn ssh_sessions(&self, by: Requester, pipeline: &Pipeline) -> BTreeMap<u16, Vec<IpAddr>> {
        let mut out: BTreeMap<u16, BTreeSet<IpAddr>> = BTreeMap::new();
        let ssh = by.pid.and_then(procinfo::ssh_connection_of);
        let listeners = || pipeline.listeners().filter(|l| l.netns == self.netns);
        let established = lockout::established_tcp(listeners(), ssh.as_deref());
        for session in lockout::sessions(listeners(), ssh.as_deref(), &established) {
            out.entry(session.port())
                .or_default()
                .insert(session.client());
        }
        out.into_iter()
            .map(|(port, clients)| (port, clients.into_iter().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn units_come_from_the_system_slice_only() {
        assert_eq!(
            system_unit("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            system_unit("/system.slice/system-getty.slice/getty@tty1.service").as_deref(),
            Some("getty@tty1.service")
        );
        assert_eq!(
            system_unit("/user.slice/user-0.slice/session-3.scope"),
            None
        );
        assert_eq!(
            system_unit("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service"),
            None
        );
    }

    #[test]
    fn sources_aggregate_to_their_networks() {
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 5, 77));
        assert_eq!(network_of(v4, 24, 64).to_string(), "198.18.5.0/24");
        assert_eq!(network_of(v4, 32, 64).to_string(), "198.18.5.77/32");
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd7e, 5, 0, 0, 1, 2, 3, 4));
        assert_eq!(network_of(v6, 24, 64).to_string(), "fd7e:5::/64");
        assert_eq!(network_of(v6, 24, 48).to_string(), "fd7e:5::/48");
    }
}
