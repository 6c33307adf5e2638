//! Interfaces for the guard: names, indexes, XDP modes, and which ones to
//! guard by default. Attaching is in `pins.rs` (the links are pinned).

use crate::error::{Error, Result};

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
