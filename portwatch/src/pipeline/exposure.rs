//! Whether the network can reach a listener: through every way in to its
//! address (every interface of its namespace that packets from outside
//! arrive on), the guard's policy where the guard is attached, and nothing
//! where it is not. What every listener event, `status`, `top` and the
//! metrics call its exposure. The guard hands the pipeline a new view after
//! each policy change and each change of its interfaces.
//!
//! Linux accepts a packet for any of the host's addresses on any interface
//! (the weak host model), so a listener on one specific address is reached
//! through every way in as a wildcard one is; only an IPv6 link-local
//! address belongs to its own interface.

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use crate::{
    iface::table::Iface,
    model::{Exposure, Listener, Reach},
    policy::Policy,
};

/// The policy in force, the namespace it guards and the interfaces there.
#[derive(Clone, Debug)]
pub struct ExposureView {
    policy: Arc<Policy>,
    /// The guard's network namespace.
    netns: Option<u64>,
    /// The interfaces of the guard's namespace.
    ifaces: Arc<Vec<Iface>>,
    /// Those of them the guard is attached to.
    guarded: Arc<BTreeSet<String>>,
}

impl ExposureView {
    pub fn new(
        policy: Arc<Policy>,
        netns: Option<u64>,
        ifaces: Arc<Vec<Iface>>,
        guarded: BTreeSet<String>,
    ) -> Self {
        Self {
            policy,
            netns,
            ifaces,
            guarded: Arc::new(guarded),
        }
    }

    pub fn netns(&self) -> Option<u64> {
        self.netns
    }

    /// The reach of a listener of the guard's namespace; for another
    /// namespace, `ifaces` is that namespace's table (None when unknown).
    pub fn of(&self, listener: &Listener, other_ifaces: Option<&[Iface]>) -> Option<Reach> {
        if listener.netns == self.netns {
            return Some(reach(
                &self.policy,
                listener,
                &self.ifaces,
                Some(&self.guarded),
            ));
        }
        // The guard's policy and programs are in its own namespace only:
        // every way into another one is unguarded.
        other_ifaces.map(|ifaces| reach(&self.policy, listener, ifaces, None))
    }

    /// Interfaces with a way in and addresses that no guard covers.
    pub fn unguarded(&self) -> Vec<&Iface> {
        self.ifaces
            .iter()
            .filter(|i| i.is_way_in() && !i.addrs.is_empty() && !self.guarded.contains(&i.name))
            .collect()
    }
}

/// An IPv6 link-local address (fe80::/10): it belongs to one interface.
pub(crate) fn is_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The ways into `listener`'s address among `ifaces`.
fn ways_in<'a>(listener: &Listener, ifaces: &'a [Iface]) -> impl Iterator<Item = &'a Iface> {
    let addr = listener.addr;
    ifaces
        .iter()
        .filter(move |i| i.is_way_in() && (!is_link_local(&addr) || i.addrs.contains(&addr)))
}

/// The listener's exposure over `ifaces`: the policy on the guarded ones
/// (None: this namespace has no guard), nothing on the others.
fn reach(
    policy: &Policy,
    listener: &Listener,
    ifaces: &[Iface],
    guarded: Option<&BTreeSet<String>>,
) -> Reach {
    let by_policy = exposure_of(policy, listener);
    if listener.addr.is_loopback() {
        return Reach {
            exposure: Exposure::Blocked,
            policy: by_policy,
            unguarded: Vec::new(),
        };
    }
    let mut exposure = Exposure::Blocked;
    let mut unguarded = Vec::new();
    for iface in ways_in(listener, ifaces) {
        if guarded.is_some_and(|g| g.contains(&iface.name)) {
            exposure = exposure.widest(by_policy);
        } else {
            exposure = Exposure::Exposed;
            unguarded.push(iface.name.clone());
        }
    }
    unguarded.sort();
    Reach {
        exposure,
        policy: by_policy,
        unguarded,
    }
}

/// What the policy alone says of a listener. A listener on a loopback
/// address is out of the network's reach whatever the policy.
pub fn exposure_of(policy: &Policy, listener: &Listener) -> Exposure {
    if listener.addr.is_loopback() {
        Exposure::Blocked
    } else {
        policy.exposure(listener.proto, listener.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ProcessInfo, Proto, SockId};

    fn iface(index: u32, name: &str, addrs: &[&str]) -> Iface {
        Iface {
            index,
            name: name.into(),
            up: true,
            loopback: name == "lo",
            has_master: false,
            dummy: false,
            kind: None,
            addrs: addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            broadcast: Vec::new(),
            xdp_programs: Vec::new(),
        }
    }

    fn listener(addr: &str, port: u16, netns: u64) -> Listener {
        Listener {
            proto: Proto::Tcp,
            addr: addr.parse().unwrap_or(IpAddr::from([0u8; 4])),
            port,
            sock_id: SockId::Cookie(1),
            netns: Some(netns),
            process: ProcessInfo::default().into(),
        }
    }

    fn view(guarded: &[&str]) -> ExposureView {
        let policy =
            Policy::parse("allow = [\"tcp/22\", { port = \"tcp/5432\", from = [\"10.0.0.0/8\"] }]")
                .unwrap_or_default();
        let ifaces = vec![
            iface(1, "lo", &["127.0.0.1", "::1"]),
            iface(2, "eth0", &["192.0.2.1", "fe80::1"]),
            iface(3, "eth1", &["10.1.0.5", "fe80::2"]),
        ];
        ExposureView::new(
            Arc::new(policy),
            Some(1),
            Arc::new(ifaces),
            guarded.iter().map(|s| (*s).to_owned()).collect(),
        )
    }

    fn exposure(v: &ExposureView, l: &Listener) -> (Exposure, Vec<String>) {
        let r = v.of(l, None).unwrap_or(Reach {
            exposure: Exposure::Blocked,
            policy: Exposure::Blocked,
            unguarded: vec!["unknown".into()],
        });
        (r.exposure, r.unguarded)
    }

    #[test]
    fn every_way_in_counts() {
        let all = view(&["eth0", "eth1"]);
        let one = view(&["eth0"]);
        let none: Vec<String> = Vec::new();
        // Guarded everywhere: the policy decides.
        assert_eq!(
            exposure(&all, &listener("0.0.0.0", 8080, 1)),
            (Exposure::Blocked, none.clone())
        );
        assert_eq!(
            exposure(&all, &listener("0.0.0.0", 22, 1)),
            (Exposure::Exposed, none.clone())
        );
        assert_eq!(
            exposure(&all, &listener("::", 5432, 1)),
            (Exposure::Partial, none.clone())
        );
        // eth1 unguarded: a wildcard listener is exposed through it, and so
        // is one on eth0's address (the weak host model).
        let eth1 = vec!["eth1".to_owned()];
        assert_eq!(
            exposure(&one, &listener("0.0.0.0", 8080, 1)),
            (Exposure::Exposed, eth1.clone())
        );
        assert_eq!(
            exposure(&one, &listener("192.0.2.1", 8080, 1)),
            (Exposure::Exposed, eth1.clone())
        );
        let r = one.of(&listener("0.0.0.0", 8080, 1), None);
        assert_eq!(r.map(|r| r.policy), Some(Exposure::Blocked));
        // Link-local addresses belong to their interface.
        assert_eq!(
            exposure(&one, &listener("fe80::1", 8080, 1)),
            (Exposure::Blocked, none.clone())
        );
        assert_eq!(
            exposure(&one, &listener("fe80::2", 8080, 1)),
            (Exposure::Exposed, eth1)
        );
        // Loopback: no way in at all.
        assert_eq!(
            exposure(&one, &listener("127.0.0.1", 8080, 1)),
            (Exposure::Blocked, none)
        );
    }

    #[test]
    fn other_namespaces_are_judged_by_their_own_interfaces() {
        let v = view(&["eth0", "eth1"]);
        let theirs = [
            iface(1, "lo", &["127.0.0.1"]),
            iface(7, "veth0", &["172.17.0.2"]),
        ];
        let r = v.of(&listener("0.0.0.0", 22, 9), Some(&theirs));
        assert_eq!(
            r.map(|r| (r.exposure, r.unguarded)),
            Some((Exposure::Exposed, vec!["veth0".to_owned()]))
        );
        let only_lo = [iface(1, "lo", &["127.0.0.1"])];
        let r = v.of(&listener("0.0.0.0", 22, 9), Some(&only_lo));
        assert_eq!(r.map(|r| r.exposure), Some(Exposure::Blocked));
        assert_eq!(
            v.of(&listener("0.0.0.0", 22, 9), None),
            None,
            "unknown namespace"
        );
        assert_eq!(
            v.unguarded().len(),
            0,
            "every interface with addresses is guarded"
        );
        assert_eq!(
            view(&["eth0"])
                .unguarded()
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["eth1"]
        );
    }
}
