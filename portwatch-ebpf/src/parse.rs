//! Bounds-checked packet access shared by the XDP and tc programs.

use core::ptr::read_volatile;

use aya_ebpf::{bindings::xdp_md, programs::XdpContext};

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
pub fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// The packet of an XDP program, read through bounds-checked copies.
///
/// `data` and `data_end` are re-read (volatile) for every access: otherwise
/// the compiler hoists `data_end - N` out of loops, and the verifier rejects
/// any arithmetic on `data_end`.
pub struct Pkt {
    ctx: *mut xdp_md,
}

impl Pkt {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self { ctx: ctx.ctx }
    }

    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        // SAFETY: ctx is the program's context; the verifier checks both reads.
        unsafe {
            (
                read_volatile(&raw const (*self.ctx).data) as usize,
                read_volatile(&raw const (*self.ctx).data_end) as usize,
            )
        }
    }

    /// Whether the first `len` bytes are all present.
    #[inline(always)]
    pub fn has(&self, len: usize) -> bool {
        let (start, end) = self.bounds();
        len <= 0xffff && start + len <= end
    }

    /// Copies `N` bytes at `off`, or None when the frame is shorter. The
    /// explicit comparison against data_end is what the verifier checks.
    #[inline(always)]
    pub fn bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        // Offsets past 64 KiB cannot be valid and keep the verifier's range small.
        if off > 0xffff {
            return None;
        }
        let (start, end) = self.bounds();
        let at = start + off;
        if at + N > end {
            return None;
        }
        // SAFETY: [at, at + N) lies inside the packet, as just checked; the
        // read is unaligned-safe.
        Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
    }
}
