//! Command-line interface: argument definitions and dispatch.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    commands,
    guard::{self, attach::XdpModeArg},
    model::Proto,
    policy::Mode,
    watch,
};

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
    /// Guard interfaces with XDP (default deny inbound, permit by exception) and stream listeners with their exposure.
    Guard(GuardArgs),
    /// Permit a port (or range) at run time, optionally only from some sources.
    Allow(commands::AllowArgs),
    /// Stop permitting a port (or range) at run time.
    Deny(commands::DenyArgs),
    /// Show the policy in force.
    Policy(commands::PolicyArgs),
    /// Re-read the policy file (as SIGHUP does).
    Reload(commands::ReloadArgs),
    /// Interfaces, mode, and every listener with its exposure and counters.
    Status(commands::StatusArgs),
    /// Stop a running guard and remove everything portwatch attached or pinned.
    Down(DownArgs),
    /// Full-screen view of listeners, exposure and drops.
    Top(crate::tui::TopArgs),
    /// Validate a policy file without loading anything.
    CheckPolicy {
        /// The policy file (TOML).
        file: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages: portwatch.8 and one per subcommand (packaging).
    #[command(hide = true)]
    Manpage {
        /// Directory for the pages [default: portwatch.8 on stdout]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Enforce,
    Audit,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Enforce => Mode::Enforce,
            ModeArg::Audit => Mode::Audit,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// Interface to guard (repeatable); default: the policy's `interfaces`, else the default-route interfaces.
    #[arg(long = "iface", value_name = "IFACE")]
    pub iface: Vec<String>,
    /// Policy file [default: /etc/portwatch/policy.toml]
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Also permit SPEC (tcp/PORT, udp/PORT, tcp/LO-HI), from anywhere (repeatable).
    #[arg(long = "allow", value_name = "SPEC")]
    pub allow: Vec<String>,
    /// enforce drops what the policy does not permit; audit only reports it [default: the policy's, else enforce]
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// XDP attach mode: auto tries native and falls back to generic.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeArg,
    /// Print JSON Lines instead of aligned text.
    #[arg(long)]
    pub json: bool,
    /// Enforce even if the policy would cut off the SSH session this runs in.
    #[arg(long)]
    pub force: bool,
    /// Seconds an outbound UDP flow of the host admits replies after its last packet.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub flow_timeout: u64,
    /// Drop reports per second per CPU (the rest are counted as held back).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub report_rate: u32,
    /// On exit, detach and unpin everything (default: enforcement stays pinned).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Where the datapath is pinned [default: /sys/fs/bpf/portwatch]
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// The control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Members of this group may read status and follow the stream.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// Wait up to SECS for the interfaces to guard (named ones to exist, else a default route) instead of failing at once (for boot).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub wait_for_iface: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (ADDR: IP:PORT, e.g. 127.0.0.1:9469 or [::1]:9469).
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// text: log lines for people, events on stdout; json: events and log records as JSON lines on stderr, nothing on stdout.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct DownArgs {
    /// Where the datapath is pinned [default: /sys/fs/bpf/portwatch]
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// The control socket of a running guard [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
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
    /// A running guard's control socket: when one answers there, follow its
    /// stream instead of loading programs [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Load portwatch's own programs even when a guard runs (implied by --metrics and --log-format json).
    #[arg(long)]
    pub local: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (ADDR: IP:PORT, e.g. 127.0.0.1:9469 or [::1]:9469).
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// text: log lines for people, events on stdout; json: events and log records as JSON lines on stderr, nothing on stdout.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: crate::logging::LogFormat,
}

/// Whether people get colour: a terminal, and NO_COLOR unset or empty.
pub fn colour_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Watch(a) => a.log_format,
        Command::Guard(a) => a.log_format,
        _ => crate::logging::LogFormat::Text,
    };
    crate::logging::init(log_format);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            crate::logging::report_error(log_format, &e);
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
            Command::Watch(args) => {
                crate::logging::check_flags(args.json, args.log_format)?;
                let socket = args
                    .socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(crate::control::server::DEFAULT_SOCKET));
                // Metrics and JSON logs come from this process's own view.
                if !args.local
                    && args.metrics.is_none()
                    && args.log_format == crate::logging::LogFormat::Text
                    && args.ports.is_empty()
                    && args.proto.is_none()
                    && commands::watch_via_guard(&socket, args.json, colour_wanted())?
                {
                    return Ok(ExitCode::SUCCESS);
                }
                watch::run(args).await.map(|_| ExitCode::SUCCESS)
            }
            Command::Guard(args) => {
                crate::logging::check_flags(args.json, args.log_format)?;
                guard::run(args).await.map(|_| ExitCode::SUCCESS)
            }
            Command::Allow(args) => commands::allow(args),
            Command::Deny(args) => commands::deny(args),
            Command::Policy(args) => commands::policy(args),
            Command::Reload(args) => commands::reload(args),
            Command::Status(args) => commands::status(args),
            Command::Down(args) => guard::down(args.pin_dir.as_deref(), args.socket.as_deref())
                .map(|()| ExitCode::SUCCESS),
            Command::Top(args) => crate::tui::run(args),
            Command::CheckPolicy { file } => guard::check_policy(&file).map(|()| ExitCode::SUCCESS),
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
