//! Drop throughput on a veth pair: trafgen in one namespace sends TCP SYNs
//! to a port nothing permits; the other namespace drops them with nothing,
//! nftables (ufw-style default drop with conntrack), iptables raw, xdp-filter,
//! a bare XDP_DROP program, or portwatch's guard (native and generic XDP).
//! Configurations alternate within each round.

mod configs;
mod progtime;
mod trafgen;

use std::fmt::Write as _;

use anyhow::{Context as _, Result};
use portwatch_lab::{Lab, require_tools};
use serde_json::{Value, json};

use self::{
    configs::{CONFIGS, Config, FLOOD_PORT, PERMITTED, attach},
    trafgen::{Sample, flood_config, ksoftirqd_pids, measure},
};
use super::{
    Ctx, Section,
    attach::bare_program,
    stats::{column, config_table, median, min_max, rotated, spread, stats_json, verdict},
    verdict::kernel_worker,
};

pub fn run(ctx: &Ctx) -> Result<Section> {
    let (rounds, n) = if ctx.quick {
        (2, 200_000)
    } else {
        (5, 2_000_000)
    };
    require_tools(&[
        "trafgen",
        "nft",
        "iptables",
        "xdp-filter",
        "nsenter",
        "bpftool",
    ])?;
    let lab = Lab::new()?;
    // No ARP on the veth while trafgen counts.
    lab.pin_neighbours()?;
    let bare = bare_program(&lab.dir, "bench_xdp_drop", 1)?;
    let cfg = flood_config(&lab)?;
    let worker = kernel_worker(&ctx.root)?;

    let ksoftirqd = ksoftirqd_pids();
    let samples = rotated(rounds, CONFIGS.len(), |round, i| {
        let config = CONFIGS[i];
        let attached = attach(&ctx.portwatch, &worker, &lab, config, &bare)
            .with_context(|| format!("setting up {}", config.label()))?;
        let sample = measure_retrying(&lab, &cfg, n, &ksoftirqd, attached.guard_pid())
            .with_context(|| format!("measuring {}", config.label()))?;
        drop(attached);
        eprintln!(
            "veth round {}/{rounds}: {:<34} {:>7.0} packets/s, {:>5.0} ns CPU/packet \
             ({:>5.0} ns machine-wide), {} processed",
            round + 1,
            config.label(),
            sample.pps,
            sample.cpu_ns,
            sample.total_ns,
            sample.processed
        );
        Ok(sample)
    })?;
    // Best effort: the rounds stand without it.
    let program = program_times(ctx, &lab, &worker, &bare, &cfg, &ksoftirqd)
        .inspect_err(|e| eprintln!("veth: the programs' run time not measured: {e:#}"))
        .ok();
    Ok(report(rounds, n, &samples, program.as_deref()))
}

/// [`measure`], tried again twice at most: trafgen now and then fails its
/// last TX ring flush (EAGAIN).
fn measure_retrying(
    lab: &Lab,
    cfg: &std::path::Path,
    n: u64,
    ksoftirqd: &[u32],
    daemon: Option<u32>,
) -> Result<Sample> {
    let mut sample = measure(lab, cfg, n, ksoftirqd, daemon);
    for _ in 0..2 {
        if sample.is_ok() {
            break;
        }
        sample = measure(lab, cfg, n, ksoftirqd, daemon);
    }
    sample
}

/// The configurations whose XDP program's own run time is measured.
const TIMED: [Config; 4] = [
    Config::BareDrop,
    Config::ParseDrop,
    Config::XdpFilter,
    Config::PwNative,
];

/// The XDP programs' own run time per packet on this path, ns, one list
/// of rounds per [`TIMED`] configuration: a pass of floods of its own after
/// the rounds, with the kernel's statistics on.
fn program_times(
    ctx: &Ctx,
    lab: &Lab,
    worker: &std::path::Path,
    bare: &std::path::Path,
    cfg: &std::path::Path,
    ksoftirqd: &[u32],
) -> Result<Vec<Vec<f64>>> {
    let (rounds, n) = if ctx.quick {
        (1, 100_000)
    } else {
        (3, 500_000)
    };
    rotated(rounds, TIMED.len(), |round, i| {
        let config = TIMED[i];
        let attached = attach(&ctx.portwatch, worker, lab, config, bare)
            .with_context(|| format!("setting up {}", config.label()))?;
        let daemon = attached.guard_pid();
        let ns = progtime::program_ns(lab, n * 95 / 100, || {
            measure_retrying(lab, cfg, n, ksoftirqd, daemon).map(drop)
        })
        .with_context(|| format!("timing {}'s program", config.label()))?;
        drop(attached);
        eprintln!(
            "veth program time {}/{rounds}: {:<34} {ns:>6.1} ns per packet",
            round + 1,
            config.label()
        );
        Ok(ns)
    })
}

/// The table, the targets and latest.json's section from the samples of
/// every configuration.
fn report(rounds: usize, n: u64, samples: &[Vec<Sample>], program: Option<&[Vec<f64>]>) -> Section {
    let per_config =
        |f: fn(&Sample) -> f64| -> Vec<Vec<f64>> { samples.iter().map(|s| column(s, f)).collect() };
    let pps = per_config(|s| s.pps);
    let cpu = per_config(|s| s.cpu_ns);
    let total = per_config(|s| s.total_ns);
    let daemon = per_config(|s| s.daemon_ns);
    let med_pps = |c: Config| median(&pps[c.index()]);
    let med_cpu = |c: Config| median(&cpu[c.index()]);
    let cpu_vs_bare = med_cpu(Config::PwNative) / med_cpu(Config::BareDrop);
    let med_total = |c: Config| median(&total[c.index()]);
    let total_vs_bare = med_total(Config::PwNative) / med_total(Config::BareDrop);
    let vs_nft = med_pps(Config::PwNative) / med_pps(Config::Nft);
    let vs_filter = med_pps(Config::PwNative) / med_pps(Config::XdpFilter);
    let targets = [
        (
            "CPU per packet within 3% of bare XDP_DROP (portwatch native / bare)",
            cpu_vs_bare,
            cpu_vs_bare <= 1.03,
        ),
        (
            "throughput ≥ 1.6× nftables (portwatch native / nftables)",
            vs_nft,
            vs_nft >= 1.6,
        ),
        (
            "throughput ≥ 1.05× xdp-filter (portwatch native / xdp-filter)",
            vs_filter,
            vs_filter >= 1.05,
        ),
    ];

    let (mut md, configs_json) = config_table(
        "| configuration | packets/s: median (min–max) | vs none | CPU ns/packet: median \
         (min–max) | vs bare XDP_DROP | machine-wide busy ns/packet |\n\
         |---|---|---|---|---|---|\n",
        CONFIGS.iter().enumerate().map(|(i, config)| {
            let row = format!(
                "| {} | {} | {:.2}× | {} | {:.3}× | {} |",
                config.label(),
                spread(&pps[i], 0),
                median(&pps[i]) / med_pps(Config::None),
                spread(&cpu[i], 0),
                median(&cpu[i]) / med_cpu(Config::BareDrop),
                spread(&total[i], 0),
            );
            let json = json!({
                "label": config.label(),
                "packets_per_s": stats_json(&pps[i]),
                "cpu_ns_per_packet": stats_json(&cpu[i]),
                "machine_busy_ns_per_packet": stats_json(&total[i]),
                "daemon_cpu_ns_per_packet": stats_json(&daemon[i]),
            });
            (config.key(), row, json)
        }),
    );
    let _ = writeln!(
        md,
        "\nMethod: {rounds} rounds × {n} TCP SYNs to port {FLOOD_PORT} (varying source \
         ports) from trafgen (1 process, TX ring) over a veth pair between \
         two namespaces; configurations alternate within each round, on the receiving veth. \
         packets/s = packets the receiving veth processed / trafgen's send time. veth delivery \
         and the receive path run in softirq in the sender's context here, which the kernel \
         charges to trafgen, so CPU ns/packet = (trafgen's user+system time + ksoftirqd's + \
         the guard daemon's, for portwatch) / \
         packets processed: the generator plus everything the packets cost, without other \
         processes' load; the last column is the whole machine's busy time from /proc/stat \
         per packet (it also counts whatever else runs meanwhile). xdp-filter as documented \
         (`load -m native`, `port {FLOOD_PORT}`); bare XDP_DROP is a two-instruction program \
         assembled at run time; portwatch's policy permits only {PERMITTED}.\n"
    );
    let _ = writeln!(
        md,
        "- for reference, machine-wide busy time, portwatch native / bare: {total_vs_bare:.3}"
    );
    let floor_vs_bare = med_cpu(Config::ParseDrop) / med_cpu(Config::BareDrop);
    let _ = writeln!(
        md,
        "- the floor of a filter that reads the headers it judges (the guard's header walk, \
         then XDP_DROP) / bare XDP_DROP, CPU per packet: {floor_vs_bare:.3}; portwatch native \
         / that floor: {:.3}; throughput, that floor / xdp-filter: {:.3}",
        med_cpu(Config::PwNative) / med_cpu(Config::ParseDrop),
        med_pps(Config::ParseDrop) / med_pps(Config::XdpFilter)
    );
    let _ = writeln!(
        md,
        "- tc ingress (`--xdp-mode tc`) against the other ways to drop there, packets/s: \
         / generic XDP {:.3}, / iptables raw {:.3}, / nftables {:.3}; CPU per packet / bare \
         XDP_DROP {:.3}",
        med_pps(Config::PwTc) / med_pps(Config::PwGeneric),
        med_pps(Config::PwTc) / med_pps(Config::IptRaw),
        med_pps(Config::PwTc) / med_pps(Config::Nft),
        med_cpu(Config::PwTc) / med_cpu(Config::BareDrop)
    );
    let daemon_native = median(&daemon[Config::PwNative.index()]);
    let _ = writeln!(
        md,
        "- of portwatch native's CPU per packet, its daemon's (drop reports, housekeeping): \
         {daemon_native:.1} ns; the rest over bare XDP_DROP is the kernel's: {:.0} ns",
        med_cpu(Config::PwNative) - med_cpu(Config::BareDrop) - daemon_native
    );
    let by_program = program.map(|program| by_program_line(program, &cpu, cpu_vs_bare));
    if let Some((line, _)) = &by_program {
        let _ = writeln!(md, "{line}");
    }
    let mut targets_json = Vec::new();
    for (what, ratio, met) in targets {
        let _ = writeln!(md, "- {what}: {ratio:.3} — {}", verdict(met));
        targets_json.push(json!({"target": what, "ratio": ratio, "met": met}));
    }
    Section {
        key: "veth",
        title: "Drop throughput on a veth pair",
        json: json!({
            "rounds": rounds,
            "packets_per_round": n,
            "configs": configs_json,
            "ratios": {
                "portwatch_native_cpu_vs_bare": cpu_vs_bare,
                "portwatch_native_machine_busy_vs_bare": total_vs_bare,
                "portwatch_native_pps_vs_nftables": vs_nft,
                "portwatch_native_pps_vs_xdp_filter": vs_filter,
                "portwatch_generic_pps_vs_native": med_pps(Config::PwGeneric) / med_pps(Config::PwNative),
                "portwatch_tc_pps_vs_generic": med_pps(Config::PwTc) / med_pps(Config::PwGeneric),
                "portwatch_tc_pps_vs_iptables_raw": med_pps(Config::PwTc) / med_pps(Config::IptRaw),
                "portwatch_tc_cpu_vs_bare": med_cpu(Config::PwTc) / med_cpu(Config::BareDrop),
                "parse_drop_cpu_vs_bare": floor_vs_bare,
                "portwatch_native_cpu_vs_parse_drop": med_cpu(Config::PwNative) / med_cpu(Config::ParseDrop),
            },
            "by_program_time": by_program.map(|(_, json)| json),
            "targets": targets_json,
        }),
        markdown: md,
    }
}

/// The line on the programs' own run time, and its figures for
/// latest.json: `program` holds each [`TIMED`] configuration's rounds, ns
/// per packet; `cpu` every configuration's CPU per packet.
fn by_program_line(program: &[Vec<f64>], cpu: &[Vec<f64>], cpu_vs_bare: f64) -> (String, Value) {
    let med_cpu = |c: Config| median(&cpu[c.index()]);
    let prog = |c: Config| {
        TIMED
            .iter()
            .position(|t| *t == c)
            // NaN, not a plausible figure, if ever asked for another.
            .map_or(f64::NAN, |i| median(&program[i]))
    };
    // Each program's run time over bare XDP_DROP's, added to bare's CPU per
    // packet: what the configuration would cost if the path around the
    // program were the same in every round.
    let bare_cpu = med_cpu(Config::BareDrop);
    let by_program = |c: Config| bare_cpu + prog(c) - prog(Config::BareDrop);
    let cpu_by_program = by_program(Config::PwNative) / bare_cpu;
    let filter_by_program = by_program(Config::XdpFilter) / by_program(Config::PwNative);
    let floor_vs_filter = by_program(Config::XdpFilter) / by_program(Config::ParseDrop);
    let rest = cpu_vs_bare - cpu_by_program;
    let (bare_lo, bare_hi) = min_max(&cpu[Config::BareDrop.index()]);
    let bare_spread = (bare_hi - bare_lo) / bare_cpu;
    let line = format!(
        "- the XDP programs' own run time per packet on this path (the kernel's BPF \
         statistics, in floods of their own after the rounds; each figure includes the \
         statistics' clock reads, alike in all): bare XDP_DROP {:.1} ns, header walk {:.1} \
         ns, portwatch {:.1} ns, xdp-filter {:.1} ns (its libxdp dispatcher included). \
         Their differences, added to bare XDP_DROP's CPU per packet: portwatch native \
         {cpu_by_program:.3}× bare XDP_DROP (measured {cpu_vs_bare:.3}×; the other \
         {rest:+.3} lies outside the program, {} the rounds' spread of bare XDP_DROP's own \
         CPU per packet, {:.1}%); xdp-filter / portwatch {filter_by_program:.3}×, the \
         throughput over xdp-filter a CPU-bound path can show; xdp-filter / the header walk \
         {floor_vs_filter:.3}×, the most that any filter reading the headers could show",
        prog(Config::BareDrop),
        prog(Config::ParseDrop),
        prog(Config::PwNative),
        prog(Config::XdpFilter),
        if rest.abs() <= bare_spread {
            "within"
        } else {
            "beyond"
        },
        bare_spread * 100.0
    );
    let json = json!({
        "program_run_ns": TIMED
            .iter()
            .zip(program)
            .map(|(c, ns)| (c.key().to_string(), stats_json(ns)))
            .collect::<serde_json::Map<_, _>>(),
        "portwatch_native_cpu_vs_bare_by_program_time": cpu_by_program,
        "xdp_filter_cpu_vs_portwatch_native_by_program_time": filter_by_program,
        "xdp_filter_cpu_vs_parse_drop_by_program_time": floor_vs_filter,
    });
    (line, json)
}
