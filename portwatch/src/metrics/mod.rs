//! `--metrics ADDR`: the Prometheus text format at `/metrics`.
//!
//! The event loop owns the kernel maps and the listener set, so a scrape
//! asks it for a [`Snapshot`] over a channel (the same map reads `status`
//! does): plain data, which this module encodes. The HTTP side is in
//! [`server`].

pub mod server;

use std::{collections::BTreeMap, net::SocketAddr};

use portwatch_common::{GuardStat, PortCounters};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::oneshot;

pub use self::server::{MIN_SNAPSHOT_GAP, MetricsError, MetricsServer};
use crate::{
    datapath::{attach::AttachedMode, maps::GuardTotals},
    model::{EventKind, Exposure, ListenerEvent, Mode},
};

/// The parser of `--metrics`: an IP address and a port.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("{s:?} is not an IP address and port (e.g. 127.0.0.1:9469 or [::1]:9469)")
    })
}

/// Counts the stream keeps for the metrics as events pass through it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Listens the policy blocks, not on loopback: the ones the human
    /// stream flags with "! ... blocked by policy".
    pub blocked_listeners_opened: u64,
    /// Policy changes applied at run time (allow, deny, reload, SIGHUP).
    pub policy_changes: u64,
    /// Events followers of the guard's stream could not take.
    pub follower_events_missed: u64,
}

impl Tally {
    pub fn count_listener(&mut self, ev: &ListenerEvent) {
        if ev.kind == EventKind::Listen
            && ev.reach.as_ref().map(|r| r.policy) == Some(Exposure::Blocked)
            && !ev.listener.addr.is_loopback()
        {
            self.blocked_listeners_opened += 1;
        }
    }
}

/// A scrape's question to the event loop.
pub struct ScrapeRequest {
    pub reply: oneshot::Sender<Snapshot>,
}

/// Everything a scrape exports, read at once by the event loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Listeners per exposure; "unknown" when no guard runs or a
    /// namespace's interfaces could not be read.
    pub listeners: BTreeMap<&'static str, u64>,
    /// Interfaces of the guard's namespace with addresses and no guard,
    /// with the listeners reachable through each.
    pub unguarded: BTreeMap<String, u64>,
    /// Events the listener ring could not queue.
    pub events_lost: u64,
    /// What the stream counted (exported with the guard's metrics).
    pub tally: Tally,
    pub guard: Option<GuardSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSnapshot {
    pub mode: Mode,
    /// (interface, XDP mode).
    pub interfaces: Vec<(String, AttachedMode)>,
    /// Packets and bytes per port, summed over CPUs: ports with a rule or
    /// a listener each on their own, the rest summed per protocol.
    pub ports: BTreeMap<PortLabel, PortCounters>,
    pub totals: GuardTotals,
    /// Ports whose rule names an owner.
    pub owned: Vec<OwnedSeries>,
    /// Sources of limited rules with a token bucket now.
    pub limited_sources: u64,
    /// The last verify, once one ran.
    pub verify: Option<VerifySeries>,
}

/// The last verify's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifySeries {
    pub ok: bool,
    /// Listeners and interfaces where the program disagrees with the policy.
    pub disagreements: u64,
    /// Unix time of the run.
    pub at: u64,
}

/// An owned port: open while its owner listens, and the other listeners
/// on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedSeries {
    pub proto: String,
    pub port: String,
    pub open: bool,
    pub squatters: u64,
}

/// The `proto` and `port` labels of a counter series. Only rules and
/// ports with a listener get a series of their own: what an outsider sends
/// to any other port adds to `other`, so a scan cannot set the number of
/// series.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortLabel {
    /// `tcp`, `vrrp`, `112`, or `other` (every protocol without ports and
    /// without a rule).
    pub proto: String,
    /// `22`, a rule's `8000-8099`, or `other`.
    pub port: String,
}

/// The snapshot as prometheus-client collects it: constant values, encoded
/// once per scrape.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

type Series = [(Vec<(&'static str, String)>, u64)];

/// One metric family: its descriptor, then a value per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &Series,
    metric: impl Fn(u64) -> M,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric(0).metric_type())?;
    for (labels, value) in series {
        metric(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &Series,
) -> Result<(), std::fmt::Error> {
    family(encoder, name, help, series, ConstGauge::new)
}

/// A counter; `name` without `_total`, which the encoder appends.
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &Series,
) -> Result<(), std::fmt::Error> {
    family(encoder, name, help, series, ConstCounter::new)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let e = &mut encoder;
        gauge(
            e,
            "build_info",
            "The portwatch build; always 1",
            &[(vec![("version", env!("CARGO_PKG_VERSION").into())], 1)],
        )?;
        let listeners: Vec<_> = s
            .listeners
            .iter()
            .map(|(exposure, n)| (vec![("exposure", (*exposure).to_string())], *n))
            .collect();
        gauge(
            e,
            "listeners",
            "Listening sockets now, by their exposure over every way in (unknown: no guard, or a namespace whose interfaces could not be read)",
            &listeners,
        )?;
        let mut lost = vec![(vec![("ring", "listeners".to_string())], s.events_lost)];
        if let Some(g) = &s.guard {
            let drops = g.totals.get(GuardStat::ReportsLost);
            lost.push((vec![("ring", "drops".to_string())], drops));
            let binds = g.totals.get(GuardStat::BindReportsLost);
            lost.push((vec![("ring", "binds".to_string())], binds));
        }
        counter(
            e,
            "events_lost",
            "Events the kernel could not queue, per ring buffer",
            &lost,
        )?;
        let Some(g) = &s.guard else {
            return Ok(());
        };
        let unguarded: Vec<_> = s
            .unguarded
            .iter()
            .map(|(iface, n)| (vec![("iface", iface.clone())], *n))
            .collect();
        gauge(
            e,
            "unguarded_listeners",
            "Listeners reachable through an interface with addresses where no guard runs, per interface (0: such an interface, nothing reachable through it)",
            &unguarded,
        )?;
        counter(
            e,
            "blocked_listeners_opened",
            "Listeners opened that the policy blocks, not on loopback",
            &[(Vec::new(), s.tally.blocked_listeners_opened)],
        )?;
        let mut packets = Vec::with_capacity(g.ports.len() * 2);
        let mut bytes = Vec::with_capacity(g.ports.len() * 2);
        for (label, c) in &g.ports {
            let proto = label.proto.clone();
            let port = label.port.clone();
            for (action, p, b) in [
                ("pass", c.pass_packets, c.pass_bytes),
                ("drop", c.drop_packets, c.drop_bytes),
            ] {
                let labels = vec![
                    ("proto", proto.clone()),
                    ("port", port.clone()),
                    ("action", action.to_string()),
                ];
                packets.push((labels.clone(), p));
                bytes.push((labels, b));
            }
        }
        counter(
            e,
            "packets",
            "Inbound packets per destination protocol and port (a rule's ports, or a listened port without a rule; port=\"other\" sums the rest), passed or dropped by the XDP guard (audit mode: would-be drops)",
            &packets,
        )?;
        counter(
            e,
            "bytes",
            "Inbound bytes (whole frames) per destination protocol and port (a rule's ports, or a listened port without a rule; port=\"other\" sums the rest), passed or dropped by the XDP guard",
            &bytes,
        )?;
        let reasons: Vec<_> = [
            ("no_rule", GuardStat::DropNoRule),
            ("source_not_allowed", GuardStat::DropSource),
            ("malformed", GuardStat::DropMalformed),
            ("fragment", GuardStat::DropFragment),
            ("rate_limited", GuardStat::DropRateLimited),
        ]
        .into_iter()
        .map(|(name, stat)| (vec![("reason", name.to_string())], g.totals.get(stat)))
        .collect();
        counter(
            e,
            "dropped_packets",
            "Inbound packets dropped per reason (audit mode: would-be drops)",
            &reasons,
        )?;
        let binds: Vec<_> = [
            ("refused", GuardStat::BindsDenied),
            ("audited", GuardStat::BindsAudited),
        ]
        .into_iter()
        .map(|(name, stat)| (vec![("verdict", name.to_string())], g.totals.get(stat)))
        .collect();
        counter(
            e,
            "owned_port_binds",
            "Binds of owned ports by processes that are not their owner: refused (EPERM), or let through in audit mode",
            &binds,
        )?;
        counter(
            e,
            "drop_reports_suppressed",
            "Drop reports the kernel's rate limit held back (since this guard started)",
            &[(Vec::new(), g.totals.get(GuardStat::ReportsSuppressed))],
        )?;
        counter(
            e,
            "follower_events_missed",
            "Events followers of the guard's stream (watch, top) could not keep up with; each was told how many and given the listeners anew",
            &[(Vec::new(), s.tally.follower_events_missed)],
        )?;
        counter(
            e,
            "policy_changes",
            "Policy changes applied at run time (allow, deny, reload, SIGHUP)",
            &[(Vec::new(), s.tally.policy_changes)],
        )?;
        let attached: Vec<_> = g
            .interfaces
            .iter()
            .map(|(iface, mode)| {
                (
                    vec![("iface", iface.clone()), ("mode", mode.to_string())],
                    1,
                )
            })
            .collect();
        gauge(
            e,
            "xdp_attached",
            "1 per guarded interface, with its XDP attach mode",
            &attached,
        )?;
        let modes: Vec<_> = [Mode::Enforce, Mode::Audit]
            .into_iter()
            .map(|m| {
                (
                    vec![("mode", m.as_str().to_string())],
                    u64::from(m == g.mode),
                )
            })
            .collect();
        let label = |o: &OwnedSeries| vec![("proto", o.proto.clone()), ("port", o.port.clone())];
        let open: Vec<_> = g
            .owned
            .iter()
            .map(|o| (label(o), u64::from(o.open)))
            .collect();
        gauge(
            e,
            "owned_port_open",
            "1 while the owner a rule names listens on its port (the port is open at XDP), else 0",
            &open,
        )?;
        let squatters: Vec<_> = g.owned.iter().map(|o| (label(o), o.squatters)).collect();
        gauge(
            e,
            "owned_port_squatters",
            "Listeners on an owned port that are not its owner",
            &squatters,
        )?;
        gauge(
            e,
            "guard_mode",
            "1 for the policy mode in force, 0 for the other",
            &modes,
        )?;
        gauge(
            e,
            "rate_limited_sources",
            "Sources of rate-limited rules that have a token bucket now (the table holds 65,536)",
            &[(Vec::new(), g.limited_sources)],
        )?;
        if let Some(v) = &g.verify {
            gauge(
                e,
                "verify_ok",
                "1 when the last verify found the loaded XDP program doing what the policy says for every listener, else 0",
                &[(Vec::new(), u64::from(v.ok))],
            )?;
            gauge(
                e,
                "verify_disagreements",
                "Listeners and interfaces where the last verify found the XDP program and the policy disagree",
                &[(Vec::new(), v.disagreements)],
            )?;
            gauge(
                e,
                "verify_timestamp_seconds",
                "Unix time of the last verify (the guard runs one at start and after every policy change)",
                &[(Vec::new(), v.at)],
            )?;
        }
        Ok(())
    }
}

/// The snapshot in the Prometheus text format (version 0.0.4).
pub fn encode(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("portwatch");
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::proto_name;
    use portwatch_common::{GUARD_STATS_LEN, IPPROTO_TCP, IPPROTO_UDP};

    fn sample() -> Snapshot {
        let mut totals = [0u64; GUARD_STATS_LEN as usize];
        totals[GuardStat::DropNoRule as usize] = 7;
        totals[GuardStat::ReportsSuppressed as usize] = 2;
        totals[GuardStat::ReportsLost as usize] = 1;
        let mut ports = BTreeMap::new();
        let label = |proto: u8, port: &str| PortLabel {
            proto: proto_name(proto),
            port: port.to_owned(),
        };
        ports.insert(
            label(IPPROTO_UDP, "other"),
            PortCounters {
                pass_packets: 0,
                pass_bytes: 0,
                drop_packets: 5,
                drop_bytes: 300,
            },
        );
        ports.insert(
            label(IPPROTO_TCP, "22"),
            PortCounters {
                pass_packets: 10,
                pass_bytes: 900,
                drop_packets: 0,
                drop_bytes: 0,
            },
        );
        Snapshot {
            listeners: [
                ("exposed", 1),
                ("partial", 0),
                ("blocked", 3),
                ("unknown", 4),
            ]
            .into_iter()
            .collect(),
            unguarded: [("eth1".to_owned(), 2)].into_iter().collect(),
            events_lost: 6,
            tally: Tally {
                blocked_listeners_opened: 3,
                policy_changes: 4,
                follower_events_missed: 8,
            },
            guard: Some(GuardSnapshot {
                mode: Mode::Audit,
                interfaces: vec![("eth0".into(), AttachedMode::Native)],
                ports,
                totals: GuardTotals(totals),
                owned: vec![OwnedSeries {
                    proto: "tcp".into(),
                    port: "6379".into(),
                    open: false,
                    squatters: 2,
                }],
                limited_sources: 11,
                verify: Some(VerifySeries {
                    ok: false,
                    disagreements: 1,
                    at: 1_796_000_000,
                }),
            }),
        }
    }

    #[test]
    fn encodes_every_metric_with_its_labels() -> Result<(), std::fmt::Error> {
        let text = encode(sample())?;
        for line in [
            "# TYPE portwatch_build_info gauge",
            &format!(
                "portwatch_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "portwatch_listeners{exposure=\"blocked\"} 3",
            "portwatch_listeners{exposure=\"partial\"} 0",
            "portwatch_listeners{exposure=\"unknown\"} 4",
            "# TYPE portwatch_blocked_listeners_opened_total counter",
            "portwatch_blocked_listeners_opened_total 3",
            "# TYPE portwatch_unguarded_listeners gauge",
            "portwatch_unguarded_listeners{iface=\"eth1\"} 2",
            "portwatch_packets_total{proto=\"tcp\",port=\"22\",action=\"pass\"} 10",
            "portwatch_packets_total{proto=\"udp\",port=\"other\",action=\"drop\"} 5",
            "portwatch_bytes_total{proto=\"udp\",port=\"other\",action=\"drop\"} 300",
            "portwatch_bytes_total{proto=\"tcp\",port=\"22\",action=\"pass\"} 900",
            "portwatch_dropped_packets_total{reason=\"no_rule\"} 7",
            "portwatch_dropped_packets_total{reason=\"source_not_allowed\"} 0",
            "portwatch_drop_reports_suppressed_total 2",
            "portwatch_events_lost_total{ring=\"listeners\"} 6",
            "portwatch_events_lost_total{ring=\"drops\"} 1",
            "portwatch_policy_changes_total 4",
            "portwatch_follower_events_missed_total 8",
            "portwatch_xdp_attached{iface=\"eth0\",mode=\"native\"} 1",
            "portwatch_guard_mode{mode=\"audit\"} 1",
            "portwatch_guard_mode{mode=\"enforce\"} 0",
            "portwatch_owned_port_open{proto=\"tcp\",port=\"6379\"} 0",
            "portwatch_owned_port_squatters{proto=\"tcp\",port=\"6379\"} 2",
            "portwatch_rate_limited_sources 11",
            "portwatch_verify_ok 0",
            "portwatch_verify_disagreements 1",
            "portwatch_verify_timestamp_seconds 1796000000",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // The Prometheus text format, not OpenMetrics: no `# EOF`.
        assert!(!text.contains("# EOF"), "{text}");
        Ok(())
    }

    #[test]
    fn without_a_guard_only_listeners_and_the_listener_ring() -> Result<(), std::fmt::Error> {
        let snapshot = Snapshot {
            listeners: [("unknown", 2)].into_iter().collect(),
            unguarded: BTreeMap::new(),
            events_lost: 0,
            tally: Tally::default(),
            guard: None,
        };
        let text = encode(snapshot)?;
        assert!(text.contains("portwatch_listeners{exposure=\"unknown\"} 2"));
        assert!(text.contains("portwatch_events_lost_total{ring=\"listeners\"} 0"));
        for absent in ["ring=\"drops\"", "portwatch_packets_total", "guard_mode"] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        Ok(())
    }

    #[test]
    fn parses_addresses_and_names_a_bad_one() {
        assert_eq!(
            parse_addr("127.0.0.1:9469"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9469)))
        );
        assert!(parse_addr("[::1]:9469").is_ok_and(|a| a.is_ipv6()));
        for bad in [
            "localhost:9469",
            "127.0.0.1",
            ":9469",
            "[::1]",
            "1.2.3.4:99999",
        ] {
            let e = parse_addr(bad).err().unwrap_or_default();
            assert!(e.contains(bad) && e.contains("[::1]:9469"), "{bad}: {e}");
        }
    }

    #[test]
    fn tally_counts_exactly_the_flagged_listens() {
        use crate::model::{Listener, Origin, ProcessInfo, SockId};
        let ev = |addr: &str, kind, exposure: Option<Exposure>| ListenerEvent {
            ts: std::time::SystemTime::UNIX_EPOCH,
            kind,
            origin: Origin::Live,
            listener: Listener {
                proto: crate::model::Proto::Tcp,
                addr: addr
                    .parse()
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
                port: 8080,
                sock_id: SockId::Cookie(1),
                netns: None,
                process: ProcessInfo::default().into(),
            },
            reach: exposure.map(|e| crate::model::Reach {
                exposure: e,
                policy: e,
                unguarded: vec![],
            }),
        };
        let mut t = Tally::default();
        t.count_listener(&ev("0.0.0.0", EventKind::Listen, Some(Exposure::Blocked)));
        t.count_listener(&ev("::", EventKind::Listen, Some(Exposure::Blocked)));
        t.count_listener(&ev("127.0.0.1", EventKind::Listen, Some(Exposure::Blocked)));
        t.count_listener(&ev("0.0.0.0", EventKind::Close, Some(Exposure::Blocked)));
        t.count_listener(&ev("0.0.0.0", EventKind::Listen, Some(Exposure::Exposed)));
        t.count_listener(&ev("0.0.0.0", EventKind::Listen, None));
        assert_eq!(t.blocked_listeners_opened, 2);
    }
}
