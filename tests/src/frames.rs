//! A small builder of Ethernet frames for the guard's verdict tests: no
//! packet crate, every byte written here, lengths and checksums computed.
//!
//! ```
//! use portwatch_tests::frames::{Frame, TCP_SYN, ETH_P_8021Q};
//! let frame = Frame::eth()
//!     .vlan(ETH_P_8021Q, 10)
//!     .ipv4([203, 0, 113, 7].into(), [198, 19, 0, 1].into())
//!     .tcp(40000, 22, TCP_SYN)
//!     .build();
//! assert_eq!(frame.len(), 14 + 4 + 20 + 20);
//! ```
//!
//! Stages: [`Frame::eth`] gives an [`Eth`]; from it [`Eth::ipv4`] /
//! [`Eth::ipv6`] give the network layer, whose `tcp`/`udp` give a transport
//! stage; `icmp_echo`, `payload`, [`Eth::arp_request`] and
//! [`Eth::ethertype`] give a finished [`Packet`]. Every stage ends in
//! `build() -> Vec<u8>`. Overrides (`ihl`, `total_length`, `data_offset`,
//! `length`, ...) exist to write malformed headers on purpose.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_LLDP: u16 = 0x88cc;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IGMP: u8 = 2;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VLAN_HLEN: usize = 4;

/// IPv4 flag bits of the fragment field.
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;

/// Locally administered unicast addresses; the guard does not look at them.
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x02];
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Entry point of the builder.
pub struct Frame;

impl Frame {
    /// An Ethernet header from `PEER_MAC` to `HOST_MAC`, untagged.
    pub fn eth() -> Eth {
        Eth {
            dst: HOST_MAC,
            src: PEER_MAC,
            tags: Vec::new(),
        }
    }
}

/// The Ethernet header: MACs and VLAN tags, outermost first.
#[derive(Clone, Debug)]
pub struct Eth {
    dst: [u8; 6],
    src: [u8; 6],
    tags: Vec<(u16, u16)>,
}

impl Eth {
    pub fn dst_mac(mut self, mac: [u8; 6]) -> Self {
        self.dst = mac;
        self
    }

    pub fn src_mac(mut self, mac: [u8; 6]) -> Self {
        self.src = mac;
        self
    }

    /// Appends a VLAN tag (inside the ones already added): `tpid` is
    /// 0x8100 (802.1Q) or 0x88a8 (802.1ad), `vid` the 12-bit VLAN id.
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.tags.push((tpid, vid & 0x0fff));
        self
    }

    /// Length of the Ethernet header with its tags.
    pub fn header_len(&self) -> usize {
        ETH_HLEN + VLAN_HLEN * self.tags.len()
    }

    fn write(&self, ethertype: u16, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.dst);
        out.extend_from_slice(&self.src);
        for (tpid, tci) in &self.tags {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
    }

    /// Any payload behind any EtherType.
    pub fn ethertype(self, ethertype: u16, payload: &[u8]) -> Packet {
        let mut out = Vec::with_capacity(self.header_len() + payload.len());
        self.write(ethertype, &mut out);
        out.extend_from_slice(payload);
        Packet(out)
    }

    /// An ARP who-has request from this frame's source MAC. The frame's
    /// destination MAC stays as set (use `dst_mac(BROADCAST_MAC)` for a
    /// realistic request).
    pub fn arp_request(self, sender: Ipv4Addr, target: Ipv4Addr) -> Packet {
        let mut arp = Vec::with_capacity(28);
        arp.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
        arp.extend_from_slice(&ETH_P_IP.to_be_bytes());
        arp.extend_from_slice(&[6, 4]);
        arp.extend_from_slice(&1u16.to_be_bytes()); // request
        arp.extend_from_slice(&self.src);
        arp.extend_from_slice(&sender.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&target.octets());
        self.ethertype(ETH_P_ARP, &arp)
    }

    pub fn ipv4(self, src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4 {
        Ipv4 {
            eth: self,
            src,
            dst,
            id: 0x1234,
            ttl: 64,
            frag: IP_DF,
            options: Vec::new(),
            ihl: None,
            version: 4,
            total_length: None,
        }
    }

    pub fn ipv6(self, src: Ipv6Addr, dst: Ipv6Addr) -> Ipv6 {
        Ipv6 {
            eth: self,
            src,
            dst,
            hop_limit: 64,
            exts: Vec::new(),
            payload_length: None,
        }
    }
}

/// A finished frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet(Vec<u8>);

impl Packet {
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

/// The IPv4 header. Defaults: id 0x1234, TTL 64, DF set, no options.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    eth: Eth,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    ttl: u8,
    frag: u16,
    options: Vec<u8>,
    ihl: Option<u8>,
    version: u8,
    total_length: Option<u16>,
}

impl Ipv4 {
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// A fragment: `offset` in 8-byte units (13 bits), `more` the MF flag.
    /// The first fragment of several is `fragment(0, true)`.
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.frag = (offset & 0x1fff) | if more { IP_MF } else { 0 };
        self
    }

    /// Option bytes, padded with End-of-Options to a multiple of 4; at most
    /// 40 bytes (IHL 15).
    pub fn options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len() <= 40,
            "IPv4 options hold at most 40 bytes, not {}",
            options.len()
        );
        self.options = options.to_vec();
        while !self.options.len().is_multiple_of(4) {
            self.options.push(0);
        }
        self
    }

    /// `words` 32-bit words of options (IHL 5 + `words`): NOPs, then EOL.
    pub fn nop_options(self, words: usize) -> Self {
        let mut options = vec![1u8; words * 4];
        if let Some(last) = options.last_mut() {
            *last = 0;
        }
        self.options(&options)
    }

    /// Writes this IHL instead of the computed one (malformed headers).
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl & 0x0f);
        self
    }

    /// Writes this version instead of 4 (malformed headers).
    pub fn version(mut self, version: u8) -> Self {
        self.version = version & 0x0f;
        self
    }

    /// Writes this total length instead of the computed one.
    pub fn total_length(mut self, total_length: u16) -> Self {
        self.total_length = Some(total_length);
        self
    }

    /// Length of the IPv4 header with its options.
    pub fn header_len(&self) -> usize {
        IPV4_HLEN + self.options.len()
    }

    pub fn tcp(self, sport: u16, dport: u16, flags: u8) -> Tcp {
        Tcp::new(Net::V4(self), sport, dport, flags)
    }

    pub fn udp(self, sport: u16, dport: u16) -> Udp {
        Udp::new(Net::V4(self), sport, dport)
    }

    /// An ICMP echo request.
    pub fn icmp_echo(self, id: u16, seq: u16) -> Packet {
        Net::V4(self).icmp_echo(id, seq)
    }

    /// Any protocol number with any payload (later fragments, GRE, ...).
    pub fn payload(self, proto: u8, payload: &[u8]) -> Packet {
        Packet(Net::V4(self).wrap(proto, payload))
    }
}

/// An IPv6 extension header. `len` is the header's own length field: for
/// hop-by-hop, routing and destination options the header is
/// `(len + 1) * 8` bytes, for AH `(len + 2) * 4` bytes (`len >= 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    HopByHop {
        len: u8,
    },
    Routing {
        len: u8,
    },
    DestOpts {
        len: u8,
    },
    /// `offset` in 8-byte units, `more` the M flag.
    Fragment {
        offset: u16,
        more: bool,
        id: u32,
    },
    Auth {
        len: u8,
    },
}

impl Ext {
    /// The Next Header value that announces this header.
    pub fn kind(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => NEXTHDR_HOP,
            Ext::Routing { .. } => NEXTHDR_ROUTING,
            Ext::DestOpts { .. } => NEXTHDR_DEST,
            Ext::Fragment { .. } => NEXTHDR_FRAGMENT,
            Ext::Auth { .. } => NEXTHDR_AUTH,
        }
    }

    /// Bytes on the wire.
    pub fn size(&self) -> usize {
        match *self {
            Ext::HopByHop { len } | Ext::Routing { len } | Ext::DestOpts { len } => {
                (usize::from(len) + 1) * 8
            }
            Ext::Fragment { .. } => 8,
            Ext::Auth { len } => (usize::from(len) + 2) * 4,
        }
    }

    fn write(&self, next: u8, out: &mut Vec<u8>) {
        let start = out.len();
        match *self {
            Ext::HopByHop { len } | Ext::DestOpts { len } => {
                out.extend_from_slice(&[next, len]);
                // PadN options fill the rest (Pad1 for a last single byte).
                let end = start + self.size();
                while out.len() < end {
                    let rest = end - out.len();
                    if rest == 1 {
                        out.push(0);
                    } else {
                        let n = (rest - 2).min(255);
                        out.push(1);
                        out.push(u8::try_from(n).unwrap_or(u8::MAX));
                        out.resize(out.len() + n, 0);
                    }
                }
            }
            Ext::Routing { len } => {
                // Type 0 with no segments left: processed as a no-op.
                out.extend_from_slice(&[next, len, 0, 0]);
                out.resize(start + self.size(), 0);
            }
            Ext::Fragment { offset, more, id } => {
                out.extend_from_slice(&[next, 0]);
                let field = ((offset & 0x1fff) << 3) | u16::from(more);
                out.extend_from_slice(&field.to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            Ext::Auth { len } => {
                assert!(len >= 1, "AH length field must be >= 1 (12-byte header)");
                out.extend_from_slice(&[next, len, 0, 0]);
                out.extend_from_slice(&0x0000_0100u32.to_be_bytes()); // SPI
                out.extend_from_slice(&1u32.to_be_bytes()); // sequence
                out.resize(start + self.size(), 0); // ICV
            }
        }
    }
}

/// The IPv6 header and its extension headers, in order.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    eth: Eth,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    exts: Vec<Ext>,
    payload_length: Option<u16>,
}

impl Ipv6 {
    pub fn hop_limit(mut self, hop_limit: u8) -> Self {
        self.hop_limit = hop_limit;
        self
    }

    /// Appends an extension header after the ones already added.
    pub fn ext(mut self, ext: Ext) -> Self {
        self.exts.push(ext);
        self
    }

    pub fn hop_by_hop(self, len: u8) -> Self {
        self.ext(Ext::HopByHop { len })
    }

    pub fn routing(self, len: u8) -> Self {
        self.ext(Ext::Routing { len })
    }

    pub fn dest_opts(self, len: u8) -> Self {
        self.ext(Ext::DestOpts { len })
    }

    /// A fragment header: `offset` in 8-byte units, `more` the M flag.
    pub fn fragment(self, offset: u16, more: bool, id: u32) -> Self {
        self.ext(Ext::Fragment { offset, more, id })
    }

    pub fn auth(self, len: u8) -> Self {
        self.ext(Ext::Auth { len })
    }

    /// Writes this payload length instead of the computed one.
    pub fn payload_length(mut self, len: u16) -> Self {
        self.payload_length = Some(len);
        self
    }

    /// Length of the IPv6 header with its extension headers.
    pub fn header_len(&self) -> usize {
        IPV6_HLEN + self.exts.iter().map(Ext::size).sum::<usize>()
    }

    pub fn tcp(self, sport: u16, dport: u16, flags: u8) -> Tcp {
        Tcp::new(Net::V6(self), sport, dport, flags)
    }

    pub fn udp(self, sport: u16, dport: u16) -> Udp {
        Udp::new(Net::V6(self), sport, dport)
    }

    /// An ICMPv6 echo request.
    pub fn icmp_echo(self, id: u16, seq: u16) -> Packet {
        Net::V6(self).icmp_echo(id, seq)
    }

    /// Any upper-layer protocol with any payload: the last extension
    /// header (or the IPv6 header) names `proto` as next header.
    pub fn payload(self, proto: u8, payload: &[u8]) -> Packet {
        Packet(Net::V6(self).wrap(proto, payload))
    }
}

/// The network layer under a transport header.
#[derive(Clone, Debug)]
enum Net {
    V4(Ipv4),
    V6(Ipv6),
}

impl Net {
    /// The whole frame: Ethernet, IP (and extension headers), `l4`.
    fn wrap(&self, proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Net::V4(ip) => {
                ip.eth.write(ETH_P_IP, &mut out);
                let start = out.len();
                let hlen = ip.header_len();
                let ihl = ip.ihl.unwrap_or(u8::try_from(hlen / 4).unwrap_or(0x0f));
                let total = ip
                    .total_length
                    .unwrap_or(u16::try_from(hlen + l4.len()).unwrap_or(u16::MAX));
                out.push((ip.version << 4) | ihl);
                out.push(0); // DSCP/ECN
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&ip.id.to_be_bytes());
                out.extend_from_slice(&ip.frag.to_be_bytes());
                out.extend_from_slice(&[ip.ttl, proto, 0, 0]);
                out.extend_from_slice(&ip.src.octets());
                out.extend_from_slice(&ip.dst.octets());
                out.extend_from_slice(&ip.options);
                let sum = checksum(&out[start..], 0);
                out[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
            }
            Net::V6(ip) => {
                ip.eth.write(ETH_P_IPV6, &mut out);
                let ext_len: usize = ip.exts.iter().map(Ext::size).sum();
                let payload_len = ip
                    .payload_length
                    .unwrap_or(u16::try_from(ext_len + l4.len()).unwrap_or(u16::MAX));
                out.extend_from_slice(&[0x60, 0, 0, 0]); // version, class, flow
                out.extend_from_slice(&payload_len.to_be_bytes());
                out.push(ip.exts.first().map_or(proto, Ext::kind));
                out.push(ip.hop_limit);
                out.extend_from_slice(&ip.src.octets());
                out.extend_from_slice(&ip.dst.octets());
                for (i, ext) in ip.exts.iter().enumerate() {
                    let next = ip.exts.get(i + 1).map_or(proto, Ext::kind);
                    ext.write(next, &mut out);
                }
            }
        }
        out.extend_from_slice(l4);
        out
    }

    /// The pseudo-header's partial sum for an upper-layer checksum.
    fn pseudo_sum(&self, proto: u8, len: usize) -> u32 {
        let mut pseudo = Vec::with_capacity(40);
        match self {
            Net::V4(ip) => {
                pseudo.extend_from_slice(&ip.src.octets());
                pseudo.extend_from_slice(&ip.dst.octets());
                pseudo.extend_from_slice(&[0, proto]);
                pseudo.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
            }
            Net::V6(ip) => {
                pseudo.extend_from_slice(&ip.src.octets());
                pseudo.extend_from_slice(&ip.dst.octets());
                pseudo.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, proto]);
            }
        }
        partial_sum(&pseudo, 0)
    }

    /// Fills the checksum at `at` of the upper-layer bytes `l4`.
    fn fill_checksum(&self, proto: u8, l4: &mut [u8], at: usize, zero_means_none: bool) {
        let mut sum = checksum(l4, self.pseudo_sum(proto, l4.len()));
        if zero_means_none && sum == 0 {
            sum = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }

    fn icmp_echo(self, id: u16, seq: u16) -> Packet {
        let (proto, kind) = match self {
            Net::V4(_) => (IPPROTO_ICMP, 8),
            Net::V6(_) => (IPPROTO_ICMPV6, 128),
        };
        let mut icmp = vec![kind, 0, 0, 0];
        icmp.extend_from_slice(&id.to_be_bytes());
        icmp.extend_from_slice(&seq.to_be_bytes());
        icmp.extend_from_slice(b"portwatch");
        match self {
            Net::V4(_) => {
                let sum = checksum(&icmp, 0);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            Net::V6(_) => self.fill_checksum(proto, &mut icmp, 2, false),
        }
        Packet(self.wrap(proto, &icmp))
    }
}

/// A TCP segment. Defaults: seq 1000, ack 0, window 65535, no options.
#[derive(Clone, Debug)]
pub struct Tcp {
    net: Net,
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    window: u16,
    options: Vec<u8>,
    data_offset: Option<u8>,
    payload: Vec<u8>,
}

impl Tcp {
    fn new(net: Net, sport: u16, dport: u16, flags: u8) -> Self {
        Self {
            net,
            sport,
            dport,
            flags,
            seq: 1000,
            ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
            window: 65535,
            options: Vec::new(),
            data_offset: None,
            payload: Vec::new(),
        }
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn ack_number(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    /// Option bytes, padded with End-of-Options to a multiple of 4; at most
    /// 40 bytes (data offset 15).
    pub fn options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len() <= 40,
            "TCP options hold at most 40 bytes, not {}",
            options.len()
        );
        self.options = options.to_vec();
        while !self.options.len().is_multiple_of(4) {
            self.options.push(0);
        }
        self
    }

    /// The options a Linux SYN carries: MSS 1460, SACK permitted,
    /// timestamps, NOP, window scale 7 (20 bytes).
    pub fn syn_options(self) -> Self {
        self.options(&[
            2, 4, 0x05, 0xb4, // MSS
            4, 2, // SACK permitted
            8, 10, 0, 0, 0, 1, 0, 0, 0, 0, // timestamps
            1, // NOP
            3, 3, 7, // window scale
        ])
    }

    /// Writes this data offset (in 32-bit words) instead of the computed one.
    pub fn data_offset(mut self, words: u8) -> Self {
        self.data_offset = Some(words & 0x0f);
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Length of the TCP header with its options.
    pub fn header_len(&self) -> usize {
        TCP_HLEN + self.options.len()
    }

    pub fn build(self) -> Vec<u8> {
        let hlen = self.header_len();
        let doff = self
            .data_offset
            .unwrap_or(u8::try_from(hlen / 4).unwrap_or(0x0f));
        let mut seg = Vec::with_capacity(hlen + self.payload.len());
        seg.extend_from_slice(&self.sport.to_be_bytes());
        seg.extend_from_slice(&self.dport.to_be_bytes());
        seg.extend_from_slice(&self.seq.to_be_bytes());
        seg.extend_from_slice(&self.ack.to_be_bytes());
        seg.extend_from_slice(&[doff << 4, self.flags]);
        seg.extend_from_slice(&self.window.to_be_bytes());
        seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        seg.extend_from_slice(&self.options);
        seg.extend_from_slice(&self.payload);
        self.net.fill_checksum(IPPROTO_TCP, &mut seg, 16, false);
        self.net.wrap(IPPROTO_TCP, &seg)
    }
}

/// A UDP datagram, empty unless given a payload.
#[derive(Clone, Debug)]
pub struct Udp {
    net: Net,
    sport: u16,
    dport: u16,
    payload: Vec<u8>,
    length: Option<u16>,
}

impl Udp {
    fn new(net: Net, sport: u16, dport: u16) -> Self {
        Self {
            net,
            sport,
            dport,
            payload: Vec::new(),
            length: None,
        }
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Writes this length field instead of the computed one.
    pub fn length(mut self, length: u16) -> Self {
        self.length = Some(length);
        self
    }

    pub fn build(self) -> Vec<u8> {
        let len = UDP_HLEN + self.payload.len();
        let field = self
            .length
            .unwrap_or(u16::try_from(len).unwrap_or(u16::MAX));
        let mut dgram = Vec::with_capacity(len);
        dgram.extend_from_slice(&self.sport.to_be_bytes());
        dgram.extend_from_slice(&self.dport.to_be_bytes());
        dgram.extend_from_slice(&field.to_be_bytes());
        dgram.extend_from_slice(&[0, 0]);
        dgram.extend_from_slice(&self.payload);
        self.net.fill_checksum(IPPROTO_UDP, &mut dgram, 6, true);
        self.net.wrap(IPPROTO_UDP, &dgram)
    }
}

/// Every proper prefix of `frame`, shortest (empty) first: lengths
/// `0..frame.len()`.
pub fn truncations(frame: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    (0..frame.len()).map(|len| frame[..len].to_vec())
}

/// The one's-complement sum of `data` (odd length padded with a zero)
/// added to `acc`, not yet folded.
fn partial_sum(data: &[u8], mut acc: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = match *pair {
            [hi, lo] => u16::from_be_bytes([hi, lo]),
            [hi] => u16::from_be_bytes([hi, 0]),
            _ => 0,
        };
        acc += u32::from(word);
    }
    acc
}

/// The Internet checksum of `data` with `acc` (a pseudo-header's
/// partial sum) added.
pub fn checksum(data: &[u8], acc: u32) -> u16 {
    let mut sum = partial_sum(data, acc);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    const DST4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
    const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 7);
    const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

    fn be16(frame: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([frame[at], frame[at + 1]])
    }

    fn be32(frame: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
    }

    #[test]
    fn ipv4_tcp_syn_has_its_fields_in_place() {
        let f = Frame::eth()
            .ipv4(SRC4, DST4)
            .id(0xbeef)
            .tcp(40000, 22, TCP_SYN)
            .build();
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(&f[0..6], &HOST_MAC);
        assert_eq!(&f[6..12], &PEER_MAC);
        assert_eq!(be16(&f, 12), ETH_P_IP);
        assert_eq!(f[14], 0x45, "version 4, IHL 5");
        assert_eq!(be16(&f, 16), 40, "total length");
        assert_eq!(be16(&f, 18), 0xbeef, "id");
        assert_eq!(be16(&f, 20), IP_DF, "DF, offset 0");
        assert_eq!(f[22], 64, "TTL");
        assert_eq!(f[23], IPPROTO_TCP);
        assert_eq!(&f[26..30], &SRC4.octets());
        assert_eq!(&f[30..34], &DST4.octets());
        assert_eq!(checksum(&f[14..34], 0), 0, "IPv4 header checksum verifies");
        assert_eq!(be16(&f, 34), 40000, "sport");
        assert_eq!(be16(&f, 36), 22, "dport");
        assert_eq!(be32(&f, 38), 1000, "seq");
        assert_eq!(f[46] >> 4, 5, "data offset");
        assert_eq!(f[47], TCP_SYN);
        let net = Net::V4(Frame::eth().ipv4(SRC4, DST4));
        assert_eq!(
            checksum(&f[34..], net.pseudo_sum(IPPROTO_TCP, 20)),
            0,
            "TCP checksum verifies"
        );
    }

    #[test]
    fn ipv4_options_set_ihl_and_lengths() {
        for words in 1..=10 {
            let f = Frame::eth()
                .ipv4(SRC4, DST4)
                .nop_options(words)
                .udp(5000, 53)
                .payload(b"abc")
                .build();
            let ihl = 5 + words;
            assert_eq!(f.len(), 14 + ihl * 4 + 8 + 3);
            assert_eq!(usize::from(f[14] & 0x0f), ihl);
            assert_eq!(usize::from(be16(&f, 16)), ihl * 4 + 11);
            assert_eq!(checksum(&f[14..14 + ihl * 4], 0), 0);
            let udp = 14 + ihl * 4;
            assert_eq!(be16(&f, udp + 2), 53);
            assert_eq!(be16(&f, udp + 4), 11, "UDP length");
        }
        // Odd option lengths are padded.
        let f = Frame::eth()
            .ipv4(SRC4, DST4)
            .options(&[1, 1, 1, 1, 1])
            .tcp(1, 2, TCP_ACK)
            .build();
        assert_eq!(f[14] & 0x0f, 7);
        assert_eq!(&f[34..42], &[1, 1, 1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn ipv4_fragment_fields() {
        let first = Frame::eth()
            .ipv4(SRC4, DST4)
            .id(7)
            .fragment(0, true)
            .udp(1, 53)
            .payload(&[0; 16])
            .build();
        assert_eq!(be16(&first, 20), IP_MF);
        let later = Frame::eth()
            .ipv4(SRC4, DST4)
            .id(7)
            .fragment(3, false)
            .payload(IPPROTO_UDP, &[0; 8])
            .build();
        assert_eq!(be16(&later, 20), 3);
        assert_eq!(later[23], IPPROTO_UDP);
        assert_eq!(later.len(), 14 + 20 + 8);
    }

    #[test]
    fn overrides_write_malformed_fields() {
        let f = Frame::eth()
            .ipv4(SRC4, DST4)
            .ihl(4)
            .version(6)
            .total_length(3)
            .tcp(1, 2, TCP_SYN)
            .data_offset(4)
            .build();
        assert_eq!(f[14], 0x64);
        assert_eq!(be16(&f, 16), 3);
        assert_eq!(f[46] >> 4, 4);
        let f = Frame::eth()
            .ipv6(SRC6, DST6)
            .payload_length(1)
            .udp(1, 2)
            .length(99)
            .build();
        assert_eq!(be16(&f, 18), 1);
        assert_eq!(be16(&f, 54 + 4), 99);
    }

    #[test]
    fn vlan_tags_sit_between_macs_and_ethertype() {
        let f = Frame::eth()
            .vlan(ETH_P_8021AD, 100)
            .vlan(ETH_P_8021Q, 0x1abc)
            .ipv6(SRC6, DST6)
            .udp(1, 2)
            .build();
        assert_eq!(f.len(), 14 + 8 + 40 + 8);
        assert_eq!(be16(&f, 12), ETH_P_8021AD);
        assert_eq!(be16(&f, 14), 100);
        assert_eq!(be16(&f, 16), ETH_P_8021Q);
        assert_eq!(be16(&f, 18), 0x0abc, "VID keeps 12 bits");
        assert_eq!(be16(&f, 20), ETH_P_IPV6);
        assert_eq!(f[22] >> 4, 6);
    }

    #[test]
    fn ipv6_extension_chain_links_next_headers() {
        let ip = Frame::eth()
            .ipv6(SRC6, DST6)
            .hop_by_hop(0)
            .dest_opts(1)
            .routing(2)
            .fragment(5, true, 0xdead_beef)
            .auth(4);
        assert_eq!(ip.header_len(), 40 + 8 + 16 + 24 + 8 + 24);
        let f = ip.tcp(1234, 443, TCP_SYN).build();
        assert_eq!(f.len(), 14 + 40 + 80 + 20);
        assert_eq!(be16(&f, 18), 80 + 20, "payload length");
        assert_eq!(f[20], NEXTHDR_HOP, "IPv6 next header");
        assert_eq!(&f[22..38], &SRC6.octets());
        assert_eq!(&f[38..54], &DST6.octets());
        let mut at = 54;
        // (next header, length field, size) of each extension header.
        for (next, len, size) in [
            (NEXTHDR_DEST, 0, 8),
            (NEXTHDR_ROUTING, 1, 16),
            (NEXTHDR_FRAGMENT, 2, 24),
        ] {
            assert_eq!(f[at], next, "next header at {at}");
            assert_eq!(f[at + 1], len, "length at {at}");
            at += size;
        }
        assert_eq!(f[at], NEXTHDR_AUTH, "fragment's next header");
        assert_eq!(be16(&f, at + 2), (5 << 3) | 1, "offset 5, M");
        assert_eq!(be32(&f, at + 4), 0xdead_beef);
        at += 8;
        assert_eq!(f[at], IPPROTO_TCP, "AH's next header");
        assert_eq!(f[at + 1], 4);
        at += 24;
        assert_eq!(at, 14 + 40 + 80);
        assert_eq!(be16(&f, at + 2), 443);
        // The PadN option fills hop-by-hop exactly.
        assert_eq!(&f[56..62], &[1, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn ipv6_udp_and_icmpv6_checksums_verify() {
        let udp = Frame::eth()
            .ipv6(SRC6, DST6)
            .udp(547, 546)
            .payload(b"reply")
            .build();
        let net = Net::V6(Frame::eth().ipv6(SRC6, DST6));
        assert_eq!(checksum(&udp[54..], net.pseudo_sum(IPPROTO_UDP, 13)), 0);
        let icmp = Frame::eth().ipv6(SRC6, DST6).icmp_echo(1, 2).build();
        assert_eq!(icmp[20], IPPROTO_ICMPV6);
        assert_eq!(icmp[54], 128, "echo request");
        assert_eq!(checksum(&icmp[54..], net.pseudo_sum(IPPROTO_ICMPV6, 17)), 0);
        let icmp4 = Frame::eth().ipv4(SRC4, DST4).icmp_echo(1, 2).build();
        assert_eq!(icmp4[23], IPPROTO_ICMP);
        assert_eq!(icmp4[34], 8);
        assert_eq!(checksum(&icmp4[34..], 0), 0);
    }

    #[test]
    fn tcp_options_set_data_offset() {
        let f = Frame::eth()
            .ipv4(SRC4, DST4)
            .tcp(1, 2, TCP_SYN)
            .syn_options()
            .payload(b"x")
            .build();
        assert_eq!(f.len(), 14 + 20 + 40 + 1);
        assert_eq!(f[46] >> 4, 10);
        assert_eq!(be16(&f, 16), 61);
        assert_eq!(&f[54..58], &[2, 4, 0x05, 0xb4]);
    }

    #[test]
    fn arp_request_layout() {
        let f = Frame::eth()
            .dst_mac(BROADCAST_MAC)
            .arp_request(SRC4, DST4)
            .build();
        assert_eq!(f.len(), 14 + 28);
        assert_eq!(&f[0..6], &BROADCAST_MAC);
        assert_eq!(be16(&f, 12), ETH_P_ARP);
        assert_eq!(be16(&f, 14), 1);
        assert_eq!(be16(&f, 16), ETH_P_IP);
        assert_eq!(be16(&f, 20), 1, "request");
        assert_eq!(&f[22..28], &PEER_MAC);
        assert_eq!(&f[28..32], &SRC4.octets());
        assert_eq!(&f[38..42], &DST4.octets());
    }

    #[test]
    fn truncations_yield_every_proper_prefix() {
        let f = Frame::eth().ipv4(SRC4, DST4).tcp(1, 2, TCP_SYN).build();
        let all: Vec<Vec<u8>> = truncations(&f).collect();
        assert_eq!(all.len(), f.len());
        for (len, t) in all.iter().enumerate() {
            assert_eq!(t.len(), len);
            assert_eq!(t.as_slice(), &f[..len]);
        }
    }
}
