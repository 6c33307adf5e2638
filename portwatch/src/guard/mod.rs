//! `portwatch guard`: the listener monitor plus the XDP enforcer, in one
//! daemon. Default deny inbound, permit by exception.
//!
//! [`run`] sets the guard up (lock, datapath, control socket, snapshot,
//! lockout check, policy, interfaces), then hands it to the event loop. The
//! guard's state lives in one [`actor::Guard`]; control requests reach it
//! through [`requests`].

mod activation;
pub mod actor;
mod binds;
pub mod confirm;
mod gate;
mod inspect;
mod learn;
mod loading;
pub mod lock;
pub mod lockout;
mod requests;

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use self::{
    actor::{Guard, Input, Parts, Shutdown, StartArgs},
    lock::GuardLock,
};
use crate::{
    control::server::{ControlServer, DEFAULT_SOCKET, resolve_group},
    datapath::{
        Datapath,
        attach::XdpMode,
        decode::{DecodeError, RawBind, decode_drop},
        maps::MapImage,
        maps::UdpBinds,
        pins::{DEFAULT_PIN_DIR, PinDir},
    },
    format::endpoint,
    iface::{interfaces_to_guard, watch::LinkWatch},
    metrics::{GuardSnapshot, MetricsServer},
    model::{Exposure, Mode},
    pipeline::{Filter, Pipeline, exposure::exposure_of},
    policy::{Policy, PolicyError, PortRange, Rule, compile::compile, store::DEFAULT_POLICY},
    procinfo,
    runloop::{self, Daemon, Flow, Signals, recv_optional},
    sinks::{Sink, Summary},
    sys::sd_notify,
};

/// How long the control socket may take to write its last answers at exit.
const CONTROL_DRAIN: Duration = Duration::from_secs(1);

/// What `portwatch guard` is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Interfaces to guard; empty: the policy's, else the default-route ones.
    pub ifaces: Vec<String>,
    /// The policy file; None: [`DEFAULT_POLICY`] if it exists.
    pub policy: Option<PathBuf>,
    /// Also permitted, from anywhere (`--allow`).
    pub allow: Vec<PortRange>,
    /// Wins over the policy's mode; default enforce.
    pub mode: Option<Mode>,
    pub xdp_mode: XdpMode,
    /// Enforce even if the policy would cut off an SSH session.
    pub force: bool,
    pub flow_timeout: Duration,
    /// Drop reports per second per CPU.
    pub report_rate: u32,
    /// Detach and unpin everything on exit.
    pub detach_on_exit: bool,
    pub pin_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    /// Members of this group may read status and follow the stream.
    pub control_group: Option<String>,
    /// How long to wait for the interfaces to guard (boot).
    pub wait_for_iface: Duration,
}

/// The policy file (a missing default file is an empty policy) plus the
/// command line's `--allow` rules.
pub fn effective_policy(path: Option<&Path>, allow: &[PortRange]) -> anyhow::Result<Policy> {
    let policy = match path {
        Some(path) => Policy::load(path)?,
        None if Path::new(DEFAULT_POLICY).exists() => Policy::load(Path::new(DEFAULT_POLICY))?,
        None => {
            log::warn!(
                "no policy file at {DEFAULT_POLICY}: only the --allow rules apply (default deny)"
            );
            Policy::default()
        }
    };
    with_start_rules(policy, allow)
}

/// `policy` with the command line's `--allow` rules added.
pub fn with_start_rules(mut policy: Policy, allow: &[PortRange]) -> anyhow::Result<Policy> {
    for ports in allow {
        match policy.add_rule(Rule::anywhere(*ports)) {
            // Already in the file (e.g. persisted by a runtime change): fine.
            Err(PolicyError::Duplicate { .. }) => {}
            other => other.with_context(|| format!("--allow {ports}"))?,
        }
    }
    Ok(policy)
}

/// The single-instance lock next to the control socket (SOCKET.lock).
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Runs the guard until a signal or a `shutdown` request; `sink` gets the
/// stream, `metrics` (already bound) is served once the guard is up.
pub async fn run(
    opts: Options,
    sink: Box<dyn Sink>,
    metrics: Option<MetricsServer>,
) -> anyhow::Result<Summary> {
    // A change left unconfirmed by a guard that stopped is undone first.
    let policy_path = opts
        .policy
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_POLICY));
    if let Some(change) = confirm::recover(&policy_path)? {
        log::warn!(
            "{change:?} was not confirmed before the guard stopped: {} is back as it was before it",
            policy_path.display()
        );
    }
    let policy = effective_policy(opts.policy.as_deref(), &opts.allow)?;
    let mode = opts.mode.or(policy.mode).unwrap_or(Mode::Enforce);
    let named = if opts.ifaces.is_empty() {
        policy.interfaces.clone()
    } else {
        opts.ifaces.clone()
    };
    let ifaces = interfaces_to_guard(&named, opts.wait_for_iface).await?;
    // Checked before anything loads.
    compile(&policy)?;

    // One guard at a time; the lock lives next to the control socket.
    let socket = opts
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let _lock = GuardLock::acquire(&lock_path(&socket))?;
    let pins = PinDir::new(
        opts.pin_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_PIN_DIR)),
    );
    let adopting = pins.exists();
    let setup = Setup {
        opts: &opts,
        policy,
        mode,
        ifaces,
        socket,
        adopting,
    };
    let result = serve(&setup, pins.clone(), metrics, sink).await;
    // A guard that fails while setting up leaves nothing pinned behind it,
    // unless the datapath was already there (then it keeps enforcing).
    if result.is_err() && !adopting {
        pins.remove_all();
    }
    result
}

struct Setup<'a> {
    opts: &'a Options,
    policy: Policy,
    mode: Mode,
    ifaces: Vec<String>,
    socket: PathBuf,
    adopting: bool,
}

/// The guard from loading the datapath until it stops.
async fn serve(
    setup: &Setup<'_>,
    pins: PinDir,
    metrics: Option<MetricsServer>,
    sink: Box<dyn Sink>,
) -> anyhow::Result<Summary> {
    let mut signals = Signals::install()?;
    let mut datapath = Datapath::load_with_pins(Some(&pins))?;
    datapath.attach_monitor_pinned(&pins)?;
    let mut feed = datapath
        .take_monitor_feed()
        .context("the monitor's ring buffer is already taken")?;
    let (maps, drops) = datapath.guard_maps()?;
    let binds = bind_hooks(&mut datapath);
    let mut udp_binds = datapath.udp_binds()?;
    let opts = setup.opts;
    let server = ControlServer::bind(
        &setup.socket,
        opts.control_group.as_deref().and_then(resolve_group),
    )
    .with_context(|| format!("creating the control socket {}", setup.socket.display()))?;
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(64);
    let (stop_control, control_stop) = tokio::sync::watch::channel(false);
    let control_task = tokio::spawn(server.serve_until(control_tx, control_stop));
    // Opened before attaching, so an interface removed meanwhile is seen.
    let links = match LinkWatch::open_with_addresses() {
        Ok(watch) => Some(watch),
        Err(e) => {
            log::warn!(
                "cannot follow interface changes (rtnetlink): {e}; a re-created interface will not be guarded again"
            );
            None
        }
    };
    // Adopting: move the pinned maps from what they hold to this policy.
    let image = if setup.adopting {
        maps.read_image()?
    } else {
        MapImage::default()
    };
    let parts = Parts {
        datapath,
        maps,
        drops,
        binds,
        start: StartArgs {
            policy_path: opts
                .policy
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_POLICY)),
            allow: opts.allow.clone(),
            mode: opts.mode,
        },
        pins,
        ifaces: setup.ifaces.clone(),
        xdp_mode: opts.xdp_mode,
        report_rate: opts.report_rate,
        flow_timeout: opts.flow_timeout,
        netns: procinfo::netns_of(std::process::id()),
        control: control_rx,
        links,
    };
    let mut guard = Guard::new(parts, image);
    let mut pipeline = Pipeline::new(sink, Filter::default());
    pipeline.track_ports();
    let result = match start(setup, &mut guard, &mut pipeline, &mut udp_binds).await {
        // Served from here on: a scrape never sees a guard half set up.
        Ok(()) => {
            let (metrics_task, scrapes) = match metrics.map(MetricsServer::spawn) {
                Some((task, rx)) => (Some(task), Some(rx)),
                None => (None, None),
            };
            let result =
                runloop::run(&mut feed, &mut pipeline, &mut guard, &mut signals, scrapes).await;
            if let Some(task) = metrics_task {
                task.abort();
            }
            result
        }
        Err(e) => Err(e),
    };
    // Whatever stops it, a change nobody confirmed does not outlive the
    // guard in the pinned maps.
    if let Some(event) = guard.revert_unconfirmed("before the guard stopped") {
        let _ = pipeline.emit(event);
    }
    finish_control(control_task, stop_control).await;
    result?;
    let detach = opts.detach_on_exit || guard.shutdown == Some(Shutdown::Detach);
    let ifaces = setup.ifaces.join(", ");
    let pins = guard.pins().clone();
    drop(guard); // closes its descriptors; pinned links stay attached
    if detach {
        pins.remove_all();
        log::info!("stopped: the guard is detached from {ifaces} and unpinned");
    } else {
        log::info!(
            "stopped: enforcement stays on {ifaces} (pinned in {}); `portwatch down` removes it",
            pins.root.display()
        );
    }
    pipeline.finish()
}

/// Owned ports at bind(): their table and reports; without them (no
/// namespace cookie: Linux before 5.14) owned ports are still gated at XDP,
/// and the guard says what is missing.
fn bind_hooks(datapath: &mut Datapath) -> Option<binds::BindHooks> {
    let cookie = match crate::sys::netns_cookie() {
        Ok(cookie) => cookie,
        Err(e) => {
            log::warn!(
                "owned ports are not enforced at bind(): the network namespace's cookie is \
                 unreadable (SO_NETNS_COOKIE, Linux 5.14+): {e}; they still open at XDP only \
                 while their owner listens"
            );
            return None;
        }
    };
    let attached = crate::sys::cgroup2_root().and_then(|root| {
        let (map, reports) = datapath.bind_guard()?;
        Ok(binds::BindHooks::new(
            map,
            reports,
            binds::Cgroups::new(root),
            cookie,
        ))
    });
    match attached {
        Ok(hooks) => Some(hooks),
        Err(e) => {
            log::warn!(
                "owned ports are not enforced at bind(): {e}; they still open at XDP only \
                 while their owner listens"
            );
            None
        }
    }
}

/// Answers already given (a `shutdown` one among them) still reach their
/// clients; a client that does not read cannot hold the guard up.
async fn finish_control(
    mut task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
) {
    let _ = stop.send(true);
    if tokio::time::timeout(CONTROL_DRAIN, &mut task)
        .await
        .is_err()
    {
        task.abort();
    }
}

/// Blocked listeners named one by one per process at start; the rest
/// are counted.
const BLOCKED_LINES_PER_PROCESS: usize = 3;

/// Snapshot, lockout check, policy, interfaces: everything between loading
/// and serving.
async fn start(
    setup: &Setup<'_>,
    guard: &mut Guard,
    pipeline: &mut Pipeline,
    udp_binds: &mut UdpBinds,
) -> anyhow::Result<()> {
    let policy = &setup.policy;
    let mode = setup.mode;
    // Lockout protection, with the listeners that exist now, before anything
    // is reported: a refusal leaves no partial stream behind.
    let found = Pipeline::collect_snapshot().await?;
    let own_netns = procinfo::netns_of(std::process::id());
    let local = || found.listeners.iter().filter(move |l| l.netns == own_netns);
    // A few lines per process, then a count: a process with thousands of
    // blocked listeners must not flood the journal.
    let mut per_process: std::collections::BTreeMap<Option<u32>, usize> = Default::default();
    for l in local() {
        if exposure_of(policy, l) == Exposure::Blocked && !l.addr.is_loopback() {
            let seen = per_process.entry(l.process.pid).or_default();
            *seen += 1;
            if *seen <= BLOCKED_LINES_PER_PROCESS {
                log::warn!(
                    "{} (pid {}) listens on {} {}: blocked by policy",
                    l.process.comm.as_deref().unwrap_or("?"),
                    l.process.pid.map_or_else(|| "?".into(), |p| p.to_string()),
                    l.proto.as_str(),
                    endpoint(&l.addr, l.port)
                );
            }
        }
    }
    for (pid, n) in per_process {
        if n > BLOCKED_LINES_PER_PROCESS {
            log::warn!(
                "pid {}: {} more listeners blocked by policy",
                pid.map_or_else(|| "?".into(), |p| p.to_string()),
                n - BLOCKED_LINES_PER_PROCESS
            );
        }
    }
    let ssh = std::env::var("SSH_CONNECTION").ok();
    let established = lockout::established_tcp(local(), ssh.as_deref());
    let problems = lockout::problems(policy, local(), ssh.as_deref(), &established);
    if !problems.is_empty() {
        if mode == Mode::Enforce && !setup.opts.force {
            bail!(
                "refusing to enforce: {}\n(fix the policy, use --mode audit first, or pass --force)",
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        for p in &problems {
            log::warn!(
                "{p} (continuing: {})",
                if setup.opts.force {
                    "--force"
                } else {
                    "audit mode"
                }
            );
        }
    }
    // The host's addresses go into the kernel before the policy and the
    // program: until they are there, no frame is the host's own.
    guard.refresh_ifaces();
    guard.seed_flows();
    guard.seed_gate(policy, &found.listeners);
    guard
        .install(policy.clone(), mode)
        .map_err(anyhow::Error::msg)?;
    if setup.adopting {
        let pins = guard.pins();
        log::info!("adopted the pinned datapath in {}", pins.root.display());
        for stale in pins
            .pinned_interfaces()
            .iter()
            .filter(|i| !setup.ifaces.contains(i))
        {
            pins.detach(stale);
            log::info!("{stale}: no longer in the interfaces to guard: detached");
        }
    }
    let rules = guard.policy().rules.len();
    for attached in guard.attach_all()? {
        log::info!(
            "guarding {} ({}, {mode} mode, {rules} rules){}",
            attached.iface,
            attached.xdp_mode.hook(),
            attached
                .why
                .as_ref()
                .map(|w| format!("; {w}"))
                .unwrap_or_default()
        );
    }
    // Exposure is judged over every way in, once the guard stands in its
    // own: an interface with addresses that it does not guard is a way
    // around it.
    for iface in guard.exposure_view().unguarded() {
        let addrs: Vec<String> = iface.addrs.iter().map(ToString::to_string).collect();
        log::warn!(
            "{} ({}) is not guarded: listeners reachable through it are exposed whatever the \
             policy (guard it with --iface or the policy's `interfaces`)",
            iface.name,
            addrs.join(", ")
        );
    }
    pipeline.set_exposure(guard.exposure_view());
    pipeline.emit_snapshot(found)?;
    if let Err(e) = pipeline.adopt_udp_binds(udp_binds).await {
        log::warn!("{e:#}: UDP listeners open before the start may not be seen closing");
    }
    // The snapshot's listened ports get their counter slots, and owned
    // ports whose owner listens open.
    guard.listeners_changed(pipeline);
    guard.regate(pipeline)?;
    guard.verify_after(pipeline, "start");
    sd_notify("READY=1");
    pipeline.announce_ready()?;
    Ok(())
}

impl Daemon for Guard {
    type Input = Input;

    async fn next(&mut self) -> io::Result<Input> {
        let mut drops = Vec::new();
        let mut binds = Vec::new();
        let layout_due = self.layout_due();
        let control = self.control.as_mut();
        let links = self.links.as_mut();
        let housekeeping = self
            .housekeeping
            .get_or_insert_with(|| tokio::time::interval(actor::HOUSEKEEPING));
        let unconfirmed = self.awaiting.as_ref().map(|a| a.at);
        let verifying = self.verify_run.is_some();
        tokio::select! {
            _ = housekeeping.tick() => Ok(Input::Housekeeping),
            () = sleep_until(unconfirmed) => Ok(Input::ConfirmExpired),
            () = sleep_until(layout_due) => Ok(Input::LayOutCounters),
            req = recv_optional(control) => match req {
                Some(req) => Ok(Input::Control(Box::new(req))),
                // The server is gone: nothing more comes from there.
                None => {
                    self.control = None;
                    Ok(Input::Links(Vec::new()))
                }
            },
            // Drop reports wake the loop once, and are read together
            // `DROPS_LINGER` later.
            read = self.drops.read_gathered(actor::DROPS_LINGER, |rec| drops.push(decode_drop(rec))) => {
                read?;
                Ok(Input::Drops(drops))
            }
            news = next_binds(self.binds.as_mut(), &mut binds) => Ok(match news? {
                binds::BindNews::Reports => Input::Binds(binds),
                binds::BindNews::CgroupsChanged => Input::CgroupsChanged,
            }),
            changes = next_links(links) => Ok(Input::Links(changes?)),
            // The guard holds the sender: this never ends.
            Some(loaded) = self.loaded_rx.recv() => Ok(Input::Loaded(Box::new(loaded))),
            // The runtime has one thread: the verify goes on after the
            // scheduler has run the control server's tasks and polled the
            // ring buffers and timers once (a future that is ready at once
            // would never let them in).
            () = tokio::task::yield_now(), if verifying => Ok(Input::VerifyMore),
        }
    }

    fn handle(&mut self, input: Input, pipeline: &mut Pipeline) -> io::Result<Flow> {
        // A change of policy may add, remove or re-own an owned port: the
        // gate follows at once. Drops, links and housekeeping leave it be.
        let policy_may_change = matches!(
            input,
            Input::Control(_) | Input::Loaded(_) | Input::ConfirmExpired
        );
        let flow = self.handle_input(input, pipeline)?;
        if policy_may_change {
            self.regate(pipeline)?;
        }
        Ok(flow)
    }

    fn hangup(&mut self, _pipeline: &mut Pipeline) -> io::Result<()> {
        self.reload_on_signal();
        Ok(())
    }

    fn metrics(&self, pipeline: &Pipeline) -> Option<GuardSnapshot> {
        Some(Guard::metrics(self, pipeline))
    }

    fn listeners_changed(&mut self, pipeline: &mut Pipeline) -> io::Result<()> {
        let touched = pipeline.take_touched_ports();
        Guard::listeners_changed(self, pipeline);
        // Who holds an owned port changes only with a listener on one; the
        // gate walks every listener, and did so per batch of a burst.
        if self.gate_concerns(&touched) {
            self.regate(pipeline)?;
        }
        Ok(())
    }

    fn drain(&mut self, pipeline: &mut Pipeline) -> io::Result<()> {
        let mut drops = Vec::new();
        self.drops.drain_now(|rec| drops.push(decode_drop(rec)));
        let binds = self.binds.as_mut().map(|b| b.drain()).unwrap_or_default();
        self.bind_events(pipeline, binds)?;
        self.drop_events(pipeline, drops)
    }
}

impl Guard {
    fn handle_input(&mut self, input: Input, pipeline: &mut Pipeline) -> io::Result<Flow> {
        match input {
            Input::Control(req) => return self.handle_request(pipeline, *req),
            Input::Drops(batch) => self.drop_events(pipeline, batch)?,
            Input::Binds(batch) => self.bind_events(pipeline, batch)?,
            Input::CgroupsChanged => self.owner_cgroups_changed(),
            Input::LayOutCounters => self.lay_out_counters(),
            Input::Housekeeping => {
                self.housekeeping();
                self.follow_handed_over(pipeline);
                self.regate(pipeline)?;
                if let Some(trigger) = self.verify_due.take() {
                    self.verify_after(pipeline, &trigger);
                }
            }
            Input::Loaded(loaded) => self.reload_loaded(pipeline, *loaded)?,
            Input::VerifyMore => self.continue_verify(pipeline),
            Input::ConfirmExpired => {
                if let Some(event) = self.revert_unconfirmed("in time") {
                    pipeline.set_exposure(self.exposure_view());
                    pipeline.emit(event)?;
                    // Tested like any change (and not under the reverted
                    // change's name, if its verify was under way).
                    self.verify_after(pipeline, "revert (not confirmed)");
                }
            }
            Input::Links(changes) => {
                for change in changes {
                    if let Some(event) = self.on_link_change(change) {
                        pipeline.emit(event)?;
                    }
                }
                // A link or an address came or went: the ways in changed.
                self.refresh_ifaces();
                pipeline.set_exposure(self.exposure_view());
            }
        }
        Ok(Flow::Continue)
    }
}

/// Completes at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next link changes when following them; never completes otherwise.
/// The bind hooks' next news; never without the hooks.
async fn next_binds(
    hooks: Option<&mut binds::BindHooks>,
    batch: &mut Vec<Result<RawBind, DecodeError>>,
) -> io::Result<binds::BindNews> {
    match hooks {
        Some(h) => h.next(batch).await,
        None => std::future::pending().await,
    }
}

async fn next_links(
    links: Option<&mut LinkWatch>,
) -> io::Result<Vec<crate::iface::watch::LinkChange>> {
    match links {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// What `portwatch down` did.
#[derive(Debug, Default)]
pub struct Down {
    /// The guard that was running and was stopped.
    pub stopped: Option<u32>,
    /// The pins removed.
    pub removed: Vec<String>,
}

/// `portwatch down`: stops a running guard and removes everything pinned.
pub fn down(pin_dir: Option<&Path>, socket: Option<&Path>) -> anyhow::Result<Down> {
    let socket = socket
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let mut done = Down::default();
    if let Some(pid) = GuardLock::holder(&lock_path(&socket)) {
        crate::control::client::request::<crate::control::protocol::ChangeResponse>(
            &socket,
            &crate::control::protocol::Request::Shutdown { detach: true },
        )
        .with_context(|| format!("asking the running guard (pid {pid}) to stop"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while GuardLock::holder(&lock_path(&socket)).is_some() {
            if std::time::Instant::now() > deadline {
                bail!("the guard (pid {pid}) did not stop within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done.stopped = Some(pid);
    }
    let pins = PinDir::new(pin_dir.unwrap_or(Path::new(DEFAULT_PIN_DIR)));
    done.removed = pins.remove_all();
    Ok(done)
}
