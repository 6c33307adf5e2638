//! Byte access to a frame for the header walk ([`crate::headers`]): direct
//! packet access in XDP, `bpf_skb_load_bytes` in tc.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::xdp_md,
    programs::{TcContext, XdpContext},
};

use crate::headers::{Bytes, Chunk};

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

    /// Copies `N` bytes at `off`, or None when the frame is shorter. The
    /// explicit comparison against data_end is what the verifier checks.
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<Chunk<N>> {
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
        Some(Chunk(unsafe {
            core::ptr::read_unaligned(at as *const [u8; N])
        }))
    }
}

/// The packet of a tc program: `bpf_skb_load_bytes` also reads the
/// non-linear part of an skb.
pub struct Skb<'a>(pub &'a TcContext);

impl Bytes for Skb<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<Chunk<N>> {
        // Loaded straight into the aligned chunk: a `[u8; N]` slot could be
        // misaligned on the stack.
        self.0.load::<Chunk<N>>(off).ok()
    }

    #[inline(always)]
    fn has(&self, len: usize) -> bool {
        len <= self.0.len() as usize
    }
}
