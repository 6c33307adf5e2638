//! The command line: clap's definitions of every subcommand and flag, and
//! their conversions into the library's plain types. Nothing here runs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use portwatch::{
    datapath::attach::XdpMode,
    metrics,
    model::{Mode, Proto},
};

use crate::{commands, logging};

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
    Allow(commands::change::AllowArgs),
    /// Stop permitting a port (or range) at run time.
    Deny(commands::change::DenyArgs),
    /// Show the policy in force.
    Policy(commands::change::PolicyArgs),
    /// Re-read the policy file (as SIGHUP does).
    Reload(commands::change::ReloadArgs),
    /// Put a whole policy file in force (it becomes the policy file), optionally reverting unless confirmed.
    Apply(commands::apply::ApplyArgs),
    /// Keep the change that awaits confirmation (after --confirm-within).
    Confirm(commands::apply::ConfirmArgs),
    /// Show what a policy file would change against the policy in force: rules, settings, listeners' exposure, SSH sessions.
    Diff(commands::apply::DiffArgs),
    /// Interfaces, mode, and every listener with its exposure and counters.
    Status(commands::status::StatusArgs),
    /// The verdict the running guard's XDP program gives one packet, and why: rule and line, source, limit, owner, flow, counters, last drops.
    Explain(commands::inspect::ExplainArgs),
    /// Ask the running guard's XDP program, for every listener, whether sample sources get through, and compare with the policy; exit 1 on any disagreement.
    Verify(commands::inspect::VerifyArgs),
    /// Propose a policy from the listeners and the connection attempts the guard recorded (audit mode, or --for DURATION): one rule per listener that got traffic, its owner, its sources as networks.
    Learn(commands::learn::LearnArgs),
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

/// How the guard attaches to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Per interface: generic on veth and tun devices (native XDP there copies every packet), else native, falling back to generic with a notice.
    Auto,
    /// XDP in the driver, before the kernel builds an skb.
    Native,
    /// XDP on the skb, on any device.
    Generic,
    /// A tc ingress program on the skb (Linux 6.6+): the same verdicts without XDP's copy on veth; after the kernel untags VLAN frames (a truncated tag is dropped unreported).
    Tc,
}

impl From<XdpModeArg> for XdpMode {
    fn from(m: XdpModeArg) -> Self {
        match m {
            XdpModeArg::Auto => XdpMode::Auto,
            XdpModeArg::Native => XdpMode::Native,
            XdpModeArg::Generic => XdpMode::Generic,
            XdpModeArg::Tc => XdpMode::Tc,
        }
    }
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
    /// Where the verdict runs: auto picks an XDP mode per interface (generic on veth and tun, else native, falling back to generic); tc runs it at tc ingress.
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
    #[arg(long, value_name = "ADDR", value_parser = metrics::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Run at nice -N at least (0-20; needs CAP_SYS_NICE) and with a short time slice (Linux 6.12+), so the stream keeps up with a burst of listeners while busy processes hold every CPU; 0 leaves the scheduling as it is.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=20))]
    pub priority_boost: u8,
    /// text: log lines for people, events on stdout; json: events and log records as JSON lines on stderr, nothing on stdout.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: logging::LogFormat,
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
    #[arg(long, value_name = "ADDR", value_parser = metrics::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Run at nice -N at least (0-20; needs CAP_SYS_NICE) and with a short time slice (Linux 6.12+), so the stream keeps up with a burst of listeners while busy processes hold every CPU; 0 leaves the scheduling as it is.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=20))]
    pub priority_boost: u8,
    /// text: log lines for people, events on stdout; json: events and log records as JSON lines on stderr, nothing on stdout.
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub log_format: logging::LogFormat,
}
