//! User-space hot paths: ring-buffer decoding, event formatting (JSON and
//! the human sink), policy compilation and the map diff a policy change
//! costs. `cargo bench -p portwatch --bench hot_paths`; no privileges.

use std::{
    hint::black_box,
    io,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use criterion::{Criterion, criterion_group, criterion_main};
use portwatch::{
    datapath::{
        decode::{decode_drop, decode_listen, encode_listen},
        maps::MapImage,
    },
    model::{
        DropEvent, DropReason, Event, EventKind, Listener, ListenerEvent, Origin, ProcessInfo,
        Proto, SockId,
    },
    policy::{Policy, compile::compile},
    sinks::{
        Sink as _,
        human::HumanSink,
        json::{JsonSink, to_json},
    },
};
use portwatch_common::{
    AF_INET, DropReport, IPPROTO_TCP, ListenEvent, drop_report_offsets as doff,
};

fn listen_record() -> Vec<u8> {
    let mut comm = [0u8; 16];
    comm[..7].copy_from_slice(b"python3");
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    encode_listen(&ListenEvent {
        ts_ns: 1_234_567_890,
        sock_id: 0xffff_8880_1234_5678,
        tgid: 32206,
        tid: 32206,
        uid: 0,
        port: 8765,
        family: AF_INET,
        proto: IPPROTO_TCP,
        kind: 1,
        _pad: [0; 6],
        addr,
        comm,
    })
}

fn drop_record() -> Vec<u8> {
    let mut rec = vec![0u8; DropReport::SIZE];
    rec[doff::REASON] = 0;
    rec[doff::PROTO] = IPPROTO_TCP;
    rec[doff::FAMILY] = AF_INET as u8;
    rec[doff::IFINDEX..doff::IFINDEX + 4].copy_from_slice(&2u32.to_ne_bytes());
    rec[doff::SRC_PORT..doff::SRC_PORT + 2].copy_from_slice(&40000u16.to_ne_bytes());
    rec[doff::DST_PORT..doff::DST_PORT + 2].copy_from_slice(&6379u16.to_ne_bytes());
    rec[doff::SRC..doff::SRC + 4].copy_from_slice(&[203, 0, 113, 7]);
    rec[doff::DST..doff::DST + 4].copy_from_slice(&[198, 19, 0, 1]);
    rec
}

fn listener_event() -> Event {
    Event::Listener(ListenerEvent {
        ts: SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456),
        kind: EventKind::Listen,
        origin: Origin::Live,
        listener: Listener {
            proto: Proto::Tcp,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 8765,
            sock_id: SockId::KernelAddr(0xffff_8880_1234_5678),
            netns: Some(4_026_531_833),
            process: ProcessInfo {
                pid: Some(32206),
                comm: Some("python3".into()),
                uid: Some(0),
                exe: Some("/usr/bin/python3.11".into()),
                cmdline: Some("/usr/bin/python3 -m http.server 8765".into()),
                cgroup: Some("/user.slice/user-0.slice/session-1.scope".into()),
            }
            .into(),
        },
        reach: None,
    })
}

fn drop_event() -> Event {
    Event::Drop(DropEvent {
        ts: SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456),
        iface: Some("eth0".into()),
        reason: DropReason::NoRule,
        proto: IPPROTO_TCP,
        src: Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))),
        dst: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))),
        src_port: 40000,
        dst_port: 6379,
        audit: false,
    })
}

fn decoding(c: &mut Criterion) {
    let listen = listen_record();
    let drop = drop_record();
    c.bench_function("decode/listen", |b| {
        b.iter(|| decode_listen(black_box(&listen)))
    });
    c.bench_function("decode/drop", |b| b.iter(|| decode_drop(black_box(&drop))));
}

fn formatting(c: &mut Criterion) {
    let listener = listener_event();
    let dropped = drop_event();
    c.bench_function("format/json_listener", |b| {
        b.iter(|| to_json(black_box(&listener)))
    });
    c.bench_function("format/json_drop", |b| {
        b.iter(|| to_json(black_box(&dropped)))
    });
    // A line from a fresh sink (above) renders the process's part anew;
    // in a stream (`watch --json`) it is rendered once per process.
    let mut json = JsonSink::new(io::sink());
    c.bench_function("format/json_listener_stream", |b| {
        b.iter(|| json.event(black_box(&listener)))
    });
    // One sink for every iteration, as in `watch`: the header and the user
    // name lookup happen once.
    let mut human = HumanSink::new(io::sink(), false, Some(4_026_531_833));
    c.bench_function("format/human_listener", |b| {
        b.iter(|| human.event(black_box(&listener)))
    });
    c.bench_function("format/human_drop", |b| {
        b.iter(|| human.event(black_box(&dropped)))
    });
}

/// `rules` rules: single ports, ranges and rules with sources, on disjoint
/// ports; `shift` moves a tenth of them so that two policies differ.
fn policy_text(rules: usize, shift: u16) -> String {
    let mut allow = Vec::with_capacity(rules);
    for i in 0..rules {
        let i16 = u16::try_from(i).unwrap_or(u16::MAX);
        let moved = if i % 10 == 0 { shift } else { 0 };
        let rule = match i % 4 {
            0 => format!("\"tcp/{}\"", 1000 + i16 + moved),
            1 => format!("\"udp/{}\"", 1000 + i16 + moved),
            2 => {
                let lo = 20000 + i16 * 10 + moved;
                format!("\"tcp/{lo}-{}\"", lo + 4)
            }
            _ => format!(
                "{{ port = \"tcp/{}\", from = [\"10.{}.0.0/16\", \"fd00:{:x}::/32\"] }}",
                40000 + i16 + moved,
                i % 256,
                i
            ),
        };
        allow.push(rule);
    }
    format!("allow = [{}]\n", allow.join(", "))
}

/// What `GuardMaps::apply` walks: sources added, ports set or cleared,
/// sources removed (here counted instead of written to maps).
fn diff(old: &MapImage, new: &MapImage) -> usize {
    new.src4.difference(&old.src4).count()
        + new.src6.difference(&old.src6).count()
        + new
            .ports
            .iter()
            .filter(|(slot, bits)| old.ports.get(slot) != Some(bits))
            .count()
        + old
            .ports
            .keys()
            .filter(|s| !new.ports.contains_key(s))
            .count()
        + old.src4.difference(&new.src4).count()
        + old.src6.difference(&new.src6).count()
}

fn policies(c: &mut Criterion) {
    const RULES: usize = 400;
    let text = policy_text(RULES, 0);
    let changed = policy_text(RULES, 5000);
    let (Ok(policy), Ok(other)) = (Policy::parse(&text), Policy::parse(&changed)) else {
        panic!("the bench policies must parse");
    };
    let (Ok(old), Ok(new)) = (compile(&policy), compile(&other)) else {
        panic!("the bench policies must compile");
    };
    assert!(diff(&old, &new) > 0, "the two policies must differ");
    c.bench_function("policy/parse_400_rules", |b| {
        b.iter(|| Policy::parse(black_box(&text)))
    });
    c.bench_function("policy/compile_400_rules", |b| {
        b.iter(|| compile(black_box(&policy)))
    });
    c.bench_function("policy/diff_400_rules", |b| {
        b.iter(|| diff(black_box(&old), black_box(&new)))
    });
    c.bench_function("policy/compile_and_diff_400_rules", |b| {
        b.iter(|| compile(black_box(&other)).map(|image| diff(&old, &image)))
    });
}

criterion_group!(benches, decoding, formatting, policies);
criterion_main!(benches);
