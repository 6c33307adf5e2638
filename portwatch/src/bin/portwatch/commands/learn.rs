//! `portwatch learn`: a policy proposed by the running guard from what
//! listens and the connection attempts it recorded; printed, diffed
//! against the policy in force, or written to a file for `apply`.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args;
use portwatch::{
    control::{
        client,
        protocol::{
            ChangeResponse, DiffResponse, LearnQuery, MAX_RECORD_SECS, Proposal, Request, Response,
        },
    },
    policy::{Policy, PortRange, store::write_atomically},
};

use super::{apply, client_error, parse_duration, print, socket_path};

#[derive(Debug, Clone, Args)]
pub struct LearnArgs {
    /// Only what was seen in this last while (90s, 30m, 12h, 2d) [default: everything recorded].
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub since: Option<u64>,
    /// Record connection attempts for this long first (any mode; audit mode always records), then propose from them.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_record)]
    pub record_for: Option<u64>,
    /// With --for: forget what was recorded before.
    #[arg(long, requires = "record_for")]
    pub forget: bool,
    /// IPv4 sources are grouped into networks of this prefix length.
    #[arg(long, value_name = "BITS", default_value_t = 24)]
    pub prefix4: u8,
    /// IPv6 sources are grouped into networks of this prefix length.
    #[arg(long, value_name = "BITS", default_value_t = 64)]
    pub prefix6: u8,
    /// More networks than this on one port make its rule "from anywhere".
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub spread: usize,
    /// Propose a rule for this listener's port even without traffic (repeatable): tcp/443.
    #[arg(long, value_name = "PROTO/PORT")]
    pub keep: Vec<String>,
    /// Show what the proposal would change against the policy in force.
    #[arg(long, conflicts_with = "write")]
    pub diff: bool,
    /// Write the proposal to FILE (for `portwatch diff FILE` and `apply FILE --confirm-within`).
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Print the guard's answer as JSON.
    #[arg(long, conflicts_with_all = ["diff", "write"])]
    pub json: bool,
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

fn parse_window(text: &str) -> Result<u64, String> {
    parse_duration(text, 365 * 86_400, "--since")
}

fn parse_record(text: &str) -> Result<u64, String> {
    parse_duration(text, MAX_RECORD_SECS, "--for")
}

pub fn learn(args: LearnArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let keep = args
        .keep
        .iter()
        .map(|k| PortRange::parse(k).with_context(|| format!("--keep {k}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut since = args.since;
    if let Some(secs) = args.record_for {
        let answer = client::request::<ChangeResponse>(
            &socket,
            &Request::Record {
                secs,
                forget: args.forget,
            },
        )
        .map_err(|e| client_error(e, "learn asks the running guard"))?;
        eprintln!(
            "{}; the proposal follows when it ends (Ctrl-C stops waiting, not the recording)",
            answer.change
        );
        let end = Instant::now() + Duration::from_secs(secs);
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            std::thread::sleep(left.min(Duration::from_secs(1)));
        }
        // What was seen while it recorded (and a second either side).
        since = Some(since.map_or(secs + 1, |s| s.max(secs + 1)));
    }
    let query = LearnQuery {
        since,
        prefix4: args.prefix4,
        prefix6: args.prefix6,
        spread: args.spread,
        keep,
    };
    let proposal = client::request::<Proposal>(&socket, &Request::Learn(Box::new(query)))
        .map_err(|e| client_error(e, "learn asks the running guard"))?;
    let text = proposal.text();
    if args.json {
        print(&Response::Learn(Box::new(proposal)).to_line())?;
    } else if args.diff {
        let policy = Policy::parse(&text).context("the guard's proposal")?;
        let diff = client::request::<DiffResponse>(
            &socket,
            &Request::Diff {
                policy: Box::new(policy),
            },
        )
        .map_err(|e| client_error(e, ""))?;
        print(&apply::render(&diff))?;
    } else if let Some(file) = &args.write {
        // Through a temporary file and a rename: a reader never sees half
        // a policy.
        write_atomically(file, &text).with_context(|| format!("writing {}", file.display()))?;
        let rules = proposal.rules.len();
        let file = file.display();
        eprintln!(
            "wrote {rules} rules to {file} (recording {}); next: portwatch diff {file}; \
             portwatch apply {file} --confirm-within 120; portwatch confirm; portwatch verify",
            proposal.recording
        );
    } else {
        print(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}
