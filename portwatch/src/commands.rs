//! The client commands that steer a running guard through its control
//! socket: `allow`, `deny`, `policy`, `reload`, `status`, and `watch`'s
//! use of a running guard's stream. Each checks what it can locally first,
//! so that a typo gets a precise message even without a guard.
//!
//! `allow` and `deny` can also edit the policy file directly (`--offline`),
//! for when no guard runs: the change applies when one starts.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, IsTerminal as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use ipnet::IpNet;
use serde_json::Value;

pub use crate::control::write_atomically;
use crate::{
    control::{
        DEFAULT_SOCKET, Format, Request,
        client::{self, ClientError},
    },
    guard::DEFAULT_POLICY,
    policy::{Policy, PolicyError, PortRange, Rule},
};

#[derive(Debug, Clone, Args)]
pub struct AllowArgs {
    /// Ports to permit: tcp/PORT, udp/PORT or a range such as tcp/8000-8099.
    #[arg(value_name = "SPEC")]
    pub spec: String,
    /// Permit only these sources: addresses or CIDRs (repeatable, or comma-separated) [default: from anywhere]
    #[arg(long = "from", value_name = "CIDR", value_delimiter = ',')]
    pub from: Vec<String>,
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Change the policy file instead of a running guard; it applies when a guard starts (or reloads).
    #[arg(long)]
    pub offline: bool,
    /// With --offline: the policy file to change (created if missing) [default: /etc/portwatch/policy.toml]
    #[arg(long, value_name = "FILE", requires = "offline")]
    pub policy: Option<PathBuf>,
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
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the guard's answer as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn socket_path(socket: Option<&Path>) -> PathBuf {
    socket.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), Path::to_owned)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

// ---- allow / deny ---------------------------------------------------------

/// An address (a /32 or /128) or a CIDR whose host bits are clear.
fn parse_source(value: &str) -> anyhow::Result<IpNet> {
    let net = if value.contains('/') {
        value.parse::<IpNet>().map_err(|_| {
            anyhow!(
                "--from {value:?} is not a CIDR: expected an address and a prefix length, \
                 e.g. 10.0.0.0/8 or fd00::/8"
            )
        })?
    } else {
        value.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
            anyhow!(
                "--from {value:?} is not an address: expected e.g. 10.0.0.1, or a CIDR like \
                 10.0.0.0/8"
            )
        })?
    };
    if net.trunc() != net {
        bail!(
            "--from {value:?} has host bits set (did you mean {}?)",
            net.trunc()
        );
    }
    Ok(net)
}

/// The rule `allow SPEC --from ...` asks for, checked as the guard would.
fn local_rule(spec: &str, from: &[String]) -> anyhow::Result<Rule> {
    let ports = PortRange::parse(spec)?;
    let from = from
        .iter()
        .map(|v| parse_source(v))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rule = Rule {
        ports,
        from,
        line: None,
    };
    // The checks of a rule on its own: redundant sources and the like.
    Policy::default().add_rule(rule.clone())?;
    Ok(rule)
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

/// The guard's `change` text, or its whole answer when it has none.
fn print_change(answer: &Value) -> anyhow::Result<ExitCode> {
    match answer.get("change").and_then(Value::as_str) {
        Some(change) => print(&format!("{}\n", change.trim_end()))?,
        None => print(&format!("{answer}\n"))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The error for a client failure; a missing guard gets `hint` after it.
fn client_error(e: ClientError, hint: &str) -> anyhow::Error {
    match e {
        ClientError::NoGuard { .. } if !hint.is_empty() => anyhow!("{e}; {hint}"),
        e => e.into(),
    }
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
    let mut policy = match Policy::load(path) {
        Ok(policy) => policy,
        Err(PolicyError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {
            Policy::default()
        }
        Err(e) => return Err(e.into()),
    };
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
    let rule = local_rule(&args.spec, &args.from)?;
    let socket = socket_path(args.socket.as_deref());
    if args.offline {
        return edit_offline(args.policy.as_deref(), &socket, |policy| {
            let what = format!("allowed {}", describe(&rule));
            policy.add_rule(rule)?;
            Ok(what)
        });
    }
    let request = Request::Allow {
        spec: args.spec.clone(),
        from: args.from.clone(),
    };
    let answer = client::request(&socket, &request)
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
        spec: args.spec.clone(),
    };
    let answer = client::request(&socket, &request)
        .map_err(|e| client_error(e, &offline_hint("deny", &args.spec, &[])))?;
    print_change(&answer)
}

// ---- policy / reload ------------------------------------------------------

/// `portwatch policy`: the policy in force in the running guard.
pub fn policy(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let answer = client::request(&socket, &Request::Policy).map_err(|e| {
        client_error(
            e,
            &format!("a guard would start with {DEFAULT_POLICY} (check a file with `portwatch check-policy FILE`)"),
        )
    })?;
    if args.json {
        print(&format!("{answer}\n"))?;
    } else {
        match answer.get("toml").and_then(Value::as_str) {
            Some(text) if text.ends_with('\n') => print(text)?,
            Some(text) => print(&format!("{text}\n"))?,
            None => bail!("the guard's answer has no policy text: {answer}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `portwatch reload`: the guard reads its policy file again.
pub fn reload(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let answer = client::request(&socket, &Request::Reload).map_err(|e| client_error(e, ""))?;
    print_change(&answer)
}

// ---- status -----------------------------------------------------------------

/// `portwatch status`: the guard's mode, interfaces, counters and listeners.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let answer = client::request(&socket, &Request::Status)
        .map_err(|e| client_error(e, "start one with `portwatch guard`"))?;
    if args.json {
        print(&format!("{answer}\n"))?;
    } else {
        let own_netns = crate::procinfo::netns_of(std::process::id());
        let mut users = Users::default();
        print(&render_status(
            &answer,
            crate::cli::colour_wanted(),
            own_netns,
            &mut |uid| users.name(uid),
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Users(HashMap<u32, String>);

impl Users {
    fn name(&mut self, uid: u32) -> String {
        self.0
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map_or_else(|| uid.to_string(), |u| u.name)
            })
            .clone()
    }
}

const RED: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn u64_of(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// `900 B`, `1.5 KiB`, `3.2 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("PiB"))
}

/// `10`, or `10 (900 B)` with bytes; `-` when the guard did not say.
fn packets(l: &Value, packets: &str, bytes_key: &str) -> String {
    match (u64_of(l, packets), u64_of(l, bytes_key)) {
        (Some(p), Some(b)) => format!("{p} ({})", bytes(b)),
        (Some(p), None) => p.to_string(),
        _ => "-".to_owned(),
    }
}

/// `1.2.3.4:80`, `[::]:80`.
fn address(l: &Value) -> String {
    let addr = str_of(l, "addr").unwrap_or("?");
    let port = u64_of(l, "port").map_or_else(|| "?".to_owned(), |p| p.to_string());
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// The status answer as people read it: a few `key value` lines, then a
/// table of listeners sorted by protocol and port. Fields the answer lacks
/// are left out (or shown as `-`).
fn render_status(
    status: &Value,
    colour: bool,
    own_netns: Option<u64>,
    user_name: &mut dyn FnMut(u32) -> String,
) -> String {
    let paint = |code: &'static str| if colour { (code, RESET) } else { ("", "") };
    let mut head: Vec<(&str, String)> = Vec::new();
    if let Some(mode) = str_of(status, "mode") {
        let (on, off) = paint(if mode == "audit" { YELLOW } else { "" });
        head.push(("mode", format!("{on}{mode}{off}")));
    }
    if let Some(file) = str_of(status, "policy_file") {
        head.push(("policy", file.to_owned()));
    }
    if let Some(pinned) = status.get("pinned").and_then(Value::as_bool) {
        head.push(("pinned", if pinned { "yes" } else { "no" }.to_owned()));
    }
    if let Some(ifaces) = status.get("interfaces").and_then(Value::as_array) {
        let list: Vec<String> = ifaces
            .iter()
            .map(|i| {
                let name = str_of(i, "iface").unwrap_or("?");
                match str_of(i, "xdp_mode") {
                    Some(mode) => format!("{name} ({mode})"),
                    None => name.to_owned(),
                }
            })
            .collect();
        head.push((
            "interfaces",
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.join(", ")
            },
        ));
    }
    if let Some(totals) = status.get("totals").filter(|t| t.is_object()) {
        let mut parts = Vec::new();
        if let Some(n) = u64_of(totals, "passed") {
            parts.push(format!("passed {n}"));
        }
        let reasons: Vec<(u64, &str)> = [
            ("drop_no_rule", "no rule"),
            ("drop_source", "source not allowed"),
            ("drop_malformed", "malformed"),
            ("drop_fragment", "fragment"),
        ]
        .into_iter()
        .filter_map(|(key, label)| u64_of(totals, key).map(|n| (n, label)))
        .collect();
        if !reasons.is_empty() {
            let sum: u64 = reasons.iter().map(|(n, _)| n).sum();
            let each: Vec<String> = reasons.iter().map(|(n, l)| format!("{l} {n}")).collect();
            parts.push(format!("dropped {sum} ({})", each.join(", ")));
        }
        if let Some(n) = u64_of(totals, "reports_suppressed") {
            parts.push(format!("drop reports held back {n}"));
        }
        if let Some(n) = u64_of(totals, "events_lost") {
            let (on, off) = paint(if n > 0 { RED } else { "" });
            parts.push(format!("{on}events lost {n}{off}"));
        }
        // Counters this client does not know yet, by their names.
        const KNOWN: [&str; 7] = [
            "passed",
            "drop_no_rule",
            "drop_source",
            "drop_malformed",
            "drop_fragment",
            "reports_suppressed",
            "events_lost",
        ];
        if let Some(all) = totals.as_object() {
            for (key, value) in all.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())) {
                if let Some(n) = value.as_u64() {
                    parts.push(format!("{} {n}", key.replace('_', " ")));
                }
            }
        }
        head.push(("totals", parts.join(", ")));
    }
    let mut out = String::new();
    let key_width = head.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in &head {
        let _ = writeln!(out, "{key:<key_width$}  {value}");
    }

    let Some(listeners) = status.get("listeners").and_then(Value::as_array) else {
        return out;
    };
    if !head.is_empty() {
        out.push('\n');
    }
    if listeners.is_empty() {
        out.push_str("no listeners\n");
        return out;
    }
    let mut sorted: Vec<&Value> = listeners.iter().collect();
    sorted.sort_by_key(|l| {
        (
            str_of(l, "proto").unwrap_or("").to_owned(),
            u64_of(l, "port").unwrap_or(0),
            str_of(l, "addr").unwrap_or("").to_owned(),
        )
    });
    const HEADER: [&str; 9] = [
        "PROTO", "ADDRESS", "PID", "COMM", "USER", "EXPOSURE", "PASSED", "DROPPED", "COMMAND",
    ];
    // Right-aligned: the numbers.
    const RIGHT: [bool; 9] = [false, false, true, false, false, false, true, true, false];
    let rows: Vec<[String; 9]> = sorted
        .iter()
        .map(|l| {
            let command = str_of(l, "cmdline")
                .filter(|c| !c.is_empty())
                .or_else(|| str_of(l, "exe"))
                .unwrap_or("")
                .to_owned();
            let netns = match u64_of(l, "netns") {
                Some(ns) if own_netns.is_some_and(|own| own != ns) => format!(" netns={ns}"),
                _ => String::new(),
            };
            [
                str_of(l, "proto").unwrap_or("-").to_owned(),
                address(l),
                u64_of(l, "pid").map_or_else(|| "-".to_owned(), |p| p.to_string()),
                str_of(l, "comm").unwrap_or("-").to_owned(),
                l.get("uid")
                    .and_then(Value::as_u64)
                    .and_then(|u| u32::try_from(u).ok())
                    .map_or_else(|| "-".to_owned(), &mut *user_name),
                str_of(l, "exposure").unwrap_or("-").to_owned(),
                packets(l, "pass_packets", "pass_bytes"),
                packets(l, "drop_packets", "drop_bytes"),
                format!("{command}{netns}").trim_start().to_owned(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 9], colours: [(&str, &str); 9]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let last = i + 1 == cells.len();
            let width = widths.get(i).copied().unwrap_or(0);
            let (on, off) = colours.get(i).copied().unwrap_or(("", ""));
            let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
            if i > 0 {
                text.push(' ');
            }
            if RIGHT.get(i).copied().unwrap_or(false) {
                text.push_str(&pad);
                let _ = write!(text, "{on}{cell}{off}");
            } else if last {
                let _ = write!(text, "{on}{cell}{off}");
            } else {
                let _ = write!(text, "{on}{cell}{off}{pad}");
            }
        }
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let (dim, undim) = paint(DIM);
    out.push_str(&line(HEADER, [(dim, undim); 9]));
    for row in &rows {
        let mut colours = [("", ""); 9];
        if let Some(slot) = colours.get_mut(5) {
            *slot = match row[5].as_str() {
                "exposed" => paint(RED),
                "partial" => paint(YELLOW),
                _ => ("", ""),
            };
        }
        out.push_str(&line(row.each_ref().map(String::as_str), colours));
    }
    out
}

// ---- watch ------------------------------------------------------------------

/// `portwatch watch` while a guard runs: the guard's own stream instead of
/// a second set of kernel hooks. Copies its lines to stdout, each flushed,
/// until the guard ends the stream or stdout goes away; Ctrl-C ends the
/// process as usual. Ok(false) when no guard runs.
pub fn watch_via_guard(socket: &Path, json: bool, colour: bool) -> anyhow::Result<bool> {
    if !client::guard_running(socket) {
        return Ok(false);
    }
    let format = if json { Format::Json } else { Format::Human };
    let lines = match client::subscribe(socket, format, colour) {
        Ok(lines) => lines,
        // It went away in between.
        Err(ClientError::NoGuard { .. }) => return Ok(false),
        // Not ours to follow (or a stale socket we may not even touch): watch
        // on our own, which says what it needs if we lack that too.
        Err(ClientError::PermissionDenied(why)) => {
            log::warn!("not following the guard at {}: {why}", socket.display());
            return Ok(false);
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "a portwatch guard is running (control socket {}), but its stream is not available",
                socket.display()
            )));
        }
    };
    let mut out = io::stdout().lock();
    for line in lines {
        let line = line.context("reading the guard's stream")?;
        match writeln!(out, "{line}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(true),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    if !json && io::stderr().is_terminal() {
        eprintln!("portwatch: the guard ended its stream");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn status_example() -> Value {
        serde_json::json!({
            "ok": true, "mode": "enforce", "policy_file": "/etc/portwatch/policy.toml",
            "pinned": true,
            "interfaces": [{"iface": "eth0", "ifindex": 2, "xdp_mode": "native"},
                           {"iface": "eth1", "ifindex": 3, "xdp_mode": "generic"}],
            "totals": {"passed": 1, "drop_no_rule": 2, "drop_source": 0, "drop_malformed": 0,
                       "drop_fragment": 0, "reports_suppressed": 0, "events_lost": 0,
                       "flow_replies": 5},
            "listeners": [
                {"proto": "udp", "family": "ipv6", "addr": "::", "port": 53, "pid": 900,
                 "comm": "dnsmasq", "uid": 65534, "exe": "/usr/sbin/dnsmasq", "cmdline": "",
                 "netns": 1, "exposure": "blocked", "pass_packets": 0, "pass_bytes": 0,
                 "drop_packets": 3, "drop_bytes": 3000},
                {"proto": "tcp", "family": "ipv4", "addr": "0.0.0.0", "port": 22, "pid": 812,
                 "comm": "sshd", "uid": 0, "exe": "/usr/sbin/sshd", "cmdline": "sshd -D",
                 "netns": 1, "exposure": "exposed", "pass_packets": 10, "pass_bytes": 900,
                 "drop_packets": 0, "drop_bytes": 0},
                {"proto": "tcp", "family": "ipv4", "addr": "10.0.0.5", "port": 5432,
                 "pid": null, "comm": null, "uid": null, "netns": 7, "exposure": "partial"}
            ]
        })
    }

    fn name(uid: u32) -> String {
        match uid {
            0 => "root".into(),
            65534 => "nobody".into(),
            n => n.to_string(),
        }
    }

    #[test]
    fn status_table() {
        let text = render_status(&status_example(), false, Some(1), &mut name);
        let want = "\
mode        enforce
policy      /etc/portwatch/policy.toml
pinned      yes
interfaces  eth0 (native), eth1 (generic)
totals      passed 1, dropped 2 (no rule 2, source not allowed 0, malformed 0, fragment 0), drop reports held back 0, events lost 0, flow replies 5

PROTO ADDRESS       PID COMM    USER   EXPOSURE     PASSED     DROPPED COMMAND
tcp   0.0.0.0:22    812 sshd    root   exposed  10 (900 B)     0 (0 B) sshd -D
tcp   10.0.0.5:5432   - -       -      partial           -           - netns=7
udp   [::]:53       900 dnsmasq nobody blocked     0 (0 B) 3 (2.9 KiB) /usr/sbin/dnsmasq
";
        assert_eq!(text, want, "\n{text}");
        assert!(!text.contains('\x1b'));
        let coloured = render_status(&status_example(), true, Some(1), &mut name);
        assert!(
            coloured.contains(&format!("{RED}exposed{RESET}")),
            "{coloured}"
        );
        // Colour does not move the columns.
        let strip = |s: &str| {
            [RED, YELLOW, DIM, RESET]
                .iter()
                .fold(s.to_owned(), |acc, code| acc.replace(code, ""))
        };
        assert_eq!(strip(&coloured), text);
    }

    #[test]
    fn status_tolerates_missing_fields() {
        assert_eq!(
            render_status(&serde_json::json!({"ok": true}), false, None, &mut name),
            ""
        );
        assert_eq!(
            render_status(
                &serde_json::json!({"ok": true, "mode": "audit", "listeners": []}),
                false,
                None,
                &mut name
            ),
            "mode  audit\n\nno listeners\n"
        );
        let odd = serde_json::json!({"ok": true, "totals": 3, "interfaces": [{}],
                                     "listeners": [{}, {"port": "x"}]});
        let text = render_status(&odd, false, None, &mut name);
        assert!(text.contains("interfaces  ?\n"), "{text}");
        assert!(text.contains("-     ?:?"), "{text}");
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn local_checks() {
        let err = |spec: &str, from: &[&str]| {
            let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
            local_rule(spec, &from)
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
            Err(r#"--from "10.0.0.1/8" has host bits set (did you mean 10.0.0.0/8?)"#.into())
        );
        assert!(
            err("tcp/1", &["10.0.0.0/33"]).is_err_and(|e| e.contains("is not a CIDR")),
            "prefix too long"
        );
        assert!(err("tcp/1", &["example.org"]).is_err_and(|e| e.contains("is not an address")));
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
                socket: Some(socket.clone()),
                offline: true,
                policy: Some(file.clone()),
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

        // An invalid file is left alone.
        std::fs::write(&file, "allow = [\"sctp/1\"]\n")?;
        let e = allow("tcp/1", &[]).expect_err("invalid file");
        assert!(e.contains("unknown protocol \"sctp\""), "{e}");
        assert_eq!(std::fs::read_to_string(&file)?, "allow = [\"sctp/1\"]\n");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
