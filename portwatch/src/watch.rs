//! `portwatch watch`: the snapshot, then the live stream, until Ctrl-C or SIGTERM.

use std::io;

use crate::{
    cli::{WatchArgs, colour_wanted},
    loader::Datapath,
    model::Proto,
    procinfo,
    sinks::{Sink, Summary, human::HumanSink, json::JsonSink},
    stream::{self, Filter, Signals, Stream},
};

/// The sink for `--json` or people.
pub fn make_sink(json: bool) -> Box<dyn Sink> {
    let stdout = io::BufWriter::new(io::stdout());
    if json {
        Box::new(JsonSink::new(stdout))
    } else {
        Box::new(
            HumanSink::new(
                stdout,
                colour_wanted(),
                procinfo::netns_of(std::process::id()),
            )
            .with_width(crate::sinks::human::terminal_width()),
        )
    }
}

pub async fn run(args: WatchArgs) -> anyhow::Result<Summary> {
    let mut signals = Signals::install()?;
    // Bound first, so a bad address or a port in use fails before anything loads.
    let metrics = match args.metrics {
        Some(addr) => Some(crate::metrics::MetricsServer::bind(addr).await?),
        None => None,
    };
    // The reader exists before the hooks attach, so nothing is missed.
    let mut datapath = Datapath::load()?;
    datapath.attach_monitor()?;
    log::info!("watching listeners (TCP listen, UDP bind; IPv4 and IPv6); Ctrl-C to stop");
    let filter = Filter {
        ports: args.ports.clone(),
        proto: args.proto.map(Proto::from),
    };
    let mut stream = Stream::new(
        crate::logging::event_sink(args.json, args.log_format),
        filter,
    );
    if !args.no_snapshot {
        stream.take_snapshot().await?;
    }
    stream.announce_ready()?;
    let metrics_task = metrics.map(|server| {
        let (task, scrapes) = server.spawn();
        stream.metrics = Some(scrapes);
        task
    });
    stream::run(&mut datapath, &mut stream, &mut signals).await?;
    if let Some(task) = metrics_task {
        task.abort();
    }
    drop(datapath); // detaches every hook
    stream.finish()
}
