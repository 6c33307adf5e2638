//! The guard's clock: CLOCK_MONOTONIC at the start of the current tick,
//! read from jiffies (a load once the verifier inlines `bpf_jiffies64`)
//! with the tick length and offset user space calibrated at load. The
//! verdict ages flows, rate-limit buckets and reports by it, and tc egress
//! stamps flows with it.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use portwatch_common::GuardConfig;

/// CLOCK_MONOTONIC at the start of the current tick, the coarse clock's
/// resolution.
#[inline(always)]
pub fn now_ns(cfg: &GuardConfig) -> u64 {
    // SAFETY: bpf_jiffies64 has no preconditions.
    clock_at(unsafe { bpf_jiffies64() }, cfg)
}

/// The time at `jiffies` (inlined by the verifier, bpf_jiffies64 is a
/// load) once user space has calibrated `cfg`; until then the coarse clock
/// (a helper call).
#[inline(always)]
pub fn clock_at(jiffies: u64, cfg: &GuardConfig) -> u64 {
    if cfg.tick_ns == 0 {
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        return unsafe { bpf_ktime_get_coarse_ns() };
    }
    jiffies
        .wrapping_mul(cfg.tick_ns)
        .wrapping_add(cfg.clock_offset_ns)
}
