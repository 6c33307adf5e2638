//! Kernel-side measurements for `cargo xtask bench` (sections `verdict` and
//! `host`). xtask builds this with `cargo bench --no-run`, runs it as root
//! and reads one JSON object from its stdout; run alone it only says so.
//!
//! - `verdict --reps N --rounds R [--xdp-filter PIN] [--frames DIR]`: the
//!   per-packet cost (BPF_PROG_TEST_RUN: the kernel's average over N runs)
//!   of the guard, of two baselines from the benchmark object
//!   (`bench_xdp_drop`, `bench_parse_drop`, `bench_parse_lookup_drop`) and
//!   of xdp-filter's pinned program, on one frame per traffic class; every
//!   program through the same syscall.
//! - `pin-floor --path P`: loads `bench_parse_drop` (the guard's header
//!   walk, then XDP_DROP) and pins it at P on bpffs, for the `veth`
//!   section to attach natively as the floor of any filter that reads the
//!   headers it judges.
//! - `calls --cycles N [--port P]`: per-call latency of
//!   socket/bind/listen/close (on 127.0.0.1:P, 0 by default), for the
//!   monitor's and the bind hooks' cost to the host.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::Path,
    process::ExitCode,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use aya_obj::programs::xdp::XdpAttachType;
use nix::{
    sys::socket::{AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, socket},
    time::{ClockId, clock_gettime},
};
use portwatch::{
    datapath::testing::{XDP_DROP, XDP_PASS, XdpTester},
    model::Mode,
    policy::Policy,
};
use portwatch_common::{AF_INET, Flow4Key, FlowKey, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use serde_json::{Value, json};

/// The benchmark object build.rs made from portwatch-ebpf: the baselines
/// live there, not in the shipped object.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch-bench"));

fn main() -> ExitCode {
    // `cargo bench` passes --bench; nothing else here is cargo's.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let result = match args.first().map(String::as_str) {
        Some("verdict") => verdict(&args[1..]),
        Some("calls") => calls(&args[1..]),
        Some("pin-floor") => pin_floor(&args[1..]),
        _ => {
            eprintln!(
                "kernel_worker: run by `cargo xtask bench --only verdict|host` (as root); \
                 nothing to do on its own"
            );
            return ExitCode::SUCCESS;
        }
    };
    match result {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kernel_worker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The value after `--name`, if given.
fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn opt_u32(args: &[String], name: &str, default: u32) -> Result<u32> {
    opt(args, name).map_or(Ok(default), |v| {
        v.parse()
            .with_context(|| format!("{name} wants a number, not {v:?}"))
    })
}

// ---- pin-floor ----

/// Pins `bench_parse_drop` at `--path` (on bpffs) and returns; the pin
/// keeps the program loaded until it is removed.
fn pin_floor(args: &[String]) -> Result<Value> {
    let path = opt(args, "--path").context("pin-floor wants --path P")?;
    let mut obj = EbpfLoader::new()
        .load(OBJECT)
        .context("loading portwatch's benchmark object")?;
    let prog = baseline(&mut obj, "bench_parse_drop")?;
    prog.load().context("loading bench_parse_drop")?;
    prog.pin(path)
        .with_context(|| format!("pinning bench_parse_drop at {path} (is bpffs mounted?)"))?;
    Ok(json!({ "pinned": path }))
}

// ---- verdict ----

/// The guard's policy in the bench; xdp-filter gets the same permitted ports.
/// The last three rules are for the classes of the checks protocol rules,
/// scope and rate limits added; the others' costs do not depend on them.
const POLICY: &str = r#"allow = ["tcp/22", "udp/53", "tcp/443", "proto/vrrp", "sctp/3868",
    { port = "tcp/2222", limit = "1/hour" },
    { port = "tcp/8443", from = ["10.0.0.0/8", "203.0.113.0/24"] }]"#;

const HOST4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const PEER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// An address behind the host (a routed guest): not one of the host's.
const ROUTED4: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 9);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);
/// The host's port of the UDP flow whose reply is measured.
const FLOW_PORT: u16 = 45000;
const FRAG_ID: u16 = 0x4242;

struct Class {
    key: &'static str,
    label: &'static str,
    frame: Vec<u8>,
    /// The guard's verdict under `POLICY` (checked, so the right path is timed).
    guard: u32,
}

fn classes() -> Vec<Class> {
    let syn = |dport| ipv4(IPPROTO_TCP, IP_DF, 0x1234, &tcp_syn(40000, dport));
    vec![
        Class {
            key: "tcp_syn_permitted",
            label: "TCP SYN to a permitted port (tcp/22)",
            frame: eth(None, ETH_P_IP, &syn(22)),
            guard: XDP_PASS,
        },
        Class {
            key: "tcp_syn_dropped",
            label: "TCP SYN to a closed port (tcp/6379)",
            frame: eth(None, ETH_P_IP, &syn(6379)),
            guard: XDP_DROP,
        },
        Class {
            key: "tcp_ack",
            label: "TCP ACK segment to a port without a rule (tcp/6379)",
            frame: eth(
                None,
                ETH_P_IP,
                &ipv4(IPPROTO_TCP, IP_DF, 0x1234, &tcp_ack(40000, 6379)),
            ),
            guard: XDP_PASS,
        },
        Class {
            key: "cidr_permitted",
            label: "TCP SYN to a CIDR-restricted port from inside (tcp/8443 from 203.0.113.0/24)",
            frame: eth(None, ETH_P_IP, &syn(8443)),
            guard: XDP_PASS,
        },
        Class {
            key: "udp_dropped",
            label: "UDP to a closed port (udp/6379)",
            frame: eth(
                None,
                ETH_P_IP,
                &ipv4(IPPROTO_UDP, IP_DF, 0x1234, &udp(40000, 6379, 32)),
            ),
            guard: XDP_DROP,
        },
        Class {
            key: "udp_flow_reply",
            label: "UDP reply to the host's own flow (53 -> 45000)",
            frame: eth(
                None,
                ETH_P_IP,
                &ipv4(IPPROTO_UDP, IP_DF, 0x1234, &udp(53, FLOW_PORT, 64)),
            ),
            guard: XDP_PASS,
        },
        Class {
            key: "ipv6_ext_headers",
            label: "IPv6 + hop-by-hop + destination options, TCP SYN to tcp/22",
            frame: eth(None, ETH_P_IPV6, &ipv6_ext_syn(22)),
            guard: XDP_PASS,
        },
        Class {
            key: "vlan",
            label: "802.1Q-tagged TCP SYN to tcp/22",
            frame: eth(Some(10), ETH_P_IP, &syn(22)),
            guard: XDP_PASS,
        },
        Class {
            key: "later_fragment",
            label: "IPv4 later fragment of a permitted UDP datagram",
            frame: eth(None, ETH_P_IP, &ipv4(IPPROTO_UDP, 185, FRAG_ID, &[0u8; 64])),
            guard: XDP_PASS,
        },
        Class {
            key: "proto_permitted",
            label: "VRRP advertisement, permitted by proto/vrrp",
            frame: eth(None, ETH_P_IP, &ipv4(IPPROTO_VRRP, 0, 0x1234, &[0x21; 20])),
            guard: XDP_PASS,
        },
        Class {
            key: "sctp_permitted",
            label: "SCTP INIT to a permitted port (sctp/3868)",
            frame: eth(
                None,
                ETH_P_IP,
                &ipv4(IPPROTO_SCTP, IP_DF, 0x1234, &sctp_init(40000, 3868)),
            ),
            guard: XDP_PASS,
        },
        Class {
            key: "tcp_syn_rate_limited",
            label: "TCP SYN over its source's limit (tcp/2222, 1/hour)",
            frame: eth(None, ETH_P_IP, &syn(2222)),
            guard: XDP_DROP,
        },
        Class {
            key: "forwarded",
            label: "TCP SYN to a closed port of a routed address (forwarded = pass)",
            frame: eth(
                None,
                ETH_P_IP,
                &ipv4_to(ROUTED4, IPPROTO_TCP, IP_DF, 0x1234, &tcp_syn(40000, 6379)),
            ),
            guard: XDP_PASS,
        },
        Class {
            key: "arp",
            label: "ARP request",
            frame: arp_request(),
            guard: XDP_PASS,
        },
    ]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Guard,
    ParseDrop,
    XdpDrop,
    ParseLookupDrop,
    XdpFilter,
}

impl Prog {
    fn key(self) -> &'static str {
        match self {
            Prog::Guard => "guard",
            Prog::ParseDrop => "parse_drop",
            Prog::XdpDrop => "xdp_drop",
            Prog::ParseLookupDrop => "parse_lookup_drop",
            Prog::XdpFilter => "xdp_filter",
        }
    }
}

struct Programs {
    guard: XdpTester,
    /// Holds `bench_xdp_drop`, `bench_parse_drop` and
    /// `bench_parse_lookup_drop`, loaded.
    baselines: Ebpf,
    xdp_filter: Option<Xdp>,
}

fn baseline<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("the object has no program {name} (rebuild portwatch)"))?;
    Ok(prog.try_into()?)
}

fn test_run(xdp: &Xdp, frame: &[u8], reps: u32) -> Result<(u32, f64)> {
    let out = xdp.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: reps,
        ..Default::default()
    })?;
    Ok((out.return_value, out.duration.as_nanos() as f64))
}

impl Programs {
    /// The verdict and the kernel's average ns per run over `reps` runs.
    fn run(&mut self, prog: Prog, frame: &[u8], reps: u32) -> Result<(u32, f64)> {
        match prog {
            Prog::Guard => {
                let (verdict, duration) = self.guard.bench(frame, reps)?;
                Ok((verdict, duration.as_nanos() as f64))
            }
            Prog::ParseDrop => test_run(
                baseline(&mut self.baselines, "bench_parse_drop")?,
                frame,
                reps,
            ),
            Prog::XdpDrop => test_run(
                baseline(&mut self.baselines, "bench_xdp_drop")?,
                frame,
                reps,
            ),
            Prog::ParseLookupDrop => test_run(
                baseline(&mut self.baselines, "bench_parse_lookup_drop")?,
                frame,
                reps,
            ),
            Prog::XdpFilter => match &self.xdp_filter {
                Some(xdp) => test_run(xdp, frame, reps),
                None => bail!("xdp-filter was not given"),
            },
        }
    }

    /// Records the flow the `udp_flow_reply` frame answers, as of now.
    fn record_flow(&mut self) -> Result<()> {
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&HOST4.octets());
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&PEER4.octets());
        let key = FlowKey {
            family: AF_INET as u8,
            proto: IPPROTO_UDP,
            _pad: 0,
            local_port: FLOW_PORT,
            remote_port: 53,
            local,
            remote,
        };
        let ns = monotonic_ns()?;
        self.guard.maps.record_flow(key, ns)?;
        Ok(())
    }

    /// Gives `bench_parse_lookup_drop` a hit for each class that needs a
    /// lookup, as the guard finds its flow, bucket, fragment or prefix.
    fn fill_lookup_floor(&mut self) -> Result<()> {
        let mut flows: aya::maps::HashMap<_, Flow4Key, u64> = self
            .baselines
            .map_mut("BENCH_FLOWS4")
            .context("the benchmark object has no BENCH_FLOWS4 (rebuild portwatch)")?
            .try_into()?;
        let now = monotonic_ns()?;
        // (protocol, local port, remote port) of the lookup classes' frames;
        // a later fragment has no ports.
        for (proto, local_port, remote_port) in [
            (IPPROTO_UDP, FLOW_PORT, 53),
            (IPPROTO_TCP, 2222, 40000),
            (IPPROTO_TCP, 8443, 40000),
            (IPPROTO_UDP, 0, 0),
        ] {
            let key = Flow4Key {
                proto,
                _pad: 0,
                local_port,
                remote_port,
                _pad2: 0,
                local: HOST4.octets(),
                remote: PEER4.octets(),
            };
            flows.insert(key, now, 0)?;
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in ns: what the kernel's clocks read.
fn monotonic_ns() -> Result<u64> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(now.tv_sec())? * 1_000_000_000 + u64::try_from(now.tv_nsec())?)
}

fn verdict(args: &[String]) -> Result<Value> {
    let reps = opt_u32(args, "--reps", 5_000_000)?;
    let rounds = opt_u32(args, "--rounds", 5)?.max(1);
    let classes = classes();

    let mut guard = XdpTester::load().context("loading the XDP guard")?;
    // The frames are the host's own: the forwarded-frame check runs on
    // every drop as it does under the guard.
    guard.set_local_addresses(&[HOST4.into(), HOST6.into()])?;
    guard.apply(&Policy::parse(POLICY)?, Mode::Enforce)?;
    let mut baselines = EbpfLoader::new()
        .load(OBJECT)
        .context("loading portwatch's object for the baselines")?;
    for name in [
        "bench_xdp_drop",
        "bench_parse_drop",
        "bench_parse_lookup_drop",
    ] {
        baseline(&mut baselines, name)?
            .load()
            .with_context(|| format!("loading {name}"))?;
    }
    let xdp_filter = match opt(args, "--xdp-filter") {
        Some(pin) => Some(
            Xdp::from_pin(pin, XdpAttachType::Interface)
                .with_context(|| format!("opening xdp-filter's program pinned at {pin}"))?,
        ),
        None => None,
    };
    let mut progs = vec![
        Prog::Guard,
        Prog::ParseDrop,
        Prog::XdpDrop,
        Prog::ParseLookupDrop,
    ];
    if xdp_filter.is_some() {
        progs.push(Prog::XdpFilter);
    }
    let mut p = Programs {
        guard,
        baselines,
        xdp_filter,
    };
    p.fill_lookup_floor()?;

    if let Some(dir) = opt(args, "--frames") {
        for class in &classes {
            let path = Path::new(dir).join(format!("{}.bin", class.key));
            std::fs::write(&path, &class.frame)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }

    // The first fragment, once: later fragments follow its verdict.
    let first = eth(
        None,
        ETH_P_IP,
        &ipv4(IPPROTO_UDP, IP_MF, FRAG_ID, &udp(40000, 53, 64)),
    );
    ensure!(
        p.guard.verdict(&first)? == XDP_PASS,
        "the guard dropped the first fragment to udp/53"
    );

    // Warm-up, and each program's verdict per class.
    let warm = reps.min(100_000);
    let mut verdicts = vec![vec![0u32; progs.len()]; classes.len()];
    for (c, class) in classes.iter().enumerate() {
        p.record_flow()?;
        for (i, prog) in progs.iter().enumerate() {
            verdicts[c][i] = p.run(*prog, &class.frame, warm)?.0;
        }
        let [guard, parse, drop, lookup, ..] = verdicts[c][..] else {
            bail!("four programs at least");
        };
        ensure!(
            guard == class.guard,
            "{}: the guard returned {guard}, expected {}",
            class.key,
            class.guard
        );
        ensure!(
            parse == XDP_DROP && drop == XDP_DROP && lookup == XDP_DROP,
            "{}: a baseline did not drop",
            class.key
        );
    }

    // Round-major, the program order rotating, so that noise spreads evenly.
    let mut ns = vec![vec![Vec::new(); progs.len()]; classes.len()];
    for round in 0..rounds as usize {
        for (c, class) in classes.iter().enumerate() {
            if class.key == "udp_flow_reply" {
                p.record_flow()?;
            }
            for k in 0..progs.len() {
                let i = (k + round) % progs.len();
                let (verdict, took) = p.run(progs[i], &class.frame, reps)?;
                ensure!(
                    verdict == verdicts[c][i],
                    "{}: {} changed its verdict mid-run ({} then {verdict})",
                    class.key,
                    progs[i].key(),
                    verdicts[c][i]
                );
                ns[c][i].push(took);
            }
        }
    }

    let egress = egress(&mut p, reps, rounds)?;

    let out: Vec<Value> = classes
        .iter()
        .enumerate()
        .map(|(c, class)| {
            let programs: serde_json::Map<String, Value> = progs
                .iter()
                .enumerate()
                .map(|(i, prog)| {
                    (
                        prog.key().to_string(),
                        json!({"verdict": verdicts[c][i], "ns": ns[c][i]}),
                    )
                })
                .collect();
            json!({
                "key": class.key,
                "label": class.label,
                "bytes": class.frame.len(),
                "programs": programs,
            })
        })
        .collect();
    Ok(json!({
        "reps": reps,
        "rounds": rounds,
        "policy": POLICY,
        "classes": out,
        "egress": egress,
    }))
}

/// tc egress on the host's own outbound datagram of a flow it already
/// recorded: what every outbound UDP packet of the host pays, next to the
/// header walk alone on the same frame.
fn egress(p: &mut Programs, reps: u32, rounds: u32) -> Result<Value> {
    let frame = eth(
        None,
        ETH_P_IP,
        &ipv4_from_to(
            HOST4,
            PEER4,
            IPPROTO_UDP,
            IP_DF,
            0x1234,
            &udp(FLOW_PORT, 53, 64),
        ),
    );
    p.guard.egress(&frame, reps.min(100_000))?;
    let (mut ns, mut parse) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ns.push(p.guard.egress(&frame, reps)?.as_nanos() as f64);
        parse.push(p.run(Prog::ParseDrop, &frame, reps)?.1);
    }
    Ok(json!({
        "label": "tc egress: an outbound UDP datagram of a recorded flow",
        "bytes": frame.len(),
        "ns": ns,
        "parse_drop_ns": parse,
    }))
}

// ---- frames (every byte written here; L4 checksums left 0: nothing
// measured reads them) ----

const IPPROTO_VRRP: u8 = 112;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_DEST: u8 = 60;
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x02];

fn eth(vlan: Option<u16>, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&PEER_MAC);
    if let Some(vid) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// PEER4 -> HOST4; `frag` is the flags-and-offset field.
fn ipv4(proto: u8, frag: u16, id: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_to(HOST4, proto, frag, id, payload)
}

/// PEER4 -> `dst`.
fn ipv4_to(dst: Ipv4Addr, proto: u8, frag: u16, id: u16, payload: &[u8]) -> Vec<u8> {
    ipv4_from_to(PEER4, dst, proto, frag, id, payload)
}

/// `src` -> `dst`.
fn ipv4_from_to(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    frag: u16,
    id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let mut sum: u32 = h
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// PEER6 -> HOST6 with a hop-by-hop and a destination options header (8
/// bytes each, PadN), then a TCP SYN.
fn ipv6_ext_syn(dport: u16) -> Vec<u8> {
    let mut payload = vec![NEXTHDR_DEST, 0, 1, 4, 0, 0, 0, 0];
    payload.extend_from_slice(&[IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
    payload.extend_from_slice(&tcp_syn(40000, dport));
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[NEXTHDR_HOP, 64]);
    h.extend_from_slice(&PEER6.octets());
    h.extend_from_slice(&HOST6.octets());
    h.extend_from_slice(&payload);
    h
}

/// A SYN with the options Linux sends (MSS, SACK, timestamps, window scale).
fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::with_capacity(40);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[10 << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(&[2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1]);
    t.extend_from_slice(&[0, 0, 0, 0, 1, 3, 3, 7]);
    t
}

/// A bare ACK segment (20-byte header, no options, no payload).
fn tcp_ack(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes());
    t.extend_from_slice(&2000u32.to_be_bytes());
    t.extend_from_slice(&[5 << 4, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// An SCTP common header and an INIT chunk (20 bytes, no parameters).
fn sctp_init(sport: u16, dport: u16) -> Vec<u8> {
    let mut c = Vec::with_capacity(32);
    c.extend_from_slice(&sport.to_be_bytes());
    c.extend_from_slice(&dport.to_be_bytes());
    c.extend_from_slice(&[0; 8]); // verification tag 0 (INIT), checksum
    c.extend_from_slice(&[1, 0, 0, 20]); // INIT, flags, length
    c.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // initiate tag
    c.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    c.extend_from_slice(&[0, 10, 0, 10]); // streams out, in
    c.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    c
}

fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let len = u16::try_from(8 + payload).unwrap_or(u16::MAX);
    let mut u = Vec::with_capacity(8 + payload);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.resize(8 + payload, 0xab);
    u
}

fn arp_request() -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&PEER_MAC);
    a.extend_from_slice(&PEER4.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&HOST4.octets());
    let mut f = eth(None, ETH_P_ARP, &a);
    f[..6].copy_from_slice(&[0xff; 6]);
    f
}

// ---- calls ----

/// Median, 90th percentile and mean of a sample, in ns.
fn stats(xs: &mut [f64]) -> Value {
    xs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| xs.get(((xs.len() as f64 * q) as usize).min(xs.len().saturating_sub(1)));
    let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    json!({
        "median": at(0.5).copied().unwrap_or(0.0),
        "p90": at(0.9).copied().unwrap_or(0.0),
        "mean": mean,
    })
}

fn ns_since(t: Instant) -> f64 {
    t.elapsed().as_nanos() as f64
}

fn calls(args: &[String]) -> Result<Value> {
    let cycles = opt_u32(args, "--cycles", 20_000)? as usize;
    // 0: the kernel picks one; a port of its own names it every time (an
    // owned port's bind hook judges only named ports).
    let port = u16::try_from(opt_u32(args, "--port", 0)?).context("--port wants 0-65535")?;
    let any = SockaddrIn::new(127, 0, 0, 1, port);
    let backlog = Backlog::new(16)?;
    let mut t = [(); 7].map(|()| Vec::with_capacity(cycles));
    let started = Instant::now();
    for _ in 0..cycles {
        // TCP: socket, bind, listen, close.
        let t0 = Instant::now();
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let t1 = Instant::now();
        bind(fd.as_raw_fd(), &any)?;
        t[0].push(ns_since(t1));
        let t2 = Instant::now();
        listen(&fd, backlog)?;
        t[1].push(ns_since(t2));
        let t3 = Instant::now();
        drop(fd);
        t[2].push(ns_since(t3));
        t[3].push(ns_since(t0));
        // UDP: socket, bind, close.
        let t0 = Instant::now();
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let t1 = Instant::now();
        bind(fd.as_raw_fd(), &any)?;
        t[4].push(ns_since(t1));
        let t2 = Instant::now();
        drop(fd);
        t[5].push(ns_since(t2));
        t[6].push(ns_since(t0));
    }
    let seconds = started.elapsed().as_secs_f64();
    let names = [
        "tcp_bind",
        "tcp_listen",
        "tcp_close",
        "tcp_cycle",
        "udp_bind",
        "udp_close",
        "udp_cycle",
    ];
    let mut out = serde_json::Map::new();
    for (name, xs) in names.iter().zip(t.iter_mut()) {
        out.insert((*name).to_string(), stats(xs));
    }
    out.insert("cycles".into(), json!(cycles));
    out.insert("seconds".into(), json!(seconds));
    Ok(Value::Object(out))
}
