//! `portwatch status`: the guard's mode, interfaces, counters and every
//! listener with its exposure, as a table for people or the guard's JSON.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;

use clap::Args;
use portwatch::{
    control::{
        client,
        protocol::{ListenerStatus, Response, StatusResponse, Totals, VerifySummary},
    },
    format::{self, UserNames, bytes, endpoint},
    model::Mode,
    procinfo,
};

use super::{client_error, ignore_broken_pipe, print, socket_path};

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the guard's answer as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `portwatch status`.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let answer =
        client::status(&socket).map_err(|e| client_error(e, "start one with `portwatch guard`"))?;
    if args.json {
        // One document, as before; written as it is encoded, not built as
        // one string first.
        let stdout = io::stdout().lock();
        let mut out = io::BufWriter::with_capacity(64 << 10, stdout);
        Response::Status(Box::new(answer))
            .write_line(&mut out)
            .and_then(|()| out.flush())
            .or_else(ignore_broken_pipe)
            .context("cannot write the status")?;
    } else {
        let own_netns = procinfo::netns_of(std::process::id());
        let mut users = UserNames::default();
        print(&render_status(
            &answer,
            crate::terminal::colour_wanted(),
            own_netns,
            &mut |uid| users.name(uid),
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

const RED: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// `10 (900 B)`.
fn packets(packets: u64, bytes_count: u64) -> String {
    format!("{packets} ({})", bytes(bytes_count))
}

/// The totals line: passed, dropped by reason, and the other counters.
fn totals_line(t: &Totals, paint: impl Fn(&'static str) -> (&'static str, &'static str)) -> String {
    let mut parts = vec![format!("passed {}", t.passed)];
    let reasons = [
        (t.drop_no_rule, "no rule"),
        (t.drop_source, "source not allowed"),
        (t.drop_malformed, "malformed"),
        (t.drop_fragment, "fragment"),
        (t.drop_rate_limited, "rate limited"),
    ];
    let sum: u64 = reasons.iter().map(|(n, _)| n).sum();
    let each: Vec<String> = reasons.iter().map(|(n, l)| format!("{l} {n}")).collect();
    parts.push(format!("dropped {sum} ({})", each.join(", ")));
    parts.push(format!("drop reports held back {}", t.reports_suppressed));
    let (on, off) = paint(if t.events_lost > 0 { RED } else { "" });
    parts.push(format!("{on}events lost {}{off}", t.events_lost));
    if t.follower_events_missed > 0 {
        let (on, off) = paint(RED);
        parts.push(format!(
            "{on}events followers missed {}{off}",
            t.follower_events_missed
        ));
    }
    parts.push(format!("flow replies {}", t.flow_replies));
    parts.push(format!("forwarded {}", t.forwarded));
    if t.rate_table_full > 0 {
        parts.push(format!(
            "rate-limited sources over the table {}",
            t.rate_table_full
        ));
    }
    parts.push(format!("reports lost {}", t.reports_lost));
    if t.binds_refused + t.binds_audited > 0 {
        let (on, off) = paint(RED);
        parts.push(format!(
            "{on}owned-port binds by others refused {}, audited {}{off}",
            t.binds_refused, t.binds_audited
        ));
    }
    // Counters of a newer guard, by their names.
    for (key, value) in &t.other {
        parts.push(format!("{} {value}", key.replace('_', " ")));
    }
    parts.join(", ")
}

/// The status answer as people read it: a few `key value` lines, then a
/// table of listeners sorted by protocol and port.
/// The last verify: `ok at 12:00:01 (reload): 3 listeners, 20 probes`, or
/// FAILED and what disagreed.
pub fn verify_line(
    v: &VerifySummary,
    paint: impl Fn(&'static str) -> (&'static str, &'static str),
) -> String {
    let at = format::time_of_day(std::time::UNIX_EPOCH + std::time::Duration::from_secs(v.at));
    let unchecked = if v.unchecked > 0 {
        format!(", {} not probed", v.unchecked)
    } else {
        String::new()
    };
    if v.ok {
        format!(
            "ok at {at} ({}): {} listeners, {} probes agree with the policy{unchecked}",
            v.trigger, v.listeners, v.probes
        )
    } else {
        let (on, off) = paint(RED);
        format!(
            "{on}FAILED{off} at {at} ({}): {}{unchecked}",
            v.trigger,
            v.disagreements.join("; ")
        )
    }
}

fn render_status(
    status: &StatusResponse,
    colour: bool,
    own_netns: Option<u64>,
    user_name: &mut dyn FnMut(u32) -> String,
) -> String {
    let paint = |code: &'static str| if colour { (code, RESET) } else { ("", "") };
    let mut head: Vec<(&str, String)> = Vec::new();
    if let Some(mode) = status.mode {
        let (on, off) = paint(if mode == Mode::Audit { YELLOW } else { "" });
        head.push(("mode", format!("{on}{mode}{off}")));
    }
    if let Some(file) = &status.policy_file {
        head.push(("policy", file.clone()));
    }
    if let Some(pinned) = &status.pinned {
        head.push(("pinned", pinned.clone()));
    }
    let list: Vec<String> = status
        .interfaces
        .iter()
        .map(
            |i| match i.why.as_deref().and_then(|w| w.split(':').next()) {
                // `eth1 (generic: veth)`: auto chose generic for what it is.
                Some(kind) => format!("{} ({}: {kind})", i.iface, i.xdp_mode),
                None => format!("{} ({})", i.iface, i.xdp_mode),
            },
        )
        .collect();
    head.push((
        "interfaces",
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        },
    ));
    head.push(("totals", totals_line(&status.totals, paint)));
    if !status.owned.is_empty() {
        let owned: Vec<String> = status
            .owned
            .iter()
            .map(|o| {
                let state = if o.open {
                    let who = format::process(o.comm.as_deref(), o.pid);
                    format!("open: {who} listens")
                } else {
                    let (on, off) = paint(YELLOW);
                    format!("{on}closed{off}: no owner listens")
                };
                let squat = match o.squatters {
                    0 => String::new(),
                    1 => ", 1 other listener on it".to_owned(),
                    n => format!(", {n} other listeners on it"),
                };
                format!("{} {state}; owner {}{squat}", o.port, o.owner)
            })
            .collect();
        head.push(("owned", owned.join("; ")));
    }
    if let Some(v) = &status.verify {
        head.push(("verify", verify_line(v, paint)));
    }
    if let Some(v) = &status.verifying {
        head.push((
            "verifying",
            format!(
                "{}: {} of {} listeners probed",
                v.trigger, v.probed, v.listeners
            ),
        ));
    }
    let mut out = String::new();
    let key_width = head.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in &head {
        let _ = writeln!(out, "{key:<key_width$}  {value}");
    }
    out.push('\n');
    if status.listeners.is_empty() {
        out.push_str("no listeners\n");
        return out;
    }
    let mut sorted: Vec<&ListenerStatus> = status.listeners.iter().collect();
    sorted.sort_by_key(|l| (l.proto, l.port, l.addr));
    const HEADER: [&str; 9] = [
        "PROTO", "ADDRESS", "PID", "COMM", "USER", "EXPOSURE", "PASSED", "DROPPED", "COMMAND",
    ];
    // Right-aligned: the numbers.
    const RIGHT: [bool; 9] = [false, false, true, false, false, false, true, true, false];
    let rows: Vec<[String; 9]> = sorted
        .iter()
        .map(|l| {
            let command = l
                .cmdline
                .as_deref()
                .filter(|c| !c.is_empty())
                .or(l.exe.as_deref())
                .unwrap_or("")
                .to_owned();
            let netns = match l.netns {
                Some(ns) if own_netns.is_some_and(|own| own != ns) => format!(" netns={ns}"),
                _ => String::new(),
            };
            [
                l.proto.as_str().to_owned(),
                endpoint(&l.addr, l.port),
                l.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                l.comm.as_deref().unwrap_or("-").to_owned(),
                l.uid.map_or_else(|| "-".to_owned(), &mut *user_name),
                l.exposure
                    .map_or_else(|| "-".to_owned(), |e| format::exposure(e, &l.exposed_via)),
                packets(l.pass_packets, l.pass_bytes),
                packets(l.drop_packets, l.drop_bytes),
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

#[cfg(test)]
mod tests {
    use portwatch::{
        control::protocol::{OwnedPort, VerifyProgress},
        datapath::attach::Attached,
        model::{AttachedMode, Family, Proto},
    };

    use super::*;

    fn listener(proto: Proto, addr: &str, port: u16) -> ListenerStatus {
        let addr: std::net::IpAddr = addr.parse().unwrap_or([0u8; 4].into());
        ListenerStatus {
            proto,
            family: Family::of(&addr),
            addr,
            port,
            pid: None,
            comm: None,
            uid: None,
            exe: None,
            cmdline: None,
            netns: Some(1),
            exposure: None,
            exposed_via: vec![],
            is_owner: None,
            pass_packets: 0,
            pass_bytes: 0,
            drop_packets: 0,
            drop_bytes: 0,
        }
    }

    fn status_example() -> StatusResponse {
        StatusResponse {
            mode: Some(Mode::Enforce),
            policy_file: Some("/etc/portwatch/policy.toml".into()),
            pinned: Some("/sys/fs/bpf/portwatch".into()),
            interfaces: vec![
                Attached {
                    iface: "eth0".into(),
                    ifindex: 2,
                    xdp_mode: AttachedMode::Native,
                    why: None,
                },
                Attached {
                    iface: "eth1".into(),
                    ifindex: 3,
                    xdp_mode: AttachedMode::Generic,
                    why: None,
                },
            ],
            totals: Totals {
                passed: 1,
                drop_no_rule: 2,
                flow_replies: 5,
                other: [("new_counter".to_owned(), 9)].into_iter().collect(),
                ..Totals::default()
            },
            listeners: vec![
                ListenerStatus {
                    pid: Some(900),
                    comm: Some("dnsmasq".into()),
                    uid: Some(65534),
                    exe: Some("/usr/sbin/dnsmasq".into()),
                    cmdline: Some("".into()),
                    exposure: Some(portwatch::model::Exposure::Blocked),
                    exposed_via: vec![],
                    is_owner: None,
                    drop_packets: 3,
                    drop_bytes: 3000,
                    ..listener(Proto::Udp, "::", 53)
                },
                ListenerStatus {
                    pid: Some(812),
                    comm: Some("sshd".into()),
                    uid: Some(0),
                    exe: Some("/usr/sbin/sshd".into()),
                    cmdline: Some("sshd -D".into()),
                    exposure: Some(portwatch::model::Exposure::Exposed),
                    exposed_via: vec![],
                    is_owner: None,
                    pass_packets: 10,
                    pass_bytes: 900,
                    ..listener(Proto::Tcp, "0.0.0.0", 22)
                },
                ListenerStatus {
                    netns: Some(7),
                    exposure: Some(portwatch::model::Exposure::Partial),
                    exposed_via: vec![],
                    is_owner: None,
                    ..listener(Proto::Tcp, "10.0.0.5", 5432)
                },
            ],
            owned: vec![OwnedPort {
                port: "tcp/6379".parse().expect("a port"),
                owner: "unit redis-server.service".into(),
                open: false,
                pid: None,
                comm: None,
                squatters: 1,
            }],
            verify: Some(VerifySummary {
                at: 0,
                trigger: "reload".into(),
                ok: false,
                listeners: 3,
                probes: 20,
                disagreements: vec!["tcp [::]:9000 sshd[9]: predicted closed (no rule), observed 4 of 4 probes pass".into()],
                unchecked: 0,
            }),
            verifying: Some(VerifyProgress {
                trigger: "request".into(),
                probed: 256,
                listeners: 15000,
            }),
            listeners_follow: None,
        }
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
pinned      /sys/fs/bpf/portwatch
interfaces  eth0 (native), eth1 (generic)
totals      passed 1, dropped 2 (no rule 2, source not allowed 0, malformed 0, fragment 0, rate limited 0), drop reports held back 0, events lost 0, flow replies 5, forwarded 0, reports lost 0, new counter 9
owned       tcp/6379 closed: no owner listens; owner unit redis-server.service, 1 other listener on it
verify      FAILED at 00:00:00 (reload): tcp [::]:9000 sshd[9]: predicted closed (no rule), observed 4 of 4 probes pass
verifying   request: 256 of 15000 listeners probed

PROTO ADDRESS       PID COMM    USER   EXPOSURE     PASSED     DROPPED COMMAND
tcp   0.0.0.0:22    812 sshd    root   exposed  10 (900 B)     0 (0 B) sshd -D
tcp   10.0.0.5:5432   - -       -      partial     0 (0 B)     0 (0 B) netns=7
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
    fn an_answer_without_listeners_says_so() {
        let status = StatusResponse {
            mode: Some(Mode::Audit),
            ..StatusResponse::default()
        };
        let text = render_status(&status, false, None, &mut name);
        assert!(text.starts_with("mode        audit\n"), "{text}");
        assert!(text.contains("interfaces  none\n"), "{text}");
        assert!(text.ends_with("\nno listeners\n"), "{text}");
    }
}
