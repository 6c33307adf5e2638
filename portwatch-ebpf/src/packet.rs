//! Byte access to a frame for the header walk ([`crate::headers`]) and what
//! the guard's verdict needs of it besides: direct packet access in XDP and
//! in tc (where an skb's headers are in its linear part), with
//! `bpf_skb_load_bytes` for what lies beyond it in tc.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_get_buff_len},
    programs::{TcContext, XdpContext},
};

use crate::{
    headers::{Bytes, Chunk},
    maps::SKB_SCRATCH,
};

/// A frame the guard judges: its bytes, plus what a count and a report
/// need of it.
pub trait Frame: Bytes {
    /// The whole frame's length, non-linear parts included.
    fn wire_len(&self) -> u64;
    /// The interface it arrived on.
    fn ifindex(&self) -> u32;
}

/// Copies `N` bytes at `at` if `[at, at + N)` lies within `[.., end)`.
/// The explicit comparison against data_end is what the verifier checks.
#[inline(always)]
fn direct<const N: usize>(at: usize, end: usize) -> Option<Chunk<N>> {
    if at + N > end {
        return None;
    }
    // SAFETY: [at, at + N) lies inside the packet, as just checked; the
    // read is unaligned-safe.
    Some(Chunk(unsafe {
        core::ptr::read_unaligned(at as *const [u8; N])
    }))
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
}

impl Bytes for Pkt {
    /// Whether the first `len` bytes are all present.
    #[inline(always)]
    fn has(&self, len: usize) -> bool {
        let (start, end) = self.bounds();
        len <= 0xffff && start + len <= end
    }

    /// Copies `N` bytes at `off`, or None when the frame is shorter.
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<Chunk<N>> {
        // Offsets past 64 KiB cannot be valid and keep the verifier's range small.
        if off > 0xffff {
            return None;
        }
        let (start, end) = self.bounds();
        direct(start + off, end)
    }
}

impl Frame for Pkt {
    #[inline(always)]
    fn wire_len(&self) -> u64 {
        // The whole frame, fragments of a multi-buffer frame included: the
        // linear part alone undercounts jumbo frames.
        // SAFETY: `ctx` is the xdp_md the kernel passed to this program.
        unsafe { bpf_xdp_get_buff_len(self.ctx) }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: ctx is the program's context.
        unsafe { (*self.ctx).ingress_ifindex }
    }
}

/// The packet of a tc program: direct reads of the skb's linear part (where
/// the stack and the drivers put the headers), `bpf_skb_load_bytes` for
/// bytes past it (a header in a fragment), so a non-linear skb is read
/// whole without being pulled or copied.
pub struct Skb<'a>(pub &'a TcContext);

impl Skb<'_> {
    #[inline(always)]
    fn skb(&self) -> *mut __sk_buff {
        self.0.skb.skb
    }

    /// `N` bytes at `off` past the linear part, through the per-CPU
    /// scratch buffer.
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<Chunk<N>> {
        if N > core::mem::size_of::<[u64; 8]>() {
            return None;
        }
        let buf = SKB_SCRATCH.get_ptr_mut(0)?;
        // SAFETY: the helper writes at most N bytes (checked above to fit)
        // into this CPU's scratch buffer, which nothing else uses while
        // the program runs.
        let rc =
            unsafe { bpf_skb_load_bytes(self.skb() as *const _, off as u32, buf.cast(), N as u32) };
        if rc != 0 {
            return None;
        }
        // SAFETY: the helper filled the first N bytes of the buffer.
        Some(Chunk(unsafe {
            core::ptr::read_unaligned(buf as *const [u8; N])
        }))
    }

    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        let skb = self.skb();
        // SAFETY: skb is the program's context; the verifier checks both reads.
        unsafe {
            (
                read_volatile(&raw const (*skb).data) as usize,
                read_volatile(&raw const (*skb).data_end) as usize,
            )
        }
    }
}

impl Bytes for Skb<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<Chunk<N>> {
        if off > 0xffff {
            return None;
        }
        let (start, end) = self.bounds();
        match direct(start + off, end) {
            Some(chunk) => Some(chunk),
            None => self.load::<N>(off),
        }
    }

    #[inline(always)]
    fn has(&self, len: usize) -> bool {
        len <= self.0.len() as usize
    }

    #[inline(always)]
    fn tag_stripped(&self) -> bool {
        // SAFETY: skb is the program's context.
        unsafe { (*self.skb()).vlan_present != 0 }
    }
}

impl Frame for Skb<'_> {
    #[inline(always)]
    fn wire_len(&self) -> u64 {
        u64::from(self.0.len())
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: skb is the program's context.
        unsafe { (*self.skb()).ingress_ifindex }
    }
}
