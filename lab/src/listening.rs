//! Servers in a namespace, and waiting until they listen.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{bounded::run_within, netns::Netns, process::ChildGuard};

/// How long a server may take to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// Waits (10 s at most) until something in `ns` listens on `proto`
/// (`"tcp"`; anything else is UDP) `port`.
pub fn wait_listening(ns: &Netns, proto: &str, port: u16) -> Result<()> {
    let flags = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
    let suffix = format!(":{port}");
    let deadline = Instant::now() + LISTEN_WAIT;
    loop {
        let out = run_within(ns.command("ss").arg(flags), LISTEN_WAIT)?;
        let listening = out.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|local| local.ends_with(&suffix))
        });
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {proto}/{port} in {} after {LISTEN_WAIT:?}:\n{out}",
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `program args` in `ns` (no stdio) and waits until it listens on
/// `proto` `port`; killed on drop.
pub fn spawn_server(
    ns: &Netns,
    proto: &str,
    port: u16,
    program: &str,
    args: &[&str],
) -> Result<ChildGuard> {
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = ChildGuard::spawn(&mut cmd)?;
    if let Err(e) = wait_listening(ns, proto, port) {
        let status = server.0.try_wait();
        bail!("{program} {args:?} did not start listening ({status:?}): {e:#}");
    }
    Ok(server)
}
