//! Which owners' units are socket-activated, from the service manager
//! (`systemctl show -p TriggeredBy`), and the manager's cgroup (PID 1's in
//! the guard's PID namespace): systemd binds and listens on such a unit's
//! port in its own cgroup, before and while the service runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::{Command, Stdio},
    time::Duration,
};

use crate::policy::{Activation, Policy};

/// How long `systemctl show` may take before the unit counts as not
/// socket-activated.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(2);

/// Remembers what systemd said per unit, so that a resolution runs
/// `systemctl` once per unit, not at every policy change.
#[derive(Default)]
pub struct Resolver {
    /// Per unit: the slice path of its socket unit, when it has one.
    known: BTreeMap<String, Option<String>>,
}

impl Resolver {
    /// The activation of `policy`'s owners' units.
    pub fn resolve(&mut self, policy: &Policy) -> Activation {
        let units: BTreeSet<String> = policy
            .rules
            .iter()
            .filter_map(|r| r.owner.as_ref()?.unit.clone())
            .collect();
        if units.is_empty() {
            return Activation::default();
        }
        let mut activation = Activation::default();
        for unit in units {
            let slice = self
                .known
                .entry(unit.clone())
                .or_insert_with(|| socket_slice(&unit));
            if let Some(slice) = slice {
                activation.helper_slices.insert(unit.clone(), slice.clone());
                activation.units.insert(unit);
            }
        }
        if !activation.units.is_empty() {
            activation.manager_cgroup = crate::procinfo::cgroup_of(1);
        }
        activation
    }

    /// Forgets what systemd said (units may have gained or lost a socket).
    pub fn forget(&mut self) {
        self.known.clear();
    }
}

/// The cgroup of the slice of the socket unit that starts `unit`, if one
/// does. Without systemd (or an answer in time) none does.
fn socket_slice(unit: &str) -> Option<String> {
    let triggers = systemctl_show(unit, "TriggeredBy")?;
    let socket = triggers
        .split_whitespace()
        .find(|u| u.ends_with(".socket"))?
        .to_owned();
    let slice = systemctl_show(&socket, "Slice")?;
    Some(slice_path(slice.trim()))
}

/// `systemctl show --property=PROPERTY --value UNIT`, bounded in time.
fn systemctl_show(unit: &str, property: &str) -> Option<String> {
    let child = Command::new("systemctl")
        .args([
            "show",
            &format!("--property={property}"),
            "--value",
            "--",
            unit,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return None;
    };
    let deadline = std::time::Instant::now() + SYSTEMCTL_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                log::warn!(
                    "systemctl show {unit} did not answer in time: taken as not socket-activated"
                );
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    Some(out)
}

/// The cgroup path of a slice: `-` nests (`a-b.slice` is in `a.slice`),
/// `-.slice` is the root.
fn slice_path(slice: &str) -> String {
    let Some(name) = slice
        .strip_suffix(".slice")
        .filter(|n| !n.is_empty() && *n != "-")
    else {
        return "/".to_owned();
    };
    let parts: Vec<&str> = name.split('-').collect();
    let mut path = String::new();
    for i in 1..=parts.len() {
        path.push('/');
        path.push_str(&parts[..i].join("-"));
        path.push_str(".slice");
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_nest_by_their_dashes() {
        assert_eq!(slice_path("system.slice"), "/system.slice");
        assert_eq!(
            slice_path("system-getty.slice"),
            "/system.slice/system-getty.slice"
        );
        assert_eq!(slice_path("-.slice"), "/");
        assert_eq!(slice_path(""), "/");
    }
}
