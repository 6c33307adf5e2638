//! Network interfaces: names and indexes, which ones to guard when nothing
//! names them, and waiting for them at boot. [`watch`] follows changes
//! through rtnetlink.

pub mod table;
pub mod watch;

use std::time::{Duration, Instant};

use self::watch::LinkWatch;
use crate::{
    error::{Error, Result},
    sys::sd_notify,
};

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

/// Why there is nothing to guard (yet).
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("no network interface named `{iface}`{} (see `ip link`)", waited_note(*.waited))]
    Missing { iface: String, waited: Duration },
    #[error(
        "no interface to guard: none given with --iface, none in the policy's `interfaces`, \
         and no default route to pick one from{}", waited_note(*.waited)
    )]
    NoDefaultRoute { waited: Duration },
}

fn waited_note(waited: Duration) -> String {
    if waited.is_zero() {
        String::new()
    } else {
        format!(" after waiting {} s", waited.as_secs_f32())
    }
}

/// What the guard still waits for.
#[derive(Debug, PartialEq, Eq)]
enum Pending {
    Iface(String),
    DefaultRoute,
}

impl Pending {
    fn describe(&self) -> String {
        match self {
            Pending::Iface(name) => format!("interface {name} to appear"),
            Pending::DefaultRoute => "a default route to pick the interfaces to guard".into(),
        }
    }

    fn into_error(self, waited: Duration) -> InterfaceError {
        match self {
            Pending::Iface(iface) => InterfaceError::Missing { iface, waited },
            Pending::DefaultRoute => InterfaceError::NoDefaultRoute { waited },
        }
    }
}

/// The interfaces to guard now: all of `named` when they all exist, else
/// (nothing named) those that carry a default route.
fn find_interfaces(named: &[String]) -> std::result::Result<Vec<String>, Pending> {
    if !named.is_empty() {
        return match named.iter().find(|i| ifindex(i).is_err()) {
            Some(missing) => Err(Pending::Iface(missing.clone())),
            None => Ok(named.to_vec()),
        };
    }
    let found = default_route_interfaces();
    if found.is_empty() {
        Err(Pending::DefaultRoute)
    } else {
        Ok(found)
    }
}

/// The interfaces to guard: `named` (from --iface or the policy), else the
/// default-route interfaces. With a non-zero `wait` it waits that long for
/// them, following link and route changes through rtnetlink: at boot a
/// service may start before udev has created a named interface or before
/// DHCP has set the default route. Without `wait` it fails at once, as a
/// person at a terminal expects.
pub async fn interfaces_to_guard(
    named: &[String],
    wait: Duration,
) -> std::result::Result<Vec<String>, InterfaceError> {
    // Subscribed before the first look, so a change in between is not missed.
    let mut watch = if wait.is_zero() {
        None
    } else {
        match LinkWatch::open_with_routes() {
            Ok(watch) => Some(watch),
            Err(e) => {
                log::warn!(
                    "cannot follow link and route changes (rtnetlink): {e}; looking again every second"
                );
                None
            }
        }
    };
    let deadline = Instant::now() + wait;
    let mut waiting_for: Option<String> = None;
    loop {
        let pending = match find_interfaces(named) {
            Ok(found) => {
                if let Some(what) = waiting_for {
                    log::info!("done waiting for {what}");
                }
                if named.is_empty() {
                    log::info!(
                        "guarding the default-route interfaces: {}",
                        found.join(", ")
                    );
                }
                return Ok(found);
            }
            Err(pending) => pending,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(pending.into_error(wait));
        }
        let what = pending.describe();
        if waiting_for.as_deref() != Some(what.as_str()) {
            log::info!("waiting up to {} s for {what}", wait.as_secs_f32());
            sd_notify(&format!("STATUS=waiting for {what}"));
            waiting_for = Some(what);
        }
        // Woken by any link or route change; a look every second anyway, in
        // case the kernel dropped notifications.
        let step = (deadline - now).min(Duration::from_secs(1));
        match watch.as_mut() {
            Some(w) => {
                if let Ok(Err(e)) = tokio::time::timeout(step, w.next()).await {
                    log::warn!("rtnetlink: {e}; looking again every second");
                    watch = None;
                }
            }
            None => tokio::time::sleep(step).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_interfaces_are_found_only_when_all_exist() {
        assert_eq!(find_interfaces(&["lo".into()]), Ok(vec!["lo".to_string()]));
        assert_eq!(
            find_interfaces(&["lo".into(), "pwnosuch0".into()]),
            Err(Pending::Iface("pwnosuch0".into()))
        );
    }

    #[tokio::test]
    async fn without_a_wait_a_missing_interface_fails_at_once() {
        let start = Instant::now();
        let err = interfaces_to_guard(&["pwnosuch0".into()], Duration::ZERO)
            .await
            .expect_err("no such interface");
        assert!(start.elapsed() < Duration::from_millis(200));
        assert_eq!(
            err.to_string(),
            "no network interface named `pwnosuch0` (see `ip link`)"
        );
    }

    #[tokio::test]
    async fn with_a_wait_a_missing_interface_fails_after_it_and_says_so() {
        let start = Instant::now();
        let err = interfaces_to_guard(&["pwnosuch0".into()], Duration::from_millis(1500))
            .await
            .expect_err("no such interface");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
            "{took:?}"
        );
        assert!(err.to_string().contains("after waiting 1.5 s"), "{err}");
    }

    #[tokio::test]
    async fn an_existing_interface_needs_no_wait() {
        let start = Instant::now();
        let found = interfaces_to_guard(&["lo".into()], Duration::from_secs(30))
            .await
            .expect("lo exists");
        assert_eq!(found, vec!["lo".to_string()]);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
