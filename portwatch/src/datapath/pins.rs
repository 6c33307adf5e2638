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

use aya::programs::links::PinnedLink;
use portwatch_common::map;

use super::attach::AttachedMode;
use crate::error::{Error, Result};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portwatch";

/// The guard's maps that are pinned: policy, mode, flow and fragment state,
/// counters; the monitor's event ring, counters and UDP socket table, and
/// the owned ports' table and bind reports (the hooks are pinned too: what
/// happens while no guard runs waits in the rings for the next one). The
/// drop-report ring buffer and the report rate limit (with its count of
/// reports held back) are not: they belong to the running daemon.
pub const PINNED_MAPS: &[&str] = &[
    map::EVENTS,
    map::MONITOR_STATS,
    map::UDP_SOCKS,
    map::OWNERS,
    map::OWNER_COUNT,
    map::BINDS,
    map::LEARN,
    map::GUARD_CONFIG,
    map::POLICY_PORTS,
    map::POLICY_SRC4,
    map::POLICY_SRC6,
    map::FLOWS,
    map::FLOWS4,
    map::FLOW_PORTS,
    map::FRAGS,
    map::FRAGS4,
    map::COUNTERS,
    map::GUARD_STATS,
    map::LOCAL_ADDRS,
    map::LOCAL_LIST,
    map::LIMITS,
    map::RATE_STATE,
    map::RATE_OVERFLOW,
];

#[derive(Clone, Debug)]
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

    pub(crate) fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The guard's link on `iface` in `mode`. The mode is part of the
    /// pin's name: bpffs holds only BPF objects, and an XDP link does not
    /// say which mode it was attached in.
    pub(crate) fn guard_link(&self, iface: &str, mode: AttachedMode) -> PathBuf {
        match mode {
            AttachedMode::Native | AttachedMode::Generic => {
                self.links().join(format!("xdp-{}-{iface}", mode.as_str()))
            }
            AttachedMode::Tc => self.links().join(format!("ingress-{iface}")),
        }
    }

    /// The pinned guard link of `iface` and its mode, if there is one.
    pub(crate) fn pinned_guard(&self, iface: &str) -> Option<(PathBuf, AttachedMode)> {
        [
            AttachedMode::Native,
            AttachedMode::Generic,
            AttachedMode::Tc,
        ]
        .into_iter()
        .map(|mode| (self.guard_link(iface, mode), mode))
        .find(|(path, _)| path.exists())
    }

    /// The pinned link of a monitor hook, by program name.
    pub(crate) fn hook_link(&self, program: &str) -> PathBuf {
        self.links().join(format!("hook-{program}"))
    }

    /// The tc egress link of `iface` (the host's own flows).
    pub(crate) fn tc_link(&self, iface: &str) -> PathBuf {
        self.links().join(format!("tc-{iface}"))
    }

    /// Whether a previous guard left a datapath here.
    pub fn exists(&self) -> bool {
        self.map(map::POLICY_PORTS).exists()
    }

    /// Unpins the maps a build with another layout pinned here (key size,
    /// value size or number of entries differ from `object`'s): the loader
    /// would reuse them as they are, and the programs would read them
    /// wrong. They are made afresh; their state (flows, counters) starts
    /// over. Returns the names replaced.
    pub fn drop_incompatible(&self, object: &[u8]) -> Result<Vec<&'static str>> {
        let obj = aya_obj::Object::parse(object).map_err(|e| Error::Io {
            what: "parsing the kernel object".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut dropped = Vec::new();
        for name in PINNED_MAPS {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            let Some(want) = obj.maps.get(*name) else {
                continue;
            };
            let same = aya::maps::MapInfo::from_pin(&path).is_ok_and(|have| {
                (have.key_size(), have.value_size(), have.max_entries())
                    == (want.key_size(), want.value_size(), want.max_entries())
            });
            if !same {
                fs::remove_file(&path).map_err(io(format!("unpinning {}", path.display())))?;
                dropped.push(*name);
            }
        }
        Ok(dropped)
    }

    pub fn create(&self) -> Result<()> {
        fs::create_dir_all(self.links()).map_err(io(format!("creating {}", self.links().display())))
    }

    /// Interfaces with a pinned guard link (XDP or tc ingress).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.links()) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                if let Some(iface) = name.strip_prefix("ingress-") {
                    return Some(iface.to_string());
                }
                // `xdp-MODE-IFACE`: interface names may hold `-`, modes do not.
                let rest = name.strip_prefix("xdp-")?;
                ["native-", "generic-"]
                    .into_iter()
                    .find_map(|mode| rest.strip_prefix(mode).map(str::to_string))
            })
            .collect();
        out.sort();
        out
    }

    /// Detaches and unpins the guard from `iface`.
    pub fn detach(&self, iface: &str) -> Vec<String> {
        let mut done = Vec::new();
        let guard = self.pinned_guard(iface).map(|(path, _)| path);
        for pin in guard.into_iter().chain([self.tc_link(iface)]) {
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
        // tc egress links of interfaces without a guard link (a
        // half-finished attach).
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
        // Maps an older portwatch pinned under other names.
        if let Ok(entries) = fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_file() && fs::remove_file(&path).is_ok() {
                    done.push(path.display().to_string());
                }
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
        for name in [
            "xdp-native-eth0",
            "xdp-generic-veth-a",
            "ingress-veth-b",
            "tc-eth0",
            "tc-veth-b",
            "stray",
        ] {
            fs::write(pins.links().join(name), b"")?;
        }
        let found = pins.pinned_interfaces();
        fs::remove_dir_all(&root)?;
        assert_eq!(found, ["eth0", "veth-a", "veth-b"]);
        Ok(())
    }
}
