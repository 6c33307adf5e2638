//! The client commands: steering a running guard through its control
//! socket (`allow`, `deny`, `policy`, `reload`: [`change`]; `apply`,
//! `confirm`, `diff`: [`apply`]), showing its
//! state (`status`: [`status`]), asking its XDP program (`explain`,
//! `verify`: [`inspect`]), following its stream (`watch` while a guard
//! runs: [`follow`]), and the local ones (`check-policy`, `down`).

pub mod apply;
pub mod change;
pub mod follow;
pub mod inspect;
pub mod learn;
pub mod status;

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, anyhow};
use portwatch::{
    control::{DEFAULT_SOCKET, client::ClientError},
    guard,
    policy::{Policy, compile::compile},
};

fn socket_path(socket: Option<&Path>) -> PathBuf {
    socket.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), Path::to_owned)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .or_else(ignore_broken_pipe)
        .context("writing to stdout")
}

/// A reader of stdout that went away (`| head`) is not an error.
fn ignore_broken_pipe(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e)
    }
}

/// The error for a client failure; a missing guard gets `hint` after it.
fn client_error(e: ClientError, hint: &str) -> anyhow::Error {
    match e {
        ClientError::NoGuard { .. } if !hint.is_empty() => anyhow!("{e}; {hint}"),
        e => e.into(),
    }
}

/// `60`, `90s`, `5m`, `2h`, `1d` as seconds, from 1 s to `max` seconds;
/// `what` names the value in errors.
pub fn parse_duration(text: &str, max: u64, what: &str) -> Result<u64, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?}: expected seconds, or a number with s, m, h or d (e.g. 90s, 5m)"
            ));
        }
    };
    let secs = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a time (e.g. 60, 90s, 5m)"))?;
    if secs == 0 || secs > max {
        let limit = if max.is_multiple_of(86_400) && max > 86_400 {
            format!("{} d", max / 86_400)
        } else {
            format!("{} h", max / 3600)
        };
        return Err(format!("{text:?}: {what} must be between 1 s and {limit}"));
    }
    Ok(secs)
}

/// `portwatch check-policy FILE`.
pub fn check_policy(path: &Path) -> anyhow::Result<ExitCode> {
    let policy = Policy::load(path)?;
    let image = compile(&policy)?;
    let mut out = format!(
        "{}: ok: {} rules ({} ports), mode {}, interfaces {}\n",
        path.display(),
        policy.rules.len(),
        image.ports.len(),
        policy.mode.map_or("unset (enforce)", |m| m.as_str()),
        if policy.interfaces.is_empty() {
            "unset (default-route interfaces)".to_string()
        } else {
            policy.interfaces.join(", ")
        }
    );
    for rule in &policy.rules {
        let from = if rule.from.is_empty() {
            "anywhere".to_string()
        } else {
            let nets: Vec<String> = rule.from.iter().map(ToString::to_string).collect();
            nets.join(", ")
        };
        out.push_str(&format!("  allow {} from {from}\n", rule.ports));
    }
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// `portwatch down`: stops a running guard and removes everything pinned.
pub fn down(pin_dir: Option<&Path>, socket: Option<&Path>) -> anyhow::Result<ExitCode> {
    let done = guard::down(pin_dir, socket)?;
    let mut out = String::new();
    if let Some(pid) = done.stopped {
        out.push_str(&format!("stopped the guard (pid {pid})\n"));
    }
    if done.removed.is_empty() {
        let dir = pin_dir.map_or_else(
            || portwatch::datapath::pins::DEFAULT_PIN_DIR.to_owned(),
            |p| p.display().to_string(),
        );
        out.push_str(&format!("nothing pinned in {dir}\n"));
    } else {
        for r in &done.removed {
            out.push_str(&format!("removed {r}\n"));
        }
    }
    print(&out)?;
    Ok(ExitCode::SUCCESS)
}
