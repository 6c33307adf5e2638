//! The drop benchmark's configurations: what drops the flood on the
//! server's veth, and how each is attached and undone.

use std::{path::Path, time::Duration};

use anyhow::Result;
use portwatch_lab::{Lab, run_within};

use crate::bench::attach::{Attached, BareMode, attach_bare, attach_floor, start_guard, xdp_off};

/// The destination port of the flood; no configuration permits it.
pub const FLOOD_PORT: u16 = 9;
/// The port the guard's policy permits (nothing is sent there).
pub const PERMITTED: &str = "tcp/5201";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Config {
    None,
    Nft,
    IptRaw,
    XdpFilter,
    BareDrop,
    ParseDrop,
    PwNative,
    PwGeneric,
    /// At tc ingress (`--xdp-mode tc`).
    PwTc,
}

pub const CONFIGS: [Config; 9] = [
    Config::None,
    Config::Nft,
    Config::IptRaw,
    Config::XdpFilter,
    Config::BareDrop,
    Config::ParseDrop,
    Config::PwNative,
    Config::PwGeneric,
    Config::PwTc,
];

impl Config {
    pub fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Nft => "nftables_ct",
            Config::IptRaw => "iptables_raw",
            Config::XdpFilter => "xdp_filter_native",
            Config::BareDrop => "bare_xdp_drop",
            Config::ParseDrop => "parse_drop_native",
            Config::PwNative => "portwatch_native",
            Config::PwGeneric => "portwatch_generic",
            Config::PwTc => "portwatch_tc",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Config::None => "no filter (closed port, RST)",
            Config::Nft => "nftables default drop + conntrack",
            Config::IptRaw => "iptables raw PREROUTING drop",
            Config::XdpFilter => "xdp-filter (native)",
            Config::BareDrop => "bare XDP_DROP (native)",
            Config::ParseDrop => "header walk, then XDP_DROP (native)",
            Config::PwNative => "portwatch guard (native XDP)",
            Config::PwGeneric => "portwatch guard (generic XDP)",
            Config::PwTc => "portwatch guard (tc ingress: --xdp-mode tc)",
        }
    }

    /// The index of this configuration in [`CONFIGS`].
    pub fn index(self) -> usize {
        CONFIGS.iter().position(|x| *x == self).unwrap_or(0)
    }
}

/// ufw's shape: input policy drop, established/related and loopback accepted.
const NFT_RULESET: &str = "table inet pwbench {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iif lo accept
  }
}
";

/// Sets `config` up on the lab's server veth; `bare` is the bare
/// XDP_DROP object, `portwatch` the guard's binary, `worker` portwatch's
/// `kernel_worker` (which pins the header-walk floor).
pub fn attach(
    portwatch: &Path,
    worker: &Path,
    lab: &Lab,
    config: Config,
    bare: &Path,
) -> Result<Attached> {
    let mut undo = Vec::new();
    let mut guard = None;
    match config {
        Config::None => {}
        Config::Nft => {
            let file = lab.dir.join("ruleset.nft");
            std::fs::write(&file, NFT_RULESET)?;
            let mut del = lab.server.command("nft");
            del.args(["delete", "table", "inet", "pwbench"]);
            undo.push(del);
            run_within(
                lab.server.command("nft").arg("-f").arg(&file),
                Duration::from_secs(20),
            )?;
        }
        Config::IptRaw => {
            let rule = [
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                &FLOOD_PORT.to_string(),
                "-j",
                "DROP",
            ]
            .map(str::to_string);
            let mut del = lab.server.command("iptables");
            del.args(["-t", "raw", "-D"]).args(&rule);
            undo.push(del);
            run_within(
                lab.server
                    .command("iptables")
                    .args(["-t", "raw", "-A"])
                    .args(&rule),
                Duration::from_secs(20),
            )?;
        }
        Config::XdpFilter => {
            undo.push(xdp_off(lab));
            // xdp-filter keeps its state pinned on bpffs: give it a private
            // one inside `ip netns exec`'s mount namespace, gone when the
            // shell exits (the attached program keeps its maps).
            let script = format!(
                "mount -t bpf bpf /sys/fs/bpf && xdp-filter load -m native {} && \
                 xdp-filter port {FLOOD_PORT}",
                lab.server_if
            );
            run_within(
                lab.server.command("sh").args(["-c", &script]),
                Duration::from_secs(30),
            )?;
        }
        Config::BareDrop => return attach_bare(lab, bare, BareMode::Native),
        Config::ParseDrop => return attach_floor(lab, worker),
        Config::PwNative => guard = Some(start_guard(portwatch, lab, "native", &[PERMITTED])?),
        Config::PwGeneric => guard = Some(start_guard(portwatch, lab, "generic", &[PERMITTED])?),
        Config::PwTc => guard = Some(start_guard(portwatch, lab, "tc", &[PERMITTED])?),
    }
    Ok(Attached { undo, guard })
}
