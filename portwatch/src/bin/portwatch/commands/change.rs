//! `allow`, `deny`, `policy` and `reload`: changes to a running guard's
//! policy through its control socket, or (`--offline`) to the policy file
//! when no guard runs. A rule is parsed here by the policy's own parser
//! first, so a typo gets the same precise message with or without a guard.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Args;
use portwatch::{
    control::{
        client,
        protocol::{ChangeResponse, PolicyView, Request, Response},
    },
    policy::{
        OwnerSpec, Policy, PolicyError, PortRange, Rule,
        store::{DEFAULT_POLICY, load_or_empty, write_atomically},
    },
};

use super::{client_error, print, socket_path};

#[derive(Debug, Clone, Args)]
pub struct AllowArgs {
    /// What to permit: tcp/PORT, udp/PORT, sctp/PORT, a range such as tcp/8000-8099, or a whole protocol: proto/vrrp, proto/47.
    #[arg(value_name = "SPEC")]
    pub spec: String,
    /// Permit only these sources: addresses or CIDRs (repeatable, or comma-separated) [default: from anywhere]
    #[arg(long = "from", value_name = "CIDR", value_delimiter = ',')]
    pub from: Vec<String>,
    /// At most this much per source, e.g. 10/minute or 200/second (TCP: connection attempts; others: packets).
    #[arg(long, value_name = "COUNT/PERIOD")]
    pub limit: Option<String>,
    #[command(flatten)]
    pub owner: OwnerArgs,
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Change the policy file instead of a running guard; it applies when a guard starts (or reloads).
    #[arg(long)]
    pub offline: bool,
    /// With --offline: the policy file to change (created if missing) [default: /etc/portwatch/policy.toml]
    #[arg(long, value_name = "FILE", requires = "offline")]
    pub policy: Option<PathBuf>,
    /// Apply it even if it would cut off an SSH session (yours, or one established).
    #[arg(long, conflicts_with = "offline")]
    pub force: bool,
    /// Revert it unless `portwatch confirm` follows within this time (e.g. 60, 90s, 5m).
    #[arg(long, value_name = "TIME", value_parser = super::apply::parse_within, conflicts_with = "offline")]
    pub confirm_within: Option<u64>,
}

/// `--owner-*`: the process that must listen for the port to open.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Owner (the port is open only while it listens)")]
pub struct OwnerArgs {
    /// A process of this systemd unit.
    #[arg(long, value_name = "UNIT")]
    pub owner_unit: Option<String>,
    /// A process in this cgroup v2 path (or below it).
    #[arg(long, value_name = "PATH")]
    pub owner_cgroup: Option<String>,
    /// A process of this user (a name or a uid).
    #[arg(long, value_name = "USER")]
    pub owner_user: Option<String>,
    /// A process with this command name (the kernel's comm, at most 15 bytes).
    #[arg(long, value_name = "COMM")]
    pub owner_comm: Option<String>,
    /// A process running this executable.
    #[arg(long, value_name = "PATH")]
    pub owner_exe: Option<String>,
    /// ... whose contents have this SHA-256 (64 hex digits; with --owner-exe).
    #[arg(long, value_name = "HEX")]
    pub owner_sha256: Option<String>,
}

impl OwnerArgs {
    fn spec(&self) -> OwnerSpec {
        OwnerSpec {
            unit: self.owner_unit.clone(),
            cgroup: self.owner_cgroup.clone(),
            user: self.owner_user.clone(),
            comm: self.owner_comm.clone(),
            exe: self.owner_exe.clone(),
            sha256: self.owner_sha256.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DenyArgs {
    /// Ports to stop permitting: tcp/PORT, udp/PORT or a range; rules reaching past it keep the rest.
    #[arg(value_name = "SPEC")]
    pub spec: String,
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Change the policy file instead of a running guard; it applies when a guard starts (or reloads).
    #[arg(long)]
    pub offline: bool,
    /// With --offline: the policy file to change [default: /etc/portwatch/policy.toml]
    #[arg(long, value_name = "FILE", requires = "offline")]
    pub policy: Option<PathBuf>,
    /// Apply it even if it would cut off an SSH session (yours, or one established).
    #[arg(long, conflicts_with = "offline")]
    pub force: bool,
    /// Revert it unless `portwatch confirm` follows within this time (e.g. 60, 90s, 5m).
    #[arg(long, value_name = "TIME", value_parser = super::apply::parse_within, conflicts_with = "offline")]
    pub confirm_within: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the guard's answer as JSON instead of the policy file text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ReloadArgs {
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Apply the file even if it would cut off an SSH session.
    #[arg(long)]
    pub force: bool,
}

/// `tcp/8080 (from anywhere)`, `tcp/5432 (from 10.0.0.0/8, fd00::/8)`.
fn describe(rule: &Rule) -> String {
    if rule.from.is_empty() {
        format!("{} (from anywhere)", rule.ports)
    } else {
        let from: Vec<String> = rule.from.iter().map(ToString::to_string).collect();
        format!("{} (from {})", rule.ports, from.join(", "))
    }
}

/// The guard's account of what changed.
pub(super) fn print_change(answer: &ChangeResponse) -> anyhow::Result<ExitCode> {
    print(&format!("{}\n", answer.change.trim_end()))?;
    Ok(ExitCode::SUCCESS)
}

/// How to run the same change offline, for the no-guard message.
fn offline_hint(command: &str, spec: &str, from: &[String]) -> String {
    let from: String = from.iter().map(|f| format!(" --from {f}")).collect();
    format!(
        "to change the policy file instead, run: portwatch {command} {spec}{from} --offline \
         [--policy FILE]"
    )
}

/// Loads the policy file (a missing one is empty), applies `change`, and
/// writes it back atomically. Prints what changed.
fn edit_offline(
    file: Option<&Path>,
    socket: &Path,
    change: impl FnOnce(&mut Policy) -> Result<String, PolicyError>,
) -> anyhow::Result<ExitCode> {
    let path = file.unwrap_or(Path::new(DEFAULT_POLICY));
    let mut policy = load_or_empty(path)?;
    let what = change(&mut policy).with_context(|| path.display().to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create {}, the policy file's directory",
                dir.display()
            )
        })?;
    }
    write_atomically(path, &policy.to_toml()).with_context(|| {
        format!(
            "cannot write the policy file {} (it is unchanged)",
            path.display()
        )
    })?;
    print(&format!("{what} in {}\n", path.display()))?;
    if client::guard_running(socket) {
        eprintln!(
            "portwatch: note: a guard is running (control socket {}); it keeps its policy until \
             `portwatch reload`",
            socket.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `portwatch allow SPEC [--from CIDR]...`
pub fn allow(args: AllowArgs) -> anyhow::Result<ExitCode> {
    let rule =
        Rule::parse(&args.spec, &args.from, args.limit.as_deref())?.owned_by(&args.owner.spec())?;
    let socket = socket_path(args.socket.as_deref());
    if args.offline {
        return edit_offline(args.policy.as_deref(), &socket, |policy| {
            let what = format!("allowed {}", describe(&rule));
            policy.add_rule(rule)?;
            Ok(what)
        });
    }
    let request = Request::Allow {
        rule,
        force: args.force,
        confirm_within: args.confirm_within,
    };
    let answer = client::request::<ChangeResponse>(&socket, &request)
        .map_err(|e| client_error(e, &offline_hint("allow", &args.spec, &args.from)))?;
    print_change(&answer)
}

/// `portwatch deny SPEC`
pub fn deny(args: DenyArgs) -> anyhow::Result<ExitCode> {
    let ports = PortRange::parse(&args.spec)?;
    let socket = socket_path(args.socket.as_deref());
    if args.offline {
        return edit_offline(args.policy.as_deref(), &socket, |policy| {
            let removed = policy.remove_port(ports)?;
            let before: Vec<String> = removed.iter().map(ToString::to_string).collect();
            Ok(if before == [ports.to_string()] {
                format!("denied {ports}")
            } else {
                format!("denied {ports} (was in: {})", before.join("; "))
            })
        });
    }
    let request = Request::Deny {
        ports,
        force: args.force,
        confirm_within: args.confirm_within,
    };
    let answer = client::request::<ChangeResponse>(&socket, &request)
        .map_err(|e| client_error(e, &offline_hint("deny", &args.spec, &[])))?;
    print_change(&answer)
}

/// `portwatch policy`: the policy in force in the running guard.
pub fn policy(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let view = client::request::<PolicyView>(&socket, &Request::Policy).map_err(|e| {
        client_error(
            e,
            &format!("a guard would start with {DEFAULT_POLICY} (check a file with `portwatch check-policy FILE`)"),
        )
    })?;
    if args.json {
        print(&Response::Policy(view).to_line())?;
    } else if view.toml.ends_with('\n') {
        print(&view.toml)?;
    } else {
        print(&format!("{}\n", view.toml))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `portwatch reload`: the guard reads its policy file again.
pub fn reload(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let request = Request::Reload { force: args.force };
    let answer =
        client::request::<ChangeResponse>(&socket, &request).map_err(|e| client_error(e, ""))?;
    print_change(&answer)
}

#[cfg(test)]
mod tests {
    use portwatch::control::client::ClientError;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn local_checks() {
        let err = |spec: &str, from: &[&str]| {
            let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
            Rule::parse(spec, &from, None)
                .map(|r| describe(&r))
                .map_err(|e| e.to_string())
        };
        assert_eq!(err("tcp/8080", &[]), Ok("tcp/8080 (from anywhere)".into()));
        assert_eq!(
            err("tcp/5432", &["10.0.0.0/8", "fd00::/8", "192.0.2.1"]),
            Ok("tcp/5432 (from 10.0.0.0/8, fd00::/8, 192.0.2.1/32)".into())
        );
        assert_eq!(
            err("tcp/x", &[]),
            Err(r#""tcp/x": port "x" is not a number"#.into())
        );
        assert_eq!(
            err("tcp/1", &["10.0.0.1/8"]),
            Err(r#""10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#.into())
        );
        assert!(
            err("tcp/1", &["10.0.0.0/33"]).is_err_and(|e| e.contains("is not an address or CIDR")),
            "prefix too long"
        );
        assert!(err("tcp/1", &["example.org"]).is_err_and(|e| e.contains("is not an address")));
        assert!(
            err("tcp/1", &["::ffff:10.0.0.0/104"]).is_err_and(|e| e.contains("write 10.0.0.0/8")),
            "IPv4-mapped sources are refused"
        );
        assert_eq!(
            err("tcp/1", &["10.0.0.0/8", "10.2.0.0/16"]),
            Err(
                "10.2.0.0/16 is already covered by 10.0.0.0/8 in the same `from` list; remove it"
                    .into()
            )
        );
    }

    #[test]
    fn no_guard_message() {
        let e = client_error(
            ClientError::NoGuard {
                path: PathBuf::from("/run/x.sock"),
            },
            &offline_hint("allow", "tcp/8080", &["10.0.0.0/8".to_owned()]),
        );
        assert_eq!(
            e.to_string(),
            "no portwatch guard is running (no control socket at /run/x.sock); to change the \
             policy file instead, run: portwatch allow tcp/8080 --from 10.0.0.0/8 --offline \
             [--policy FILE]"
        );
    }

    #[test]
    fn offline_edits() -> TestResult {
        let dir = std::env::temp_dir().join(format!("portwatch-offline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("sub/policy.toml");
        let socket = dir.join("no.sock");
        let allow = |spec: &str, from: &[&str]| {
            allow(AllowArgs {
                spec: spec.into(),
                from: from.iter().map(|s| (*s).to_owned()).collect(),
                limit: None,
                owner: OwnerArgs::default(),
                socket: Some(socket.clone()),
                offline: true,
                policy: Some(file.clone()),
                force: false,
                confirm_within: None,
            })
            .map_err(|e| format!("{e:#}"))
        };
        // Created when missing, directory and all.
        assert!(allow("tcp/8000-8099", &[]).is_ok());
        assert!(allow("tcp/5432", &["10.0.0.0/8"]).is_ok());
        let e = allow("tcp/8080", &[]).expect_err("overlap");
        assert!(
            e.starts_with(&format!(
                "{}: tcp/8080 overlaps tcp/8000-8099",
                file.display()
            )),
            "{e}"
        );
        let deny = |spec: &str| {
            deny(DenyArgs {
                spec: spec.into(),
                socket: Some(socket.clone()),
                offline: true,
                policy: Some(file.clone()),
                force: false,
                confirm_within: None,
            })
            .map_err(|e| format!("{e:#}"))
        };
        assert!(deny("tcp/8050").is_ok());
        let e = deny("udp/1").expect_err("nothing to deny");
        assert!(e.ends_with("udp/1 is not permitted by any rule"), "{e}");
        let policy = Policy::load(&file)?;
        let rules: Vec<String> = policy.rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            ["tcp/8000-8049", "tcp/8051-8099", "tcp/5432 from 10.0.0.0/8"]
        );

        // An owner from the command line is checked and persisted.
        let owned = |spec: &str, user: &str| {
            super::allow(AllowArgs {
                spec: spec.into(),
                from: Vec::new(),
                limit: None,
                owner: OwnerArgs {
                    owner_user: Some(user.into()),
                    owner_comm: Some("redis-server".into()),
                    ..OwnerArgs::default()
                },
                socket: Some(socket.clone()),
                offline: true,
                policy: Some(file.clone()),
                force: false,
                confirm_within: None,
            })
            .map_err(|e| format!("{e:#}"))
        };
        assert!(owned("tcp/6379", "root").is_ok());
        let e = owned("tcp/7000-7001", "root").expect_err("a range");
        assert!(e.contains("an owner rule names one port"), "{e}");
        let e = owned("tcp/7002", "no-such-user-pw").expect_err("no such user");
        assert!(e.contains("user \"no-such-user-pw\" does not exist"), "{e}");
        let policy = Policy::load(&file)?;
        assert_eq!(
            policy.rules.last().map(ToString::to_string).as_deref(),
            Some("tcp/6379 owner user root, comm redis-server")
        );

        // An invalid file is left alone.
        std::fs::write(&file, "allow = [\"dccp/1\"]\n")?;
        let e = allow("tcp/1", &[]).expect_err("invalid file");
        assert!(e.contains("unknown protocol \"dccp\""), "{e}");
        assert_eq!(std::fs::read_to_string(&file)?, "allow = [\"dccp/1\"]\n");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
