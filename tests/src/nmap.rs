//! nmap against a lab's server, from its client namespace: the ports and
//! states it reports, read from its XML output.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use crate::{
    Result,
    net::{Lab, run_bounded},
};

/// (protocol, port) -> state, from nmap's XML.
pub fn nmap_states(xml: &str) -> BTreeMap<(String, u16), String> {
    let attr = |s: &str, name: &str| -> Option<String> {
        let start = s.find(&format!("{name}=\""))? + name.len() + 2;
        let len = s[start..].find('"')?;
        Some(s[start..start + len].to_owned())
    };
    let mut out = BTreeMap::new();
    for chunk in xml.split("<port ").skip(1) {
        let Some(head) = chunk.split('>').next() else {
            continue;
        };
        let Some(state) = chunk.find("<state ").map(|i| &chunk[i..]) else {
            continue;
        };
        if let (Some(proto), Some(port), Some(state)) = (
            attr(head, "protocol"),
            attr(head, "portid").and_then(|p| p.parse().ok()),
            attr(state, "state"),
        ) {
            out.insert((proto, port), state);
        }
    }
    out
}

/// Runs nmap with `args` against `target`, bounded to a minute; short
/// timeouts, one retry: the lab's round trip is microseconds.
pub fn nmap(lab: &Lab, args: &[&str], target: IpAddr) -> Result<BTreeMap<(String, u16), String>> {
    let mut cmd = lab.client.command("nmap");
    cmd.args(args)
        .args([
            "-n",
            "-Pn",
            "--max-retries",
            "1",
            "--initial-rtt-timeout",
            "200ms",
            "--max-rtt-timeout",
            "400ms",
            "--host-timeout",
            "30s",
            "-oX",
            "-",
        ])
        .arg(target.to_string());
    let out = run_bounded(&mut cmd, None, Duration::from_secs(60), None)?;
    anyhow::ensure!(out.success(), "nmap {args:?} {target}: {out:?}");
    let states = nmap_states(&out.stdout);
    anyhow::ensure!(
        !states.is_empty(),
        "no ports in nmap's XML:\n{}",
        out.stdout
    );
    Ok(states)
}
