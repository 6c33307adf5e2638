//! `apply`, `confirm` and `diff`: a whole policy file put in force at once
//! (optionally reverting unless confirmed), and what it would change shown
//! before it is.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Args;
use portwatch::{
    control::{
        client,
        protocol::{ChangeResponse, DiffResponse, Request, Response},
    },
    format::endpoint,
    policy::{Policy, compile::compile},
};

use super::{change::print_change, client_error, print, socket_path};

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// The policy file to put in force (TOML); it becomes the guard's policy file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Revert it unless `portwatch confirm` follows within this time (e.g. 60, 90s, 5m).
    #[arg(long, value_name = "TIME", value_parser = parse_within)]
    pub confirm_within: Option<u64>,
    /// Apply it even if it would cut off an SSH session (yours, or one established).
    #[arg(long)]
    pub force: bool,
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ConfirmArgs {
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    /// The policy file to compare with the policy in force (TOML).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print the guard's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 when the file would change anything (as diff(1) does).
    #[arg(long)]
    pub exit_code: bool,
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Longest a change may wait for confirmation: a day.
const MAX_WITHIN: u64 = 24 * 3600;

/// `60`, `60s`, `5m`, `1h` as seconds, between 1 s and a day.
pub fn parse_within(text: &str) -> Result<u64, String> {
    super::parse_duration(text, MAX_WITHIN, "the time to confirm")
}

/// The file's text and policy, checked as the guard will check them.
fn read_policy(file: &Path) -> anyhow::Result<(String, Policy)> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the policy file {}", file.display()))?;
    let policy = Policy::parse(&text).with_context(|| file.display().to_string())?;
    compile(&policy).with_context(|| file.display().to_string())?;
    Ok((text, policy))
}

/// `portwatch apply FILE`
pub fn apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    let (text, policy) = read_policy(&args.file)?;
    let socket = socket_path(args.socket.as_deref());
    let request = Request::Apply {
        text,
        policy: Box::new(policy),
        force: args.force,
        confirm_within: args.confirm_within,
    };
    let answer = client::request::<ChangeResponse>(&socket, &request).map_err(|e| {
        client_error(
            e,
            "to use the file when a guard starts, copy it to the policy file (default \
             /etc/portwatch/policy.toml)",
        )
    })?;
    print_change(&answer)
}

/// `portwatch confirm`
pub fn confirm(args: ConfirmArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let answer = client::request::<ChangeResponse>(&socket, &Request::Confirm)
        .map_err(|e| client_error(e, ""))?;
    print_change(&answer)
}

/// `portwatch diff FILE`
pub fn diff(args: DiffArgs) -> anyhow::Result<ExitCode> {
    let (_, policy) = read_policy(&args.file)?;
    let socket = socket_path(args.socket.as_deref());
    let request = Request::Diff {
        policy: Box::new(policy),
    };
    let answer =
        client::request::<DiffResponse>(&socket, &request).map_err(|e| client_error(e, ""))?;
    let changes = answer != DiffResponse::default();
    if args.json {
        print(&Response::Diff(answer).to_line())?;
    } else {
        print(&render(&answer))?;
    }
    Ok(if changes && args.exit_code {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The diff for people: rules (+/-), settings (~), listeners whose
/// exposure changes, SSH sessions it would cut off.
pub(super) fn render(diff: &DiffResponse) -> String {
    if diff == &DiffResponse::default() {
        return "no change: the file is the policy in force\n".into();
    }
    let mut out = String::new();
    for rule in &diff.added {
        let _ = writeln!(out, "+ {rule}");
    }
    for rule in &diff.removed {
        let _ = writeln!(out, "- {rule}");
    }
    for setting in &diff.settings {
        let _ = writeln!(out, "~ {setting}");
    }
    if !diff.exposure.is_empty() {
        let _ = writeln!(out, "listeners whose exposure changes:");
        for c in &diff.exposure {
            let name = |e: Option<portwatch::model::Exposure>| e.map_or("unknown", |e| e.as_str());
            let who = match (&c.comm, c.pid) {
                (Some(comm), Some(pid)) => format!(" {comm} (pid {pid})"),
                (Some(comm), None) => format!(" {comm}"),
                (None, Some(pid)) => format!(" pid {pid}"),
                (None, None) => String::new(),
            };
            let _ = writeln!(
                out,
                "  {} {}{who}: {} -> {}",
                c.proto.as_str(),
                endpoint(&c.addr, c.port),
                name(c.from),
                name(c.to)
            );
        }
    }
    for cut in &diff.ssh {
        let _ = writeln!(out, "warning: {cut}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use portwatch::{
        control::protocol::ExposureChange,
        model::{Exposure, Proto},
    };

    use super::*;

    #[test]
    fn times_to_confirm() {
        assert_eq!(parse_within("60"), Ok(60));
        assert_eq!(parse_within("90s"), Ok(90));
        assert_eq!(parse_within("5m"), Ok(300));
        assert_eq!(parse_within("1h"), Ok(3600));
        for bad in [
            "",
            "0",
            "s",
            "5d",
            "-1",
            "1.5m",
            "25h",
            "99999999999999999999",
        ] {
            let e = parse_within(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn a_diff_reads_as_one() {
        assert_eq!(
            render(&DiffResponse::default()),
            "no change: the file is the policy in force\n"
        );
        let diff = DiffResponse {
            added: vec!["tcp/8080".into()],
            removed: vec!["udp/53 from 10.0.0.0/8".into()],
            settings: vec!["mode enforce -> audit".into()],
            exposure: vec![ExposureChange {
                proto: Proto::Tcp,
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port: 8080,
                pid: Some(42),
                comm: Some("nginx".into()),
                from: Some(Exposure::Blocked),
                to: Some(Exposure::Exposed),
            }],
            ssh: vec![],
        };
        assert_eq!(
            render(&diff),
            "+ tcp/8080\n- udp/53 from 10.0.0.0/8\n~ mode enforce -> audit\nlisteners whose \
             exposure changes:\n  tcp 0.0.0.0:8080 nginx (pid 42): blocked -> exposed\n"
        );
    }
}
