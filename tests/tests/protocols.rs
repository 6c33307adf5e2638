//! Protocols other than TCP and UDP through the guard: VRRP, GRE and SCTP
//! sent as raw IP by socat from the lab's client namespace to a raw socket
//! in the server namespace, over IPv4 and IPv6. A `proto/...` or `sctp/...`
//! rule lets them in, nothing else does, and the host's own packets of a
//! protocol admit its peer's answers. (This kernel has no SCTP or GRE
//! module, so raw sockets stand in for the endpoints; what the guard sees
//! on the wire is the same.)

use std::{net::IpAddr, thread, time::Duration};

use portwatch_tests::{
    Netns, Result,
    net::{Lab, TempFile, host, run_bounded, start_guard},
    portwatch_bin,
};

const MAGIC: &str = "pw-raw-probe";
const WAIT: Duration = Duration::from_secs(10);

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IP4" } else { "IP6" }
}

/// What a packet of `proto` carries: for SCTP a common header to `port`
/// first (ports, verification tag, checksum), then the marker.
fn payload(proto: u8, port: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    if proto == 132 {
        bytes.extend_from_slice(&40000u16.to_be_bytes());
        bytes.extend_from_slice(&port.to_be_bytes());
        bytes.extend_from_slice(&[0; 8]);
    }
    bytes.extend_from_slice(MAGIC.as_bytes());
    bytes.push(b'\n');
    bytes
}

/// Sends three packets of `proto` from `ns` to `to` with socat (the
/// payload from a file, so that socat sees its end).
fn send(lab: &Lab, ns: &Netns, to: IpAddr, proto: u8, port: u16) -> Result {
    let file = lab.dir.join(format!("payload-{proto}-{port}"));
    std::fs::write(&file, payload(proto, port))?;
    let source = format!("OPEN:{}", file.display());
    let target = format!("{}-SENDTO:{}:{proto}", family(to), host(to));
    for _ in 0..3 {
        let mut cmd = ns.command("socat");
        cmd.args(["-u", &source, &target]);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(3), None)?;
        anyhow::ensure!(
            out.status.is_some_and(|s| s.success()),
            "socat {target}: {out:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Whether a packet of `proto` from the client reaches a raw socket of
/// `proto` in the server namespace at `to`.
fn delivered(lab: &Lab, to: IpAddr, proto: u8, port: u16) -> Result<bool> {
    let listen = format!("{}-RECV:{proto}", family(to));
    let mut receiver = lab.server.command("socat");
    receiver.args(["-u", &listen, "STDOUT"]);
    let got = thread::spawn(move || {
        run_bounded(&mut receiver, None, Duration::from_secs(3), Some(MAGIC))
            .map(|out| out.stdout.contains(MAGIC))
    });
    // The receiver's socket is open well before the first packet.
    thread::sleep(Duration::from_millis(500));
    send(lab, &lab.client, to, proto, port)?;
    got.join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?
}

#[test]
fn only_permitted_protocols_reach_the_host_on_ipv4_and_ipv6() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new(
        "proto",
        "allow = [\"tcp/22\", \"proto/vrrp\", \"sctp/3868\"]\n",
    )?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    for to in [lab.server_v4(), lab.server_v6()] {
        assert!(delivered(&lab, to, 112, 0)?, "VRRP to {to} with proto/vrrp");
        assert!(!delivered(&lab, to, 47, 0)?, "GRE to {to} without a rule");
        assert!(delivered(&lab, to, 132, 3868)?, "SCTP to {to} port 3868");
        assert!(!delivered(&lab, to, 132, 3869)?, "SCTP to {to} port 3869");
    }
    let gre = pw.wait_for(WAIT, |v| {
        v["event"] == "drop" && v["proto"] == "gre" && v["reason"] == "no_rule"
    })?;
    assert_eq!(gre["src"], lab.client_v4().to_string(), "{gre}");
    let sctp = pw.wait_for(WAIT, |v| {
        v["event"] == "drop" && v["proto"] == "sctp" && v["dst_port"] == 3869
    })?;
    assert_eq!(sctp["reason"], "no_rule", "{sctp}");

    // Permitted at run time, GRE gets in at once.
    let out = std::process::Command::new(portwatch_bin())
        .args(["allow", "proto/gre", "--socket", &lab.socket()?])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    assert!(delivered(&lab, lab.server_v4(), 47, 0)?, "GRE after allow");
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn the_hosts_own_packets_of_a_protocol_admit_the_peers_answers() -> Result {
    let lab = Lab::new()?;
    let policy = TempFile::new("proto", "allow = [\"tcp/22\"]\n")?;
    let mut pw = start_guard(&lab, &policy, &[])?;
    // ESP from a peer the host never spoke ESP to: dropped.
    assert!(!delivered(&lab, lab.server_v4(), 50, 0)?, "unsolicited ESP");
    // The host sends ESP to the peer (tc egress records it): the peer's
    // ESP back gets in; GRE from the same peer still does not.
    send(&lab, &lab.server, lab.client_v4(), 50, 0)?;
    assert!(
        delivered(&lab, lab.server_v4(), 50, 0)?,
        "ESP answering the host's"
    );
    assert!(
        !delivered(&lab, lab.server_v4(), 47, 0)?,
        "GRE, not the host's protocol"
    );
    let status = pw.stop()?;
    assert!(status.success(), "{status}");
    let summary = pw.seen.last().cloned().unwrap_or_default();
    assert_eq!(summary["event"], "summary", "{summary}");
    Ok(())
}
