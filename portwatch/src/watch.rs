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
    // The reader exists before the hooks attach, so nothing is missed.
    let mut datapath = Datapath::load()?;
    datapath.attach_monitor()?;
    log::info!("watching listeners (TCP listen, UDP bind; IPv4 and IPv6); Ctrl-C to stop");
    let filter = Filter {
        ports: args.ports.clone(),
        proto: args.proto.map(Proto::from),
    };
    let mut stream = Stream::new(make_sink(args.json), filter);
    if !args.no_snapshot {
        stream.take_snapshot().await?;
    }
    stream.announce_ready()?;
    stream::run(&mut datapath, &mut stream, &mut signals).await?;
    drop(datapath); // detaches every hook
    stream.finish()
}
