//! `portwatch guard`: the listener monitor plus the XDP enforcer, in one
//! daemon. Default deny inbound, permit by exception.

pub mod attach;
pub mod links;
pub mod lock;
pub mod lockout;
pub mod owner;
pub mod pins;
pub mod reference;
pub mod testrun;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use portwatch_common::{GUARD_AUDIT, GuardConfig};

use crate::{
    cli::GuardArgs,
    compile::compile,
    control::server::{ControlServer, DEFAULT_SOCKET, resolve_group},
    guard::{
        lock::GuardLock,
        owner::{GuardState, StartArgs},
        pins::PinDir,
    },
    loader::Datapath,
    maps::MapImage,
    model::Listener,
    policy::{Exposure, Mode, Policy, PolicyError, PortRange, Rule},
    procinfo,
    sinks::{Summary, human::endpoint},
    stream::{self, Filter, GuardFeed, Signals, Stream},
};

pub const DEFAULT_POLICY: &str = "/etc/portwatch/policy.toml";

/// How long the control socket may take to write its last answers at exit.
const CONTROL_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

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
        match policy.add_rule(Rule {
            ports,
            from: Vec::new(),
            line: None,
        }) {
            // Already in the file (e.g. persisted by a runtime change): fine.
            Err(PolicyError::Duplicate { .. }) => {}
            other => other.with_context(|| format!("--allow {spec}"))?,
        }
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
    let named = if !args.iface.is_empty() {
        &args.iface
    } else {
        &policy.interfaces
    };
    let wait = std::time::Duration::from_secs(args.wait_for_iface);
    let ifaces = attach::interfaces_to_guard(named, wait).await?;
    let image = compile(&policy)?;

    // One guard at a time; the lock lives next to the control socket.
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let _lock = GuardLock::acquire(&lock_path(&socket))?;
    let pins = PinDir::new(
        args.pin_dir
            .as_deref()
            .unwrap_or(Path::new(pins::DEFAULT_PIN_DIR)),
    );
    let adopting = pins.exists();
    let result = serve(
        &args, policy, mode, &ifaces, image, &pins, adopting, &socket,
    )
    .await;
    // A guard that fails while setting up leaves nothing pinned behind it,
    // unless the datapath was already there (then it keeps enforcing).
    if result.is_err() && !adopting {
        pins.remove_all();
    }
    result
}

/// The guard from loading the datapath until it stops.
#[allow(clippy::too_many_arguments)]
async fn serve(
    args: &GuardArgs,
    policy: Policy,
    mode: Mode,
    ifaces: &[String],
    image: MapImage,
    pins: &PinDir,
    adopting: bool,
    socket: &Path,
) -> anyhow::Result<Summary> {
    let mut signals = Signals::install()?;
    // Bound before anything loads: a bad address or a port in use stops here.
    let metrics = match args.metrics {
        Some(addr) => Some(crate::metrics::MetricsServer::bind(addr).await?),
        None => None,
    };
    let mut datapath = Datapath::load_with_pins(Some(pins))?;
    datapath.attach_monitor()?;
    let (maps, drops) = datapath.guard_maps()?;
    let control_server = ControlServer::bind(
        socket,
        args.control_group.as_deref().and_then(resolve_group),
    )
    .with_context(|| format!("creating the control socket {}", socket.display()))?;
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(64);
    let (stop_control, control_stop) = tokio::sync::watch::channel(false);
    let mut control_task = tokio::spawn(control_server.serve_until(control_tx, control_stop));
    let policy_path = args
        .policy
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_POLICY));
    let mut stream = Stream::new(
        crate::logging::event_sink(args.json, args.log_format),
        Filter::default(),
    );
    stream.guard = Some(GuardFeed {
        policy: policy.clone(),
        drops,
        maps,
        ifnames: HashMap::new(),
        netns: procinfo::netns_of(std::process::id()),
        state: GuardState {
            start: StartArgs {
                policy_path,
                allow: args.allow.clone(),
                mode: args.mode.map(Mode::from),
            },
            mode,
            image: MapImage::default(),
            attached: Vec::new(),
            pin_dir: Some(pins.root.clone()),
            ifaces: ifaces.to_vec(),
            xdp_mode: args.xdp_mode,
            subscribers: Vec::new(),
            shutdown: None,
        },
        control: Some(control_rx),
        // Opened before attaching, so an interface removed meanwhile is seen.
        links: match links::LinkWatch::open() {
            Ok(watch) => Some(watch),
            Err(e) => {
                log::warn!(
                    "cannot follow interface changes (rtnetlink): {e}; a re-created interface will not be guarded again"
                );
                None
            }
        },
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
    // Adopting: move the pinned maps from what they hold to this policy,
    // openings first, so nothing both permit is dropped in between.
    let old_image = if adopting {
        feed.maps.read_image()?
    } else {
        MapImage::default()
    };
    let config = guard_config(mode, args);
    if mode == Mode::Audit {
        feed.maps.set_config(config)?;
        feed.maps.apply(&old_image, &image)?;
    } else {
        feed.maps.apply(&old_image, &image)?;
        feed.maps.set_config(config)?;
    }
    feed.state.image = image;
    if adopting {
        log::info!("adopted the pinned datapath in {}", pins.root.display());
        for stale in pins
            .pinned_interfaces()
            .iter()
            .filter(|i| !ifaces.contains(i))
        {
            pins.detach(stale);
            log::info!("{stale}: no longer in the interfaces to guard: detached");
        }
    }
    let mut ifnames = HashMap::new();
    let mut attached_all = Vec::new();
    for iface in ifaces {
        let attached = datapath.attach_guard(pins, iface, args.xdp_mode)?;
        log::info!(
            "guarding {} ({} XDP, {} mode, {} rules)",
            attached.iface,
            attached.xdp_mode,
            mode_name(mode),
            policy.rules.len()
        );
        ifnames.insert(attached.ifindex, attached.iface.clone());
        attached_all.push(attached);
    }
    if let Some(feed) = stream.guard.as_mut() {
        feed.ifnames = ifnames;
        feed.state.attached = attached_all;
    }
    notify_ready();
    stream.announce_ready()?;
    // Served from here on: a scrape never sees a guard half set up.
    let metrics_task = metrics.map(|server| {
        let (task, scrapes) = server.spawn();
        stream.metrics = Some(scrapes);
        task
    });
    stream::run(&mut datapath, &mut stream, &mut signals).await?;
    // Answers already given (a `shutdown` one among them) still reach their
    // clients; a client that does not read cannot hold the guard up.
    let _ = stop_control.send(true);
    if tokio::time::timeout(CONTROL_DRAIN, &mut control_task)
        .await
        .is_err()
    {
        control_task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    let requested = stream.guard.as_ref().and_then(|g| g.state.shutdown);
    drop(datapath); // detaches the monitor hooks; pinned links stay
    if args.detach_on_exit || requested == Some(true) {
        pins.remove_all();
        log::info!(
            "stopped: the guard is detached from {} and unpinned",
            ifaces.join(", ")
        );
    } else {
        log::info!(
            "stopped: enforcement stays on {} (pinned in {}); `portwatch down` removes it",
            ifaces.join(", "),
            pins.root.display()
        );
    }
    stream.finish()
}

/// The single-instance lock next to the control socket (SOCKET.lock).
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Tells systemd (Type=notify) that enforcement is attached, when run by it.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    if let Err(e) = sock.send_to(b"READY=1", &path) {
        log::debug!("sd_notify: {e}");
    }
}

/// `portwatch down`: stops a running guard and removes everything pinned.
pub fn down(pin_dir: Option<&Path>, socket: Option<&Path>) -> anyhow::Result<()> {
    let socket = socket
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if let Some(pid) = GuardLock::holder(&lock_path(&socket)) {
        crate::control::client::request(
            &socket,
            &crate::control::protocol::Request::Shutdown { detach: true },
        )
        .with_context(|| format!("asking the running guard (pid {pid}) to stop"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while GuardLock::holder(&lock_path(&socket)).is_some() {
            if std::time::Instant::now() > deadline {
                bail!("the guard (pid {pid}) did not stop within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        println!("stopped the guard (pid {pid})");
    }
    let pins = PinDir::new(pin_dir.unwrap_or(Path::new(pins::DEFAULT_PIN_DIR)));
    let removed = pins.remove_all();
    if removed.is_empty() {
        println!("nothing pinned in {}", pins.root.display());
    } else {
        for r in &removed {
            println!("removed {r}");
        }
    }
    Ok(())
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
