//! Differential tests: the XDP guard (the real program, BPF_PROG_TEST_RUN)
//! against the reference model (`portwatch_tests::reference`). proptest
//! generates frames (valid and damaged, every protocol mix the guard
//! parses), policies, modes and flow state; each case runs through both,
//! and the action and the drop reason (which guard counter moved) must
//! agree, in audit mode too. A difference shrinks to a minimal case whose
//! failure message is the JSON of a regression file; `tests/regressions/`
//! keeps every one found, and `regressions_replay` runs them all through
//! both sides, expecting the specification's verdict.
//!
//! - `PORTWATCH_PROOF_CASES`: cases per generator test (default 25,000).
//! - `PORTWATCH_PROOF_SEED`: the generator seed (random otherwise; printed
//!   on failure, so a failure can be replayed).
//! - `PORTWATCH_SAVE_REGRESSIONS=1`: a failure's minimal case is also
//!   written to `tests/regressions/`.
//!
//! State: the program's flow and fragment tables outlive a case, so every
//! case gets a host address of its own as the frames' destination. Every
//! fragment and flow key contains it, so no case sees another's entries,
//! and the model starts each case with empty tables. One program is loaded
//! per test and each case applies its policy to it (a map diff).

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use portwatch::{
    datapath::{
        maps::GuardTotals,
        testing::{Hook, XDP_DROP, XDP_PASS, XdpTester},
    },
    model::{Forwarded, IpProto, Mode},
    policy::{Policy, PortRange},
};
use portwatch_common::{AF_INET, AF_INET6, FlowKey, GuardStat, IPPROTO_SCTP, IPPROTO_UDP};
use portwatch_tests::{
    Result,
    frames::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, Eth, Ext, Frame, Ipv4, Ipv6, Packet, TCP_ACK, TCP_FIN,
        TCP_PSH, TCP_RST, TCP_SYN, Tcp, Udp,
    },
    monotonic_ns,
    reference::{self, Action, FlowState, FragState, Host as ModelHost, Outcome, Reason},
};
use proptest::{
    prelude::*,
    sample::{Index, select},
    test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner},
};
use serde_json::{Value, json};

/// Frames stay inside the linear part BPF_PROG_TEST_RUN gives an XDP
/// program (a page less head- and tailroom, about 3.5 KiB).
const MAX_FRAME: usize = 3072;

const DEFAULT_CASES: u32 = 25_000;

// ---------------------------------------------------------------------------
// What the generators produce: a case, before it gets its host address.

#[derive(Clone, Debug)]
struct Case {
    mode: Mode,
    /// The policy's `forwarded`, or none (which is `pass`).
    forwarded: Option<Forwarded>,
    /// The policy's `limit_ipv6_prefix`, or none (64).
    limit_ipv6_prefix: Option<u8>,
    /// The usual source of the frames (IPv4, IPv6).
    peer4: Ipv4Addr,
    peer6: Ipv6Addr,
    rules: Vec<RuleSpec>,
    flows: Vec<FlowSpec>,
    /// Run in order; later fragments may follow an earlier first one.
    frames: Vec<FrameSpec>,
}

#[derive(Clone, Debug)]
struct RuleSpec {
    proto: RuleProto,
    lo: u16,
    width: u16,
    from: Vec<NetSpec>,
    /// `limit = "N/hour"`: a burst of N, no refill within a case.
    limit: Option<u8>,
    /// An owner (on a one-port rule), and whether it listens.
    owner: Option<bool>,
}

/// What a rule names: ports of TCP, UDP or SCTP, or a whole protocol
/// (whose number may be one no policy accepts: such rules are left out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleProto {
    Tcp,
    Udp,
    Sctp,
    Whole(u8),
}

/// A `from` network: around the case's peer (containing it, or with one
/// bit inside the prefix flipped so it just misses), or anywhere.
#[derive(Clone, Debug)]
struct NetSpec {
    v6: bool,
    base: NetBase,
    len: u8,
}

#[derive(Clone, Debug)]
enum NetBase {
    Peer,
    PeerFlip(u8),
    Random(u128),
}

/// An outbound flow of the host: the reverse of one of the case's UDP,
/// SCTP or port-less frames (`pick`), maybe skewed so that it does not
/// match, recorded `age_ms` ago (negative: in the future).
#[derive(Clone, Debug)]
struct FlowSpec {
    pick: Index,
    skew: Skew,
    age_ms: i64,
    /// Ports of a flow when the case has no UDP frame.
    ports: (u16, u16),
}

#[derive(Clone, Copy, Debug)]
enum Skew {
    Exact,
    RemotePort,
    LocalPort,
    RemoteAddr,
}

#[derive(Clone, Debug)]
enum FrameSpec {
    /// Bytes without structure.
    Raw(Vec<u8>),
    Built {
        tags: Vec<u16>,
        body: Body,
        /// Flip bits at these places, then cut the frame here.
        flips: Vec<(Index, u8)>,
        cut: Option<Index>,
    },
}

#[derive(Clone, Debug)]
enum Body {
    Ether { ethertype: u16, payload: Vec<u8> },
    V4 { ip: V4Spec, l4: L4 },
    V6 { ip: V6Spec, l4: L4 },
}

/// Where a frame goes: to the host, to an address the host routes
/// elsewhere, or to a multicast group (or the limited broadcast).
#[derive(Clone, Copy, Debug)]
enum Dst {
    Host,
    Routed(u8),
    Group,
}

#[derive(Clone, Debug)]
struct V4Spec {
    to: Dst,
    src: Option<Ipv4Addr>,
    id: u16,
    frag: Frag4,
    options: Vec<u8>,
    ihl: Option<u8>,
    version: Option<u8>,
    total_length: Option<u16>,
}

#[derive(Clone, Copy, Debug)]
enum Frag4 {
    Whole,
    First,
    Later { offset: u16, more: bool },
}

#[derive(Clone, Debug)]
struct V6Spec {
    to: Dst,
    src: Option<Ipv6Addr>,
    exts: Vec<Ext>,
    payload_length: Option<u16>,
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        options: Vec<u8>,
        data_offset: Option<u8>,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// The SCTP common header (ports, tag, checksum), then `chunks`.
    Sctp {
        sport: u16,
        dport: u16,
        chunks: Vec<u8>,
    },
    /// An AH header (length field `len`, next header `next`), then `inner`
    /// bytes: a transport header of `next` or anything.
    Ah { next: u8, len: u8, inner: Vec<u8> },
    /// ICMP echo over IPv4, ICMPv6 echo over IPv6.
    Echo,
    /// Any protocol number and payload (later fragments, GRE, ...).
    Proto { proto: u8, payload: Vec<u8> },
}

impl L4 {
    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Sctp { .. } => IPPROTO_SCTP,
            L4::Ah { .. } => 51,
            L4::Echo if v6 => 58,
            L4::Echo => 1,
            L4::Proto { proto, .. } => *proto,
        }
    }
}

// ---------------------------------------------------------------------------
// Generators.

/// How a test weighs its frames, policies and flows.
#[derive(Clone, Copy, Debug)]
struct Mix {
    v4: u32,
    v6: u32,
    ether: u32,
    raw: u32,
    /// Weight of fragment trains (a first fragment and later ones) against
    /// lists of independent frames.
    trains: u32,
    /// Chances that a built frame has bits flipped, or is cut.
    flip: f64,
    cut: f64,
    /// Chance that a rule has `from`, maximum number of flows.
    from: f64,
    flows: usize,
    audit: u32,
    /// Weight of the four ports rules and frames meet on most.
    few_ports: u32,
    /// Most extension headers in a random IPv6 chain.
    max_exts: usize,
}

/// Ports frames and rules share, so that rules often apply.
const PORTS: &[u16] = &[
    22, 53, 67, 68, 80, 443, 546, 547, 5432, 8000, 8080, 40000, 65535,
];
const FEW_PORTS: &[u16] = &[22, 53, 5432, 8080];

fn port(mix: Mix) -> BoxedStrategy<u16> {
    prop_oneof![
        3 => select(PORTS),
        mix.few_ports => select(FEW_PORTS),
        1 => any::<u16>(),
    ]
    .boxed()
}

fn payload(max: usize) -> BoxedStrategy<Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max).boxed()
}

fn tcp_flags() -> BoxedStrategy<u8> {
    prop_oneof![
        4 => Just(TCP_SYN),
        2 => Just(TCP_SYN | TCP_ACK),
        2 => Just(TCP_ACK),
        1 => Just(TCP_RST),
        1 => Just(TCP_FIN | TCP_ACK),
        1 => Just(TCP_PSH | TCP_ACK),
        // Scans without ACK: FIN, NULL, Xmas, PSH-only.
        1 => Just(TCP_FIN),
        1 => Just(0),
        1 => Just(TCP_FIN | TCP_PSH | 0x20),
        1 => Just(TCP_PSH),
        2 => any::<u8>(),
    ]
    .boxed()
}

fn proto_number() -> BoxedStrategy<u8> {
    prop_oneof![
        3 => select(&[1u8, 2, 6, 17, 58, 47, 50, 132, 59, 0, 43, 44, 51, 60, 255][..]),
        1 => any::<u8>(),
    ]
    .boxed()
}

fn l4(mix: Mix) -> BoxedStrategy<L4> {
    let udp_ports = prop_oneof![
        8 => (port(mix), port(mix)),
        1 => Just((67u16, 68u16)),
        1 => Just((547u16, 546u16)),
    ];
    prop_oneof![
        4 => (
            port(mix),
            port(mix),
            tcp_flags(),
            prop_oneof![3 => Just(Vec::new()), 1 => payload(41)],
            prop::option::weighted(0.1, 0u8..16),
            payload(8),
        )
            .prop_map(|(sport, dport, flags, options, data_offset, payload)| L4::Tcp {
                sport,
                dport,
                flags,
                options,
                data_offset,
                payload,
            }),
        4 => (udp_ports, payload(16))
            .prop_map(|((sport, dport), payload)| L4::Udp { sport, dport, payload }),
        1 => Just(L4::Echo),
        2 => (proto_number(), payload(24)).prop_map(|(proto, payload)| L4::Proto { proto, payload }),
        1 => (port(mix), port(mix), payload(20))
            .prop_map(|(sport, dport, chunks)| L4::Sctp { sport, dport, chunks }),
        1 => ah(mix),
    ]
    .boxed()
}

/// AH carrying a TCP, UDP or SCTP header (or anything), its length field
/// mostly right.
fn ah(mix: Mix) -> BoxedStrategy<L4> {
    (
        select(&[6u8, 17, 132, 47, 50, 1, 51][..]),
        prop_oneof![4 => Just(1u8), 1 => 0u8..6],
        port(mix),
        tcp_flags(),
        payload(16),
    )
        .prop_map(|(next, len, dport, flags, tail)| {
            let mut inner = 40000u16.to_be_bytes().to_vec();
            inner.extend_from_slice(&dport.to_be_bytes());
            match next {
                // seq, ack, data offset 5, flags, window, checksum, urgent.
                6 => inner.extend_from_slice(&[
                    0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0,
                ]),
                17 => inner.extend_from_slice(&[0, 8, 0, 0]),
                132 => inner.extend_from_slice(&[0; 8]),
                _ => {}
            }
            inner.extend_from_slice(&tail);
            L4::Ah { next, len, inner }
        })
        .boxed()
}

fn frag_id4() -> BoxedStrategy<u16> {
    prop_oneof![3 => 0u16..3, 1 => any::<u16>()].boxed()
}

fn frag_id6() -> BoxedStrategy<u32> {
    prop_oneof![3 => 0u32..3, 1 => any::<u32>()].boxed()
}

fn dst() -> BoxedStrategy<Dst> {
    prop_oneof![
        8 => Just(Dst::Host),
        2 => any::<u8>().prop_map(Dst::Routed),
        1 => Just(Dst::Group),
    ]
    .boxed()
}

fn v4_spec() -> BoxedStrategy<V4Spec> {
    (
        dst(),
        prop::option::weighted(0.1, any::<u32>().prop_map(Ipv4Addr::from)),
        frag_id4(),
        prop_oneof![
            10 => Just(Frag4::Whole),
            1 => Just(Frag4::First),
            1 => (1u16..0x2000, any::<bool>()).prop_map(|(offset, more)| Frag4::Later { offset, more }),
        ],
        prop_oneof![3 => Just(Vec::new()), 1 => payload(41)],
        prop::option::weighted(0.1, 0u8..16),
        prop::option::weighted(0.04, 0u8..16),
        prop::option::weighted(0.1, prop_oneof![0u16..64, any::<u16>()]),
    )
        .prop_map(
            |(to, src, id, frag, options, ihl, version, total_length)| V4Spec {
                to,
                src,
                id,
                frag,
                options,
                ihl,
                version,
                total_length,
            },
        )
        .boxed()
}

fn ext_len() -> BoxedStrategy<u8> {
    prop_oneof![6 => 0u8..4, 1 => any::<u8>()].boxed()
}

/// An extension header other than a fragment header.
fn plain_ext() -> BoxedStrategy<Ext> {
    prop_oneof![
        ext_len().prop_map(|len| Ext::HopByHop { len }),
        ext_len().prop_map(|len| Ext::Routing { len }),
        ext_len().prop_map(|len| Ext::DestOpts { len }),
        // The builder writes AH with a length field of at least 1.
        ext_len().prop_map(|len| Ext::Auth { len: len.max(1) }),
    ]
    .boxed()
}

fn ext() -> BoxedStrategy<Ext> {
    prop_oneof![
        4 => plain_ext(),
        1 => (
            prop_oneof![4 => Just(0u16), 1 => 1u16..0x2000],
            any::<bool>(),
            frag_id6()
        )
            .prop_map(|(offset, more, id)| Ext::Fragment { offset, more, id }),
    ]
    .boxed()
}

fn v6_spec(mix: Mix) -> BoxedStrategy<V6Spec> {
    (
        dst(),
        prop::option::weighted(0.1, any::<u128>().prop_map(Ipv6Addr::from)),
        prop::collection::vec(ext(), 0..=mix.max_exts),
        prop::option::weighted(0.1, any::<u16>()),
    )
        .prop_map(|(to, src, exts, payload_length)| V6Spec {
            to,
            src,
            exts,
            payload_length,
        })
        .boxed()
}

fn tags() -> BoxedStrategy<Vec<u16>> {
    prop_oneof![
        6 => Just(Vec::new()),
        2 => Just(vec![ETH_P_8021Q]),
        1 => Just(vec![ETH_P_8021AD, ETH_P_8021Q]),
        1 => prop::collection::vec(select(&[ETH_P_8021Q, ETH_P_8021AD][..]), 0..=3),
    ]
    .boxed()
}

fn ethertype() -> BoxedStrategy<u16> {
    prop_oneof![
        3 => select(&[0x0806u16, 0x88cc, 0x0800, 0x86dd, 0x8100, 0x88a8, 0x0042, 0x9000][..]),
        1 => any::<u16>(),
    ]
    .boxed()
}

/// Bit flips (place, mask) and a cut of a built frame.
type Damage = (Vec<(Index, u8)>, Option<Index>);

fn damage(mix: Mix) -> BoxedStrategy<Damage> {
    (
        prop_oneof![
            // Odds of at least one flip: `mix.flip`.
            (((1.0 - mix.flip) * 1000.0) as u32).max(1) => Just(Vec::new()),
            ((mix.flip * 1000.0) as u32).max(1) =>
                prop::collection::vec((any::<Index>(), 1u8..=255), 1..=3),
        ],
        prop::option::weighted(mix.cut, any::<Index>()),
    )
        .boxed()
}

fn built(tags: Vec<u16>, body: Body, (flips, cut): Damage) -> FrameSpec {
    FrameSpec::Built {
        tags,
        body,
        flips,
        cut,
    }
}

fn frame(mix: Mix) -> BoxedStrategy<FrameSpec> {
    prop_oneof![
        mix.v4 => (tags(), v4_spec(), l4(mix), damage(mix))
            .prop_map(|(tags, ip, l4, d)| built(tags, Body::V4 { ip, l4 }, d)),
        mix.v6 => (tags(), v6_spec(mix), l4(mix), damage(mix))
            .prop_map(|(tags, ip, l4, d)| built(tags, Body::V6 { ip, l4 }, d)),
        mix.ether => (tags(), ethertype(), payload(64), damage(mix))
            .prop_map(|(tags, ethertype, payload, d)| built(tags, Body::Ether { ethertype, payload }, d)),
        mix.raw => prop::collection::vec(any::<u8>(), 0..160).prop_map(FrameSpec::Raw),
    ]
    .boxed()
}

/// A first fragment and one or two later fragments of the same datagram
/// (same source, id and, for IPv4, protocol), sometimes out of order.
fn v4_train(mix: Mix) -> BoxedStrategy<Vec<FrameSpec>> {
    (
        tags(),
        v4_spec(),
        l4(mix),
        prop::collection::vec(
            (1u16..0x2000, any::<bool>(), payload(24), damage(mix)),
            1..=2,
        ),
        damage(mix),
        any::<bool>(),
    )
        .prop_map(|(tags, ip, l4, laters, d, reorder)| {
            let proto = l4.proto(false);
            let first = V4Spec {
                frag: Frag4::First,
                ..ip.clone()
            };
            let mut frames = vec![built(tags.clone(), Body::V4 { ip: first, l4 }, d)];
            for (offset, more, payload, d) in laters {
                let later = V4Spec {
                    frag: Frag4::Later { offset, more },
                    ..ip.clone()
                };
                let l4 = L4::Proto { proto, payload };
                frames.push(built(tags.clone(), Body::V4 { ip: later, l4 }, d));
            }
            if reorder {
                frames.reverse();
            }
            frames
        })
        .boxed()
}

/// IPv6: the first fragment's header and the later ones' sit anywhere in
/// random extension header chains.
fn v6_train(mix: Mix) -> BoxedStrategy<Vec<FrameSpec>> {
    // Up to 9 headers before a later fragment's: its own may be the 9th.
    let before = prop_oneof![
        3 => prop::collection::vec(plain_ext(), 0..=2),
        1 => prop::collection::vec(plain_ext(), 0..=9),
    ];
    (
        tags(),
        v6_spec(mix),
        prop::collection::vec(ext(), 0..=4),
        l4(mix),
        frag_id6(),
        prop::collection::vec(
            (before, 1u16..0x2000, any::<bool>(), l4(mix), damage(mix)),
            1..=2,
        ),
        damage(mix),
        any::<bool>(),
    )
        .prop_map(|(tags, ip, after, l4, id, laters, d, reorder)| {
            let mut exts = ip.exts.clone();
            exts.truncate(4);
            exts.push(Ext::Fragment {
                offset: 0,
                more: true,
                id,
            });
            exts.extend(after);
            let first = V6Spec { exts, ..ip.clone() };
            let mut frames = vec![built(tags.clone(), Body::V6 { ip: first, l4 }, d)];
            for (before, offset, more, l4, d) in laters {
                let mut exts = before;
                exts.push(Ext::Fragment { offset, more, id });
                let later = V6Spec { exts, ..ip.clone() };
                frames.push(built(tags.clone(), Body::V6 { ip: later, l4 }, d));
            }
            if reorder {
                frames.reverse();
            }
            frames
        })
        .boxed()
}

fn net() -> BoxedStrategy<NetSpec> {
    (
        any::<bool>(),
        prop_oneof![
            3 => Just(NetBase::Peer),
            2 => any::<u8>().prop_map(NetBase::PeerFlip),
            1 => any::<u128>().prop_map(NetBase::Random),
        ],
        prop_oneof![
            2 => select(&[0u8, 8, 16, 24, 32, 48, 64, 96, 104, 120, 128][..]),
            1 => any::<u8>(),
        ],
    )
        .prop_map(|(v6, base, len)| NetSpec { v6, base, len })
        .boxed()
}

fn rule_proto() -> BoxedStrategy<RuleProto> {
    prop_oneof![
        4 => Just(RuleProto::Tcp),
        4 => Just(RuleProto::Udp),
        1 => Just(RuleProto::Sctp),
        2 => select(&[47u8, 50, 112, 89, 4, 255][..]).prop_map(RuleProto::Whole),
        1 => any::<u8>().prop_map(RuleProto::Whole),
    ]
    .boxed()
}

fn rule(mix: Mix) -> BoxedStrategy<RuleSpec> {
    (
        rule_proto(),
        port(mix),
        prop_oneof![8 => Just(0u16), 3 => 1u16..16, 1 => 16u16..300],
        prop_oneof![
            (((1.0 - mix.from) * 1000.0) as u32).max(1) => Just(Vec::new()),
            ((mix.from * 1000.0) as u32).max(1) => prop::collection::vec(net(), 1..=3),
        ],
        prop::option::weighted(0.3, prop_oneof![3 => Just(1u8), 1 => 2u8..=3]),
        prop::option::weighted(0.2, any::<bool>()),
    )
        .prop_map(|(proto, lo, width, from, limit, owner)| RuleSpec {
            proto,
            limit,
            owner,
            lo: lo.max(1),
            // Source entries are one per port and network: keep them few.
            width: if from.is_empty() {
                width
            } else {
                width.min(31)
            },
            from,
        })
        .boxed()
}

fn flow(mix: Mix) -> BoxedStrategy<FlowSpec> {
    (
        any::<Index>(),
        prop_oneof![
            5 => Just(Skew::Exact),
            1 => Just(Skew::RemotePort),
            1 => Just(Skew::LocalPort),
            1 => Just(Skew::RemoteAddr),
        ],
        // Fresh, stale, in the future; all far from the 30 s boundary.
        prop_oneof![4 => 0i64..20_000, 3 => 40_000i64..3_600_000, 1 => -1000i64..0],
        (port(mix), port(mix)),
    )
        .prop_map(|(pick, skew, age_ms, ports)| FlowSpec {
            pick,
            skew,
            age_ms,
            ports,
        })
        .boxed()
}

const PEERS4: &[Ipv4Addr] = &[
    Ipv4Addr::new(203, 0, 113, 7),
    Ipv4Addr::new(198, 18, 0, 77),
    Ipv4Addr::new(10, 1, 2, 3),
];
const PEERS6: &[Ipv6Addr] = &[
    Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7),
    Ipv6Addr::new(0xfd7e, 1, 0, 0, 0, 0, 0, 5),
];

fn peers() -> BoxedStrategy<(Ipv4Addr, Ipv6Addr)> {
    let peer4 = prop_oneof![
        3 => select(PEERS4),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ];
    peer4
        .prop_flat_map(|p4| {
            let peer6 = prop_oneof![
                3 => select(PEERS6),
                1 => Just(p4.to_ipv6_mapped()),
                1 => any::<u128>().prop_map(Ipv6Addr::from),
            ];
            (Just(p4), peer6)
        })
        .boxed()
}

fn case(mix: Mix) -> BoxedStrategy<Case> {
    let frames = prop_oneof![
        10 => prop::collection::vec(frame(mix), 1..=4),
        // The same frame again and again: a source using up a limit.
        3 => (frame(mix), 2usize..=4).prop_map(|(f, n)| vec![f; n]),
        mix.trains => v4_train(mix),
        mix.trains => v6_train(mix),
    ];
    (
        prop_oneof![3 => Just(Mode::Enforce), mix.audit => Just(Mode::Audit)],
        (
            prop_oneof![
                3 => Just(None),
                1 => Just(Some(Forwarded::Pass)),
                2 => Just(Some(Forwarded::Judge)),
            ],
            prop_oneof![3 => Just(None), 1 => select(&[1u8, 48, 64, 120, 128][..]).prop_map(Some)],
        ),
        peers(),
        prop::collection::vec(rule(mix), 0..=4),
        prop::collection::vec(flow(mix), 0..=mix.flows),
        frames,
    )
        .prop_map(
            |(mode, (forwarded, limit_ipv6_prefix), (peer4, peer6), rules, flows, frames)| Case {
                mode,
                forwarded,
                limit_ipv6_prefix,
                peer4,
                peer6,
                rules,
                flows,
                frames,
            },
        )
        .boxed()
}

// ---------------------------------------------------------------------------
// A case made concrete: bytes, a policy, flows.

/// The guarded host's addresses for one case.
#[derive(Clone, Copy, Debug)]
struct Host {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

impl Host {
    /// The `n`th case's host: 10.0.0.0/8 and fd00:5a17::/96 give 2^24 cases.
    fn nth(n: u32) -> Self {
        let n = n & 0x00ff_ffff;
        Self {
            v4: Ipv4Addr::from(0x0a00_0000 | n),
            v6: Ipv6Addr::from(0xfd00_5a17_u128 << 96 | u128::from(n)),
        }
    }
}

#[derive(Clone, Debug)]
struct FlowRec {
    proto: u8,
    local: SocketAddr,
    remote: SocketAddr,
    age_ms: i64,
}

#[derive(Clone, Debug)]
struct Concrete {
    policy: Policy,
    mode: Mode,
    /// The host's addresses: frames to others are forwarded ones.
    local: Vec<IpAddr>,
    flows: Vec<FlowRec>,
    frames: Vec<Vec<u8>>,
}

/// The two network layers, for building transport headers on either.
trait Net: Sized {
    fn tcp(self, sport: u16, dport: u16, flags: u8) -> Tcp;
    fn udp(self, sport: u16, dport: u16) -> Udp;
    fn echo(self) -> Packet;
    fn raw(self, proto: u8, payload: &[u8]) -> Packet;
}

impl Net for Ipv4 {
    fn tcp(self, sport: u16, dport: u16, flags: u8) -> Tcp {
        Ipv4::tcp(self, sport, dport, flags)
    }
    fn udp(self, sport: u16, dport: u16) -> Udp {
        Ipv4::udp(self, sport, dport)
    }
    fn echo(self) -> Packet {
        self.icmp_echo(7, 1)
    }
    fn raw(self, proto: u8, payload: &[u8]) -> Packet {
        self.payload(proto, payload)
    }
}

impl Net for Ipv6 {
    fn tcp(self, sport: u16, dport: u16, flags: u8) -> Tcp {
        Ipv6::tcp(self, sport, dport, flags)
    }
    fn udp(self, sport: u16, dport: u16) -> Udp {
        Ipv6::udp(self, sport, dport)
    }
    fn echo(self) -> Packet {
        self.icmp_echo(7, 1)
    }
    fn raw(self, proto: u8, payload: &[u8]) -> Packet {
        self.payload(proto, payload)
    }
}

fn transport(net: impl Net, l4: &L4) -> Vec<u8> {
    match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            options,
            data_offset,
            payload,
        } => {
            let mut tcp = net
                .tcp(*sport, *dport, *flags)
                .options(options)
                .payload(payload);
            if let Some(words) = data_offset {
                tcp = tcp.data_offset(*words);
            }
            tcp.build()
        }
        L4::Udp {
            sport,
            dport,
            payload,
        } => net.udp(*sport, *dport).payload(payload).build(),
        L4::Sctp {
            sport,
            dport,
            chunks,
        } => {
            let mut bytes = sport.to_be_bytes().to_vec();
            bytes.extend_from_slice(&dport.to_be_bytes());
            bytes.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
            bytes.extend_from_slice(chunks);
            net.raw(IPPROTO_SCTP, &bytes).build()
        }
        L4::Ah { next, len, inner } => {
            let size = (usize::from(*len) + 2) * 4;
            let mut bytes = vec![0u8; size.max(2)];
            bytes[0] = *next;
            bytes[1] = *len;
            bytes.extend_from_slice(inner);
            net.raw(51, &bytes).build()
        }
        L4::Echo => net.echo().build(),
        L4::Proto { proto, payload } => net.raw(*proto, payload).build(),
    }
}

/// A frame's protocol and (source, destination) endpoints, for the flows
/// that may answer it: UDP and SCTP with ports, others with port 0.
type UdpEnds = (u8, SocketAddr, SocketAddr);

fn build_frame(spec: &FrameSpec, case: &Case, host: Host, udp: &mut Vec<UdpEnds>) -> Vec<u8> {
    let (tags, body, flips, cut) = match spec {
        FrameSpec::Raw(bytes) => return bytes.clone(),
        FrameSpec::Built {
            tags,
            body,
            flips,
            cut,
        } => (tags, body, flips, cut),
    };
    let mut eth: Eth = Frame::eth();
    for (i, tpid) in (10u16..).zip(tags) {
        eth = eth.vlan(*tpid, i);
    }
    let note_udp = |udp: &mut Vec<UdpEnds>, src: IpAddr, dst: IpAddr, l4: &L4| {
        let ends = |proto, sport, dport| {
            (
                proto,
                SocketAddr::new(src, sport),
                SocketAddr::new(dst, dport),
            )
        };
        match l4 {
            L4::Udp { sport, dport, .. } => udp.push(ends(IPPROTO_UDP, *sport, *dport)),
            L4::Sctp { sport, dport, .. } => udp.push(ends(IPPROTO_SCTP, *sport, *dport)),
            L4::Proto { proto, .. } => udp.push(ends(*proto, 0, 0)),
            _ => {}
        }
    };
    let mut bytes = match body {
        Body::Ether { ethertype, payload } => eth.ethertype(*ethertype, payload).build(),
        Body::V4 { ip, l4 } => {
            let src = ip.src.unwrap_or(case.peer4);
            let dst = match ip.to {
                Dst::Host => host.v4,
                Dst::Routed(n) => Ipv4Addr::new(172, 17, 0, n),
                Dst::Group => {
                    [Ipv4Addr::new(224, 0, 0, 18), Ipv4Addr::BROADCAST][usize::from(ip.id % 2)]
                }
            };
            let mut v4 = eth.ipv4(src, dst).id(ip.id).options(&ip.options);
            v4 = match ip.frag {
                Frag4::Whole => v4,
                Frag4::First => v4.fragment(0, true),
                Frag4::Later { offset, more } => v4.fragment(offset, more),
            };
            if let Some(ihl) = ip.ihl {
                v4 = v4.ihl(ihl);
            }
            if let Some(version) = ip.version {
                v4 = v4.version(version);
            }
            if let Some(len) = ip.total_length {
                v4 = v4.total_length(len);
            }
            note_udp(udp, src.into(), dst.into(), l4);
            transport(v4, l4)
        }
        Body::V6 { ip, l4 } => {
            let src = ip.src.unwrap_or(case.peer6);
            let dst = match ip.to {
                Dst::Host => host.v6,
                Dst::Routed(n) => Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, u16::from(n)),
                Dst::Group => Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12),
            };
            let mut v6 = eth.ipv6(src, dst);
            for ext in &ip.exts {
                v6 = v6.ext(*ext);
            }
            if let Some(len) = ip.payload_length {
                v6 = v6.payload_length(len);
            }
            note_udp(udp, src.into(), dst.into(), l4);
            transport(v6, l4)
        }
    };
    bytes.truncate(MAX_FRAME);
    for (at, bits) in flips {
        if !bytes.is_empty() {
            let i = at.index(bytes.len());
            bytes[i] ^= bits;
        }
    }
    if let Some(cut) = cut
        && !bytes.is_empty()
    {
        bytes.truncate(cut.index(bytes.len()));
    }
    bytes
}

/// A `from` network: family, address with the host bits cleared, length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    v6: bool,
    addr: u128,
    len: u32,
}

impl Cidr {
    fn of(spec: &NetSpec, case: &Case) -> Self {
        let (bits, peer) = if spec.v6 {
            (128, u128::from(case.peer6))
        } else {
            (32, u128::from(u32::from(case.peer4)))
        };
        let len = u32::from(spec.len) % (bits + 1);
        let addr = match spec.base {
            NetBase::Peer => peer,
            // Flip a bit inside the prefix: the network just misses the peer.
            NetBase::PeerFlip(bit) if len > 0 => {
                peer ^ (1u128 << (bits - 1 - u32::from(bit) % len))
            }
            NetBase::PeerFlip(_) => peer,
            NetBase::Random(r) if spec.v6 => r,
            NetBase::Random(r) => r & u128::from(u32::MAX),
        };
        let host_bits = bits - len;
        let addr = addr
            .checked_shr(host_bits)
            .unwrap_or(0)
            .checked_shl(host_bits)
            .unwrap_or(0);
        Self {
            v6: spec.v6,
            addr,
            len,
        }
    }

    /// Inside ::ffff:0:0/96.
    fn is_v4_mapped(&self) -> bool {
        self.v6 && self.len >= 96 && self.addr >> 32 == 0xffff
    }

    /// One of the two contains the other (a policy refuses that).
    fn nests(&self, other: &Cidr) -> bool {
        let bits = if self.v6 { 128 } else { 32 };
        let shift = bits - self.len.min(other.len);
        self.v6 == other.v6
            && self.addr.checked_shr(shift).unwrap_or(0)
                == other.addr.checked_shr(shift).unwrap_or(0)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.v6 {
            write!(f, "{}/{}", Ipv6Addr::from(self.addr), self.len)
        } else {
            write!(f, "{}/{}", Ipv4Addr::from(self.addr as u32), self.len)
        }
    }
}

/// The case's rules as a valid policy: a rule that overlaps an earlier
/// one is left out, and so is a network nested in another of its rule.
/// The command names of generated owners: the one that listens, and the
/// one that does not.
const OWNER_LISTENS: &str = "pw-listens";
const OWNER_AWAY: &str = "pw-away";

/// The owned rules whose owner listens, by their ports.
fn owners_listening(policy: &Policy) -> BTreeSet<PortRange> {
    policy
        .rules
        .iter()
        .filter(|r| r.owner.as_ref().and_then(|o| o.comm.as_deref()) == Some(OWNER_LISTENS))
        .map(|r| r.ports)
        .collect()
}

fn policy(case: &Case) -> Result<Policy> {
    let mut text = format!("mode = \"{}\"\n", case.mode.as_str());
    if let Some(forwarded) = case.forwarded {
        let _ = writeln!(text, "forwarded = \"{}\"", forwarded.as_str());
    }
    if let Some(prefix) = case.limit_ipv6_prefix {
        let _ = writeln!(text, "limit_ipv6_prefix = {prefix}");
    }
    text.push_str("allow = [\n");
    let mut taken: Vec<(RuleProto, u16, u16)> = Vec::new();
    for rule in &case.rules {
        let (lo, hi) = match rule.proto {
            // A whole protocol is its one port 0; one no policy accepts
            // (with ports, always permitted, looked through) is left out.
            RuleProto::Whole(n) => {
                if PortRange::whole(IpProto(n)).is_err() {
                    continue;
                }
                (0, 0)
            }
            _ => (rule.lo, rule.lo.saturating_add(rule.width)),
        };
        if taken
            .iter()
            .any(|&(proto, l, h)| proto == rule.proto && l <= hi && lo <= h)
        {
            continue;
        }
        taken.push((rule.proto, lo, hi));
        let spec = match rule.proto {
            RuleProto::Whole(n) => format!("proto/{n}"),
            proto => {
                let name = match proto {
                    RuleProto::Udp => "udp",
                    RuleProto::Sctp => "sctp",
                    _ => "tcp",
                };
                if hi == lo {
                    format!("{name}/{lo}")
                } else {
                    format!("{name}/{lo}-{hi}")
                }
            }
        };
        let mut nets: Vec<Cidr> = Vec::new();
        for net in &rule.from {
            let cidr = Cidr::of(net, case);
            // A policy refuses IPv4-mapped networks: no packet comes from
            // one (frames from mapped sources are still generated).
            if !cidr.is_v4_mapped() && !nets.iter().any(|n| n.nests(&cidr)) {
                nets.push(cidr);
            }
        }
        if nets.is_empty() && !rule.from.is_empty() {
            // Every network was refused: leave the rule out rather than
            // widen it to every source.
            continue;
        }
        let mut table = format!("  {{ port = \"{spec}\"");
        if !nets.is_empty() {
            let nets: Vec<String> = nets.iter().map(|n| format!("\"{n}\"")).collect();
            let _ = write!(table, ", from = [{}]", nets.join(", "));
        }
        if let Some(n) = rule.limit {
            let _ = write!(table, ", limit = \"{n}/hour\"");
        }
        // An owner names one port; whether it listens is in its name.
        if let Some(listens) = rule.owner
            && lo == hi
            && !matches!(rule.proto, RuleProto::Whole(_))
        {
            let comm = if listens { OWNER_LISTENS } else { OWNER_AWAY };
            let _ = write!(table, ", owner = {{ comm = \"{comm}\" }}");
        }
        let _ = writeln!(text, "{table} }},");
    }
    text.push_str("]\n");
    Policy::parse(&text).with_context(|| format!("the generated policy:\n{text}"))
}

fn materialize(case: &Case, host: Host) -> Result<Concrete> {
    let mut udp = Vec::new();
    let frames = case
        .frames
        .iter()
        .map(|f| build_frame(f, case, host, &mut udp))
        .collect();
    let flows = case
        .flows
        .iter()
        .map(|f| {
            // The host sent the reverse of a frame: local = its destination.
            let (proto, mut remote, mut local) = if udp.is_empty() {
                (
                    IPPROTO_UDP,
                    SocketAddr::new(case.peer4.into(), f.ports.1),
                    SocketAddr::new(host.v4.into(), f.ports.0),
                )
            } else {
                *f.pick.get(&udp)
            };
            match f.skew {
                Skew::Exact => {}
                Skew::RemotePort => remote.set_port(remote.port().wrapping_add(1)),
                Skew::LocalPort => local.set_port(local.port().wrapping_add(1)),
                Skew::RemoteAddr => remote.set_ip(match remote.ip() {
                    IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) ^ 1)),
                    IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ 1)),
                }),
            }
            FlowRec {
                proto,
                local,
                remote,
                age_ms: f.age_ms,
            }
        })
        .collect();
    Ok(Concrete {
        policy: policy(case)?,
        mode: case.mode,
        local: vec![host.v4.into(), host.v6.into()],
        flows,
        frames,
    })
}

// ---------------------------------------------------------------------------
// Running frames through the kernel and the model.

/// An untagged IPv4 or IPv6 frame shorter than Ethernet plus the fixed IP
/// header (20 or 40 bytes), which BPF_PROG_TEST_RUN will not make an skb
/// of (this kernel: EINVAL for every such frame, and for no other).
fn short_ip_header(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() < ETH_HLEN + 20,
        Some([0x86, 0xdd]) => frame.len() < ETH_HLEN + 40,
        _ => false,
    }
}

/// What the kernel did with a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kernel {
    Ran(Outcome),
    /// BPF_PROG_TEST_RUN refused the frame (shorter than Ethernet).
    Refused,
    /// BPF_PROG_TEST_RUN refuses to build an skb for a tc program from an
    /// IPv4 or IPv6 frame without its whole fixed IP header (see
    /// [`short_ip_header`]); the XDP proofs run such frames, and the model
    /// calls them malformed.
    Untestable,
    /// An XDP action or counter movement that is no outcome.
    Odd(String),
}

impl Kernel {
    fn agrees(&self, model: Outcome, frame_len: usize) -> bool {
        match self {
            Kernel::Ran(outcome) => *outcome == model,
            Kernel::Refused => frame_len < ETH_HLEN && model.reason == Some(Reason::Malformed),
            Kernel::Untestable => model.reason == Some(Reason::Malformed),
            Kernel::Odd(_) => false,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Kernel::Ran(outcome) => outcome_json(*outcome),
            Kernel::Refused => json!("refused by BPF_PROG_TEST_RUN"),
            Kernel::Untestable => json!("a bare Ethernet header: not test-runnable at tc"),
            Kernel::Odd(what) => json!(what),
        }
    }
}

const OUTCOME_STATS: [(GuardStat, Option<Reason>); 7] = [
    (GuardStat::Passed, None),
    (GuardStat::Forwarded, None),
    (GuardStat::DropNoRule, Some(Reason::NoRule)),
    (GuardStat::DropSource, Some(Reason::Source)),
    (GuardStat::DropMalformed, Some(Reason::Malformed)),
    (GuardStat::DropFragment, Some(Reason::Fragment)),
    (GuardStat::DropRateLimited, Some(Reason::RateLimited)),
];

fn outcome_json(o: Outcome) -> Value {
    json!({"action": o.action.as_str(), "reason": o.reason.map(Reason::as_str)})
}

fn outcome_from_json(v: &Value) -> Result<Outcome> {
    let action = match v["action"].as_str() {
        Some("pass") => Action::Pass,
        Some("drop") => Action::Drop,
        other => bail!("bad action {other:?}"),
    };
    let reason = match &v["reason"] {
        Value::Null => None,
        Value::String(name) => {
            Some(Reason::from_name(name).with_context(|| format!("bad reason {name:?}"))?)
        }
        other => bail!("bad reason {other}"),
    };
    Ok(Outcome { action, reason })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    ensure!(text.len().is_multiple_of(2), "odd length hex");
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .with_context(|| format!("bad hex at {i}"))
        })
        .collect()
}

/// `age_ms` before `now` (after it, for a negative age).
fn before(now: u64, age_ms: i64) -> u64 {
    let delta = age_ms.unsigned_abs().saturating_mul(1_000_000);
    if age_ms >= 0 {
        now.saturating_sub(delta)
    } else {
        now.saturating_add(delta)
    }
}

fn flow_key(proto: u8, local: SocketAddr, remote: SocketAddr) -> FlowKey {
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(a) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&a.octets());
            out
        }
        IpAddr::V6(a) => a.octets(),
    };
    FlowKey {
        family: if local.is_ipv4() {
            AF_INET as u8
        } else {
            AF_INET6 as u8
        },
        proto,
        _pad: 0,
        local_port: local.port(),
        remote_port: remote.port(),
        local: bytes(local.ip()),
        remote: bytes(remote.ip()),
    }
}

/// The JSON of a regression file: the frames before the one that differs
/// (they set up fragment state), that frame, and what to expect of it.
fn regression_json(c: &Concrete, at: usize, model: Outcome, kernel: &Kernel) -> Value {
    let flows: Vec<Value> = c
        .flows
        .iter()
        .map(|f| json!({"proto": f.proto, "local": f.local.to_string(), "remote": f.remote.to_string(), "age_ms": f.age_ms}))
        .collect();
    json!({
        "before_hex": c.frames.iter().take(at).map(|f| hex(f)).collect::<Vec<_>>(),
        "frame_hex": c.frames.get(at).map(|f| hex(f)).unwrap_or_default(),
        "policy": c.policy.to_toml(),
        "local": c.local.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "mode": c.mode.as_str(),
        "flows": flows,
        "expected": outcome_json(model),
        "kernel": kernel.to_json(),
    })
}

/// One loaded program and the counters as last read.
struct Harness {
    xdp: XdpTester,
    hook: Hook,
    totals: GuardTotals,
    next_host: u32,
    cases: u64,
    /// Model outcomes seen, for the coverage check.
    seen: BTreeMap<String, u64>,
}

impl Harness {
    /// The guard's program for `hook`, loaded afresh.
    fn load(hook: Hook) -> Result<Self> {
        let xdp = XdpTester::load_at(hook)
            .with_context(|| format!("loading the guard for {hook:?} (run as root)"))?;
        let totals = xdp.maps.totals();
        Ok(Self {
            xdp,
            hook,
            totals,
            next_host: 1,
            cases: 0,
            seen: BTreeMap::new(),
        })
    }

    /// Runs one frame in the kernel; the outcome is read from the
    /// verdict and the one guard counter that moved.
    fn kernel(&mut self, frame: &[u8]) -> Result<Kernel> {
        let verdict = match self.xdp.verdict(frame) {
            Ok(v) => v,
            Err(e) => {
                let einval = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.raw_os_error() == Some(libc::EINVAL))
                }) || format!("{e:#}").contains("Invalid argument");
                if einval && frame.len() < ETH_HLEN {
                    return Ok(Kernel::Refused);
                }
                if einval && self.hook == Hook::Tc && short_ip_header(frame) {
                    return Ok(Kernel::Untestable);
                }
                return Err(e.context(format!("running a {}-byte frame", frame.len())));
            }
        };
        let after = self.xdp.maps.totals();
        let moved: Vec<(GuardStat, Option<Reason>, u64)> = OUTCOME_STATS
            .iter()
            .map(|(stat, reason)| {
                (
                    *stat,
                    *reason,
                    after.get(*stat).wrapping_sub(self.totals.get(*stat)),
                )
            })
            .filter(|(_, _, n)| *n != 0)
            .collect();
        self.totals = after;
        let action = match verdict {
            XDP_PASS => Action::Pass,
            XDP_DROP => Action::Drop,
            other => return Ok(Kernel::Odd(format!("XDP action {other}"))),
        };
        Ok(match moved.as_slice() {
            [(_, reason, 1)] => Kernel::Ran(Outcome {
                action,
                reason: *reason,
            }),
            _ => Kernel::Odd(format!(
                "{} with counters {:?}",
                action.as_str(),
                moved.iter().map(|(s, _, n)| (s, n)).collect::<Vec<_>>()
            )),
        })
    }

    /// Runs every frame of `c` through the kernel and the model, in order.
    fn run(&mut self, c: &Concrete) -> Result<Vec<(Outcome, Kernel)>> {
        self.xdp.set_local_addresses(&c.local)?;
        let listening = owners_listening(&c.policy);
        let local = ModelHost::of(&c.local).with_owners_listening(listening.iter().copied());
        // The kernel gets what the guard gives it: the owned rules whose
        // owner listens; the model judges the whole policy with the owners.
        self.xdp.apply(&c.policy.gated(&listening), c.mode)?;
        // Damaged frames can carry any addresses, so per-case hosts alone do
        // not keep cases apart: every case starts from empty state, as the
        // model does.
        self.xdp.maps.clear_flows_and_fragments()?;
        self.xdp.clear_rate_state()?;
        let now = monotonic_ns()?;
        let mut flows = FlowState::new(now);
        for f in &c.flows {
            let last = before(now, f.age_ms);
            self.xdp
                .maps
                .record_flow(flow_key(f.proto, f.local, f.remote), last)?;
            flows.record_proto(f.proto, f.local, f.remote, last);
        }
        flows.now_ns = monotonic_ns()?;
        let mut frags = FragState::new();
        let mut out = Vec::with_capacity(c.frames.len());
        for frame in &c.frames {
            let model = reference::verdict(frame, &c.policy, c.mode, &local, &flows, &mut frags);
            out.push((model, self.kernel(frame)?));
        }
        Ok(out)
    }

    fn check(&mut self, case: &Case) -> std::result::Result<(), TestCaseError> {
        let host = Host::nth(self.next_host);
        self.next_host += 1;
        self.cases += 1;
        let c = materialize(case, host).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let results = self
            .run(&c)
            .map_err(|e| TestCaseError::fail(format!("the kernel run failed: {e:#}")))?;
        for (at, (model, kernel)) in results.iter().enumerate() {
            *self.seen.entry(model.to_string()).or_default() += 1;
            let len = c.frames.get(at).map_or(0, Vec::len);
            if !kernel.agrees(*model, len) {
                let json = regression_json(&c, at, *model, kernel);
                return Err(TestCaseError::fail(
                    serde_json::to_string_pretty(&json).unwrap_or_default(),
                ));
            }
        }
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions")
}

/// Writes a failure's JSON into `tests/regressions/NAME-HASH.json`.
fn save_regression(name: &str, json: &str) -> Result<PathBuf> {
    // FNV-1a: a stable name for the same case.
    let hash = json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let dir = regressions_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}-{hash:016x}.json"));
    std::fs::write(&path, format!("{json}\n"))?;
    Ok(path)
}

/// Runs `cases` generated cases of `mix` through kernel and model; every
/// outcome in `must_see` must come up at least once when there are enough
/// cases to expect it.
fn prove(name: &str, mix: Mix, must_see: &[&str]) -> Result {
    prove_at(name, mix, must_see, Hook::Xdp, DEFAULT_CASES)
}

/// [`prove`] with the guard's program for `hook`, `default_cases` unless
/// `PORTWATCH_PROOF_CASES` says otherwise.
fn prove_at(name: &str, mix: Mix, must_see: &[&str], hook: Hook, default_cases: u32) -> Result {
    let cases = env_u64("PORTWATCH_PROOF_CASES")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(default_cases);
    let seed = env_u64("PORTWATCH_PROOF_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ u64::from(std::process::id()) << 32
    });
    let mut key = [0u8; 16];
    for chunk in key.chunks_mut(8) {
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 20_000,
        max_shrink_time: 60_000,
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::default()
    };
    // XorShift: ChaCha costs several times more in a debug build.
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::XorShift, &key));
    let harness = RefCell::new(Harness::load(hook)?);
    let started = std::time::Instant::now();
    let result = runner.run(&case(mix), |case| harness.borrow_mut().check(&case));
    let harness = harness.into_inner();
    eprintln!(
        "{name}: {} runs, shrinking included (seed {seed}), in {:.1?}; model outcomes: {:?}",
        harness.cases,
        started.elapsed(),
        harness.seen
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, case)) => {
            let message = reason.message();
            let saved = if std::env::var_os("PORTWATCH_SAVE_REGRESSIONS").is_some()
                && message.starts_with('{')
            {
                format!("\nsaved as {}", save_regression(name, message)?.display())
            } else {
                String::new()
            };
            bail!(
                "{name}: the kernel and the reference model disagree (PORTWATCH_PROOF_SEED={seed} \
                 reproduces it); the minimal case, as a regression file:\n{message}{saved}\n\
                 generated as: {case:?}"
            );
        }
        Err(TestError::Abort(reason)) => bail!("{name}: aborted: {}", reason.message()),
    }
    if cases >= 2000 {
        let missing: Vec<&&str> = must_see
            .iter()
            .filter(|o| !harness.seen.contains_key(**o))
            .collect();
        ensure!(
            missing.is_empty(),
            "{name}: the generators never reached {missing:?} in {cases} cases"
        );
    }
    Ok(())
}

const ALL_ENFORCE: &[&str] = &[
    "pass",
    "drop (no_rule)",
    "drop (source_not_allowed)",
    "drop (malformed)",
    "drop (fragment)",
];

#[test]
fn ipv4_frames_agree_with_the_model() -> Result {
    let mix = Mix {
        v4: 12,
        v6: 1,
        ether: 1,
        raw: 1,
        trains: 3,
        flip: 0.05,
        cut: 0.08,
        from: 0.3,
        flows: 2,
        audit: 1,
        few_ports: 2,
        max_exts: 10,
    };
    prove("ipv4", mix, ALL_ENFORCE)
}

#[test]
fn ipv6_frames_agree_with_the_model() -> Result {
    let mix = Mix {
        v4: 1,
        v6: 12,
        ether: 1,
        raw: 1,
        trains: 4,
        flip: 0.05,
        cut: 0.08,
        from: 0.3,
        flows: 2,
        audit: 1,
        few_ports: 2,
        max_exts: 10,
    };
    prove("ipv6", mix, ALL_ENFORCE)
}

#[test]
fn damaged_frames_agree_with_the_model() -> Result {
    let mix = Mix {
        v4: 4,
        v6: 4,
        ether: 2,
        raw: 2,
        trains: 2,
        flip: 0.4,
        cut: 0.6,
        from: 0.2,
        flows: 1,
        audit: 1,
        few_ports: 2,
        max_exts: 10,
    };
    prove(
        "damaged",
        mix,
        &["pass", "drop (malformed)", "pass (malformed)"],
    )
}

/// The same verdict at tc ingress (auto's choice on a veth): the tc
/// program runs the one verdict over the skb's bytes, so it must agree
/// with the model frame for frame, damaged frames and trains included.
/// Fewer cases than the XDP proofs: the verdict code is theirs; what this
/// proves is the tc side's reading of the frame and its actions.
#[test]
fn frames_at_tc_ingress_agree_with_the_model() -> Result {
    let mix = Mix {
        v4: 6,
        v6: 6,
        ether: 1,
        raw: 1,
        trains: 3,
        flip: 0.1,
        cut: 0.15,
        from: 0.3,
        flows: 2,
        audit: 1,
        few_ports: 2,
        max_exts: 10,
    };
    prove_at("tc", mix, ALL_ENFORCE, Hook::Tc, 10_000)
}

#[test]
fn policies_and_flows_agree_with_the_model() -> Result {
    let mix = Mix {
        v4: 6,
        v6: 6,
        ether: 1,
        raw: 1,
        trains: 1,
        flip: 0.02,
        cut: 0.03,
        from: 0.7,
        flows: 3,
        audit: 2,
        few_ports: 16,
        max_exts: 3,
    };
    prove(
        "policy",
        mix,
        &[
            "pass",
            "drop (no_rule)",
            "drop (source_not_allowed)",
            "pass (no_rule)",
            "pass (source_not_allowed)",
            "drop (rate_limited)",
        ],
    )
}

// ---------------------------------------------------------------------------
// Regressions: every difference found, replayed through both sides.

struct Regression {
    concrete: Concrete,
    expected: Outcome,
}

fn load_regression(path: &Path) -> Result<Regression> {
    let text = std::fs::read_to_string(path)?;
    let v: Value = serde_json::from_str(&text)?;
    let mode = match v["mode"].as_str() {
        Some("enforce") => Mode::Enforce,
        Some("audit") => Mode::Audit,
        other => bail!("bad mode {other:?}"),
    };
    let mut policy = Policy::parse(v["policy"].as_str().context("no policy")?)?;
    // Files from before the scope check judged every frame as the host's.
    let local = match v["local"].as_array() {
        Some(addrs) => addrs
            .iter()
            .map(|a| Ok(a.as_str().context("local holds strings")?.parse()?))
            .collect::<Result<Vec<IpAddr>>>()?,
        None => {
            policy.forwarded = Some(Forwarded::Judge);
            Vec::new()
        }
    };
    let mut frames = Vec::new();
    for f in v["before_hex"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        frames.push(unhex(f.as_str().context("before_hex holds strings")?)?);
    }
    frames.push(unhex(v["frame_hex"].as_str().context("no frame_hex")?)?);
    let mut flows = Vec::new();
    for f in v["flows"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        flows.push(FlowRec {
            // Files from before other protocols had flows hold UDP ones.
            proto: f["proto"].as_u64().map_or(Ok(IPPROTO_UDP), u8::try_from)?,
            local: f["local"].as_str().context("flow local")?.parse()?,
            remote: f["remote"].as_str().context("flow remote")?.parse()?,
            age_ms: f["age_ms"].as_i64().context("flow age_ms")?,
        });
    }
    Ok(Regression {
        concrete: Concrete {
            policy,
            mode,
            local,
            flows,
            frames,
        },
        expected: outcome_from_json(&v["expected"])?,
    })
}

/// Each file gets a freshly loaded program, so no state leaks between them.
#[test]
fn regressions_replay() -> Result {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(regressions_dir()) {
        Ok(dir) => dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    paths.sort();
    let mut failures = Vec::new();
    for path in &paths {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let reg = load_regression(path).with_context(|| format!("reading {name}"))?;
        // Both of the guard's programs: XDP and tc ingress.
        for hook in [Hook::Xdp, Hook::Tc] {
            let mut harness = Harness::load(hook)?;
            let results = harness
                .run(&reg.concrete)
                .with_context(|| format!("running {name} ({hook:?})"))?;
            let Some((model, kernel)) = results.last() else {
                bail!("{name}: no frame");
            };
            let len = reg.concrete.frames.last().map_or(0, Vec::len);
            let want = reg.expected;
            if *model != want {
                failures.push(format!("{name}: the model gives {model}, expected {want}"));
            }
            if !kernel.agrees(want, len) {
                failures.push(format!(
                    "{name} ({hook:?}): the kernel gives {}, expected {want}",
                    kernel.to_json()
                ));
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {} regression cases fail:\n  {}",
        failures.len(),
        paths.len(),
        failures.join("\n  ")
    );
    Ok(())
}

/// Every generated case makes a valid policy and bounded frames (no
/// kernel needed).
#[test]
fn generated_cases_materialize() -> Result {
    let mut runner = TestRunner::new(Config {
        cases: 1000,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::default()
    });
    let mix = Mix {
        v4: 1,
        v6: 1,
        ether: 1,
        raw: 1,
        trains: 1,
        flip: 0.1,
        cut: 0.1,
        from: 0.5,
        flows: 2,
        audit: 1,
        few_ports: 2,
        max_exts: 10,
    };
    let result = runner.run(&case(mix), |case| {
        let c = materialize(&case, Host::nth(7)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(c.frames.len(), case.frames.len());
        prop_assert!(c.frames.iter().all(|f| f.len() <= MAX_FRAME));
        prop_assert_eq!(c.flows.len(), case.flows.len());
        prop_assert!(c.policy.rules.len() <= case.rules.len());
        Ok(())
    });
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
