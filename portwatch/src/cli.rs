//! Command-line interface: argument definitions and dispatch.

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{model::Proto, watch};

#[derive(Debug, Parser)]
#[command(
    name = "portwatch",
    version,
    about = "Live listener monitor and XDP port guard",
    long_about = "portwatch reports every listening socket (TCP listen, UDP bind; IPv4 and IPv6) \
                  as it opens and closes, with the process behind it, starting from a snapshot of \
                  what already listens."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream listeners as they open and close, starting with those that already exist.
    Watch(WatchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

impl From<ProtoArg> for Proto {
    fn from(p: ProtoArg) -> Self {
        match p {
            ProtoArg::Tcp => Proto::Tcp,
            ProtoArg::Udp => Proto::Udp,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Print JSON Lines (one object per event) instead of aligned text.
    #[arg(long)]
    pub json: bool,
    /// Only report these ports (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Only report this protocol.
    #[arg(long, value_enum)]
    pub proto: Option<ProtoArg>,
    /// Do not report the listeners that exist at start.
    #[arg(long)]
    pub no_snapshot: bool,
}

/// Whether people get colour: a terminal, and NO_COLOR unset or empty.
pub fn colour_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portwatch: error: {e:#}");
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
            Command::Watch(args) => watch::run(args).await.map(|_| ExitCode::SUCCESS),
        }
    })
}
