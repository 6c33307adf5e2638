//! The one header walk: Ethernet (up to two VLAN tags), IPv4 (options,
//! fragments) or IPv6 (up to eight extension headers), then the transport
//! ports. The guard's XDP program, the tc egress flow recorder and the
//! benchmark baseline all parse with it, over whatever byte access their
//! hook has ([`Bytes`]).
//!
//! Every read is bounds-checked; a header that runs past the frame, a
//! third VLAN tag or a ninth extension header is [`Malformed`].

use portwatch_common::{AF_INET, AF_INET6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

pub use crate::aligned::Chunk;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IPv6 extension headers followed before giving up (and dropping).
pub const MAX_EXT_HEADERS: usize = 8;

pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;

#[inline(always)]
pub fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Bounds-checked access to a frame's bytes.
pub trait Bytes {
    /// `N` bytes at `off`, or None when the frame is shorter.
    fn bytes<const N: usize>(&self, off: usize) -> Option<Chunk<N>>;
    /// Whether the first `len` bytes are all present.
    fn has(&self, len: usize) -> bool;
    /// Whether the kernel already moved the frame's outer VLAN tag out of
    /// its bytes (tc runs after the receive path untags an skb; XDP sees
    /// the frame as it came). That tag counts toward the walk's two.
    #[inline(always)]
    fn tag_stripped(&self) -> bool {
        false
    }
}

/// A header that is truncated, or more than the walk accepts.
pub struct Malformed;

/// What the walk learned. Plain fields, not Options: an Option's unset
/// payload lets the compiler store any register there, which the verifier
/// rejects. Widest first, so that every field (and any store LLVM merges
/// from neighbouring ones) sits at an offset the verifier's aligned-stack
/// rule accepts.
#[repr(C, align(8))]
pub struct Headers {
    /// Addresses in network order; IPv4 in the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The datagram id of a first fragment (valid when `first_frag`).
    pub frag_id: u32,
    /// Ports in host order, valid when `has_ports`.
    pub sport: u16,
    pub dport: u16,
    /// AF_INET or AF_INET6 (as u8); 0 for a frame that is not IP.
    pub family: u8,
    /// The IP protocol of the transport header (for a later fragment, the
    /// one its fragment header names).
    pub proto: u8,
    /// IPv4: the header's own protocol field, which names a fragmented
    /// datagram (AH's, when AH is looked through).
    pub ip_proto: u8,
    /// First fragment of several.
    pub first_frag: bool,
    pub has_ports: bool,
    /// TCP flags (byte 13), for TCP.
    pub tcp_flags: u8,
}

impl Headers {
    /// The IPv4 source: the first 4 bytes of `src`, in one load.
    #[inline(always)]
    pub fn src4(&self) -> [u8; 4] {
        // SAFETY: `src` is the first field of an 8-aligned struct, so 4
        // aligned readable bytes; byte-wise, LLVM loads and stores each.
        unsafe { self.src.as_ptr().cast::<u32>().read() }.to_ne_bytes()
    }

    /// The IPv4 destination: the first 4 bytes of `dst`, in one load.
    #[inline(always)]
    pub fn dst4(&self) -> [u8; 4] {
        // SAFETY: `dst` lies 16 bytes into an 8-aligned struct, so 4
        // aligned readable bytes.
        unsafe { self.dst.as_ptr().cast::<u32>().read() }.to_ne_bytes()
    }

    /// `slot`, all zero, written in place as 8-byte words the compiler may
    /// not merge. A `Headers` built by value is zeroed, then copied, and
    /// LLVM turns either into a call to an out-of-line memset that loops a
    /// byte at a time, which cost more per frame than the header walk.
    #[inline(always)]
    pub fn zeroed(slot: &mut core::mem::MaybeUninit<Headers>) -> &mut Headers {
        const WORDS: usize = core::mem::size_of::<Headers>() / 8;
        let words = slot.as_mut_ptr().cast::<u64>();
        let mut i = 0;
        while i < WORDS {
            // SAFETY: `Headers` is 8-aligned and WORDS words long, so each
            // store is in bounds and aligned.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
            i += 1;
        }
        // SAFETY: every byte is zero, a valid value of every field (integers,
        // byte arrays, bools).
        unsafe { slot.assume_init_mut() }
    }
}

/// Where the walk ended.
pub enum Walk {
    /// ARP, LLDP and every other non-IP protocol.
    NotIp,
    /// The transport header (of `proto`) starts at this offset.
    Transport(usize),
    /// A later fragment of datagram `id`: no transport header here.
    LaterFragment(u32),
}

/// Walks Ethernet and IP, filling `h`.
#[inline(always)]
pub fn walk<B: Bytes>(b: &B, h: &mut Headers) -> Result<Walk, Malformed> {
    let eth = b.bytes::<ETH_HLEN>(0).ok_or(Malformed)?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    // Up to two tags (802.1Q, or 802.1ad outer + 802.1Q inner), one of
    // them perhaps already stripped by the kernel.
    if is_vlan(ethertype) {
        let tag = b.bytes::<4>(off).ok_or(Malformed)?;
        ethertype = be16(tag[2], tag[3]);
        off += 4;
        if is_vlan(ethertype) {
            if b.tag_stripped() {
                return Err(Malformed);
            }
            let tag = b.bytes::<4>(off).ok_or(Malformed)?;
            ethertype = be16(tag[2], tag[3]);
            off += 4;
            if is_vlan(ethertype) {
                return Err(Malformed);
            }
        }
    }
    match ethertype {
        ETH_P_IP => ipv4(b, off, h),
        ETH_P_IPV6 => ipv6(b, off, h),
        _ => Ok(Walk::NotIp),
    }
}

#[inline(always)]
fn ipv4<B: Bytes>(b: &B, off: usize, h: &mut Headers) -> Result<Walk, Malformed> {
    let ip = b.bytes::<20>(off).ok_or(Malformed)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = be16(ip[2], ip[3]) as usize;
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || !b.has(off + ihl) {
        return Err(Malformed);
    }
    h.family = AF_INET as u8;
    h.proto = ip[9];
    h.ip_proto = ip[9];
    h.src[..4].copy_from_slice(&ip[12..16]);
    h.dst[..4].copy_from_slice(&ip[16..20]);
    let frag = be16(ip[6], ip[7]);
    let id = u32::from(be16(ip[4], ip[5]));
    if frag & 0x1fff != 0 {
        return Ok(Walk::LaterFragment(id));
    }
    if frag & 0x2000 != 0 {
        h.first_frag = true;
        h.frag_id = id;
    }
    let off = off + ihl;
    // AH (transport mode) authenticates what follows without hiding it:
    // judge what it carries, as over IPv6.
    if h.proto == NEXTHDR_AUTH {
        let e = b.bytes::<2>(off).ok_or(Malformed)?;
        let end = off + (e[1] as usize + 2) * 4;
        if !b.has(end) {
            return Err(Malformed);
        }
        h.proto = e[0];
        return Ok(Walk::Transport(end));
    }
    Ok(Walk::Transport(off))
}

#[inline(always)]
fn ipv6<B: Bytes>(b: &B, off: usize, h: &mut Headers) -> Result<Walk, Malformed> {
    let ip = b.bytes::<40>(off).ok_or(Malformed)?;
    if ip[0] >> 4 != 6 {
        return Err(Malformed);
    }
    h.family = AF_INET6 as u8;
    addresses6(&ip, h);
    let mut next = ip[6];
    let mut off = off + 40;
    // One pass per extension header, plus the one that reaches transport:
    // the pass after the 8th header accepts only a transport header.
    for i in 0..=MAX_EXT_HEADERS {
        let is_ext = matches!(
            next,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
        );
        if !is_ext {
            h.proto = next;
            return Ok(Walk::Transport(off));
        }
        if i == MAX_EXT_HEADERS {
            break;
        }
        let e = b.bytes::<2>(off).ok_or(Malformed)?;
        let len = match next {
            NEXTHDR_AUTH => (e[1] as usize + 2) * 4,
            NEXTHDR_FRAGMENT => 8,
            _ => (e[1] as usize + 1) * 8,
        };
        if next == NEXTHDR_FRAGMENT {
            let f = b.bytes::<8>(off).ok_or(Malformed)?;
            let frag = be16(f[2], f[3]);
            let id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
            if frag >> 3 != 0 {
                h.proto = f[0];
                // A later fragment names no datagram of its own.
                h.first_frag = false;
                return Ok(Walk::LaterFragment(id));
            }
            // Offset 0 without M is an atomic fragment: a whole datagram.
            // The last fragment header with M names the datagram.
            if frag & 1 != 0 {
                h.first_frag = true;
                h.frag_id = id;
            }
        }
        next = e[0];
        off += len;
        // The whole header must be in the frame.
        if !b.has(off) {
            return Err(Malformed);
        }
    }
    // Longer chains than any legitimate stack sends: refuse them.
    Err(Malformed)
}

/// Copies the IPv6 header's addresses into `h` as four 8-byte stores.
/// Not `copy_from_slice`, which may become a call to an out-of-line,
/// byte-at-a-time memmove (it did once this was inlined into two programs,
/// costing IPv6 frames ~15 ns); and volatile, because LLVM otherwise
/// merges byte stores into whatever window it likes, such as 8 bytes at
/// offset 4, which the verifier refuses on the stack (see `Chunk`).
#[inline(always)]
fn addresses6(ip: &[u8; 40], h: &mut Headers) {
    let word = |at: usize| {
        u64::from_ne_bytes([
            ip[at],
            ip[at + 1],
            ip[at + 2],
            ip[at + 3],
            ip[at + 4],
            ip[at + 5],
            ip[at + 6],
            ip[at + 7],
        ])
    };
    // `src` and `dst` are the first 32 bytes of the 8-aligned `Headers`.
    let words = (h as *mut Headers).cast::<u64>();
    // SAFETY: four aligned 8-byte stores within `h`'s first 32 bytes, which
    // are `src` then `dst` (repr(C), align(8)).
    unsafe {
        core::ptr::write_volatile(words, word(8));
        core::ptr::write_volatile(words.add(1), word(16));
        core::ptr::write_volatile(words.add(2), word(24));
        core::ptr::write_volatile(words.add(3), word(32));
    }
}

/// Reads the ports (and TCP's flags) of the transport header at `off`.
/// TCP needs its whole header, options included; UDP its 8 bytes; SCTP
/// its 12-byte common header. Other protocols have no ports:
/// `h.has_ports` stays false.
#[inline(always)]
pub fn ports<B: Bytes>(b: &B, off: usize, h: &mut Headers) -> Result<(), Malformed> {
    match h.proto {
        IPPROTO_TCP => {
            let t = b.bytes::<20>(off).ok_or(Malformed)?;
            h.sport = be16(t[0], t[1]);
            h.dport = be16(t[2], t[3]);
            h.has_ports = true;
            let doff = ((t[12] >> 4) as usize) * 4;
            if doff < 20 || !b.has(off + doff) {
                return Err(Malformed);
            }
            h.tcp_flags = t[13];
            Ok(())
        }
        IPPROTO_UDP => {
            let u = b.bytes::<8>(off).ok_or(Malformed)?;
            h.sport = be16(u[0], u[1]);
            h.dport = be16(u[2], u[3]);
            h.has_ports = true;
            Ok(())
        }
        // The 12-byte common header: ports, verification tag, checksum.
        IPPROTO_SCTP => {
            let c = b.bytes::<12>(off).ok_or(Malformed)?;
            h.sport = be16(c[0], c[1]);
            h.dport = be16(c[2], c[3]);
            h.has_ports = true;
            Ok(())
        }
        _ => Ok(()),
    }
}
