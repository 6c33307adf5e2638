//! `portwatch watch`: the snapshot, then the live stream, until Ctrl-C or
//! SIGTERM.

use crate::{
    datapath::Datapath,
    metrics::MetricsServer,
    pipeline::{Filter, Pipeline},
    runloop::{self, NoDaemon, Signals},
    sinks::{Sink, Summary},
};

/// What `portwatch watch` is asked to do.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub filter: Filter,
    /// Report the listeners that exist at start.
    pub snapshot: bool,
}

/// Loads the monitor and streams to `sink` until a signal; `metrics`
/// (already bound) is served meanwhile.
pub async fn run(
    opts: Options,
    sink: Box<dyn Sink>,
    metrics: Option<MetricsServer>,
) -> anyhow::Result<Summary> {
    let mut signals = Signals::install()?;
    // The reader exists before the hooks attach, so nothing is missed.
    let mut datapath = Datapath::load()?;
    datapath.attach_monitor()?;
    let mut feed = datapath
        .take_monitor_feed()
        .ok_or_else(|| anyhow::anyhow!("the monitor's ring buffer is already taken"))?;
    log::info!("watching listeners (TCP listen, UDP bind; IPv4 and IPv6); Ctrl-C to stop");
    let mut pipeline = Pipeline::new(sink, opts.filter);
    if opts.snapshot {
        let found = Pipeline::collect_snapshot().await?;
        pipeline.emit_snapshot(found)?;
        let mut binds = datapath.udp_binds()?;
        if let Err(e) = pipeline.adopt_udp_binds(&mut binds).await {
            log::warn!("{e:#}: UDP listeners open before the start may not be seen closing");
        }
    }
    pipeline.announce_ready()?;
    let (metrics_task, scrapes) = match metrics.map(MetricsServer::spawn) {
        Some((task, rx)) => (Some(task), Some(rx)),
        None => (None, None),
    };
    runloop::run(
        &mut feed,
        &mut pipeline,
        &mut NoDaemon,
        &mut signals,
        scrapes,
    )
    .await?;
    if let Some(task) = metrics_task {
        task.abort();
    }
    drop(datapath); // detaches every hook
    pipeline.finish()
}
