//! Bytes kept 8-aligned on the stack.
//!
//! The objects are built with misaligned loads allowed (build.rs): one load
//! per header field instead of a byte at a time. The verifier accepts that
//! for packet and context memory but never for the stack, and a plain
//! `[u8; N]` may be placed at any offset there, where LLVM then reads or
//! writes it with loads and stores the verifier refuses. What the programs
//! copy onto the stack as bytes is a [`Chunk`]; the verifier checks every
//! stack access at load time, so a miss fails the load tests, never a packet.

use aya_ebpf::helpers::generated::bpf_get_current_comm;

/// `N` bytes, 8-aligned.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Chunk<const N: usize>(pub [u8; N]);

impl<const N: usize> core::ops::Deref for Chunk<N> {
    type Target = [u8; N];

    #[inline(always)]
    fn deref(&self) -> &[u8; N] {
        &self.0
    }
}

/// The current task's name, all zero when the helper fails. aya's
/// `bpf_get_current_comm` fills a plain `[u8; 16]`, which can land
/// misaligned on the stack.
#[inline(always)]
pub fn current_comm() -> Chunk<16> {
    let mut comm = Chunk([0u8; 16]);
    // SAFETY: the helper writes at most the 16 bytes it is given, and
    // zeroes them when it fails.
    unsafe { bpf_get_current_comm(comm.0.as_mut_ptr().cast(), 16) };
    comm
}
