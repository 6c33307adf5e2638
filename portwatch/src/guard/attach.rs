//! Attaches the guard to interfaces: tc egress first (so the host's own
//! flows are recorded before anything is enforced), then XDP ingress.

use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc};

use crate::{
    error::{Error, Result, program_error},
    loader::program,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode, falling back to generic with a notice.
    Auto,
    Native,
    Generic,
}

/// How the guard sits on one interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
    /// "native" or "generic".
    pub xdp_mode: &'static str,
}

pub fn ifindex(iface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(iface).map_err(|e| Error::Io {
        what: format!("no network interface named `{iface}` (see `ip link`)"),
        source: e.into(),
    })
}

/// Loads both guard programs (once) and attaches them to `iface`.
pub fn attach(ebpf: &mut aya::Ebpf, iface: &str, mode: XdpModeArg) -> Result<Attached> {
    let ifindex = ifindex(iface)?;

    let tc_prog: &mut SchedClassifier = program(ebpf, "tc_egress")?;
    let tc_hint = "the guard records the host's own UDP flows with a tc egress program (CONFIG_NET_CLS_BPF, Linux 6.6+ for tcx or a clsact qdisc)";
    if tc_prog.fd().is_err() {
        tc_prog
            .load()
            .map_err(program_error("loading tc_egress".into(), tc_hint))?;
    }
    if let Err(first) = tc_prog.attach(iface, TcAttachType::Egress) {
        // Before tcx (Linux 6.6) the program hangs off a clsact qdisc.
        if tc::qdisc_add_clsact(iface).is_err() {
            return Err(program_error(
                format!("attaching tc egress to {iface}"),
                tc_hint,
            )(first));
        }
        tc_prog
            .attach(iface, TcAttachType::Egress)
            .map_err(program_error(
                format!("attaching tc egress to {iface}"),
                tc_hint,
            ))?;
    }

    let xdp: &mut Xdp = program(ebpf, "xdp_guard")?;
    let xdp_hint = "the guard filters inbound packets with XDP (Linux 5.9+ for XDP links)";
    if xdp.fd().is_err() {
        xdp.load()
            .map_err(program_error("loading the XDP guard".into(), xdp_hint))?;
    }
    let xdp_mode = match mode {
        XdpModeArg::Native => {
            xdp.attach(iface, XdpMode::Driver).map_err(program_error(
                format!("attaching XDP in native mode to {iface}"),
                "the driver may not support native XDP: try --xdp-mode generic (or auto)",
            ))?;
            "native"
        }
        XdpModeArg::Generic => {
            xdp.attach(iface, XdpMode::Skb).map_err(program_error(
                format!("attaching XDP in generic mode to {iface}"),
                xdp_hint,
            ))?;
            "generic"
        }
        XdpModeArg::Auto => match xdp.attach(iface, XdpMode::Driver) {
            Ok(_) => "native",
            Err(e) => {
                log::warn!(
                    "{iface}: native XDP failed ({e}); falling back to generic XDP (slower, same verdicts)"
                );
                xdp.attach(iface, XdpMode::Skb)
                    .map_err(program_error(format!("attaching XDP to {iface}"), xdp_hint))?;
                "generic"
            }
        },
    };
    Ok(Attached {
        iface: iface.to_string(),
        ifindex,
        xdp_mode,
    })
}

/// Interfaces that carry a default route (IPv4 or IPv6): what a server
/// exposes to the network when nothing else is said.
pub fn default_route_interfaces() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/route") {
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 7 && cols[1] == "00000000" && cols[7] == "00000000" {
                out.push(cols[0].to_string());
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/ipv6_route") {
        // dest plen src plen next-hop metric refcnt use flags iface
        for line in text.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() == 10
                && cols[0].bytes().all(|b| b == b'0')
                && cols[1] == "00"
                && cols[9] != "lo"
            {
                out.push(cols[9].to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
