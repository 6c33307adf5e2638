//! The guard's memory and CPU time, sampled while the run goes on, and the
//! trend of its RSS.

use std::time::Instant;

use anyhow::Result;

use crate::procstat::{memory_mb, proc_cpu_seconds};

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    pub rss_kib: f64,
    pub hwm_kib: f64,
    pub cpu_s: f64,
    pub load1: f64,
}

pub fn sample(pid: u32, t0: Instant) -> Result<Sample> {
    let (rss, hwm) = memory_mb(pid)?;
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Ok(Sample {
        t: t0.elapsed().as_secs_f64(),
        rss_kib: rss * 1024.0,
        hwm_kib: hwm * 1024.0,
        cpu_s: proc_cpu_seconds(pid)?,
        load1,
    })
}

/// Least-squares slope of RSS over time, KiB per minute.
pub fn slope_kib_per_min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mt = samples.iter().map(|s| s.t / 60.0).sum::<f64>() / n;
    let mr = samples.iter().map(|s| s.rss_kib).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        let dt = s.t / 60.0 - mt;
        num += dt * (s.rss_kib - mr);
        den += dt * dt;
    }
    if den == 0.0 { 0.0 } else { num / den }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_kib_per_minute() {
        let at = |t: f64, rss: f64| Sample {
            t,
            rss_kib: rss,
            hwm_kib: rss,
            cpu_s: 0.0,
            load1: 0.0,
        };
        // +60 KiB every 30 s: 120 KiB/min.
        let s = [at(30.0, 1000.0), at(60.0, 1060.0), at(90.0, 1120.0)];
        assert!((slope_kib_per_min(&s) - 120.0).abs() < 1e-9);
        assert_eq!(slope_kib_per_min(&s[..1]), 0.0);
        let flat = [at(30.0, 5.0), at(40.0, 5.0)];
        assert_eq!(slope_kib_per_min(&flat), 0.0);
    }
}
