//! `portwatch guard`: the listener monitor plus the XDP enforcer, in one
//! daemon. Default deny inbound, permit by exception.

pub mod attach;
pub mod lockout;
pub mod testrun;

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, bail};
use portwatch_common::{GUARD_AUDIT, GuardConfig};

use crate::{
    cli::GuardArgs,
    compile::compile,
    loader::Datapath,
    maps::MapImage,
    model::Listener,
    policy::{Exposure, Mode, Policy, PortRange, Rule},
    procinfo,
    sinks::{Summary, human::endpoint},
    stream::{self, Filter, GuardFeed, Signals, Stream},
    watch::make_sink,
};

pub const DEFAULT_POLICY: &str = "/etc/portwatch/policy.toml";

/// Whether the network can reach a listener under `policy`. A listener on
/// a loopback address is out of the network's reach whatever the policy.
pub fn exposure_of(policy: &Policy, listener: &Listener) -> Exposure {
    if listener.addr.is_loopback() {
        Exposure::Blocked
    } else {
        policy.exposure(listener.proto, listener.port)
    }
}

/// The policy file (a missing default file is an empty policy) plus the
/// command line's `--allow` rules.
pub fn effective_policy(path: Option<&Path>, allow: &[String]) -> anyhow::Result<Policy> {
    let mut policy = match path {
        Some(path) => Policy::load(path)?,
        None if Path::new(DEFAULT_POLICY).exists() => Policy::load(Path::new(DEFAULT_POLICY))?,
        None => {
            log::warn!(
                "no policy file at {DEFAULT_POLICY}: only the --allow rules apply (default deny)"
            );
            Policy::default()
        }
    };
    for spec in allow {
        let ports = PortRange::parse(spec).with_context(|| format!("--allow {spec}"))?;
        policy
            .add_rule(Rule {
                ports,
                from: Vec::new(),
                line: None,
            })
            .with_context(|| format!("--allow {spec}"))?;
    }
    Ok(policy)
}

fn guard_config(mode: Mode, args: &GuardArgs) -> GuardConfig {
    GuardConfig {
        flags: if mode == Mode::Audit { GUARD_AUDIT } else { 0 },
        report_rate: args.report_rate,
        report_burst: args.report_rate.max(1) * 2,
        _pad: 0,
        flow_timeout_ns: args.flow_timeout.saturating_mul(1_000_000_000),
    }
}

pub async fn run(args: GuardArgs) -> anyhow::Result<Summary> {
    let policy = effective_policy(args.policy.as_deref(), &args.allow)?;
    let mode = args
        .mode
        .map(Mode::from)
        .or(policy.mode)
        .unwrap_or(Mode::Enforce);
    let ifaces = if !args.iface.is_empty() {
        args.iface.clone()
    } else if !policy.interfaces.is_empty() {
        policy.interfaces.clone()
    } else {
        let found = attach::default_route_interfaces();
        if found.is_empty() {
            bail!(
                "no interface to guard: none given with --iface, none in the policy's `interfaces`, \
                 and no default route to pick one from"
            );
        }
        log::info!(
            "guarding the default-route interfaces: {}",
            found.join(", ")
        );
        found
    };
    for iface in &ifaces {
        attach::ifindex(iface)?;
    }
    let image = compile(&policy)?;

    let mut signals = Signals::install()?;
    let mut datapath = Datapath::load()?;
    datapath.attach_monitor()?;
    let (maps, drops) = datapath.guard_maps()?;
    let mut stream = Stream::new(make_sink(args.json), Filter::default());
    stream.guard = Some(GuardFeed {
        policy: policy.clone(),
        drops,
        maps,
        ifnames: HashMap::new(),
        netns: procinfo::netns_of(std::process::id()),
    });
    // Lockout protection, with the listeners that exist now, before anything
    // is reported: a refusal leaves no partial stream behind.
    let found = Stream::collect_snapshot().await?;
    let own_netns = procinfo::netns_of(std::process::id());
    let local = || found.iter().filter(move |l| l.netns == own_netns);
    for l in local() {
        if exposure_of(&policy, l) == Exposure::Blocked && !l.addr.is_loopback() {
            log::warn!(
                "{} (pid {}) listens on {} {}: blocked by policy",
                l.process.comm.as_deref().unwrap_or("?"),
                l.process.pid.map_or_else(|| "?".into(), |p| p.to_string()),
                l.proto.as_str(),
                endpoint(&l.addr, l.port)
            );
        }
    }
    let ssh = std::env::var("SSH_CONNECTION").ok();
    let problems = lockout::problems(
        &policy,
        local(),
        ssh.as_deref(),
        &lockout::established_tcp(),
    );
    if !problems.is_empty() {
        if mode == Mode::Enforce && !args.force {
            bail!(
                "refusing to enforce: {}\n(fix the policy, use --mode audit first, or pass --force)",
                problems.join("\n")
            );
        }
        for p in &problems {
            log::warn!(
                "{p} (continuing: {})",
                if args.force { "--force" } else { "audit mode" }
            );
        }
    }
    stream.emit_snapshot(found)?;

    let feed = stream
        .guard
        .as_mut()
        .context("the guard feed is set above")?;
    feed.maps.set_config(guard_config(mode, &args))?;
    feed.maps.apply(&MapImage::default(), &image)?;
    let mut ifnames = HashMap::new();
    for iface in &ifaces {
        let attached = datapath.attach_guard(iface, args.xdp_mode)?;
        log::info!(
            "guarding {} ({} XDP, {} mode, {} rules)",
            attached.iface,
            attached.xdp_mode,
            mode_name(mode),
            policy.rules.len()
        );
        ifnames.insert(attached.ifindex, attached.iface);
    }
    if let Some(feed) = stream.guard.as_mut() {
        feed.ifnames = ifnames;
    }
    stream.announce_ready()?;
    stream::run(&mut datapath, &mut stream, &mut signals).await?;
    drop(datapath); // detaches XDP, tc and the monitor hooks
    log::info!("stopped: the guard is detached from {}", ifaces.join(", "));
    stream.finish()
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    }
}

/// `portwatch check-policy FILE`.
pub fn check_policy(path: &Path) -> anyhow::Result<()> {
    let policy = Policy::load(path)?;
    let image = compile(&policy)?;
    println!(
        "{}: ok: {} rules ({} ports), mode {}, interfaces {}",
        path.display(),
        policy.rules.len(),
        image.ports.len(),
        policy.mode.map_or("unset (enforce)", mode_name),
        if policy.interfaces.is_empty() {
            "unset (default-route interfaces)".to_string()
        } else {
            policy.interfaces.join(", ")
        }
    );
    for rule in &policy.rules {
        let from = if rule.from.is_empty() {
            "anywhere".to_string()
        } else {
            rule.from
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("  allow {} from {from}", rule.ports);
    }
    Ok(())
}
