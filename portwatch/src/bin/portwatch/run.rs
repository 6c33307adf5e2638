//! Dispatch: each subcommand to the library (with plain options built from
//! its arguments) or to a client command.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use portwatch::{
    control::server::DEFAULT_SOCKET,
    guard,
    metrics::MetricsServer,
    model::{Mode, Proto},
    pipeline::Filter,
    policy::PortRange,
    watch,
};

use crate::{
    args::{Cli, Command, GuardArgs, WatchArgs},
    commands, logging,
    terminal::colour_wanted,
};

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Watch(a) => a.log_format,
        Command::Guard(a) => a.log_format,
        _ => logging::LogFormat::Text,
    };
    logging::init(log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            logging::report_error(log_format, &e);
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Watch(args) => run_watch(args).await,
            Command::Guard(args) => run_guard(args).await,
            Command::Allow(args) => commands::change::allow(args),
            Command::Deny(args) => commands::change::deny(args),
            Command::Policy(args) => commands::change::policy(args),
            Command::Reload(args) => commands::change::reload(args),
            Command::Apply(args) => commands::apply::apply(args),
            Command::Confirm(args) => commands::apply::confirm(args),
            Command::Diff(args) => commands::apply::diff(args),
            Command::Status(args) => commands::status::status(args),
            Command::Explain(args) => commands::inspect::explain(args),
            Command::Verify(args) => commands::inspect::verify(args),
            Command::Learn(args) => commands::learn::learn(args),
            Command::Down(args) => commands::down(args.pin_dir.as_deref(), args.socket.as_deref()),
            Command::Top(args) => crate::tui::run(args),
            Command::CheckPolicy { file } => commands::check_policy(&file),
            Command::Completions { shell } => {
                crate::docs::print_completions(shell)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Manpage { out } => {
                crate::docs::manpage(out.as_deref())?;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// `--priority-boost`, before the loop's threads start (they inherit it):
/// a raised nice value and a short time slice. Without the capability it
/// says so and goes on at the priority it has.
fn raise_priority(levels: u8) {
    let lowered_on_purpose = match portwatch::sys::raise_priority(levels) {
        Ok(portwatch::sys::Priority::Raised { from, to }) => {
            log::debug!(
                "scheduling priority raised: nice {from} -> {to} (--priority-boost 0 keeps it)"
            );
            false
        }
        Ok(portwatch::sys::Priority::LeftAt(nice)) => {
            log::debug!("scheduling priority left at nice {nice}");
            nice > 0
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            log::debug!(
                "scheduling priority not raised (needs CAP_SYS_NICE): {e}; a burst of \
                 listeners may reach the stream later"
            );
            false
        }
        Err(e) => {
            log::warn!("raising the scheduling priority failed: {e}");
            false
        }
    };
    if levels > 0 && !lowered_on_purpose {
        use portwatch::sys::{STREAM_SLICE, Slice, set_slice};
        match set_slice(STREAM_SLICE) {
            Ok(Slice::Set) => log::debug!(
                "time slice set to {STREAM_SLICE:?}: woken by an event, the stream takes the CPU \
                 at once"
            ),
            Ok(Slice::NotSupported) => {
                log::debug!("time slice left as it is: this kernel has no custom slices (6.12)")
            }
            Ok(Slice::OtherPolicy(policy)) => {
                log::debug!("time slice left as it is: scheduling policy {policy} was chosen")
            }
            Err(e) => log::debug!("time slice left as it is: {e}"),
        }
    }
}

/// Binds `--metrics` first, so a bad address or a port in use fails
/// before anything loads.
async fn bind_metrics(addr: Option<std::net::SocketAddr>) -> anyhow::Result<Option<MetricsServer>> {
    Ok(match addr {
        Some(addr) => Some(MetricsServer::bind(addr).await?),
        None => None,
    })
}

async fn run_watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    logging::check_flags(args.json, args.log_format)?;
    raise_priority(args.priority_boost);
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    // Metrics and JSON logs come from this process's own view.
    if !args.local
        && args.metrics.is_none()
        && args.log_format == logging::LogFormat::Text
        && args.ports.is_empty()
        && args.proto.is_none()
        && commands::follow::watch_via_guard(&socket, args.json, colour_wanted())?
    {
        return Ok(ExitCode::SUCCESS);
    }
    let metrics = bind_metrics(args.metrics).await?;
    let opts = watch::Options {
        filter: Filter {
            ports: args.ports.clone(),
            proto: args.proto.map(Proto::from),
        },
        snapshot: !args.no_snapshot,
    };
    let sink = logging::event_sink(args.json, args.log_format);
    watch::run(opts, sink, metrics).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_guard(args: GuardArgs) -> anyhow::Result<ExitCode> {
    logging::check_flags(args.json, args.log_format)?;
    raise_priority(args.priority_boost);
    let allow = args
        .allow
        .iter()
        .map(|spec| PortRange::parse(spec).with_context(|| format!("--allow {spec}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let metrics = bind_metrics(args.metrics).await?;
    let opts = guard::Options {
        ifaces: args.iface.clone(),
        policy: args.policy.clone(),
        allow,
        mode: args.mode.map(Mode::from),
        xdp_mode: args.xdp_mode.into(),
        force: args.force,
        flow_timeout: Duration::from_secs(args.flow_timeout),
        report_rate: args.report_rate,
        detach_on_exit: args.detach_on_exit,
        pin_dir: args.pin_dir.clone(),
        socket: args.socket.clone(),
        control_group: args.control_group.clone(),
        wait_for_iface: Duration::from_secs(args.wait_for_iface),
    };
    let sink = logging::event_sink(args.json, args.log_format);
    guard::run(opts, sink, metrics).await?;
    Ok(ExitCode::SUCCESS)
}
