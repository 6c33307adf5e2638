//! The pinned datapath: the guard's maps and links live under a bpffs
//! directory (default /sys/fs/bpf/portwatch), so enforcement outlives the
//! daemon: a restart, a crash or `kill -9` leaves the XDP program attached
//! with its policy. A new guard adopts what it finds: it swaps its own
//! programs into the existing links (bpf_link_update, atomic) and moves the
//! pinned maps to its policy with a diff.
//!
//! Pins live as long as the bpffs they are on: they do not survive a reboot
//! (the service starts again), nor a bpffs mounted privately by a short-lived
//! mount namespace (`ip netns exec`).

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{self, SchedClassifierLink},
    xdp::XdpLink,
};

use crate::{
    error::{Error, Result, program_error},
    guard::attach::{Attached, XdpModeArg, ifindex},
    loader::program,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portwatch";

/// The guard's maps that are pinned: policy, mode, flow and fragment state,
/// counters. The drop-report ring buffer and the report rate limit are not:
/// they belong to the running daemon.
pub const PINNED_MAPS: &[&str] = &[
    "GUARD_CONFIG",
    "POLICY_PORTS",
    "POLICY_SRC4",
    "POLICY_SRC6",
    "FLOWS",
    "FRAGS",
    "PORT_COUNTERS",
    "GUARD_STATS",
];

pub struct PinDir {
    pub root: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

impl PinDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The XDP mode is part of the pin's name: bpffs holds only BPF
    /// objects, and a link does not say which mode it was attached in.
    fn xdp_link(&self, iface: &str, mode: &str) -> PathBuf {
        self.links().join(format!("xdp-{mode}-{iface}"))
    }

    /// The pinned XDP link of `iface` and its mode, if there is one.
    fn pinned_xdp(&self, iface: &str) -> Option<(PathBuf, &'static str)> {
        ["native", "generic"]
            .into_iter()
            .map(|mode| (self.xdp_link(iface, mode), mode))
            .find(|(path, _)| path.exists())
    }

    fn tc_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("tc-{iface}"))
    }

    /// Whether a previous guard left a datapath here.
    pub fn exists(&self) -> bool {
        self.map("POLICY_PORTS").exists()
    }

    pub fn create(&self) -> Result<()> {
        fs::create_dir_all(self.links()).map_err(io(format!("creating {}", self.links().display())))
    }

    /// Interfaces with a pinned XDP link.
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.links()) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                // `xdp-MODE-IFACE`: interface names may hold `-`, modes do not.
                let rest = e.file_name().to_str()?.strip_prefix("xdp-")?.to_string();
                ["native-", "generic-"]
                    .into_iter()
                    .find_map(|mode| rest.strip_prefix(mode).map(str::to_string))
            })
            .collect();
        out.sort();
        out
    }

    /// Attaches (or adopts) the guard on `iface`: tc egress first, then XDP.
    /// New links are pinned and also kept in `held` (the daemon's own
    /// reference while it runs).
    pub fn attach(
        &self,
        ebpf: &mut aya::Ebpf,
        iface: &str,
        mode: XdpModeArg,
        held: &mut Vec<PinnedLink>,
    ) -> Result<Attached> {
        let ifindex = ifindex(iface)?;
        self.attach_tc(ebpf, iface, held)?;
        let xdp_mode = self.attach_xdp(ebpf, iface, mode, held)?;
        Ok(Attached {
            iface: iface.to_string(),
            ifindex,
            xdp_mode,
        })
    }

    fn attach_tc(
        &self,
        ebpf: &mut aya::Ebpf,
        iface: &str,
        held: &mut Vec<PinnedLink>,
    ) -> Result<()> {
        let hint = "the guard records the host's own UDP flows with a tc egress program (CONFIG_NET_CLS_BPF, Linux 6.6+ for tcx or a clsact qdisc)";
        let prog: &mut SchedClassifier = program(ebpf, "tc_egress")?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(program_error("loading tc_egress".into(), hint))?;
        }
        let pin = self.tc_link(iface);
        if let Ok(old) = PinnedLink::from_pin(&pin) {
            let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| Error::Io {
                what: format!("{} is not a tc link", pin.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            prog.attach_to_link(link).map_err(program_error(
                format!("replacing the tc program on {iface}"),
                hint,
            ))?;
            return Ok(());
        }
        let id = match prog.attach(iface, TcAttachType::Egress) {
            Ok(id) => id,
            Err(first) => {
                // Before tcx (Linux 6.6) the program hangs off a clsact qdisc.
                if tc::qdisc_add_clsact(iface).is_err() {
                    return Err(program_error(
                        format!("attaching tc egress to {iface}"),
                        hint,
                    )(first));
                }
                prog.attach(iface, TcAttachType::Egress)
                    .map_err(program_error(
                        format!("attaching tc egress to {iface}"),
                        hint,
                    ))?
            }
        };
        let link = prog.take_link(id).map_err(program_error(
            format!("taking the tc link of {iface}"),
            hint,
        ))?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                held.push(fd_link.pin(&pin).map_err(|e| Error::Io {
                    what: format!("pinning the tc link at {}", pin.display()),
                    source: std::io::Error::other(e.to_string()),
                })?);
            }
            Err(_) => log::warn!(
                "{iface}: tc egress is attached through a qdisc (kernel before 6.6), which cannot be pinned: \
                 replies to the host's UDP flows pass only while the daemon runs"
            ),
        }
        Ok(())
    }

    fn attach_xdp(
        &self,
        ebpf: &mut aya::Ebpf,
        iface: &str,
        mode: XdpModeArg,
        held: &mut Vec<PinnedLink>,
    ) -> Result<&'static str> {
        let hint = "the guard filters inbound packets with XDP (Linux 5.9+ for XDP links)";
        let xdp: &mut Xdp = program(ebpf, "xdp_guard")?;
        if xdp.fd().is_err() {
            xdp.load()
                .map_err(program_error("loading the XDP guard".into(), hint))?;
        }
        if let Some((pin, pinned_mode)) = self.pinned_xdp(iface)
            && let Ok(old) = PinnedLink::from_pin(&pin)
        {
            let link = XdpLink::try_from(FdLink::from(old)).map_err(|e| Error::Io {
                what: format!("{} is not an XDP link", pin.display()),
                source: std::io::Error::other(e.to_string()),
            })?;
            // Atomic: the interface is never without a program.
            xdp.attach_to_link(link).map_err(program_error(
                format!("replacing the XDP program on {iface}"),
                hint,
            ))?;
            return Ok(pinned_mode);
        }
        let (id, mode) = match mode {
            XdpModeArg::Native => (
                xdp.attach(iface, XdpMode::Driver).map_err(program_error(
                    format!("attaching XDP in native mode to {iface}"),
                    "the driver may not support native XDP: try --xdp-mode generic (or auto)",
                ))?,
                "native",
            ),
            XdpModeArg::Generic => (
                xdp.attach(iface, XdpMode::Skb).map_err(program_error(
                    format!("attaching XDP in generic mode to {iface}"),
                    hint,
                ))?,
                "generic",
            ),
            XdpModeArg::Auto => match xdp.attach(iface, XdpMode::Driver) {
                Ok(id) => (id, "native"),
                Err(e) => {
                    log::warn!(
                        "{iface}: native XDP failed ({e}); falling back to generic XDP (slower, same verdicts)"
                    );
                    (
                        xdp.attach(iface, XdpMode::Skb)
                            .map_err(program_error(format!("attaching XDP to {iface}"), hint))?,
                        "generic",
                    )
                }
            },
        };
        let link = xdp.take_link(id).map_err(program_error(
            format!("taking the XDP link of {iface}"),
            hint,
        ))?;
        let fd_link = FdLink::try_from(link).map_err(|e| Error::Io {
            what: format!(
                "the XDP attachment of {iface} is not a bpf_link (Linux 5.9+ needed to pin it)"
            ),
            source: std::io::Error::other(e.to_string()),
        })?;
        let pin = self.xdp_link(iface, mode);
        held.push(fd_link.pin(&pin).map_err(|e| Error::Io {
            what: format!("pinning the XDP link at {}", pin.display()),
            source: std::io::Error::other(e.to_string()),
        })?);
        Ok(mode)
    }

    /// Detaches and unpins the guard from `iface`.
    pub fn detach(&self, iface: &str) -> Vec<String> {
        let mut done = Vec::new();
        let xdp = self.pinned_xdp(iface).map(|(path, _)| path);
        for pin in xdp.into_iter().chain([self.tc_link(iface)]) {
            if let Ok(link) = PinnedLink::from_pin(&pin)
                && let Ok(fd_link) = link.unpin()
            {
                // The last reference: dropping it detaches the program.
                drop(fd_link);
                done.push(pin.display().to_string());
            }
        }
        done
    }

    /// Removes every link and map pin and the directory. Returns what went.
    pub fn remove_all(&self) -> Vec<String> {
        let mut done = Vec::new();
        for iface in self.pinned_interfaces() {
            done.extend(self.detach(&iface));
        }
        // tc links of interfaces without an XDP link (a half-finished attach).
        if let Ok(entries) = fs::read_dir(self.links()) {
            for entry in entries.flatten() {
                if fs::remove_file(entry.path()).is_ok() {
                    done.push(entry.path().display().to_string());
                }
            }
        }
        for name in PINNED_MAPS {
            let path = self.map(name);
            if fs::remove_file(&path).is_ok() {
                done.push(path.display().to_string());
            }
        }
        let _ = fs::remove_dir(self.links());
        let _ = fs::remove_dir(&self.root);
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_interfaces_are_named_without_the_mode() -> Result<(), std::io::Error> {
        let root = std::env::temp_dir().join(format!("portwatch-pins-{}", std::process::id()));
        let pins = PinDir::new(&root);
        fs::create_dir_all(pins.links())?;
        for name in ["xdp-native-eth0", "xdp-generic-veth-a", "tc-eth0", "stray"] {
            fs::write(pins.links().join(name), b"")?;
        }
        let found = pins.pinned_interfaces();
        fs::remove_dir_all(&root)?;
        assert_eq!(found, vec!["eth0".to_string(), "veth-a".to_string()]);
        Ok(())
    }
}
