//! Runs the guard on crafted frames with BPF_PROG_TEST_RUN: the real
//! program (XDP, or the tc ingress one) and maps, no interface. For verdict
//! tests and the benchmarks; only built with the `test-helpers` feature,
//! never shipped.

use std::time::Duration;

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use portwatch_common::prog;

use portwatch_common::PortCounters;

use super::{
    PROGRAMS,
    maps::{GuardMaps, GuardSettings, MapImage},
    program,
};
use crate::{
    error::Error,
    model::{IpProto, Mode},
    policy::{Policy, compile::compile, slots::CounterSlots},
    sys,
};

pub use super::probe::{XDP_DROP, XDP_PASS};

/// Which of the guard's two programs a tester runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    /// At tc ingress; its actions are reported as the XDP ones.
    Tc,
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

pub struct XdpTester {
    ebpf: Ebpf,
    hook: Hook,
    pub maps: GuardMaps,
    image: MapImage,
    slots: CounterSlots,
    /// Record connection attempts in `LEARN` (see [`Self::learning`]).
    learn: bool,
}

impl XdpTester {
    /// Loads the object and the XDP program (not attached anywhere).
    pub fn load() -> anyhow::Result<Self> {
        Self::load_at(Hook::Xdp)
    }

    /// Loads the object and the guard's program for `hook`.
    pub fn load_at(hook: Hook) -> anyhow::Result<Self> {
        sys::check_privileges()?;
        let mut ebpf = EbpfLoader::new().load(PROGRAMS).map_err(Error::from)?;
        let maps = GuardMaps::open(&mut ebpf)?;
        match hook {
            Hook::Xdp => program::<Xdp>(&mut ebpf, prog::XDP_GUARD)?.load()?,
            Hook::Tc => program::<SchedClassifier>(&mut ebpf, prog::TC_GUARD)?.load()?,
        }
        let mut tester = Self {
            ebpf,
            hook,
            maps,
            image: MapImage::default(),
            slots: CounterSlots::default(),
            learn: false,
        };
        tester.apply(&Policy::default(), Mode::Enforce)?;
        Ok(tester)
    }

    /// Puts `policy` and `mode` into the maps (a diff against the last
    /// call), as the guard does; no drop reports.
    pub fn apply(&mut self, policy: &Policy, mode: Mode) -> anyhow::Result<()> {
        let mut image = compile(policy)?;
        // Each rule counts in a slot of its own, as under the guard; no
        // listeners here.
        self.slots
            .stamp(&mut image, policy, &std::collections::BTreeSet::new());
        self.maps.zero_slots(&self.slots.take_fresh())?;
        let settings = GuardSettings {
            mode,
            report_rate: 0,
            flow_timeout: Duration::from_secs(30),
            forwarded: policy.forwarded.unwrap_or_default(),
            limit_v6_prefix: policy
                .limit_ipv6_prefix
                .unwrap_or(crate::policy::limit::DEFAULT_IPV6_PREFIX),
            learn: self.learn,
        };
        self.maps.install(&self.image, &image, &settings)?;
        self.image = image;
        Ok(())
    }

    /// Turns recording in `LEARN` on or off, as audit mode and `learn
    /// --for` do.
    pub fn learning(&mut self, on: bool) -> anyhow::Result<()> {
        self.learn = on;
        Ok(self.maps.set_learning(on)?)
    }

    /// Forgets the buckets of rate-limited sources (each case of a test
    /// starts from empty state).
    pub fn clear_rate_state(&mut self) -> anyhow::Result<()> {
        let slots: Vec<u32> = self.image.limits.keys().copied().collect();
        Ok(self.maps.clear_rate_state(slots.into_iter())?)
    }

    /// The addresses frames must be sent to to count as the host's own
    /// (the guard reads them from its interfaces); frames to others are
    /// forwarded ones.
    pub fn set_local_addresses(&mut self, addrs: &[std::net::IpAddr]) -> anyhow::Result<()> {
        Ok(self
            .maps
            .set_local_addresses(&addrs.iter().copied().collect())?)
    }

    /// What the counters hold for `proto/port`: its rule's counts, or the
    /// protocol's `other` when no rule covers it.
    pub fn counters(&self, proto: impl Into<IpProto>, port: u16) -> PortCounters {
        let slot = self.slots.slot_of(proto, port);
        self.maps
            .slot_counters(std::iter::once(slot))
            .remove(&slot)
            .unwrap_or_default()
    }

    /// What the program says of `frame` when asked as `explain` asks:
    /// decided, not acted on.
    pub fn probe(&mut self, frame: &[u8]) -> anyhow::Result<super::probe::Answer> {
        Ok(super::probe::run(
            super::probe::twin(&mut self.ebpf)?,
            frame,
        )?)
    }

    /// The kernel's jiffies and CLOCK_MONOTONIC (ns), as the twin reads
    /// them.
    pub fn kernel_time(&mut self) -> anyhow::Result<(u64, u64)> {
        Ok(super::probe::sample(super::probe::twin(&mut self.ebpf)?)?)
    }

    /// Runs tc egress (which records the host's outbound flows in the same
    /// maps) on an outbound frame `repeat` times; the kernel's average
    /// time per run. Loaded on first use.
    pub fn egress(&mut self, frame: &[u8], repeat: u32) -> anyhow::Result<Duration> {
        let egress = program::<SchedClassifier>(&mut self.ebpf, prog::TC_EGRESS)?;
        if egress.fd().is_err() {
            egress.load()?;
        }
        let out = egress.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        anyhow::ensure!(
            out.return_value == TC_ACT_OK,
            "tc egress returned {}, not TC_ACT_OK",
            out.return_value
        );
        Ok(out.duration)
    }

    /// The verdict (`XDP_PASS`, `XDP_DROP`) for one frame.
    pub fn verdict(&mut self, frame: &[u8]) -> anyhow::Result<u32> {
        Ok(self.bench(frame, 1)?.0)
    }

    /// Runs the frame `repeat` times in the kernel; returns the verdict
    /// (tc's actions as the XDP ones: TC_ACT_OK as XDP_PASS, TC_ACT_SHOT
    /// as XDP_DROP, any other as 1000 + it) and the kernel's average time
    /// per run.
    pub fn bench(&mut self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        };
        let out = match self.hook {
            Hook::Xdp => program::<Xdp>(&mut self.ebpf, prog::XDP_GUARD)?.test_run(opts)?,
            Hook::Tc => {
                let out =
                    program::<SchedClassifier>(&mut self.ebpf, prog::TC_GUARD)?.test_run(opts)?;
                let action = match out.return_value {
                    TC_ACT_OK => XDP_PASS,
                    TC_ACT_SHOT => XDP_DROP,
                    other => 1000 + other,
                };
                return Ok((action, out.duration));
            }
        };
        Ok((out.return_value, out.duration))
    }
}
