//! The XDP guard's verdicts on crafted frames: the real program and maps,
//! run with BPF_PROG_TEST_RUN (no interface). Root only; every test loads
//! its own copy of the program.
//!
//! Each check names its case, expects a verdict and the one guard counter
//! that verdict must move (`Passed`, or the drop reason), and the checks of
//! a test are collected so a failure lists every failing case at once.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, bail, ensure};
use portwatch::{
    datapath::{
        maps::GuardTotals,
        probe::Answer,
        testing::{XDP_DROP, XDP_PASS, XdpTester},
    },
    model::{DropReason, Mode, PassReason, Proto},
    policy::Policy,
};
use portwatch_common::{AF_INET, AF_INET6, FlowKey, GuardStat, PortCounters};
use portwatch_tests::{
    Result,
    frames::{
        BROADCAST_MAC, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_LLDP, Eth, Ext, Frame,
        IPPROTO_ESP, IPPROTO_GRE, IPPROTO_IGMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Ipv4, Ipv6,
        NEXTHDR_NONE, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, truncations,
    },
    monotonic_ns,
};

/// The policy of every enforcing test.
const POLICY: &str = r#"allow = ["tcp/22", "udp/53", "tcp/8000-8099", { port = "tcp/5432", from = ["198.18.0.0/24", "fd7e::/16"] }]"#;

/// The guarded host and a peer somewhere on the network.
const HOST4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The host's second addresses.
const SECOND4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const SECOND6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Addresses behind the host (a container, a VM, a routed network).
const ROUTED4: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
const ROUTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 2);
const PEER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);
/// Sources inside and outside the `from` CIDRs of tcp/5432.
const INSIDE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);
const OUTSIDE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const INSIDE6: Ipv6Addr = Ipv6Addr::new(0xfd7e, 1, 0, 0, 0, 0, 0, 5);
const OUTSIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 5);

/// A client's port.
const EPHEMERAL: u16 = 40000;

const DROP_STATS: [GuardStat; 4] = [
    GuardStat::DropNoRule,
    GuardStat::DropSource,
    GuardStat::DropMalformed,
    GuardStat::DropFragment,
];

/// What a frame must get, and the counter that must move by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// XDP_PASS, counted as `Passed`.
    Pass,
    /// XDP_DROP, counted under this drop reason.
    Dropped(GuardStat),
    /// Audit mode: XDP_PASS, but counted under this drop reason.
    Audited(GuardStat),
    /// XDP_PASS for a frame the host forwards, counted as `Forwarded`.
    Forwarded,
}

use Outcome::{Audited, Dropped, Forwarded, Pass};

/// The guard counter a drop reason moves.
fn stat_of(reason: DropReason) -> GuardStat {
    match reason {
        DropReason::NoRule => GuardStat::DropNoRule,
        DropReason::SourceNotAllowed => GuardStat::DropSource,
        DropReason::Malformed => GuardStat::DropMalformed,
        DropReason::Fragment => GuardStat::DropFragment,
        DropReason::RateLimited => GuardStat::DropRateLimited,
    }
}

fn verdict_name(v: u32) -> String {
    match v {
        XDP_PASS => "PASS".into(),
        XDP_DROP => "DROP".into(),
        other => format!("XDP action {other}"),
    }
}

/// A loaded guard plus the failures seen so far.
struct Guard {
    xdp: XdpTester,
    failures: Vec<String>,
    checks: usize,
}

impl Guard {
    fn load(policy: &str, mode: Mode) -> Result<Self> {
        let mut xdp = XdpTester::load().context("loading the XDP guard (run as root)")?;
        xdp.set_local_addresses(&[HOST4.into(), HOST6.into(), SECOND4.into(), SECOND6.into()])?;
        let policy = Policy::parse(policy).context("parsing the test policy")?;
        xdp.apply(&policy, mode)
            .context("applying the test policy")?;
        Ok(Self {
            xdp,
            failures: Vec::new(),
            checks: 0,
        })
    }

    fn enforcing() -> Result<Self> {
        Self::load(POLICY, Mode::Enforce)
    }

    /// Runs `frame` once: the verdict and how the guard counters moved.
    fn run(&mut self, frame: &[u8]) -> Result<(u32, GuardTotals)> {
        let before = self.xdp.maps.totals();
        let verdict = self.xdp.verdict(frame)?;
        let after = self.xdp.maps.totals();
        let mut delta = GuardTotals::default();
        for (d, (a, b)) in delta.0.iter_mut().zip(after.0.iter().zip(before.0.iter())) {
            *d = a.wrapping_sub(*b);
        }
        Ok((verdict, delta))
    }

    /// Checks one case; a mismatch is recorded, not raised. The frame is
    /// first asked about as `explain` asks (a probe): the answer must be the
    /// verdict the run then gets, and asking must move no counter.
    fn expect(&mut self, case: &str, frame: &[u8], want: Outcome) -> Result {
        self.checks += 1;
        self.expect_probe(case, frame, want)?;
        let (verdict, delta) = self
            .run(frame)
            .with_context(|| format!("{case}: running the program on {} bytes", frame.len()))?;
        let (want_verdict, want_stat) = match want {
            Pass => (XDP_PASS, GuardStat::Passed),
            Dropped(stat) => (XDP_DROP, stat),
            Audited(stat) => (XDP_PASS, stat),
            Forwarded => (XDP_PASS, GuardStat::Forwarded),
        };
        let moved: Vec<String> = [GuardStat::Passed, GuardStat::Forwarded]
            .iter()
            .chain(DROP_STATS.iter())
            .chain(std::iter::once(&GuardStat::ReportsSuppressed))
            .filter(|s| delta.get(**s) != 0)
            .map(|s| format!("{s:?}+{}", delta.get(*s)))
            .collect();
        // The tester's reports have no rate (`report_rate` 0): every drop,
        // and every audited one, is a report held back, counted once.
        let reported = matches!(want, Dropped(_) | Audited(_));
        let counted_right = [GuardStat::Passed, GuardStat::Forwarded]
            .iter()
            .chain(DROP_STATS.iter())
            .all(|s| delta.get(*s) == u64::from(*s == want_stat))
            && delta.get(GuardStat::ReportsSuppressed) == u64::from(reported);
        if verdict != want_verdict || !counted_right {
            self.failures.push(format!(
                "{case} ({} bytes): expected {} counted as {want_stat:?}, got {} counted as [{}]",
                frame.len(),
                verdict_name(want_verdict),
                verdict_name(verdict),
                moved.join(", ")
            ));
        }
        Ok(())
    }

    fn expect_probe(&mut self, case: &str, frame: &[u8], want: Outcome) -> Result {
        let before = self.xdp.maps.totals();
        let answer = self
            .xdp
            .probe(frame)
            .with_context(|| format!("{case}: probing {} bytes", frame.len()))?;
        let after = self.xdp.maps.totals();
        if before != after {
            self.failures
                .push(format!("{case}: the probe moved guard counters"));
        }
        let agrees = match (want, answer) {
            (Pass, Answer::Pass(why)) => why != PassReason::Forwarded,
            (Forwarded, Answer::Pass(why)) => why == PassReason::Forwarded,
            (Dropped(stat) | Audited(stat), Answer::Drop(why)) => stat_of(why) == stat,
            _ => false,
        };
        if !agrees {
            self.failures.push(format!(
                "{case}: expected {want:?}, the probe answered {answer}"
            ));
        }
        Ok(())
    }

    fn expect_all(&mut self, cases: &[Case]) -> Result {
        for case in cases {
            self.expect(&case.name, &case.frame, case.want)?;
        }
        Ok(())
    }

    /// Fails with every recorded failure.
    fn finish(self) -> Result {
        if !self.failures.is_empty() {
            bail!(
                "{} of {} cases failed:\n  {}",
                self.failures.len(),
                self.checks,
                self.failures.join("\n  ")
            );
        }
        ensure!(self.checks > 0, "the test checked nothing");
        Ok(())
    }
}

struct Case {
    name: String,
    frame: Vec<u8>,
    want: Outcome,
}

fn case(name: impl Into<String>, frame: Vec<u8>, want: Outcome) -> Case {
    Case {
        name: name.into(),
        frame,
        want,
    }
}

fn addr4(a: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a.octets());
    out
}

/// The flow key the tc egress program records for an outbound UDP packet
/// `local:local_port -> remote:remote_port`.
fn udp_flow4(local: Ipv4Addr, local_port: u16, remote: Ipv4Addr, remote_port: u16) -> FlowKey {
    FlowKey {
        family: AF_INET as u8,
        proto: IPPROTO_UDP,
        _pad: 0,
        local_port,
        remote_port,
        local: addr4(local),
        remote: addr4(remote),
    }
}

fn udp_flow6(local: Ipv6Addr, local_port: u16, remote: Ipv6Addr, remote_port: u16) -> FlowKey {
    FlowKey {
        family: AF_INET6 as u8,
        proto: IPPROTO_UDP,
        _pad: 0,
        local_port,
        remote_port,
        local: local.octets(),
        remote: remote.octets(),
    }
}

/// The IPv4 verdict matrix under `POLICY`: every frame built on the
/// Ethernet header `eth()` and shaped by `ip` (options, ...).
fn ipv4_cases(label: &str, eth: &dyn Fn() -> Eth, ip: &dyn Fn(Ipv4) -> Ipv4) -> Vec<Case> {
    let v4 = |src: Ipv4Addr| ip(eth().ipv4(src, HOST4));
    let cases = vec![
        case(
            format!("{label}: IPv4 TCP SYN to permitted tcp/22"),
            v4(PEER4).tcp(EPHEMERAL, 22, TCP_SYN).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv4 TCP SYN with options to permitted tcp/22"),
            v4(PEER4).tcp(EPHEMERAL, 22, TCP_SYN).syn_options().build(),
            Pass,
        ),
        case(
            format!("{label}: IPv4 TCP SYN to tcp/23 (no rule)"),
            v4(PEER4).tcp(EPHEMERAL, 23, TCP_SYN).build(),
            Dropped(GuardStat::DropNoRule),
        ),
        case(
            format!("{label}: IPv4 TCP SYN to tcp/53 (only udp/53 permitted)"),
            v4(PEER4).tcp(EPHEMERAL, 53, TCP_SYN).build(),
            Dropped(GuardStat::DropNoRule),
        ),
        case(
            format!("{label}: IPv4 TCP ACK to tcp/23"),
            v4(PEER4).tcp(EPHEMERAL, 23, TCP_ACK).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv4 UDP to permitted udp/53"),
            v4(PEER4).udp(EPHEMERAL, 53).payload(b"query").build(),
            Pass,
        ),
        case(
            format!("{label}: IPv4 UDP to udp/22 (only tcp/22 permitted)"),
            v4(PEER4).udp(EPHEMERAL, 22).build(),
            Dropped(GuardStat::DropNoRule),
        ),
        case(
            format!("{label}: IPv4 TCP SYN to tcp/5432 from inside 198.18.0.0/24"),
            v4(INSIDE4).tcp(EPHEMERAL, 5432, TCP_SYN).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv4 TCP SYN to tcp/5432 from 198.18.1.1"),
            v4(OUTSIDE4).tcp(EPHEMERAL, 5432, TCP_SYN).build(),
            Dropped(GuardStat::DropSource),
        ),
        case(
            format!("{label}: IPv4 ICMP echo request"),
            v4(PEER4).icmp_echo(7, 1).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv4 DHCP reply 67->68"),
            v4(PEER4).udp(67, 68).payload(&[2; 32]).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv4 GRE"),
            v4(PEER4).payload(IPPROTO_GRE, &[0, 0, 0x08, 0x00]).build(),
            Dropped(GuardStat::DropNoRule),
        ),
    ];
    cases
}

/// The IPv6 verdict matrix under `POLICY`, like `ipv4_cases`.
fn ipv6_cases(label: &str, eth: &dyn Fn() -> Eth, ip: &dyn Fn(Ipv6) -> Ipv6) -> Vec<Case> {
    let v6 = |src: Ipv6Addr| ip(eth().ipv6(src, HOST6));
    vec![
        case(
            format!("{label}: IPv6 TCP SYN to permitted tcp/22"),
            v6(PEER6).tcp(EPHEMERAL, 22, TCP_SYN).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv6 TCP SYN to permitted tcp/8099"),
            v6(PEER6)
                .tcp(EPHEMERAL, 8099, TCP_SYN)
                .syn_options()
                .build(),
            Pass,
        ),
        case(
            format!("{label}: IPv6 TCP SYN to tcp/8100 (no rule)"),
            v6(PEER6).tcp(EPHEMERAL, 8100, TCP_SYN).build(),
            Dropped(GuardStat::DropNoRule),
        ),
        case(
            format!("{label}: IPv6 TCP RST to tcp/8100"),
            v6(PEER6).tcp(EPHEMERAL, 8100, TCP_RST).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv6 UDP to permitted udp/53"),
            v6(PEER6).udp(EPHEMERAL, 53).payload(b"query").build(),
            Pass,
        ),
        case(
            format!("{label}: IPv6 UDP to udp/5353 (no rule)"),
            v6(PEER6).udp(EPHEMERAL, 5353).build(),
            Dropped(GuardStat::DropNoRule),
        ),
        case(
            format!("{label}: IPv6 TCP SYN to tcp/5432 from inside fd7e::/16"),
            v6(INSIDE6).tcp(EPHEMERAL, 5432, TCP_SYN).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv6 TCP SYN to tcp/5432 from 2001:db8:bad::5"),
            v6(OUTSIDE6).tcp(EPHEMERAL, 5432, TCP_SYN).build(),
            Dropped(GuardStat::DropSource),
        ),
        case(
            format!("{label}: ICMPv6 echo request"),
            v6(PEER6).icmp_echo(7, 1).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv6 DHCPv6 reply 547->546"),
            v6(PEER6).udp(547, 546).payload(&[7; 32]).build(),
            Pass,
        ),
        case(
            format!("{label}: IPv6 ESP"),
            v6(PEER6).payload(IPPROTO_ESP, &[0; 16]).build(),
            Dropped(GuardStat::DropNoRule),
        ),
    ]
}

fn untagged() -> Eth {
    Frame::eth()
}

fn same_ipv4(ip: Ipv4) -> Ipv4 {
    ip
}

fn same_ipv6(ip: Ipv6) -> Ipv6 {
    ip
}

// ---------------------------------------------------------------------------
// TCP

#[test]
fn tcp_syn_to_permitted_ports_passes_v4_and_v6() -> Result {
    let mut g = Guard::enforcing()?;
    for port in [22, 8000, 8050, 8099] {
        g.expect(
            &format!("IPv4 SYN to permitted tcp/{port}"),
            &Frame::eth()
                .ipv4(PEER4, HOST4)
                .tcp(EPHEMERAL, port, TCP_SYN)
                .syn_options()
                .build(),
            Pass,
        )?;
        g.expect(
            &format!("IPv6 SYN to permitted tcp/{port}"),
            &Frame::eth()
                .ipv6(PEER6, HOST6)
                .tcp(EPHEMERAL, port, TCP_SYN)
                .syn_options()
                .build(),
            Pass,
        )?;
    }
    g.finish()
}

#[test]
fn tcp_syn_to_unpermitted_ports_drops_with_reason_no_rule_v4_and_v6() -> Result {
    let mut g = Guard::enforcing()?;
    // 53 is permitted for UDP only; 7999 and 8100 border the range.
    for port in [1, 21, 23, 53, 80, 443, 7999, 8100, 65535] {
        g.expect(
            &format!("IPv4 SYN to tcp/{port}"),
            &Frame::eth()
                .ipv4(PEER4, HOST4)
                .tcp(EPHEMERAL, port, TCP_SYN)
                .build(),
            Dropped(GuardStat::DropNoRule),
        )?;
        g.expect(
            &format!("IPv6 SYN to tcp/{port}"),
            &Frame::eth()
                .ipv6(PEER6, HOST6)
                .tcp(EPHEMERAL, port, TCP_SYN)
                .build(),
            Dropped(GuardStat::DropNoRule),
        )?;
    }
    g.finish()
}

#[test]
fn tcp_segments_that_can_belong_to_a_connection_pass_to_unpermitted_port() -> Result {
    let mut g = Guard::enforcing()?;
    let flags = [
        ("SYN-ACK", TCP_SYN | TCP_ACK),
        ("ACK", TCP_ACK),
        ("PSH-ACK", TCP_PSH | TCP_ACK),
        ("RST", TCP_RST),
        ("RST-ACK", TCP_RST | TCP_ACK),
        ("FIN-ACK", TCP_FIN | TCP_ACK),
        ("every flag", 0xff),
    ];
    for (name, f) in flags {
        g.expect(
            &format!("IPv4 {name} to unpermitted tcp/23"),
            &Frame::eth()
                .ipv4(PEER4, HOST4)
                .tcp(443, 23, f)
                .payload(b"data")
                .build(),
            Pass,
        )?;
        g.expect(
            &format!("IPv6 {name} to unpermitted tcp/23"),
            &Frame::eth().ipv6(PEER6, HOST6).tcp(443, 23, f).build(),
            Pass,
        )?;
    }
    g.finish()
}

/// A segment with neither SYN-and-no-ACK nor ACK nor RST is what FIN, NULL
/// and Xmas scans send: to a blocked port the kernel would answer it with a
/// RST if nothing listens and not at all if something does, so it needs a
/// rule like a SYN.
#[test]
fn scan_segments_without_ack_need_a_rule() -> Result {
    let mut g = Guard::enforcing()?;
    const URG: u8 = 0x20;
    let flags = [
        ("FIN", TCP_FIN),
        ("NULL", 0),
        ("Xmas", TCP_FIN | TCP_PSH | URG),
        ("PSH", TCP_PSH),
        ("SYN-FIN", TCP_SYN | TCP_FIN),
        ("SYN-RST", TCP_SYN | TCP_RST),
    ];
    for (name, f) in flags {
        g.expect(
            &format!("IPv4 {name} to unpermitted tcp/23"),
            &Frame::eth().ipv4(PEER4, HOST4).tcp(443, 23, f).build(),
            Dropped(GuardStat::DropNoRule),
        )?;
        g.expect(
            &format!("IPv6 {name} to unpermitted tcp/23"),
            &Frame::eth().ipv6(PEER6, HOST6).tcp(443, 23, f).build(),
            Dropped(GuardStat::DropNoRule),
        )?;
        g.expect(
            &format!("IPv4 {name} to permitted tcp/22"),
            &Frame::eth().ipv4(PEER4, HOST4).tcp(443, 22, f).build(),
            Pass,
        )?;
        g.expect(
            &format!("IPv4 {name} to tcp/5432 from outside its `from`"),
            &Frame::eth().ipv4(OUTSIDE4, HOST4).tcp(443, 5432, f).build(),
            Dropped(GuardStat::DropSource),
        )?;
        g.expect(
            &format!("IPv6 {name} to tcp/5432 from inside its `from`"),
            &Frame::eth().ipv6(INSIDE6, HOST6).tcp(443, 5432, f).build(),
            Pass,
        )?;
    }
    g.finish()
}

// ---------------------------------------------------------------------------
// UDP

#[test]
fn udp_to_permitted_port_passes_and_to_other_ports_drops() -> Result {
    let mut g = Guard::enforcing()?;
    g.expect(
        "IPv4 UDP to permitted udp/53",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .udp(EPHEMERAL, 53)
            .payload(b"query")
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv6 UDP to permitted udp/53",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .udp(EPHEMERAL, 53)
            .payload(b"query")
            .build(),
        Pass,
    )?;
    for port in [22, 52, 54, 123, 5353, 8000] {
        g.expect(
            &format!("IPv4 UDP to udp/{port} (no rule)"),
            &Frame::eth()
                .ipv4(PEER4, HOST4)
                .udp(EPHEMERAL, port)
                .payload(b"x")
                .build(),
            Dropped(GuardStat::DropNoRule),
        )?;
        g.expect(
            &format!("IPv6 UDP to udp/{port} (no rule)"),
            &Frame::eth()
                .ipv6(PEER6, HOST6)
                .udp(EPHEMERAL, port)
                .payload(b"x")
                .build(),
            Dropped(GuardStat::DropNoRule),
        )?;
    }
    g.finish()
}

#[test]
fn udp_reply_to_recorded_flow_passes_v4() -> Result {
    let mut g = Guard::enforcing()?;
    // The host asked 203.0.113.7:5353 from port 45000.
    g.xdp
        .maps
        .record_flow(udp_flow4(HOST4, 45000, PEER4, 5353), monotonic_ns()?)?;
    let replies_before = g.xdp.maps.totals().get(GuardStat::FlowReplies);
    g.expect(
        "IPv4 UDP reply 203.0.113.7:5353 -> :45000 of a recorded flow",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .udp(5353, 45000)
            .payload(b"answer")
            .build(),
        Pass,
    )?;
    let replies = g.xdp.maps.totals().get(GuardStat::FlowReplies) - replies_before;
    ensure!(replies == 1, "FlowReplies moved by {replies}, expected 1");
    g.expect(
        "IPv4 UDP from the flow's peer but another remote port",
        &Frame::eth().ipv4(PEER4, HOST4).udp(5354, 45000).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 UDP from another peer to the flow's local port",
        &Frame::eth()
            .ipv4(Ipv4Addr::new(203, 0, 113, 8), HOST4)
            .udp(5353, 45000)
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 UDP from the flow's peer to another local port",
        &Frame::eth().ipv4(PEER4, HOST4).udp(5353, 45001).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 UDP from the flow's peer to another local address",
        &Frame::eth().ipv4(PEER4, SECOND4).udp(5353, 45000).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 TCP SYN matching the UDP flow's addresses and ports",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .tcp(5353, 45000, TCP_SYN)
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.finish()
}

#[test]
fn udp_reply_to_recorded_flow_passes_v6() -> Result {
    let mut g = Guard::enforcing()?;
    g.xdp
        .maps
        .record_flow(udp_flow6(HOST6, 45000, PEER6, 443), monotonic_ns()?)?;
    g.expect(
        "IPv6 UDP reply [2001:db8:ffff::7]:443 -> :45000 of a recorded flow",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .udp(443, 45000)
            .payload(b"quic")
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv6 UDP from another peer to the flow's local port",
        &Frame::eth().ipv6(OUTSIDE6, HOST6).udp(443, 45000).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv6 UDP from the flow's peer but another remote port",
        &Frame::eth().ipv6(PEER6, HOST6).udp(444, 45000).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.finish()
}

#[test]
fn udp_reply_to_stale_flow_drops() -> Result {
    let mut g = Guard::enforcing()?;
    let stale = monotonic_ns()?.saturating_sub(31_000_000_000);
    g.xdp
        .maps
        .record_flow(udp_flow4(HOST4, 45000, PEER4, 5353), stale)?;
    g.xdp
        .maps
        .record_flow(udp_flow6(HOST6, 45000, PEER6, 5353), stale)?;
    g.expect(
        "IPv4 UDP reply to a flow last seen 31 s ago",
        &Frame::eth().ipv4(PEER4, HOST4).udp(5353, 45000).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv6 UDP reply to a flow last seen 31 s ago",
        &Frame::eth().ipv6(PEER6, HOST6).udp(5353, 45000).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    // The same flows refreshed: replies pass again.
    let now = monotonic_ns()?;
    g.xdp
        .maps
        .record_flow(udp_flow4(HOST4, 45000, PEER4, 5353), now)?;
    g.xdp
        .maps
        .record_flow(udp_flow6(HOST6, 45000, PEER6, 5353), now)?;
    g.expect(
        "IPv4 UDP reply after the flow was refreshed",
        &Frame::eth().ipv4(PEER4, HOST4).udp(5353, 45000).build(),
        Pass,
    )?;
    g.expect(
        "IPv6 UDP reply after the flow was refreshed",
        &Frame::eth().ipv6(PEER6, HOST6).udp(5353, 45000).build(),
        Pass,
    )?;
    g.finish()
}

#[test]
fn dhcp_replies_pass_but_dhcp_requests_need_a_rule() -> Result {
    let mut g = Guard::enforcing()?;
    g.expect(
        "IPv4 DHCP reply 67->68",
        &Frame::eth()
            .ipv4(PEER4, Ipv4Addr::BROADCAST)
            .udp(67, 68)
            .payload(&[2; 240])
            .build(),
        Pass,
    )?;
    g.expect(
        "DHCPv6 reply 547->546",
        &Frame::eth()
            .ipv6(Ipv6Addr::new(0xfd7e, 0, 0, 0, 0, 0, 0, 0x547), HOST6)
            .udp(547, 546)
            .payload(&[7; 40])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv4 DHCP request 68->67 (the host is no DHCP server)",
        &Frame::eth().ipv4(PEER4, HOST4).udp(68, 67).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 UDP 547->546 (DHCPv6 ports on IPv4)",
        &Frame::eth().ipv4(PEER4, HOST4).udp(547, 546).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv6 UDP 67->68 (DHCPv4 ports on IPv6)",
        &Frame::eth().ipv6(PEER6, HOST6).udp(67, 68).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 UDP from port 67 to another port",
        &Frame::eth().ipv4(PEER4, HOST4).udp(67, 69).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.finish()
}

// ---------------------------------------------------------------------------
// Other protocols

#[test]
fn non_ip_frames_pass() -> Result {
    let mut g = Guard::enforcing()?;
    g.expect(
        "ARP request",
        &Frame::eth()
            .dst_mac(BROADCAST_MAC)
            .arp_request(PEER4, HOST4)
            .build(),
        Pass,
    )?;
    g.expect(
        "LLDP",
        &Frame::eth()
            .ethertype(ETH_P_LLDP, &[0x02, 0x07, 0x04])
            .build(),
        Pass,
    )?;
    g.expect(
        "ARP in a 802.1Q tag",
        &Frame::eth()
            .vlan(ETH_P_8021Q, 10)
            .arp_request(PEER4, HOST4)
            .build(),
        Pass,
    )?;
    g.finish()
}

#[test]
fn icmp_icmpv6_and_igmp_pass() -> Result {
    let mut g = Guard::enforcing()?;
    g.expect(
        "ICMP echo request",
        &Frame::eth().ipv4(PEER4, HOST4).icmp_echo(1, 1).build(),
        Pass,
    )?;
    g.expect(
        "ICMPv6 echo request",
        &Frame::eth().ipv6(PEER6, HOST6).icmp_echo(1, 1).build(),
        Pass,
    )?;
    g.expect(
        "ICMPv6 behind a hop-by-hop header",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .hop_by_hop(0)
            .icmp_echo(1, 2)
            .build(),
        Pass,
    )?;
    g.expect(
        "IGMPv2 membership report",
        &Frame::eth()
            .ipv4(PEER4, Ipv4Addr::new(224, 0, 0, 1))
            .ttl(1)
            .options(&[0x94, 0x04, 0, 0]) // Router Alert
            .payload(IPPROTO_IGMP, &[0x16, 0, 0, 0, 224, 0, 0, 1])
            .build(),
        Pass,
    )?;
    g.finish()
}

#[test]
fn gre_and_other_ip_protocols_drop_with_reason_no_rule() -> Result {
    let mut g = Guard::enforcing()?;
    let sctp = |dport: u16| {
        let mut h = 40000u16.to_be_bytes().to_vec();
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(&[0; 8]);
        h
    };
    g.expect(
        "IPv4 SCTP to port 3868",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .payload(IPPROTO_SCTP, &sctp(3868))
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv6 SCTP cut inside its common header",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .payload(IPPROTO_SCTP, &sctp(3868)[..11])
            .build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    for (name, proto) in [("GRE", IPPROTO_GRE), ("ESP", IPPROTO_ESP), ("VRRP", 112)] {
        g.expect(
            &format!("IPv4 {name}"),
            &Frame::eth()
                .ipv4(PEER4, HOST4)
                .payload(proto, &[0, 0, 0x08, 0x00, 0, 0, 0, 0])
                .build(),
            Dropped(GuardStat::DropNoRule),
        )?;
        g.expect(
            &format!("IPv6 {name}"),
            &Frame::eth()
                .ipv6(PEER6, HOST6)
                .payload(proto, &[0, 0, 0x86, 0xdd, 0, 0, 0, 0])
                .build(),
            Dropped(GuardStat::DropNoRule),
        )?;
    }
    g.expect(
        "IPv6 with no next header (59)",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .payload(NEXTHDR_NONE, &[])
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.finish()
}

// ---------------------------------------------------------------------------
// VLAN tags

#[test]
fn untagged_verdict_matrix() -> Result {
    let mut g = Guard::enforcing()?;
    g.expect_all(&ipv4_cases("untagged", &untagged, &same_ipv4))?;
    g.expect_all(&ipv6_cases("untagged", &untagged, &same_ipv6))?;
    g.finish()
}

#[test]
fn single_vlan_tag_verdicts_equal_untagged() -> Result {
    let mut g = Guard::enforcing()?;
    for (label, tpid) in [("802.1Q", ETH_P_8021Q), ("802.1ad", ETH_P_8021AD)] {
        let eth = move || Frame::eth().vlan(tpid, 100);
        g.expect_all(&ipv4_cases(label, &eth, &same_ipv4))?;
        g.expect_all(&ipv6_cases(label, &eth, &same_ipv6))?;
    }
    g.finish()
}

#[test]
fn qinq_verdicts_equal_untagged() -> Result {
    let mut g = Guard::enforcing()?;
    let stacks = [
        ("QinQ 802.1ad+802.1Q", ETH_P_8021AD, ETH_P_8021Q),
        ("double 802.1Q", ETH_P_8021Q, ETH_P_8021Q),
    ];
    for (label, outer, inner) in stacks {
        let eth = move || Frame::eth().vlan(outer, 100).vlan(inner, 200);
        g.expect_all(&ipv4_cases(label, &eth, &same_ipv4))?;
        g.expect_all(&ipv6_cases(label, &eth, &same_ipv6))?;
    }
    g.finish()
}

#[test]
fn three_vlan_tags_drop_as_malformed() -> Result {
    let mut g = Guard::enforcing()?;
    let three = || {
        Frame::eth()
            .vlan(ETH_P_8021AD, 1)
            .vlan(ETH_P_8021Q, 2)
            .vlan(ETH_P_8021Q, 3)
    };
    g.expect(
        "three tags, IPv4 SYN to permitted tcp/22",
        &three()
            .ipv4(PEER4, HOST4)
            .tcp(EPHEMERAL, 22, TCP_SYN)
            .build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    g.expect(
        "three tags, IPv6 UDP to permitted udp/53",
        &three().ipv6(PEER6, HOST6).udp(EPHEMERAL, 53).build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    g.expect(
        "three tags, ARP",
        &three().arp_request(PEER4, HOST4).build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    g.expect(
        "three 802.1ad tags, IPv4 ICMP",
        &Frame::eth()
            .vlan(ETH_P_8021AD, 1)
            .vlan(ETH_P_8021AD, 2)
            .vlan(ETH_P_8021AD, 3)
            .ipv4(PEER4, HOST4)
            .icmp_echo(1, 1)
            .build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    g.finish()
}

// ---------------------------------------------------------------------------
// IPv4 options, IPv6 extension headers

#[test]
fn ipv4_options_verdicts_equal_no_options() -> Result {
    let mut g = Guard::enforcing()?;
    for words in 1..=10 {
        let label = format!("IHL {}", 5 + words);
        g.expect_all(&ipv4_cases(&label, &untagged, &|ip| ip.nop_options(words)))?;
    }
    // With options and a VLAN tag at once.
    let tagged = || Frame::eth().vlan(ETH_P_8021Q, 7);
    g.expect_all(&ipv4_cases("802.1Q + IHL 15", &tagged, &|ip| {
        ip.nop_options(10)
    }))?;
    g.finish()
}

#[test]
fn ipv6_extension_header_chains_reach_the_transport_header() -> Result {
    let mut g = Guard::enforcing()?;
    let chains: Vec<(&str, Vec<Ext>)> = vec![
        ("hop-by-hop", vec![Ext::HopByHop { len: 0 }]),
        (
            "hop-by-hop + dest opts + routing",
            vec![
                Ext::HopByHop { len: 0 },
                Ext::DestOpts { len: 1 },
                Ext::Routing { len: 2 },
            ],
        ),
        (
            "hop-by-hop + routing + dest opts + AH",
            vec![
                Ext::HopByHop { len: 1 },
                Ext::Routing { len: 4 },
                Ext::DestOpts { len: 0 },
                Ext::Auth { len: 4 },
            ],
        ),
        ("AH", vec![Ext::Auth { len: 1 }]),
        ("a 2 KiB dest opts", vec![Ext::DestOpts { len: 255 }]),
        (
            "seven headers",
            vec![
                Ext::HopByHop { len: 0 },
                Ext::DestOpts { len: 0 },
                Ext::Routing { len: 0 },
                Ext::DestOpts { len: 0 },
                Ext::Auth { len: 2 },
                Ext::Routing { len: 0 },
                Ext::DestOpts { len: 0 },
            ],
        ),
    ];
    for (label, chain) in &chains {
        let with_chain = |ip: Ipv6| chain.iter().fold(ip, |ip, ext| ip.ext(*ext));
        g.expect_all(&ipv6_cases(label, &untagged, &with_chain))?;
    }
    g.finish()
}

/// Eight extension headers, the most the spec admits.
fn eight_ext_headers() -> Vec<Ext> {
    vec![
        Ext::HopByHop { len: 0 },
        Ext::DestOpts { len: 0 },
        Ext::Routing { len: 0 },
        Ext::DestOpts { len: 1 },
        Ext::Auth { len: 2 },
        Ext::Routing { len: 1 },
        Ext::DestOpts { len: 0 },
        Ext::Auth { len: 1 },
    ]
}

#[test]
fn ipv6_chain_of_eight_extension_headers_is_parsed() -> Result {
    let mut g = Guard::enforcing()?;
    let chain = eight_ext_headers();
    ensure!(chain.len() == 8);
    let with_chain = |ip: Ipv6| chain.iter().fold(ip, |ip, ext| ip.ext(*ext));
    g.expect_all(&ipv6_cases("eight ext headers", &untagged, &with_chain))?;
    g.finish()
}

#[test]
fn ipv6_chain_of_nine_extension_headers_drops_as_malformed() -> Result {
    let mut g = Guard::enforcing()?;
    let mut chain = eight_ext_headers();
    chain.push(Ext::DestOpts { len: 0 });
    let nine = || {
        chain
            .iter()
            .fold(Frame::eth().ipv6(PEER6, HOST6), |ip, ext| ip.ext(*ext))
    };
    g.expect(
        "nine ext headers, TCP SYN to permitted tcp/22",
        &nine().tcp(EPHEMERAL, 22, TCP_SYN).build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    g.expect(
        "nine ext headers, UDP to permitted udp/53",
        &nine().udp(EPHEMERAL, 53).build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    g.expect(
        "nine ext headers, ICMPv6",
        &nine().icmp_echo(1, 1).build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    let twelve = (0..12).fold(Frame::eth().ipv6(PEER6, HOST6), |ip, _| ip.dest_opts(0));
    g.expect(
        "twelve dest opts headers, TCP ACK",
        &twelve.tcp(EPHEMERAL, 22, TCP_ACK).build(),
        Dropped(GuardStat::DropMalformed),
    )?;
    g.finish()
}

// ---------------------------------------------------------------------------
// Fragments

#[test]
fn ipv4_later_fragments_follow_a_permitted_first_fragment() -> Result {
    let mut g = Guard::enforcing()?;
    let ip = || Frame::eth().ipv4(PEER4, HOST4).id(0x4242);
    let before = g.xdp.counters(Proto::Udp, 53);
    g.expect(
        "IPv4 first fragment (offset 0, MF) of UDP to permitted udp/53",
        &ip()
            .fragment(0, true)
            .udp(EPHEMERAL, 53)
            .payload(&[1; 32])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv4 middle fragment (offset 5, MF), same id",
        &ip()
            .fragment(5, true)
            .payload(IPPROTO_UDP, &[2; 40])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv4 last fragment (offset 10), same id",
        &ip()
            .fragment(10, false)
            .payload(IPPROTO_UDP, &[3; 9])
            .build(),
        Pass,
    )?;
    // The later fragments are counted under the first one's port.
    let after = g.xdp.counters(Proto::Udp, 53);
    let passed = after.pass_packets - before.pass_packets;
    ensure!(
        passed == 3,
        "udp/53 counted {passed} passed packets for 3 fragments"
    );
    // Only the same (src, dst, id, protocol) follows.
    g.expect(
        "IPv4 later fragment with another id",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .id(0x4243)
            .fragment(5, false)
            .payload(IPPROTO_UDP, &[2; 8])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    g.expect(
        "IPv4 later fragment, same id, another source",
        &Frame::eth()
            .ipv4(Ipv4Addr::new(203, 0, 113, 9), HOST4)
            .id(0x4242)
            .fragment(5, false)
            .payload(IPPROTO_UDP, &[2; 8])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    g.expect(
        "IPv4 later fragment, same id, another protocol (TCP)",
        &ip()
            .fragment(5, false)
            .payload(IPPROTO_TCP, &[2; 8])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    // TCP too.
    g.expect(
        "IPv4 first fragment of a TCP SYN to permitted tcp/22",
        &ip()
            .id(7)
            .fragment(0, true)
            .tcp(EPHEMERAL, 22, TCP_SYN)
            .payload(&[0; 8])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv4 later fragment of that TCP SYN",
        &ip()
            .id(7)
            .fragment(4, false)
            .payload(IPPROTO_TCP, &[0; 8])
            .build(),
        Pass,
    )?;
    g.finish()
}

#[test]
fn ipv4_later_fragments_follow_a_denied_first_fragment() -> Result {
    let mut g = Guard::enforcing()?;
    let ip = || Frame::eth().ipv4(PEER4, HOST4).id(0x5151);
    g.expect(
        "IPv4 first fragment of UDP to unpermitted udp/5353",
        &ip()
            .fragment(0, true)
            .udp(EPHEMERAL, 5353)
            .payload(&[1; 32])
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 later fragment of that datagram",
        &ip()
            .fragment(5, false)
            .payload(IPPROTO_UDP, &[2; 8])
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    let src = || Frame::eth().ipv4(OUTSIDE4, HOST4).id(0x5252);
    g.expect(
        "IPv4 first fragment of a SYN to tcp/5432 from 198.18.1.1",
        &src()
            .fragment(0, true)
            .tcp(EPHEMERAL, 5432, TCP_SYN)
            .payload(&[0; 8])
            .build(),
        Dropped(GuardStat::DropSource),
    )?;
    g.expect(
        "IPv4 later fragment of that SYN",
        &src()
            .fragment(4, false)
            .payload(IPPROTO_TCP, &[0; 8])
            .build(),
        Dropped(GuardStat::DropSource),
    )?;
    g.finish()
}

#[test]
fn ipv4_later_fragment_without_its_first_drops_with_reason_fragment() -> Result {
    let mut g = Guard::enforcing()?;
    g.expect(
        "IPv4 lone later fragment (offset 185, MF) of UDP",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .id(0x6161)
            .fragment(185, true)
            .payload(IPPROTO_UDP, &[0; 64])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    g.expect(
        "IPv4 lone last fragment of TCP",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .id(0x6162)
            .fragment(1, false)
            .payload(IPPROTO_TCP, &[0; 16])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    g.finish()
}

#[test]
fn ipv6_later_fragments_follow_a_permitted_first_fragment() -> Result {
    let mut g = Guard::enforcing()?;
    let ip = || Frame::eth().ipv6(PEER6, HOST6);
    g.expect(
        "IPv6 first fragment (offset 0, M) of UDP to permitted udp/53",
        &ip()
            .fragment(0, true, 0xabcd_0001)
            .udp(EPHEMERAL, 53)
            .payload(&[1; 64])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv6 middle fragment (offset 9, M), same id",
        &ip()
            .fragment(9, true, 0xabcd_0001)
            .payload(IPPROTO_UDP, &[2; 64])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv6 last fragment (offset 17), same id",
        &ip()
            .fragment(17, false, 0xabcd_0001)
            .payload(IPPROTO_UDP, &[3; 5])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv6 later fragment with another id",
        &ip()
            .fragment(9, false, 0xabcd_0002)
            .payload(IPPROTO_UDP, &[2; 8])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    g.expect(
        "IPv6 later fragment, same id, another destination",
        &Frame::eth()
            .ipv6(PEER6, SECOND6)
            .fragment(9, false, 0xabcd_0001)
            .payload(IPPROTO_UDP, &[2; 8])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    // Behind a hop-by-hop header, TCP.
    let hbh = || Frame::eth().ipv6(PEER6, HOST6).hop_by_hop(0);
    g.expect(
        "IPv6 hop-by-hop + first fragment of a SYN to permitted tcp/8000",
        &hbh()
            .fragment(0, true, 77)
            .tcp(EPHEMERAL, 8000, TCP_SYN)
            .payload(&[0; 16])
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv6 hop-by-hop + later fragment of that SYN",
        &hbh()
            .fragment(4, false, 77)
            .payload(IPPROTO_TCP, &[0; 16])
            .build(),
        Pass,
    )?;
    // An atomic fragment (offset 0, no M) is a whole datagram.
    g.expect(
        "IPv6 atomic fragment of UDP to permitted udp/53",
        &ip().fragment(0, false, 99).udp(EPHEMERAL, 53).build(),
        Pass,
    )?;
    g.expect(
        "IPv6 atomic fragment of UDP to unpermitted udp/5353",
        &ip().fragment(0, false, 100).udp(EPHEMERAL, 5353).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.finish()
}

#[test]
fn ipv6_later_fragments_follow_a_denied_first_fragment() -> Result {
    let mut g = Guard::enforcing()?;
    let ip = || Frame::eth().ipv6(PEER6, HOST6);
    g.expect(
        "IPv6 first fragment of a SYN to unpermitted tcp/23",
        &ip()
            .fragment(0, true, 0x0bad)
            .tcp(EPHEMERAL, 23, TCP_SYN)
            .payload(&[0; 16])
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv6 later fragment of that SYN",
        &ip()
            .fragment(4, false, 0x0bad)
            .payload(IPPROTO_TCP, &[0; 8])
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    let outside = || Frame::eth().ipv6(OUTSIDE6, HOST6);
    g.expect(
        "IPv6 first fragment of a SYN to tcp/5432 from 2001:db8:bad::5",
        &outside()
            .fragment(0, true, 0x0bae)
            .tcp(EPHEMERAL, 5432, TCP_SYN)
            .payload(&[0; 16])
            .build(),
        Dropped(GuardStat::DropSource),
    )?;
    g.expect(
        "IPv6 later fragment of that SYN",
        &outside()
            .fragment(4, false, 0x0bae)
            .payload(IPPROTO_TCP, &[0; 8])
            .build(),
        Dropped(GuardStat::DropSource),
    )?;
    g.finish()
}

#[test]
fn ipv6_later_fragment_without_its_first_drops_with_reason_fragment() -> Result {
    let mut g = Guard::enforcing()?;
    g.expect(
        "IPv6 lone later fragment (offset 181, M) of UDP",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .fragment(181, true, 0x7777)
            .payload(IPPROTO_UDP, &[0; 64])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    g.expect(
        "IPv6 lone last fragment of TCP behind dest opts",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .dest_opts(0)
            .fragment(1, false, 0x7778)
            .payload(IPPROTO_TCP, &[0; 16])
            .build(),
        Dropped(GuardStat::DropFragment),
    )?;
    g.finish()
}

/// RFC 8200 §4.5: extension headers that are not needed before the
/// Fragment header (destination options) travel in the fragmentable part,
/// so the later fragments' Fragment header names them (60), not TCP.
#[test]
fn ipv6_later_fragment_follows_first_with_dest_opts_after_fragment_header() -> Result {
    let mut g = Guard::enforcing()?;
    let ip = || Frame::eth().ipv6(PEER6, HOST6);
    g.expect(
        "IPv6 fragment(0, M) + dest opts + SYN to permitted tcp/22",
        &ip()
            .fragment(0, true, 0x0dd5)
            .dest_opts(0)
            .tcp(EPHEMERAL, 22, TCP_SYN)
            .payload(&[0; 8])
            .build(),
        Pass,
    )?;
    // The later fragment's Fragment header says next header 60 (dest opts):
    // that is what the first fragment's Fragment header said too.
    g.expect(
        "IPv6 later fragment (next header 60) of that datagram",
        &ip()
            .fragment(5, false, 0x0dd5)
            .payload(60, &[0; 16])
            .build(),
        Pass,
    )?;
    g.finish()
}

// ---------------------------------------------------------------------------
// Malformed and truncated frames

/// Runs every truncation of `frame` of at least `from` bytes and less than
/// `upto` bytes, expecting a malformed drop.
fn expect_truncations_drop(
    g: &mut Guard,
    label: &str,
    frame: &[u8],
    from: usize,
    upto: usize,
) -> Result {
    for t in truncations(frame)
        .skip(from)
        .take(upto.saturating_sub(from))
    {
        g.expect(
            &format!("{label} truncated to {} of {} bytes", t.len(), frame.len()),
            &t,
            Dropped(GuardStat::DropMalformed),
        )?;
    }
    Ok(())
}

/// Frames shorter than the Ethernet header (0..14 bytes). BPF_PROG_TEST_RUN
/// refuses them with EINVAL before the program runs (Linux 6.18 checks
/// the packet length against ETH_HLEN, also behind XDP metadata), so they
/// cannot reach the program this way. A refusal is accepted; should the
/// kernel ever run them, the verdict must be DROP.
fn expect_runt_frames_refused_or_dropped(g: &mut Guard, label: &str, frame: &[u8]) -> Result {
    for t in truncations(frame).take(ETH_HLEN) {
        let case = format!("{label} truncated to {} bytes", t.len());
        match g.xdp.verdict(&t) {
            Err(e) => {
                let refused = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.raw_os_error() == Some(libc::EINVAL))
                }) || format!("{e:#}").contains("Invalid argument");
                if !refused {
                    g.failures.push(format!("{case}: unexpected error {e:#}"));
                }
            }
            Ok(v) if v == XDP_DROP => {}
            Ok(v) => g
                .failures
                .push(format!("{case}: expected DROP, got {}", verdict_name(v))),
        }
        g.checks += 1;
    }
    Ok(())
}

#[test]
fn frames_truncated_inside_their_headers_drop_as_malformed() -> Result {
    let mut g = Guard::enforcing()?;
    let syn4 = Frame::eth()
        .ipv4(PEER4, HOST4)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .build();
    g.expect("IPv4 SYN to permitted tcp/22, whole", &syn4, Pass)?;
    expect_truncations_drop(&mut g, "IPv4 SYN to tcp/22", &syn4, ETH_HLEN, syn4.len())?;

    let opts4 = Frame::eth()
        .ipv4(PEER4, HOST4)
        .nop_options(3)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .build();
    g.expect("IPv4 (IHL 8) SYN to tcp/22, whole", &opts4, Pass)?;
    expect_truncations_drop(
        &mut g,
        "IPv4 (IHL 8) SYN to tcp/22",
        &opts4,
        ETH_HLEN,
        opts4.len(),
    )?;

    let payload = b"dns query";
    let udp4 = Frame::eth()
        .ipv4(PEER4, HOST4)
        .udp(EPHEMERAL, 53)
        .payload(payload)
        .build();
    g.expect("IPv4 UDP to permitted udp/53, whole", &udp4, Pass)?;
    let headers = udp4.len() - payload.len();
    expect_truncations_drop(&mut g, "IPv4 UDP to udp/53", &udp4, ETH_HLEN, headers)?;

    let udp6 = Frame::eth()
        .ipv6(PEER6, HOST6)
        .udp(EPHEMERAL, 53)
        .payload(payload)
        .build();
    g.expect("IPv6 UDP to permitted udp/53, whole", &udp6, Pass)?;
    let headers = udp6.len() - payload.len();
    expect_truncations_drop(&mut g, "IPv6 UDP to udp/53", &udp6, ETH_HLEN, headers)?;

    let ext6 = Frame::eth()
        .ipv6(PEER6, HOST6)
        .hop_by_hop(0)
        .dest_opts(1)
        .routing(2)
        .auth(4)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .build();
    g.expect("IPv6 hbh+dest+routing+AH SYN to tcp/22, whole", &ext6, Pass)?;
    expect_truncations_drop(
        &mut g,
        "IPv6 hbh+dest+routing+AH SYN to tcp/22",
        &ext6,
        ETH_HLEN,
        ext6.len(),
    )?;

    let frag6 = Frame::eth()
        .ipv6(PEER6, HOST6)
        .fragment(0, true, 1)
        .udp(EPHEMERAL, 53)
        .build();
    g.expect("IPv6 first fragment UDP to udp/53, whole", &frag6, Pass)?;
    expect_truncations_drop(
        &mut g,
        "IPv6 first fragment UDP to udp/53",
        &frag6,
        ETH_HLEN,
        frag6.len(),
    )?;

    let vlan = Frame::eth()
        .vlan(ETH_P_8021Q, 10)
        .ipv4(PEER4, HOST4)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .build();
    g.expect("802.1Q IPv4 SYN to tcp/22, whole", &vlan, Pass)?;
    expect_truncations_drop(
        &mut g,
        "802.1Q IPv4 SYN to tcp/22",
        &vlan,
        ETH_HLEN,
        vlan.len(),
    )?;

    let qinq = Frame::eth()
        .vlan(ETH_P_8021AD, 10)
        .vlan(ETH_P_8021Q, 20)
        .ipv6(PEER6, HOST6)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .build();
    g.expect("QinQ IPv6 SYN to tcp/22, whole", &qinq, Pass)?;
    expect_truncations_drop(
        &mut g,
        "QinQ IPv6 SYN to tcp/22",
        &qinq,
        ETH_HLEN,
        qinq.len(),
    )?;

    for (label, frame) in [
        ("IPv4 SYN", &syn4),
        ("IPv6 UDP", &udp6),
        ("802.1Q IPv4 SYN", &vlan),
    ] {
        expect_runt_frames_refused_or_dropped(&mut g, label, frame)?;
    }
    g.finish()
}

#[test]
fn arp_truncated_below_the_ethernet_header_drops() -> Result {
    let mut g = Guard::enforcing()?;
    let arp = Frame::eth()
        .dst_mac(BROADCAST_MAC)
        .arp_request(PEER4, HOST4)
        .build();
    g.expect("ARP request, whole", &arp, Pass)?;
    expect_runt_frames_refused_or_dropped(&mut g, "ARP request", &arp)?;
    // 14 bytes and more hold a whole Ethernet header: ARP itself is not parsed.
    g.expect(
        "ARP request cut to its Ethernet header",
        &arp[..ETH_HLEN],
        Pass,
    )?;
    g.finish()
}

/// The data offset says how long the TCP header is; options cut short are
/// a truncated header like any other.
#[test]
fn tcp_syn_truncated_inside_its_options_drops_as_malformed() -> Result {
    let mut g = Guard::enforcing()?;
    let syn = Frame::eth()
        .ipv4(PEER4, HOST4)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .syn_options()
        .build();
    g.expect(
        "IPv4 SYN with 20 bytes of options to tcp/22, whole",
        &syn,
        Pass,
    )?;
    let fixed = ETH_HLEN + 20 + 20;
    expect_truncations_drop(
        &mut g,
        "IPv4 SYN with options to tcp/22",
        &syn,
        fixed,
        syn.len(),
    )?;
    g.finish()
}

#[test]
fn malformed_ip_and_tcp_headers_drop_as_malformed() -> Result {
    let mut g = Guard::enforcing()?;
    let v4 = || Frame::eth().ipv4(PEER4, HOST4);
    let cases = [
        case(
            "IPv4 IHL 4",
            v4().ihl(4).tcp(EPHEMERAL, 22, TCP_SYN).build(),
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "IPv4 IHL 0",
            v4().ihl(0).tcp(EPHEMERAL, 22, TCP_SYN).build(),
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "IPv4 header with version 6",
            v4().version(6).tcp(EPHEMERAL, 22, TCP_SYN).build(),
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "IPv4 total length 19 (below the header)",
            v4().total_length(19).tcp(EPHEMERAL, 22, TCP_SYN).build(),
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "IPv4 IHL 15 but no options in the frame (40 bytes)",
            v4().ihl(15).tcp(EPHEMERAL, 22, TCP_SYN).build(),
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "TCP data offset 4",
            v4().tcp(EPHEMERAL, 22, TCP_SYN).data_offset(4).build(),
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "TCP ACK with data offset 0 to unpermitted tcp/23",
            v4().tcp(EPHEMERAL, 23, TCP_ACK).data_offset(0).build(),
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "IPv6 header with version 4",
            {
                let mut f = Frame::eth()
                    .ipv6(PEER6, HOST6)
                    .tcp(EPHEMERAL, 22, TCP_SYN)
                    .build();
                f[ETH_HLEN] = 0x40;
                f
            },
            Dropped(GuardStat::DropMalformed),
        ),
        case(
            "IPv6 dest opts whose length runs past the frame",
            Frame::eth()
                .ipv6(PEER6, HOST6)
                .dest_opts(0)
                .tcp(EPHEMERAL, 22, TCP_SYN)
                .build()
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == ETH_HLEN + 40 + 1 { 200 } else { b })
                .collect(),
            Dropped(GuardStat::DropMalformed),
        ),
    ];
    g.expect_all(&cases)?;
    g.finish()
}

// ---------------------------------------------------------------------------
// Source CIDRs

#[test]
fn cidr_rule_admits_sources_inside_and_drops_others_with_reason_source_v4() -> Result {
    let mut g = Guard::enforcing()?;
    for src in [
        Ipv4Addr::new(198, 18, 0, 0),
        INSIDE4,
        Ipv4Addr::new(198, 18, 0, 255),
    ] {
        g.expect(
            &format!("IPv4 SYN to tcp/5432 from {src} (inside 198.18.0.0/24)"),
            &Frame::eth()
                .ipv4(src, HOST4)
                .tcp(EPHEMERAL, 5432, TCP_SYN)
                .build(),
            Pass,
        )?;
    }
    for src in [
        OUTSIDE4,
        Ipv4Addr::new(198, 17, 255, 255),
        Ipv4Addr::new(198, 19, 0, 7),
        PEER4,
    ] {
        g.expect(
            &format!("IPv4 SYN to tcp/5432 from {src} (outside 198.18.0.0/24)"),
            &Frame::eth()
                .ipv4(src, HOST4)
                .tcp(EPHEMERAL, 5432, TCP_SYN)
                .build(),
            Dropped(GuardStat::DropSource),
        )?;
    }
    g.expect(
        "IPv4 ACK to tcp/5432 from 198.18.1.1 (no SYN: no rule needed)",
        &Frame::eth()
            .ipv4(OUTSIDE4, HOST4)
            .tcp(EPHEMERAL, 5432, TCP_ACK)
            .build(),
        Pass,
    )?;
    g.expect(
        "IPv4 SYN to tcp/5433 from inside 198.18.0.0/24 (the CIDR is per port)",
        &Frame::eth()
            .ipv4(INSIDE4, HOST4)
            .tcp(EPHEMERAL, 5433, TCP_SYN)
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 UDP to udp/5432 from inside 198.18.0.0/24 (the rule is tcp)",
        &Frame::eth()
            .ipv4(INSIDE4, HOST4)
            .udp(EPHEMERAL, 5432)
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.finish()
}

#[test]
fn cidr_rule_admits_sources_inside_and_drops_others_with_reason_source_v6() -> Result {
    let mut g = Guard::enforcing()?;
    for src in [
        Ipv6Addr::new(0xfd7e, 0, 0, 0, 0, 0, 0, 0),
        INSIDE6,
        Ipv6Addr::new(
            0xfd7e, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
        ),
    ] {
        g.expect(
            &format!("IPv6 SYN to tcp/5432 from {src} (inside fd7e::/16)"),
            &Frame::eth()
                .ipv6(src, HOST6)
                .tcp(EPHEMERAL, 5432, TCP_SYN)
                .build(),
            Pass,
        )?;
    }
    for src in [OUTSIDE6, PEER6, HOST6] {
        g.expect(
            &format!("IPv6 SYN to tcp/5432 from {src} (outside fd7e::/16)"),
            &Frame::eth()
                .ipv6(src, HOST6)
                .tcp(EPHEMERAL, 5432, TCP_SYN)
                .build(),
            Dropped(GuardStat::DropSource),
        )?;
    }
    g.expect(
        "IPv6 SYN to tcp/5432 from inside fd7e::/16 behind hop-by-hop",
        &Frame::eth()
            .ipv6(INSIDE6, HOST6)
            .hop_by_hop(0)
            .tcp(EPHEMERAL, 5432, TCP_SYN)
            .build(),
        Pass,
    )?;
    g.finish()
}

// ---------------------------------------------------------------------------
// Audit mode

#[test]
fn audit_mode_passes_everything_but_counts_would_be_drops() -> Result {
    let mut g = Guard::load(POLICY, Mode::Audit)?;
    g.expect(
        "audit: IPv4 SYN to unpermitted tcp/23",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .tcp(EPHEMERAL, 23, TCP_SYN)
            .build(),
        Audited(GuardStat::DropNoRule),
    )?;
    g.expect(
        "audit: IPv6 UDP to unpermitted udp/5353",
        &Frame::eth().ipv6(PEER6, HOST6).udp(EPHEMERAL, 5353).build(),
        Audited(GuardStat::DropNoRule),
    )?;
    g.expect(
        "audit: IPv4 SYN to tcp/5432 from 198.18.1.1",
        &Frame::eth()
            .ipv4(OUTSIDE4, HOST4)
            .tcp(EPHEMERAL, 5432, TCP_SYN)
            .build(),
        Audited(GuardStat::DropSource),
    )?;
    let syn = Frame::eth()
        .ipv4(PEER4, HOST4)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .build();
    g.expect(
        "audit: IPv4 SYN truncated inside the TCP header",
        &syn[..syn.len() - 5],
        Audited(GuardStat::DropMalformed),
    )?;
    g.expect(
        "audit: IPv4 lone later fragment",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .id(9)
            .fragment(3, false)
            .payload(IPPROTO_UDP, &[0; 8])
            .build(),
        Audited(GuardStat::DropFragment),
    )?;
    g.expect(
        "audit: three VLAN tags",
        &Frame::eth()
            .vlan(ETH_P_8021AD, 1)
            .vlan(ETH_P_8021Q, 2)
            .vlan(ETH_P_8021Q, 3)
            .arp_request(PEER4, HOST4)
            .build(),
        Audited(GuardStat::DropMalformed),
    )?;
    g.expect("audit: IPv4 SYN to permitted tcp/22", &syn, Pass)?;
    g.finish()
}

#[test]
fn switching_between_enforce_and_audit_changes_the_verdict() -> Result {
    let mut g = Guard::enforcing()?;
    let syn = Frame::eth()
        .ipv4(PEER4, HOST4)
        .tcp(EPHEMERAL, 23, TCP_SYN)
        .build();
    g.expect(
        "enforce: SYN to tcp/23",
        &syn,
        Dropped(GuardStat::DropNoRule),
    )?;
    let policy = Policy::parse(POLICY)?;
    g.xdp.apply(&policy, Mode::Audit)?;
    g.expect("audit: SYN to tcp/23", &syn, Audited(GuardStat::DropNoRule))?;
    g.xdp.apply(&policy, Mode::Enforce)?;
    g.expect(
        "enforce again: SYN to tcp/23",
        &syn,
        Dropped(GuardStat::DropNoRule),
    )?;
    // A new policy that permits tcp/23 takes effect at once.
    g.xdp
        .apply(&Policy::parse(r#"allow = ["tcp/23"]"#)?, Mode::Enforce)?;
    g.expect("policy allowing tcp/23: SYN to tcp/23", &syn, Pass)?;
    g.expect(
        "policy allowing tcp/23: SYN to tcp/22 (no longer permitted)",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .tcp(EPHEMERAL, 22, TCP_SYN)
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.finish()
}

// ---------------------------------------------------------------------------
// Port counters

#[test]
fn port_counters_count_every_packet_run() -> Result {
    let mut g = Guard::enforcing()?;
    let pass = Frame::eth()
        .ipv4(PEER4, HOST4)
        .tcp(EPHEMERAL, 22, TCP_SYN)
        .build();
    let denied = Frame::eth()
        .ipv6(PEER6, HOST6)
        .tcp(EPHEMERAL, 23, TCP_SYN)
        .build();
    let udp = Frame::eth()
        .ipv4(PEER4, HOST4)
        .udp(EPHEMERAL, 53)
        .payload(b"q")
        .build();
    let slots = [(Proto::Tcp, 22), (Proto::Tcp, 23), (Proto::Udp, 53)];
    let before: Vec<PortCounters> = slots.iter().map(|(p, n)| g.xdp.counters(*p, *n)).collect();
    for i in 0..5 {
        g.expect(&format!("SYN to tcp/22 #{i}"), &pass, Pass)?;
    }
    for i in 0..3 {
        g.expect(
            &format!("SYN to tcp/23 #{i}"),
            &denied,
            Dropped(GuardStat::DropNoRule),
        )?;
    }
    for i in 0..2 {
        g.expect(&format!("UDP to udp/53 #{i}"), &udp, Pass)?;
    }
    g.expect(
        "ARP (no ports: no counter)",
        &Frame::eth().arp_request(PEER4, HOST4).build(),
        Pass,
    )?;
    let len = |f: &[u8]| u64::try_from(f.len()).unwrap_or(u64::MAX);
    // tcp/22 and udp/53 count in their rules' slots; tcp/23 has no rule
    // (and, here, no listener): it counts under TCP's `other`.
    let c22 = g.xdp.counters(Proto::Tcp, 22);
    let c23 = g.xdp.counters(Proto::Tcp, 23);
    let c53 = g.xdp.counters(Proto::Udp, 53);
    ensure!(
        before.iter().all(|c| *c == PortCounters::default()),
        "a fresh program has counters already: {before:?}"
    );
    let want22 = PortCounters {
        pass_packets: 5,
        pass_bytes: 5 * len(&pass),
        drop_packets: 0,
        drop_bytes: 0,
    };
    let want23 = PortCounters {
        pass_packets: 0,
        pass_bytes: 0,
        drop_packets: 3,
        drop_bytes: 3 * len(&denied),
    };
    let want53 = PortCounters {
        pass_packets: 2,
        pass_bytes: 2 * len(&udp),
        drop_packets: 0,
        drop_bytes: 0,
    };
    ensure!(c22 == want22, "tcp/22: {c22:?}, expected {want22:?}");
    ensure!(c23 == want23, "tcp/23: {c23:?}, expected {want23:?}");
    ensure!(c53 == want53, "udp/53: {c53:?}, expected {want53:?}");
    // Nothing counted under UDP's `other`: each packet went to its slot.
    let other_udp = g.xdp.counters(Proto::Udp, 9);
    ensure!(
        other_udp == PortCounters::default(),
        "udp `other` counted {other_udp:?}"
    );

    // Repeated runs in the kernel count each run.
    let (verdict, _) = g.xdp.bench(&pass, 100)?;
    ensure!(
        verdict == XDP_PASS,
        "SYN to tcp/22 run 100 times: {}",
        verdict_name(verdict)
    );
    let (verdict, _) = g.xdp.bench(&denied, 50)?;
    ensure!(
        verdict == XDP_DROP,
        "SYN to tcp/23 run 50 times: {}",
        verdict_name(verdict)
    );
    let p22 = g.xdp.counters(Proto::Tcp, 22).pass_packets;
    let d23 = g.xdp.counters(Proto::Tcp, 23).drop_packets;
    ensure!(
        p22 == 5 + 100,
        "tcp/22 passed {p22} after 100 more runs, expected 105"
    );
    ensure!(
        d23 == 3 + 50,
        "tcp/23 dropped {d23} after 50 more runs, expected 53"
    );
    g.finish()
}

/// Jumbo frames larger than a page reach an `xdp.frags` program as
/// multi-buffer frames: the headers in the linear part decide, and the byte
/// counters count the whole frame, fragments included.
#[test]
fn multi_buffer_jumbo_frames_get_verdicts_and_count_every_byte() -> Result {
    let mut g = Guard::enforcing()?;
    let body = vec![0x5a; 8900];
    let permitted = Frame::eth()
        .ipv4(PEER4, HOST4)
        .udp(EPHEMERAL, 53)
        .payload(&body)
        .build();
    let denied = Frame::eth()
        .ipv6(PEER6, HOST6)
        .udp(EPHEMERAL, 54)
        .payload(&body)
        .build();
    // More than a page: BPF_PROG_TEST_RUN puts the rest into fragments.
    ensure!(
        permitted.len() > 4096 && denied.len() > 4096,
        "the frames must not fit one page: {} and {} bytes",
        permitted.len(),
        denied.len()
    );
    g.expect("9 KB IPv4 UDP to permitted udp/53", &permitted, Pass)?;
    g.expect(
        "9 KB IPv6 UDP to udp/54 (no rule)",
        &denied,
        Dropped(GuardStat::DropNoRule),
    )?;
    let len = |f: &[u8]| u64::try_from(f.len()).unwrap_or(u64::MAX);
    let c53 = g.xdp.counters(Proto::Udp, 53);
    // No rule: UDP's `other` slot.
    let c54 = g.xdp.counters(Proto::Udp, 54);
    ensure!(
        c53.pass_packets == 1 && c53.pass_bytes == len(&permitted),
        "udp/53: {c53:?}, expected 1 packet of {} bytes passed",
        permitted.len()
    );
    ensure!(
        c54.drop_packets == 1 && c54.drop_bytes == len(&denied),
        "udp/54: {c54:?}, expected 1 packet of {} bytes dropped",
        denied.len()
    );
    g.finish()
}

#[test]
fn protocol_and_sctp_rules_admit_their_traffic_and_count_it() -> Result {
    let mut g = Guard::load(
        r#"allow = ["tcp/22", "sctp/3868", "proto/vrrp", { port = "proto/gre", from = ["203.0.113.0/24"] }]"#,
        Mode::Enforce,
    )?;
    let sctp = |dport: u16| {
        let mut h = 40000u16.to_be_bytes().to_vec();
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(&[0; 8]);
        h
    };
    for _ in 0..3 {
        g.expect(
            "VRRP advertisement to 224.0.0.18",
            &Frame::eth()
                .ipv4(PEER4, Ipv4Addr::new(224, 0, 0, 18))
                .payload(112, &[0x21, 1, 100, 1, 0, 1, 0, 0, 198, 19, 0, 9])
                .build(),
            Pass,
        )?;
    }
    g.expect(
        "VRRP over IPv6",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .payload(112, &[0x31; 8])
            .build(),
        Pass,
    )?;
    g.expect(
        "GRE from inside its network",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .payload(IPPROTO_GRE, &[0, 0, 0x08, 0])
            .build(),
        Pass,
    )?;
    g.expect(
        "GRE from elsewhere",
        &Frame::eth()
            .ipv4(Ipv4Addr::new(192, 0, 2, 1), HOST4)
            .payload(IPPROTO_GRE, &[0, 0, 0x08, 0])
            .build(),
        Dropped(GuardStat::DropSource),
    )?;
    g.expect(
        "SCTP to its rule's port",
        &Frame::eth()
            .ipv6(PEER6, HOST6)
            .payload(IPPROTO_SCTP, &sctp(3868))
            .build(),
        Pass,
    )?;
    g.expect(
        "SCTP to another port",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .payload(IPPROTO_SCTP, &sctp(3869))
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "ESP without a rule",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .payload(IPPROTO_ESP, &[0; 8])
            .build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    let vrrp = g.xdp.counters(portwatch::model::IpProto(112), 0);
    assert_eq!(vrrp.pass_packets, 4, "{vrrp:?}");
    let gre = g.xdp.counters(portwatch::model::IpProto(IPPROTO_GRE), 0);
    assert_eq!((gre.pass_packets, gre.drop_packets), (1, 1), "{gre:?}");
    let other = g.xdp.counters(portwatch::model::IpProto(IPPROTO_ESP), 0);
    assert_eq!(other.drop_packets, 1, "ESP in the others' slot: {other:?}");
    g.finish()
}

#[test]
fn frames_the_host_forwards_pass_unless_the_policy_judges_them() -> Result {
    let frames = |g: &mut Guard, routed: Outcome| -> Result {
        g.expect(
            "IPv4 TCP SYN to a routed address, no rule",
            &Frame::eth()
                .ipv4(PEER4, ROUTED4)
                .tcp(40000, 6379, TCP_SYN)
                .build(),
            routed,
        )?;
        g.expect(
            "IPv6 UDP to a routed address, no rule",
            &Frame::eth().ipv6(PEER6, ROUTED6).udp(40000, 6379).build(),
            routed,
        )?;
        g.expect(
            "IPv4 GRE to a routed address",
            &Frame::eth()
                .ipv4(PEER4, ROUTED4)
                .payload(IPPROTO_GRE, &[0; 4])
                .build(),
            routed,
        )?;
        g.expect(
            "IPv4 TCP SYN to a routed address, permitted port",
            &Frame::eth()
                .ipv4(PEER4, ROUTED4)
                .tcp(40000, 22, TCP_SYN)
                .build(),
            Pass,
        )?;
        // What is the host's stays judged: its addresses, multicast, broadcast.
        for (name, dst) in [
            ("the host", HOST4),
            ("its second address", SECOND4),
            ("a multicast group", Ipv4Addr::new(239, 1, 2, 3)),
            ("the limited broadcast", Ipv4Addr::BROADCAST),
        ] {
            g.expect(
                &format!("IPv4 UDP to {name}, no rule"),
                &Frame::eth().ipv4(PEER4, dst).udp(40000, 6379).build(),
                Dropped(GuardStat::DropNoRule),
            )?;
        }
        g.expect(
            "IPv6 UDP to ff02::1, no rule",
            &Frame::eth()
                .ipv6(PEER6, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1))
                .udp(40000, 6379)
                .build(),
            Dropped(GuardStat::DropNoRule),
        )?;
        // Malformed is malformed wherever it goes.
        let syn = Frame::eth()
            .ipv4(PEER4, ROUTED4)
            .tcp(40000, 6379, TCP_SYN)
            .build();
        g.expect(
            "IPv4 TCP to a routed address, cut inside the TCP header",
            &syn[..syn.len() - 4],
            Dropped(GuardStat::DropMalformed),
        )
    };
    let mut pass = Guard::load(POLICY, Mode::Enforce)?;
    frames(&mut pass, Forwarded)?;
    pass.finish()?;
    let mut judge = Guard::load(&format!("forwarded = \"judge\"\n{POLICY}"), Mode::Enforce)?;
    frames(&mut judge, Dropped(GuardStat::DropNoRule))?;
    judge.finish()
}

#[test]
fn every_address_of_a_host_with_many_is_its_own() -> Result {
    // More addresses than the inline list holds (16 IPv4, 8 IPv6): the
    // first are compared in place, the rest found in the table.
    let v4: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 9, 0, i)).collect();
    let v6: Vec<Ipv6Addr> = (1..=20)
        .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0x9, 0, 0, 0, 0, i))
        .collect();
    let mut g = Guard::load(POLICY, Mode::Enforce)?;
    let all: Vec<std::net::IpAddr> = v4
        .iter()
        .map(|a| (*a).into())
        .chain(v6.iter().map(|a| (*a).into()))
        .collect();
    g.xdp.set_local_addresses(&all)?;
    for dst in &v4 {
        g.expect(
            &format!("IPv4 UDP to the host's {dst}, no rule"),
            &Frame::eth().ipv4(PEER4, *dst).udp(40000, 6379).build(),
            Dropped(GuardStat::DropNoRule),
        )?;
    }
    for dst in &v6 {
        g.expect(
            &format!("IPv6 UDP to the host's {dst}, no rule"),
            &Frame::eth().ipv6(PEER6, *dst).udp(40000, 6379).build(),
            Dropped(GuardStat::DropNoRule),
        )?;
    }
    for (dst4, dst6) in [
        (
            Ipv4Addr::new(10, 9, 0, 41),
            Ipv6Addr::new(0x2001, 0xdb8, 0x9, 0, 0, 0, 0, 21),
        ),
        (HOST4, HOST6),
    ] {
        g.expect(
            &format!("IPv4 UDP to {dst4}, no longer the host's"),
            &Frame::eth().ipv4(PEER4, dst4).udp(40000, 6379).build(),
            Forwarded,
        )?;
        g.expect(
            &format!("IPv6 UDP to {dst6}, no longer the host's"),
            &Frame::eth().ipv6(PEER6, dst6).udp(40000, 6379).build(),
            Forwarded,
        )?;
    }
    // Down to a few: the inline list alone, and the table no longer says
    // yes for an address gone.
    g.xdp.set_local_addresses(&[v4[30].into(), v6[15].into()])?;
    g.expect(
        "IPv4 UDP to an address the host kept",
        &Frame::eth().ipv4(PEER4, v4[30]).udp(40000, 6379).build(),
        Dropped(GuardStat::DropNoRule),
    )?;
    g.expect(
        "IPv4 UDP to an address the host dropped",
        &Frame::eth().ipv4(PEER4, v4[0]).udp(40000, 6379).build(),
        Forwarded,
    )?;
    g.expect(
        "IPv6 UDP to an address the host dropped",
        &Frame::eth().ipv6(PEER6, v6[19]).udp(40000, 6379).build(),
        Forwarded,
    )?;
    g.finish()
}

#[test]
fn a_limited_rule_admits_each_source_its_burst_then_drops_it() -> Result {
    let mut g = Guard::load(
        r#"allow = [{ port = "tcp/8080", limit = "3/hour" }, { port = "udp/5300", limit = "2/hour" }, "tcp/22"]"#,
        Mode::Enforce,
    )?;
    let syn = |src: Ipv4Addr| {
        Frame::eth()
            .ipv4(src, HOST4)
            .tcp(40000, 8080, TCP_SYN)
            .build()
    };
    for i in 0..3 {
        g.expect(&format!("SYN {i} of the burst"), &syn(PEER4), Pass)?;
    }
    g.expect(
        "SYN over the limit",
        &syn(PEER4),
        Dropped(GuardStat::DropRateLimited),
    )?;
    g.expect(
        "a segment of a connection is no attempt",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .tcp(40000, 8080, TCP_ACK)
            .build(),
        Pass,
    )?;
    g.expect(
        "another port without a limit",
        &Frame::eth()
            .ipv4(PEER4, HOST4)
            .tcp(40000, 22, TCP_SYN)
            .build(),
        Pass,
    )?;
    g.expect(
        "another source, its own burst",
        &syn(Ipv4Addr::new(203, 0, 113, 99)),
        Pass,
    )?;
    // IPv6 sources count per /64.
    let syn6 = |src: Ipv6Addr| {
        Frame::eth()
            .ipv6(src, HOST6)
            .tcp(40000, 8080, TCP_SYN)
            .build()
    };
    let same64 = |host: u16| Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, host);
    for host in [1, 2, 3] {
        g.expect(&format!("/64 neighbour {host}"), &syn6(same64(host)), Pass)?;
    }
    g.expect(
        "a fourth address of the same /64",
        &syn6(same64(4)),
        Dropped(GuardStat::DropRateLimited),
    )?;
    g.expect(
        "another /64",
        &syn6(Ipv6Addr::new(0x2001, 0xdb8, 0xfffe, 0, 0, 0, 0, 1)),
        Pass,
    )?;
    // UDP counts packets.
    let dgram = || Frame::eth().ipv4(PEER4, HOST4).udp(40000, 5300).build();
    g.expect("datagram 1", &dgram(), Pass)?;
    g.expect("datagram 2", &dgram(), Pass)?;
    g.expect("datagram 3", &dgram(), Dropped(GuardStat::DropRateLimited))?;
    let counted = g.xdp.counters(portwatch::model::Proto::Tcp, 8080);
    assert_eq!(counted.drop_packets, 2, "{counted:?}");
    g.finish()
}

/// A flood of random sources fills the table of limited sources but
/// evicts nobody: a source that used up its burst before the flood is
/// still held back after it; new sources then share the rule's overflow
/// bucket, and the guard counts that the table was full.
#[test]
fn a_source_flood_evicts_no_limited_source() -> Result {
    let mut g = Guard::load(
        r#"allow = [{ port = "tcp/8080", limit = "2/hour" }]"#,
        Mode::Enforce,
    )?;
    let syn = |src: Ipv4Addr| {
        Frame::eth()
            .ipv4(src, HOST4)
            .tcp(40000, 8080, TCP_SYN)
            .build()
    };
    g.expect("the client, 1", &syn(PEER4), Pass)?;
    g.expect("the client, 2", &syn(PEER4), Pass)?;
    g.expect(
        "the client, over",
        &syn(PEER4),
        Dropped(GuardStat::DropRateLimited),
    )?;
    let before = g.xdp.maps.totals();
    // More distinct sources than the table holds.
    let flood = portwatch_common::MAX_RATE_SOURCES + 1000;
    for i in 0..flood {
        let src = Ipv4Addr::from(0x0a00_0000 | i);
        g.xdp.verdict(&syn(src))?;
    }
    let after = g.xdp.maps.totals();
    let full = after.get(GuardStat::RateTableFull) - before.get(GuardStat::RateTableFull);
    assert!(full >= 1000, "{full} packets found the table full");
    assert_eq!(
        g.xdp.maps.source_buckets(),
        portwatch_common::MAX_RATE_SOURCES as usize
    );
    g.expect(
        "the client after the flood, still over",
        &syn(PEER4),
        Dropped(GuardStat::DropRateLimited),
    )?;
    g.expect(
        "a new source while the table is full: the shared bucket, used up by the flood",
        &syn(Ipv4Addr::new(192, 0, 2, 200)),
        Dropped(GuardStat::DropRateLimited),
    )?;
    g.finish()
}

/// While learning, the program records connection attempts the policy
/// decided — TCP SYNs and UDP datagrams, passed or dropped, per port and
/// source — and nothing else: segments of connections, replies to the
/// host's own flows, ICMP, forwarded frames and probes stay out. Off, it
/// records nothing.
#[test]
fn learning_records_connection_attempts_per_port_and_source() -> Result {
    let mut g = Guard::enforcing()?;
    g.xdp
        .maps
        .record_flow(udp_flow4(HOST4, 45000, PEER4, 5353), monotonic_ns()?)?;
    let syn = |src: Ipv4Addr, port: u16| {
        Frame::eth()
            .ipv4(src, HOST4)
            .tcp(EPHEMERAL, port, TCP_SYN)
            .build()
    };
    g.expect("off: a SYN to tcp/22", &syn(PEER4, 22), Pass)?;
    ensure!(g.xdp.maps.learned().is_empty(), "recorded while off");
    g.xdp.learning(true)?;
    let frames: Vec<(&str, Vec<u8>, Outcome)> = vec![
        ("SYN to tcp/22", syn(PEER4, 22), Pass),
        ("another SYN to tcp/22", syn(PEER4, 22), Pass),
        (
            "SYN to tcp/9999",
            syn(PEER4, 9999),
            Dropped(GuardStat::DropNoRule),
        ),
        ("SYN to tcp/5432 from inside", syn(INSIDE4, 5432), Pass),
        (
            "SYN to tcp/5432 from outside",
            syn(OUTSIDE4, 5432),
            Dropped(GuardStat::DropSource),
        ),
        (
            "IPv6 SYN to tcp/22",
            Frame::eth()
                .ipv6(PEER6, HOST6)
                .tcp(EPHEMERAL, 22, TCP_SYN)
                .build(),
            Pass,
        ),
        (
            "UDP to udp/53",
            Frame::eth().ipv4(PEER4, HOST4).udp(EPHEMERAL, 53).build(),
            Pass,
        ),
        (
            "ACK to tcp/9999",
            Frame::eth()
                .ipv4(PEER4, HOST4)
                .tcp(EPHEMERAL, 9999, TCP_ACK)
                .build(),
            Pass,
        ),
        (
            "reply to the host's flow",
            Frame::eth().ipv4(PEER4, HOST4).udp(5353, 45000).build(),
            Pass,
        ),
        (
            "SYN to a routed address",
            Frame::eth()
                .ipv4(PEER4, ROUTED4)
                .tcp(EPHEMERAL, 9999, TCP_SYN)
                .build(),
            Forwarded,
        ),
    ];
    for (name, frame, want) in &frames {
        g.expect(name, frame, *want)?;
    }
    let mut got: Vec<(u8, u16, String, u64, u64)> = g
        .xdp
        .maps
        .learned()
        .into_iter()
        .map(|(k, s)| {
            let src = if u16::from(k.family) == AF_INET {
                Ipv4Addr::new(k.src[0], k.src[1], k.src[2], k.src[3]).to_string()
            } else {
                Ipv6Addr::from(k.src).to_string()
            };
            ensure!(s.first_ns <= s.last_ns && s.first_ns > 0, "{s:?}");
            Ok((k.proto, k.port, src, s.passed, s.dropped))
        })
        .collect::<Result<_>>()?;
    got.sort();
    let mut want = vec![
        (IPPROTO_TCP, 22, PEER4.to_string(), 2, 0),
        (IPPROTO_TCP, 22, PEER6.to_string(), 1, 0),
        (IPPROTO_TCP, 5432, INSIDE4.to_string(), 1, 0),
        (IPPROTO_TCP, 5432, OUTSIDE4.to_string(), 0, 1),
        (IPPROTO_TCP, 9999, PEER4.to_string(), 0, 1),
        (IPPROTO_UDP, 53, PEER4.to_string(), 1, 0),
    ];
    want.sort();
    ensure!(got == want, "recorded {got:?}, expected {want:?}");
    g.xdp.learning(false)?;
    g.expect("off again: a SYN to tcp/22", &syn(PEER4, 22), Pass)?;
    let again: u64 = g
        .xdp
        .maps
        .learned()
        .iter()
        .filter(|(k, _)| k.port == 22 && u16::from(k.family) == AF_INET)
        .map(|(_, s)| s.passed)
        .sum();
    ensure!(again == 2, "recorded while off: {again}");
    g.finish()
}

#[test]
fn the_guards_clock_is_the_kernels_monotonic_clock_at_tick_resolution() -> Result {
    let mut g = XdpTester::load()?;
    // Timed at load: the per-packet clock is jiffies, not a helper call.
    let clock = g
        .maps
        .clock()
        .context("the kernel's ticks were not timed")?;
    ensure!(
        [1_000_000, 3_333_333, 4_000_000, 10_000_000].contains(&clock.tick_ns),
        "a tick of {} ns is no HZ's",
        clock.tick_ns
    );
    let mut worst = 0u64;
    for _ in 0..40 {
        let (jiffies, now) = g.kernel_time()?;
        let at = clock.at(jiffies);
        // The current tick began at or before now (the calibration is a
        // test-run late, some µs), and less than a tick ago (one more
        // while jiffies catch up).
        ensure!(
            at <= now + 100_000,
            "the tick at {at} begins after now ({now})"
        );
        let behind = now.saturating_sub(at);
        ensure!(
            behind < 2 * clock.tick_ns,
            "{behind} ns behind with a tick of {} ns",
            clock.tick_ns
        );
        worst = worst.max(behind);
        std::thread::sleep(std::time::Duration::from_micros(2_300));
    }
    // It does follow the clock: over 40 samples some were well into a tick.
    ensure!(worst > 0, "never behind: is this reading jiffies?");
    Ok(())
}

#[test]
fn tc_egress_stamps_the_hosts_flows_by_the_guards_clock_and_keeps_them_current() -> Result {
    let mut g = Guard::enforcing()?;
    let clock = g
        .xdp
        .maps
        .clock()
        .context("the kernel's ticks were not timed")?;
    let (local, remote) = ((HOST4, 45000), (PEER4, 5353));
    let out = Frame::eth()
        .ipv4(local.0, remote.0)
        .udp(local.1, remote.1)
        .payload(b"query")
        .build();
    let reply = Frame::eth()
        .ipv4(remote.0, local.0)
        .udp(remote.1, local.1)
        .payload(b"answer")
        .build();
    let last_sent = |g: &Guard| {
        g.xdp.maps.flow_last_sent(
            IPPROTO_UDP,
            (local.0, local.1).into(),
            (remote.0, remote.1).into(),
        )
    };
    g.expect(
        "a reply before the host sent anything",
        &reply,
        Dropped(GuardStat::DropNoRule),
    )?;
    // Each stamp lies between the ticks read just before and just after:
    // the verdict's clock, not a finer one.
    let mut stamps = Vec::new();
    for repeat in [1, 1_000] {
        let (before, _) = g.xdp.kernel_time()?;
        g.xdp.egress(&out, repeat)?;
        let (after, _) = g.xdp.kernel_time()?;
        let stamp = last_sent(&g).context("tc egress recorded no flow")?;
        ensure!(
            (clock.at(before)..=clock.at(after)).contains(&stamp),
            "stamped {stamp}, outside the ticks {}..={}",
            clock.at(before),
            clock.at(after)
        );
        stamps.push(stamp);
        // Some ticks on: the known flow's stamp must move with it.
        std::thread::sleep(std::time::Duration::from_nanos(3 * clock.tick_ns));
    }
    ensure!(
        stamps[1] > stamps[0],
        "a known flow kept its first stamp {} after more datagrams",
        stamps[0]
    );
    g.expect("the reply to the recorded flow", &reply, Pass)?;
    g.finish()
}
