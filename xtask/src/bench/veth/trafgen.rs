//! One measurement of the drop benchmark: a SYN flood from trafgen in the
//! client namespace, what the server's veth processed, and the CPU time it
//! cost meanwhile.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use portwatch_lab::{Lab, run, run_within};
use serde_json::Value;

use super::configs::FLOOD_PORT;
use crate::procstat::{children_cpu_seconds, cpu_busy_seconds, proc_cpu_seconds};

pub struct Sample {
    pub pps: f64,
    /// The generator's CPU time (veth delivery and the receive path run in
    /// its softirq context here) plus ksoftirqd's and the guard daemon's,
    /// per packet.
    pub cpu_ns: f64,
    /// The guard daemon's share of `cpu_ns` (0 for the other
    /// configurations): what the flood costs user space.
    pub daemon_ns: f64,
    /// The whole machine's busy time, per packet.
    pub total_ns: f64,
    pub processed: u64,
}

/// Writes trafgen's configuration for the flood into the lab's directory:
/// SYNs from varying source ports, as a scan or flood would send.
pub fn flood_config(lab: &Lab) -> Result<std::path::PathBuf> {
    let cfg = lab.dir.join("syn.trafgen");
    std::fs::write(
        &cfg,
        format!(
            "{{\n  eth(da={}, sa={}),\n  ipv4(saddr={}, daddr={}, ttl=64, id=drnd()),\n  \
             tcp(sp=dinc(1024, 65000), dp={FLOOD_PORT}, seq=drnd(), syn, win=64240),\n}}\n",
            lab.server_mac,
            lab.client_mac,
            lab.client_v4(),
            lab.server_v4()
        ),
    )?;
    Ok(cfg)
}

/// Sends `n` SYNs with trafgen (one process, TX ring) and
/// measures what the server's veth processed and the CPU time meanwhile.
pub fn measure(
    lab: &Lab,
    cfg: &Path,
    n: u64,
    ksoftirqd: &[u32],
    daemon: Option<u32>,
) -> Result<Sample> {
    let daemon_cpu = || daemon.map_or(Ok(0.0), proc_cpu_seconds);
    let rx0 = server_rx_packets(lab)?;
    let cpu0 = cpu_busy_seconds()?;
    let daemon0 = daemon_cpu()?;
    let helpers0 = ksoftirqd_seconds(ksoftirqd) + daemon0;
    // The shell reports its children's CPU time (trafgen and its worker,
    // both waited for) from its own /proc/PID/stat once trafgen is done.
    let mut cmd = lab.client.command("sh");
    cmd.args([
        "-c",
        "trafgen \"$@\" && cat /proc/$$/stat",
        "sh",
        "--no-sock-mem",
        "--notouch-irq",
        "--cpus",
        "1",
        "--num",
        &n.to_string(),
        "--dev",
        &lab.client_if,
        "--conf",
    ])
    .arg(cfg);
    // Even at 20k packets/s it is done well within this.
    let limit = Duration::from_secs(30 + n / 20_000);
    let out = run_within(&mut cmd, limit)?;
    let cpu1 = cpu_busy_seconds()?;
    let daemon1 = daemon_cpu()?;
    let helpers1 = ksoftirqd_seconds(ksoftirqd) + daemon1;
    let rx1 = server_rx_packets(lab)?;
    let seconds = trafgen_seconds(&out)
        .with_context(|| format!("no timing line in trafgen's output:\n{out}"))?;
    let generator = children_cpu_seconds(out.lines().last().unwrap_or_default())
        .context("reading trafgen's CPU time")?;
    let processed = rx1.saturating_sub(rx0);
    ensure!(
        processed * 100 >= n * 95,
        "the server's veth processed {processed} of {n} packets"
    );
    let per_packet = |s: f64| s * 1e9 / processed as f64;
    Ok(Sample {
        pps: processed as f64 / seconds,
        cpu_ns: per_packet(generator + helpers1 - helpers0),
        daemon_ns: per_packet(daemon1 - daemon0),
        total_ns: per_packet(cpu1 - cpu0),
        processed,
    })
}

/// The server veth as `ip -s -j link show` describes it: counters and
/// the XDP programs attached.
pub fn server_link_json(lab: &Lab) -> Result<Value> {
    let out = run(
        "ip",
        &[
            "-n",
            &lab.server.name,
            "-s",
            "-j",
            "link",
            "show",
            &lab.server_if,
        ],
    )?;
    let v: Value = serde_json::from_str(&out).context("parsing `ip -j -s link`")?;
    Ok(v[0].clone())
}

/// The server veth's rx_packets (XDP verdicts included).
fn server_rx_packets(lab: &Lab) -> Result<u64> {
    server_link_json(lab)?["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no stats64.rx.packets in `ip -j -s link`")
}

/// The pids of the ksoftirqd threads (softirq work deferred from the
/// context that raised it).
pub fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

fn ksoftirqd_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|pid| proc_cpu_seconds(*pid).unwrap_or(0.0))
        .sum()
}

/// trafgen's own send time: "  1 sec, 167183 usec on CPU0 (300000 packets)".
fn trafgen_seconds(out: &str) -> Option<f64> {
    let mut total = None;
    for line in out.lines().filter(|l| l.contains(" usec on CPU")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let secs: f64 = words.first()?.parse().ok()?;
        let usecs: f64 = words.get(2)?.parse().ok()?;
        let t = secs + usecs / 1e6;
        total = Some(f64::max(total.unwrap_or(0.0), t));
    }
    total.filter(|t| *t > 0.0)
}
