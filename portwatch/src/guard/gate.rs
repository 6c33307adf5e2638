//! Listener-gated ports: a rule with an owner opens its port only while a
//! process matching the owner listens on it in the guard's namespace. The
//! gate is worked out here from the listeners; opening and closing is a
//! policy map update, so the per-packet path does not change.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use crate::{
    model::{GateEvent, Listener, Proto},
    policy::{Activation, Owner, Policy, PortRange},
};

/// The policy's owned ports and their owners.
fn owned(policy: &Policy) -> Vec<(PortRange, &Owner)> {
    policy
        .rules
        .iter()
        .filter_map(|r| r.owner.as_ref().map(|o| (r.ports, o)))
        .collect()
}

/// Whether `proto/port` is an owned port of `policy`.
pub fn is_owned(policy: &Policy, proto: Proto, port: u16) -> bool {
    policy
        .rules
        .iter()
        .any(|r| r.owner.is_some() && r.ports.contains(proto, port))
}

/// The process that holds an owned port open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
}

/// The owned ports with a matching owner listening, and who that is (the
/// lowest pid, so that the answer does not depend on table order).
pub fn holders<'a>(
    policy: &Policy,
    listeners: impl Iterator<Item = &'a Listener>,
    netns: Option<u64>,
    activation: &Activation,
) -> BTreeMap<PortRange, Holder> {
    let owned = owned(policy);
    let mut open: BTreeMap<PortRange, Holder> = BTreeMap::new();
    if owned.is_empty() {
        return open;
    }
    for l in listeners.filter(|l| l.netns == netns) {
        for (ports, owner) in &owned {
            if !ports.contains(l.proto, l.port) || !owner.holds(&l.process, activation) {
                continue;
            }
            let holder = Holder {
                pid: l.process.pid,
                comm: l.process.comm.clone(),
            };
            open.entry(*ports)
                .and_modify(|h| {
                    if holder.pid < h.pid {
                        *h = holder.clone();
                    }
                })
                .or_insert(holder);
        }
    }
    open
}

/// A listener on an owned port, in the guard's namespace, that is not its
/// owner: the port stays closed for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Squatter {
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
    pub exe: Option<Arc<str>>,
}

/// Every squatter now, by owned port and pid.
pub fn squatters<'a>(
    policy: &Policy,
    listeners: impl Iterator<Item = &'a Listener>,
    netns: Option<u64>,
    activation: &Activation,
) -> BTreeMap<(PortRange, Option<u32>), Squatter> {
    let owned = owned(policy);
    let mut out = BTreeMap::new();
    if owned.is_empty() {
        return out;
    }
    for l in listeners.filter(|l| l.netns == netns) {
        for (ports, owner) in &owned {
            if ports.contains(l.proto, l.port) && !owner.holds(&l.process, activation) {
                out.insert(
                    (*ports, l.process.pid),
                    Squatter {
                        pid: l.process.pid,
                        comm: l.process.comm.clone(),
                        exe: l.process.exe.clone(),
                    },
                );
            }
        }
    }
    out
}

/// The stream's events for the step from `before` to `after`: ports that
/// opened, then ports that closed. A port that stays open under another
/// owner process is not news.
pub fn changes(
    policy: &Policy,
    before: &BTreeMap<PortRange, Holder>,
    after: &BTreeMap<PortRange, Holder>,
    ts: SystemTime,
) -> Vec<GateEvent> {
    let owner_of = |ports: &PortRange| {
        policy
            .rules
            .iter()
            .find(|r| r.ports == *ports)
            .and_then(|r| r.owner.as_ref())
            .map(ToString::to_string)
            .unwrap_or_default()
    };
    let opened = after
        .iter()
        .filter(|(ports, _)| !before.contains_key(*ports))
        .map(|(ports, h)| GateEvent {
            ts,
            port: ports.to_string(),
            open: true,
            pid: h.pid,
            comm: h.comm.clone(),
            owner: owner_of(ports),
        });
    // A rule that went with a policy change is the policy event's news.
    let closed = before
        .keys()
        .filter(|ports| !after.contains_key(*ports))
        .filter(|ports| policy.rules.iter().any(|r| r.ports == **ports))
        .map(|ports| GateEvent {
            ts,
            port: ports.to_string(),
            open: false,
            pid: None,
            comm: None,
            owner: owner_of(ports),
        });
    opened.chain(closed).collect()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::{ProcessInfo, SockId};

    fn listener(port: u16, comm: &str, pid: u32, netns: u64) -> Listener {
        Listener {
            proto: Proto::Tcp,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port,
            sock_id: SockId::Cookie(u64::from(pid)),
            netns: Some(netns),
            process: Arc::new(ProcessInfo {
                pid: Some(pid),
                comm: Some(Arc::from(comm)),
                ..ProcessInfo::default()
            }),
        }
    }

    #[test]
    fn an_owned_port_opens_only_for_its_owner_in_the_guards_namespace() {
        let policy = Policy::parse(
            "allow = [\"tcp/22\", { port = \"tcp/6379\", owner = { comm = \"redis-server\" } }]",
        )
        .expect("a valid policy");
        let port = policy.rules[1].ports;
        let none = holders(&policy, [].iter(), Some(1), &Activation::default());
        assert!(none.is_empty());

        let squatter = listener(6379, "python3", 40, 1);
        let elsewhere = listener(6379, "redis-server", 41, 2);
        let other_port = listener(6380, "redis-server", 42, 1);
        let shut = [squatter.clone(), elsewhere, other_port];
        assert!(holders(&policy, shut.iter(), Some(1), &Activation::default()).is_empty());

        let owners = [
            squatter,
            listener(6379, "redis-server", 812, 1),
            listener(6379, "redis-server", 811, 1),
        ];
        let open = holders(&policy, owners.iter(), Some(1), &Activation::default());
        assert_eq!(open.len(), 1);
        assert_eq!(open[&port].pid, Some(811), "the lowest pid names it");

        let ts = SystemTime::UNIX_EPOCH;
        let events = changes(&policy, &BTreeMap::new(), &open, ts);
        assert_eq!(events.len(), 1);
        assert!(events[0].open && events[0].port == "tcp/6379");
        assert_eq!(events[0].owner, "comm redis-server");
        assert_eq!(events[0].comm.as_deref(), Some("redis-server"));
        let back = changes(&policy, &open, &BTreeMap::new(), ts);
        assert_eq!(back.len(), 1);
        assert!(!back[0].open && back[0].pid.is_none());
        // The same port under another owner process: no event.
        let mut other = open.clone();
        other.insert(
            port,
            Holder {
                pid: Some(900),
                comm: None,
            },
        );
        assert!(changes(&policy, &open, &other, ts).is_empty());

        // Who squats: the python3 in the guard's namespace, once.
        let squat = squatters(&policy, owners.iter(), Some(1), &Activation::default());
        assert_eq!(squat.len(), 1);
        assert_eq!(
            squat.get(&(port, Some(40))).and_then(|s| s.comm.as_deref()),
            Some("python3")
        );

        // What the kernel gets: the owned rule only while it is open.
        assert_eq!(policy.gated(&Default::default()).rules.len(), 1);
        let keys = open.keys().copied().collect();
        assert_eq!(policy.gated(&keys).rules.len(), 2);
    }
}
