//! Bounds-checked packet access shared by the XDP and tc programs.

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

/// Copies `N` bytes at `off` of the packet `[start, end)`, or None when the
/// packet is shorter. The explicit comparison is what the verifier checks.
#[inline(always)]
pub fn bytes_at<const N: usize>(start: usize, end: usize, off: usize) -> Option<[u8; N]> {
    // Offsets past 64 KiB cannot be valid and keep the verifier's range small.
    if off > 0xffff {
        return None;
    }
    let at = start + off;
    if at + N > end {
        return None;
    }
    // SAFETY: [at, at + N) lies inside the packet, as just checked; the read
    // is unaligned-safe.
    Some(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) })
}
