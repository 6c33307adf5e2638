//! `portwatch explain` and `portwatch verify`: what the running guard's XDP
//! program does with a packet, and whether it does for every listener
//! what the policy says.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::Args;
use portwatch::{
    control::{
        client,
        protocol::{ExplainQuery, Explanation, Request, Response, VerifyReport},
    },
    datapath::probe::{Answer, TcpFlags},
    policy::PortRange,
};

use super::{client_error, print, socket_path};

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The packet's protocol and destination port: tcp/5432, udp/53, sctp/3868, gre.
    #[arg(value_name = "PROTO/PORT")]
    pub spec: String,
    /// Its source address [default: a documentation address no rule names].
    #[arg(long, value_name = "ADDR")]
    pub from: Option<IpAddr>,
    /// Its destination [default: the host's address on a guarded interface].
    #[arg(long, value_name = "ADDR")]
    pub to: Option<IpAddr>,
    /// Its source port [default: 40000]; for UDP, the remote port of a flow the host opened.
    #[arg(long, value_name = "PORT")]
    pub source_port: Option<u16>,
    /// TCP flags: syn (default), ack, syn,ack, rst, fin, psh, urg, or null, xmas.
    #[arg(long, value_name = "FLAGS")]
    pub flags: Option<TcpFlags>,
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the guard's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The guard's control socket [default: /run/portwatch/control.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the guard's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Every probe of every listener, not only the disagreeing ones.
    #[arg(long, short)]
    pub verbose: bool,
}

/// `portwatch explain PROTO/PORT`: exit 0 whatever the verdict; 1 when the
/// program's answer is not what the policy predicts.
pub fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let ports = PortRange::parse(&args.spec)?;
    if ports.lo != ports.hi {
        anyhow::bail!("explain asks about one port, not the range {ports}");
    }
    let request = Request::Explain(Box::new(ExplainQuery {
        proto: ports.proto,
        port: ports.lo,
        from: args.from,
        to: args.to,
        source_port: args.source_port,
        flags: args.flags,
    }));
    let socket = socket_path(args.socket.as_deref());
    let answer = client::request::<Explanation>(&socket, &request)
        .map_err(|e| client_error(e, "explain asks the running guard's XDP program"))?;
    let agrees = answer.agrees;
    if args.json {
        print(&Response::Explain(Box::new(answer)).to_line())?;
    } else {
        print(&render_explanation(&answer))?;
    }
    Ok(if agrees {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render_explanation(e: &Explanation) -> String {
    let mut out = format!("{}\n", e.packet);
    let reason = match e.verdict {
        Answer::Pass(why) => why.as_str(),
        Answer::Drop(why) => why.as_str(),
    };
    out.push_str(&format!(
        "  verdict: {}, {reason} (the XDP datapath's answer, {} mode)\n",
        e.outcome,
        e.mode.as_str()
    ));
    match &e.rule {
        Some(r) => out.push_str(&format!(
            "  rule:    {} ({}{})\n",
            r.rule,
            r.file,
            r.line
                .map(|l| format!(" line {l}"))
                .unwrap_or_else(|| ", added at run time".into())
        )),
        None => out.push_str("  rule:    none\n"),
    }
    for reason in &e.reasons {
        out.push_str(&format!("  why:     {reason}\n"));
    }
    out.push_str(&format!(
        "  policy:  {}{}\n",
        e.predicted,
        if e.agrees {
            " (the program agrees)"
        } else {
            " — THE PROGRAM DISAGREES"
        }
    ));
    out.push_str(&format!(
        "  port:    {} packets passed, {} dropped\n",
        e.pass_packets, e.drop_packets
    ));
    for drop in &e.last_drops {
        out.push_str(&format!("  dropped: {drop}\n"));
    }
    for note in &e.notes {
        out.push_str(&format!("  note:    {note}\n"));
    }
    out
}

/// `portwatch verify`: exit 1 on any disagreement.
pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let socket = socket_path(args.socket.as_deref());
    let report = client::request::<VerifyReport>(&socket, &Request::Verify)
        .map_err(|e| client_error(e, "verify asks the running guard's XDP program"))?;
    let ok = report.ok();
    if args.json {
        print(&Response::Verify(Box::new(report)).to_line())?;
    } else {
        print(&render_report(&report, args.verbose))?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render_report(r: &VerifyReport, verbose: bool) -> String {
    let width = r
        .rows
        .iter()
        .map(|row| row.listener.chars().count())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut out = format!(
        "{:<width$}  {:<3}  {:<40}  OBSERVED\n",
        "LISTENER", "OK", "PREDICTED"
    );
    for row in &r.rows {
        let mark = match (&row.skipped, row.ok) {
            (Some(_), _) => "-",
            (None, true) => "ok",
            (None, false) => "NO",
        };
        let observed = row.skipped.as_deref().unwrap_or(&row.observed);
        out.push_str(&format!(
            "{:<width$}  {mark:<3}  {:<40}  {observed}\n",
            row.listener, row.predicted
        ));
        for s in row.samples.iter().filter(|s| verbose || !s.agrees) {
            out.push_str(&format!(
                "{:<width$}       from {} to {}{}: predicted {}, program {}{}\n",
                "",
                s.from,
                s.to,
                s.flags
                    .as_deref()
                    .map(|f| format!(" [{f}]"))
                    .unwrap_or_default(),
                if s.predicted_pass { "pass" } else { "drop" },
                s.observed,
                if s.agrees { "" } else { "  <- disagrees" }
            ));
        }
    }
    for problem in &r.interfaces {
        out.push_str(&format!("interface: {problem}\n"));
    }
    out.push_str(&format!(
        "{}: {} listeners, {} probes, {} disagreement{}{}\n",
        if r.ok() { "verified" } else { "FAILED" },
        r.rows.iter().filter(|row| row.skipped.is_none()).count(),
        r.probes,
        r.disagreements,
        if r.disagreements == 1 { "" } else { "s" },
        if r.unchecked > 0 {
            format!(", {} not probed", r.unchecked)
        } else {
            String::new()
        }
    ));
    out
}
