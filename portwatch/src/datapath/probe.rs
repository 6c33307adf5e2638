//! Asking the XDP guard what it would do with a packet: a crafted frame,
//! test-run (BPF_PROG_TEST_RUN) through `xdp_probe`, the guard's read-only
//! twin in the same object: the same code (one function, instantiated with
//! and without side effects), against the very maps the attached guard
//! reads. The frame carries an [`XdpProbe`] in its XDP metadata; the twin
//! decides it as the guard would, changes nothing (no counter, drop report,
//! rate-limit token, fragment or learning record) and writes its verdict
//! and reason back into the metadata. What `explain` and `verify` stand on:
//! the answer is the datapath's own, not a re-implementation of it, and the
//! attached guard pays nothing for it.

use std::{fmt, net::IpAddr, str::FromStr};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::{IpNumber, PacketBuilder};
use portwatch_common::{PROBE_MAGIC, XdpProbe};
use serde::{Deserialize, Serialize};

use super::decode::{drop_reason, pass_reason};
use crate::{
    error::{Error, Result},
    model::{DropReason, IpProto, PassReason},
};

/// XDP return codes.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// TCP flags of a probe, as `explain --flags syn,ack` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    const NAMES: [(&'static str, u8); 6] = [
        ("fin", Self::FIN),
        ("syn", Self::SYN),
        ("rst", Self::RST),
        ("psh", Self::PSH),
        ("ack", Self::ACK),
        ("urg", Self::URG),
    ];

    /// A connection attempt: what a client's first segment carries.
    pub const OPENING: TcpFlags = TcpFlags(Self::SYN);
}

impl FromStr for TcpFlags {
    type Err = String;

    /// `syn`, `syn,ack`, `fin|psh|urg`, and the scans' names `null` (none)
    /// and `xmas` (fin, psh, urg).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let mut bits = 0u8;
        for word in text.split([',', '|', '+']).map(str::trim) {
            let lower = word.to_ascii_lowercase();
            bits |= match lower.as_str() {
                "null" | "none" => 0,
                "xmas" => Self::FIN | Self::PSH | Self::URG,
                _ => Self::NAMES
                    .iter()
                    .find(|(name, _)| *name == lower)
                    .map(|(_, bit)| *bit)
                    .ok_or_else(|| {
                        format!(
                            "unknown TCP flag `{word}` (one of fin, syn, rst, psh, ack, urg, or null, xmas)"
                        )
                    })?,
            };
        }
        Ok(TcpFlags(bits))
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(_, bit)| self.0 & bit != 0)
            .map(|(name, _)| *name)
            .collect();
        if names.is_empty() {
            f.write_str("null")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// One inbound packet to ask the guard about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub proto: IpProto,
    pub src: IpAddr,
    /// One of the host's addresses (else the packet is forwarded traffic).
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP only.
    pub flags: TcpFlags,
}

impl Probe {
    /// The Ethernet frame. Checksums are left as they fall: the guard does
    /// not read them.
    pub fn frame(&self) -> Result<Vec<u8>> {
        const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
        const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
        let eth = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
            _ => {
                return Err(Error::Invalid(format!(
                    "a probe from {} to {} mixes IPv4 and IPv6",
                    self.src, self.dst
                )));
            }
        };
        let mut out = Vec::with_capacity(96);
        let written = match self.proto {
            IpProto::TCP => {
                let f = self.flags.0;
                let mut tcp = ip.tcp(self.src_port, self.dst_port, 1, 64240);
                if f & TcpFlags::FIN != 0 {
                    tcp = tcp.fin();
                }
                if f & TcpFlags::SYN != 0 {
                    tcp = tcp.syn();
                }
                if f & TcpFlags::RST != 0 {
                    tcp = tcp.rst();
                }
                if f & TcpFlags::PSH != 0 {
                    tcp = tcp.psh();
                }
                if f & TcpFlags::ACK != 0 {
                    tcp = tcp.ack(1);
                }
                if f & TcpFlags::URG != 0 {
                    tcp = tcp.urg(0);
                }
                tcp.write(&mut out, &[])
            }
            IpProto::UDP => ip
                .udp(self.src_port, self.dst_port)
                .write(&mut out, &[0; 8]),
            other => {
                // SCTP's common header starts with the ports; any other
                // protocol is judged as a whole and gets a few bytes.
                let mut payload = [0u8; 12];
                payload[0..2].copy_from_slice(&self.src_port.to_be_bytes());
                payload[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
                ip.write(&mut out, IpNumber(other.0), &payload)
            }
        };
        written.map_err(|e| Error::Invalid(format!("building the probe frame: {e}")))?;
        Ok(out)
    }
}

/// What the guard's program said about a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "reason")]
pub enum Answer {
    Pass(PassReason),
    /// Dropped; in audit mode, passed but would drop in enforce mode.
    Drop(DropReason),
}

impl Answer {
    pub fn passes(self) -> bool {
        matches!(self, Answer::Pass(_))
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Pass(why) => write!(f, "pass ({})", why.as_str()),
            Answer::Drop(why) => write!(f, "drop ({})", why.as_str()),
        }
    }
}

/// The twin from `ebpf`, loaded if it is not yet.
pub(crate) fn twin(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp> {
    let xdp: &mut Xdp = super::program(ebpf, portwatch_common::prog::XDP_PROBE)?;
    if xdp.fd().is_err() {
        xdp.load().map_err(crate::error::program_error(
            "loading the guard's probe program".into(),
            "explain and verify test-run it (Linux 5.15+ for XDP metadata in BPF_PROG_TEST_RUN)",
        ))?;
    }
    Ok(xdp)
}

const META: usize = std::mem::size_of::<XdpProbe>();

/// Test-runs `frame` through the twin with probe metadata; the action and
/// the metadata and frame as the program left them.
fn test_run(xdp: &Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut data = Vec::with_capacity(META + frame.len());
    data.extend_from_slice(&PROBE_MAGIC.to_ne_bytes());
    data.extend_from_slice(&[0; META - 4]);
    data.extend_from_slice(frame);
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex; `data` is the metadata's length.
    let mut ctx = [0u8; 24];
    ctx[0..4].copy_from_slice(&(META as u32).to_ne_bytes());
    ctx[4..8].copy_from_slice(&(data.len() as u32).to_ne_bytes());
    let mut out = vec![0u8; data.len() + 64];
    let result = xdp
        .test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .map_err(|e| Error::Program {
            what: "test-running the XDP guard".into(),
            hint: "BPF_PROG_TEST_RUN with XDP metadata needs Linux 5.15+",
            detail: e.to_string(),
        })?;
    Ok((result.return_value, out))
}

/// The kernel's clock as the guard reads it from jiffies (see
/// `GuardConfig::tick_ns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelClock {
    pub tick_ns: u64,
    pub offset_ns: u64,
}

impl KernelClock {
    /// CLOCK_MONOTONIC (ns) at the start of tick `jiffies`.
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.offset_ns)
    }
}

/// The tick lengths of the kernel's HZ choices (1000, 300, 250, 100):
/// TICK_NSEC, rounded as the kernel rounds it.
const TICKS_NS: [u64; 4] = [1_000_000, 3_333_333, 4_000_000, 10_000_000];

/// The kernel's jiffies and CLOCK_MONOTONIC (ns) at one run of the twin.
pub fn sample(xdp: &Xdp) -> Result<(u64, u64)> {
    // A frame the guard passes without a lookup: an ARP broadcast.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.resize(42, 0);
    let (_, out) = test_run(xdp, &arp)?;
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&out[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    Ok((
        word(std::mem::offset_of!(XdpProbe, jiffies)),
        word(std::mem::offset_of!(XdpProbe, now_ns)),
    ))
}

/// Reads jiffies against CLOCK_MONOTONIC through the twin until it has
/// seen ticks begin over `SPAN_NS` (half a second at most). A tick begins
/// at `offset + jiffies × tick` and is seen in the first sample after it,
/// late by the tick interrupt's latency and the gap between samples: the
/// first and last starts give the tick's length (the kernel's HZ, not
/// shown to user space), and the least late of all of them the offset.
/// None if no tick's length fits, or too few ticks were seen.
pub fn clock(xdp: &Xdp) -> Result<Option<KernelClock>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    let (mut last, mut last_ns) = sample(xdp)?;
    // (jiffies, the sample before, the sample that saw them)
    let mut edges: Vec<(u64, u64, u64)> = Vec::new();
    while std::time::Instant::now() <= deadline {
        let (jiffies, now) = sample(xdp)?;
        // A tick seen only after a preemption is known to within the gap:
        // left out.
        if jiffies != last && now.saturating_sub(last_ns) <= TIGHT_NS {
            edges.push((jiffies, last_ns, now));
            if let Some(clock) = pin_down(&edges) {
                return Ok(Some(clock));
            }
        }
        (last, last_ns) = (jiffies, now);
    }
    Ok(None)
}

/// The clock the tick starts in `edges` agree on, once there are
/// `MIN_EDGES` of them over `SPAN_NS`.
fn pin_down(edges: &[(u64, u64, u64)]) -> Option<KernelClock> {
    let (&(j0, before0, seen0), &(j1, before1, seen1)) = (edges.first()?, edges.last()?);
    if edges.len() < MIN_EDGES || seen1.saturating_sub(seen0) < SPAN_NS {
        return None;
    }
    let ticks = j1.wrapping_sub(j0).max(1);
    // The length lies between the shortest and the longest the two starts
    // allow, give or take the interrupts' latency (5%: the HZ's lengths
    // are 20% apart at least).
    let (shortest, longest) = (
        before1.saturating_sub(seen0) / ticks,
        seen1.saturating_sub(before0) / ticks,
    );
    let mut fits = TICKS_NS
        .iter()
        .copied()
        .filter(|t| (shortest.saturating_sub(t / 20)..=longest + t / 20).contains(t));
    let tick_ns = match (fits.next(), fits.next()) {
        (Some(one), None) => one,
        _ => return None,
    };
    // Each sight of a start is at or after it: the earliest-looking one
    // bounds the offset from above, the closest any sample came. Offsets
    // wrap (jiffies start near 2^32 ticks), so they are compared as signed
    // distances from the first one's.
    let reference = seen0.wrapping_sub(j0.wrapping_mul(tick_ns));
    let least_late = edges
        .iter()
        .map(|&(j, _, seen)| {
            seen.wrapping_sub(j.wrapping_mul(tick_ns))
                .wrapping_sub(reference) as i64
        })
        .min()?;
    Some(KernelClock {
        tick_ns,
        offset_ns: reference.wrapping_add(least_late as u64),
    })
}

/// How far apart the first and last tick starts are at least: each seen
/// within tens of µs, the tick's length is then known to 1%, whatever HZ.
const SPAN_NS: u64 = 10_000_000;

/// The most a tick's start may lie between two samples to count.
const TIGHT_NS: u64 = 200_000;

/// Tick starts seen at least: the offset is the least late of them.
const MIN_EDGES: usize = 4;

/// Runs `frame` through the twin (`xdp_probe`) as a probe.
pub fn run(xdp: &Xdp, frame: &[u8]) -> Result<Answer> {
    let (action, out) = test_run(xdp, frame)?;
    let magic = u32::from_ne_bytes([out[0], out[1], out[2], out[3]]);
    let (pass, drop) = (out[4], out[5]);
    let unanswered = || {
        Error::Invalid(
            "the guard's probe program did not answer the probe (a build mismatch?)".into(),
        )
    };
    if magic != PROBE_MAGIC {
        return Err(unanswered());
    }
    let answer = match (pass_reason(pass), drop_reason(drop)) {
        (Some(why), None) => Answer::Pass(why),
        (None, Some(why)) => Answer::Drop(why),
        _ => return Err(unanswered()),
    };
    // In enforce mode a drop answer comes with XDP_DROP; in audit mode
    // with XDP_PASS. Any other pairing is a program that lies.
    match (answer, action) {
        (Answer::Pass(_), XDP_PASS) | (Answer::Drop(_), XDP_PASS | XDP_DROP) => Ok(answer),
        _ => Err(Error::Invalid(format!(
            "the XDP guard answered {answer} but returned action {action}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tick starts of HZ=250 jiffies near 2^32 on a clock at 5,000 s,
    /// each seen `late[i]` after it began, the sample before 30 µs earlier.
    fn edges(late: &[u64]) -> (Vec<(u64, u64, u64)>, KernelClock) {
        let truth = KernelClock {
            tick_ns: 4_000_000,
            offset_ns: 5_000_000_000_000u64.wrapping_sub((1u64 << 32).wrapping_mul(4_000_000)),
        };
        let edges = late
            .iter()
            .enumerate()
            .map(|(i, late)| {
                let j = (1u64 << 32) + 3 * i as u64;
                let seen = truth.at(j) + late;
                (j, seen - 30_000, seen)
            })
            .collect();
        (edges, truth)
    }

    #[test]
    fn the_clock_is_pinned_to_the_least_late_tick_start() {
        let (e, truth) = edges(&[25_000, 9_000, 180_000, 14_000]);
        let clock = pin_down(&e).expect("four starts over 36 ms");
        assert_eq!(clock.tick_ns, truth.tick_ns);
        // Never ahead of the truth, and behind it by the least lateness.
        assert_eq!(clock.offset_ns, truth.offset_ns.wrapping_add(9_000));
    }

    #[test]
    fn too_few_tick_starts_or_a_length_of_no_hz_pin_nothing() {
        assert_eq!(pin_down(&edges(&[1_000, 1_000, 1_000]).0), None);
        // Three jiffies 15 ms apart: a 5 ms tick, which no HZ has.
        let (mut e, _) = edges(&[1_000; 4]);
        for (i, edge) in e.iter_mut().enumerate() {
            let later = 3_000_000 * i as u64;
            *edge = (edge.0, edge.1 + later, edge.2 + later);
        }
        assert_eq!(pin_down(&e), None);
    }

    #[test]
    fn flags_parse_by_name_and_by_scan() {
        assert_eq!("syn".parse::<TcpFlags>(), Ok(TcpFlags(0x02)));
        assert_eq!("SYN,ack".parse::<TcpFlags>(), Ok(TcpFlags(0x12)));
        assert_eq!("xmas".parse::<TcpFlags>(), Ok(TcpFlags(0x29)));
        assert_eq!("null".parse::<TcpFlags>(), Ok(TcpFlags(0)));
        assert!("synn".parse::<TcpFlags>().is_err());
        assert_eq!(TcpFlags(0x12).to_string(), "syn,ack");
        assert_eq!(TcpFlags(0).to_string(), "null");
    }

    #[test]
    fn frames_carry_ports_and_flags_where_the_guard_reads_them() -> Result<()> {
        let p = Probe {
            proto: IpProto::TCP,
            src: "10.1.2.3"
                .parse()
                .map_err(|_| Error::Invalid("addr".into()))?,
            dst: "10.1.2.4"
                .parse()
                .map_err(|_| Error::Invalid("addr".into()))?,
            src_port: 40000,
            dst_port: 5432,
            flags: "fin,psh,urg".parse().map_err(Error::Invalid)?,
        };
        let f = p.frame()?;
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14 + 9], 6);
        assert_eq!(&f[26..30], &[10, 1, 2, 3]);
        assert_eq!(&f[34..36], &40000u16.to_be_bytes());
        assert_eq!(&f[36..38], &5432u16.to_be_bytes());
        assert_eq!(f[34 + 13], 0x29);
        let sctp = Probe {
            proto: IpProto::SCTP,
            src: "2001:db8::1"
                .parse()
                .map_err(|_| Error::Invalid("addr".into()))?,
            dst: "2001:db8::2"
                .parse()
                .map_err(|_| Error::Invalid("addr".into()))?,
            ..p
        }
        .frame()?;
        assert_eq!(&sctp[12..14], &[0x86, 0xdd]);
        assert_eq!(sctp[14 + 6], 132);
        assert_eq!(&sctp[56..58], &5432u16.to_be_bytes());
        let mixed = Probe {
            dst: "2001:db8::2"
                .parse()
                .map_err(|_| Error::Invalid("addr".into()))?,
            ..p
        };
        assert!(mixed.frame().is_err());
        Ok(())
    }
}
