//! Which `COUNTERS` slot counts which ports: one slot per rule, one per
//! port that has a listener but no rule, and per protocol one `other` slot
//! for everything else. What an outsider sends therefore never sets how
//! many counters the guard keeps or exports; what the operator configured
//! (rules) and what runs on the host (listeners) does.
//!
//! The slots live in the high half of each `POLICY_PORTS` value
//! ([`portwatch_common::port_entry`]); [`CounterSlots::stamp`] writes them
//! into a compiled [`MapImage`], which the guard then installs.

use std::collections::{BTreeMap, BTreeSet};

use portwatch_common::{
    FIRST_COUNTER_SLOT, MAX_COUNTER_SLOTS, SLOT_OTHER_IP, SLOT_OTHER_SCTP, SLOT_OTHER_TCP,
    SLOT_OTHER_UDP, other_slot, port_entry, port_slot,
};

use super::{Policy, PortRange};
use crate::{
    datapath::maps::MapImage,
    model::{IpProto, Proto},
};

/// What a slot counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SlotOwner {
    /// Every port of a rule (or every packet of a whole-protocol rule).
    Rule(PortRange),
    /// A port with a listener and no rule.
    Port(Proto, u16),
    /// A protocol's ports with neither (TCP, UDP, SCTP); `None`: every
    /// protocol without ports and without a rule.
    Other(Option<IpProto>),
}

impl SlotOwner {
    /// The `proto` label: `tcp`, `vrrp`, `112`, or `other`.
    pub fn proto_label(&self) -> String {
        match self {
            SlotOwner::Rule(r) => r.proto.to_string(),
            SlotOwner::Port(p, _) => p.as_str().to_owned(),
            SlotOwner::Other(Some(p)) => p.to_string(),
            SlotOwner::Other(None) => "other".to_owned(),
        }
    }

    /// The `port` label: `22`, `8000-8099`, `other`; empty for a
    /// protocol without ports.
    pub fn port_label(&self) -> String {
        match self {
            SlotOwner::Rule(r) if r.is_whole_protocol() => String::new(),
            SlotOwner::Rule(r) if r.lo == r.hi => r.lo.to_string(),
            SlotOwner::Rule(r) => format!("{}-{}", r.lo, r.hi),
            SlotOwner::Port(_, port) => port.to_string(),
            SlotOwner::Other(Some(_)) => "other".to_owned(),
            SlotOwner::Other(None) => String::new(),
        }
    }
}

/// The slots handed out.
#[derive(Debug)]
pub struct CounterSlots {
    owners: BTreeMap<SlotOwner, u32>,
    free: Vec<u32>,
    /// Slots handed out since the last `take_fresh`: their counters must be
    /// zeroed before any port points at them.
    fresh: Vec<u32>,
    /// Owners left without a slot (all taken): counted under `other`.
    overflow: usize,
}

impl Default for CounterSlots {
    fn default() -> Self {
        let mut owners = BTreeMap::new();
        owners.insert(SlotOwner::Other(Some(IpProto::TCP)), SLOT_OTHER_TCP);
        owners.insert(SlotOwner::Other(Some(IpProto::UDP)), SLOT_OTHER_UDP);
        owners.insert(SlotOwner::Other(Some(IpProto::SCTP)), SLOT_OTHER_SCTP);
        owners.insert(SlotOwner::Other(None), SLOT_OTHER_IP);
        Self {
            owners,
            // Popped from the end: the lowest slots go first.
            free: (FIRST_COUNTER_SLOT..MAX_COUNTER_SLOTS).rev().collect(),
            fresh: Vec::new(),
            overflow: 0,
        }
    }
}

impl CounterSlots {
    /// Gives a slot to each rule of `policy` and to each listened port no
    /// rule covers, takes them from owners that are gone, and writes them
    /// into `image` (compiled from `policy`).
    pub fn stamp(
        &mut self,
        image: &mut MapImage,
        policy: &Policy,
        listened: &BTreeSet<(Proto, u16)>,
    ) {
        let mut wanted: Vec<SlotOwner> = policy
            .rules
            .iter()
            .map(|r| SlotOwner::Rule(r.ports))
            .collect();
        wanted.extend(
            listened
                .iter()
                .filter(|(proto, port)| {
                    !policy.rules.iter().any(|r| r.ports.contains(*proto, *port))
                })
                .map(|(proto, port)| SlotOwner::Port(*proto, *port)),
        );
        let keep: BTreeSet<SlotOwner> = wanted.iter().copied().collect();
        let gone: Vec<SlotOwner> = self
            .owners
            .keys()
            .filter(|o| !matches!(o, SlotOwner::Other(_)) && !keep.contains(o))
            .copied()
            .collect();
        for owner in gone {
            if let Some(slot) = self.owners.remove(&owner) {
                self.free.push(slot);
            }
        }
        self.overflow = 0;
        for owner in wanted {
            if self.owners.contains_key(&owner) {
                continue;
            }
            match self.free.pop() {
                Some(slot) => {
                    self.owners.insert(owner, slot);
                    self.fresh.push(slot);
                }
                None => self.overflow += 1,
            }
        }
        for (owner, slot) in &self.owners {
            match owner {
                SlotOwner::Rule(r) => {
                    let limit = policy
                        .rules
                        .iter()
                        .find(|rule| rule.ports == *r)
                        .and_then(|rule| rule.limit);
                    if let Some(limit) = limit {
                        image.limits.insert(*slot, limit.bucket());
                    }
                    for port in r.lo..=r.hi {
                        let entry = image.ports.entry(port_slot(r.proto.0, port)).or_insert(0);
                        *entry = port_entry(*entry, *slot);
                    }
                }
                SlotOwner::Port(proto, port) => {
                    let entry = image
                        .ports
                        .entry(port_slot(proto.number(), *port))
                        .or_insert(0);
                    *entry = port_entry(*entry, *slot);
                }
                SlotOwner::Other(_) => {}
            }
        }
    }

    /// Whether `proto/port`, just listened on, would get a slot of its own
    /// at the next [`Self::stamp`]: nothing counts it but `other`, and a
    /// slot is free. False means a stamp would lay out the same counters.
    pub fn would_take(&self, proto: Proto, port: u16) -> bool {
        let proto = IpProto::from(proto);
        !self.free.is_empty() && self.slot_of(proto, port) == other_slot(proto.0)
    }

    /// Whether `proto/port` has a slot of its own (a listened port without
    /// a rule): when its last listener goes, a stamp frees it.
    pub fn owns(&self, proto: Proto, port: u16) -> bool {
        self.owners.contains_key(&SlotOwner::Port(proto, port))
    }

    /// Slots handed out since the last call: to be zeroed before they count.
    pub fn take_fresh(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.fresh)
    }

    /// Owners that found no free slot at the last `stamp`.
    pub fn overflow(&self) -> usize {
        self.overflow
    }

    /// Every slot in use, with what it counts.
    pub fn owners(&self) -> impl Iterator<Item = (&SlotOwner, u32)> {
        self.owners.iter().map(|(o, s)| (o, *s))
    }

    /// The slot that counts `proto/port` (port 0 for a protocol without
    /// ports): its rule's, its own, or `other`.
    pub fn slot_of(&self, proto: impl Into<IpProto>, port: u16) -> u32 {
        let proto = proto.into();
        // Rules sort first and are few; a listened port's own slot is found
        // by key, not by a walk past thousands of them (status asks once per
        // listener).
        let by_rule = self
            .owners
            .iter()
            .take_while(|(o, _)| matches!(o, SlotOwner::Rule(_)))
            .find(|(o, _)| matches!(o, SlotOwner::Rule(r) if r.contains(proto, port)))
            .map(|(_, s)| *s);
        let by_port = || {
            [Proto::Tcp, Proto::Udp]
                .into_iter()
                .find(|p| IpProto::from(*p) == proto)
                .and_then(|p| self.owners.get(&SlotOwner::Port(p, port)).copied())
        };
        by_rule.or_else(by_port).unwrap_or(other_slot(proto.0))
    }
}

#[cfg(test)]
mod tests {
    use portwatch_common::{RULE_ANY, entry_slot};

    use super::*;
    use crate::policy::compile::compile;

    fn policy(text: &str) -> Policy {
        Policy::parse(text).unwrap_or_default()
    }

    #[test]
    fn rules_and_listened_ports_get_slots_and_others_share() {
        let p = policy("allow = [\"tcp/22\", \"tcp/8000-8002\"]");
        let mut image = compile(&p).unwrap_or_default();
        let mut slots = CounterSlots::default();
        let listened: BTreeSet<_> = [(Proto::Tcp, 22), (Proto::Udp, 5353), (Proto::Tcp, 8001)]
            .into_iter()
            .collect();
        slots.stamp(&mut image, &p, &listened);
        let slot = |proto: Proto, port| {
            image
                .ports
                .get(&port_slot(proto.number(), port))
                .map(|e| entry_slot(*e))
        };
        let s22 = slot(Proto::Tcp, 22);
        let s8000 = slot(Proto::Tcp, 8000);
        assert!(s22.is_some_and(|s| s >= FIRST_COUNTER_SLOT));
        assert_ne!(s22, s8000);
        assert_eq!(s8000, slot(Proto::Tcp, 8002), "one slot per rule");
        assert_eq!(slot(Proto::Tcp, 8001), s8000, "a listener under a rule");
        assert!(slot(Proto::Udp, 5353).is_some_and(|s| s >= FIRST_COUNTER_SLOT));
        assert_eq!(
            image.ports.get(&port_slot(6, 22)).map(|e| e & 0xffff),
            Some(RULE_ANY),
            "the rule bits stay"
        );
        assert_eq!(slot(Proto::Tcp, 9), None, "no entry: `other`");
        assert_eq!(slots.slot_of(Proto::Tcp, 9), SLOT_OTHER_TCP);
        // What counts a port is what the datapath's entry says: rule, own
        // port, rule over a listener.
        for (proto, port) in [(Proto::Tcp, 22), (Proto::Udp, 5353), (Proto::Tcp, 8001)] {
            assert_eq!(
                Some(slots.slot_of(proto, port)),
                slot(proto, port),
                "{proto:?}/{port}"
            );
        }
        assert_eq!(slots.take_fresh().len(), 3);
        assert!(slots.take_fresh().is_empty());

        // The listener goes: its slot is free again, the rules keep theirs.
        let mut image = compile(&p).unwrap_or_default();
        slots.stamp(&mut image, &p, &BTreeSet::new());
        assert_eq!(image.ports.get(&port_slot(17, 5353)), None);
        assert_eq!(
            image.ports.get(&port_slot(6, 22)).map(|e| entry_slot(*e)),
            s22
        );
        assert!(slots.take_fresh().is_empty());
        let labels: Vec<String> = slots.owners().map(|(o, _)| o.port_label()).collect();
        assert_eq!(labels, ["22", "8000-8002", "", "other", "other", "other"]);
    }

    #[test]
    fn running_out_of_slots_counts_the_rest_under_other() {
        let p = Policy::default();
        let listened: BTreeSet<_> = (1..=MAX_COUNTER_SLOTS as u16 + 10)
            .map(|port| (Proto::Udp, port))
            .collect();
        let mut image = MapImage::default();
        let mut slots = CounterSlots::default();
        slots.stamp(&mut image, &p, &listened);
        let handed = (MAX_COUNTER_SLOTS - FIRST_COUNTER_SLOT) as usize;
        assert_eq!(image.ports.len(), handed);
        assert_eq!(slots.overflow(), listened.len() - handed);
        // All taken: one more listened port would change nothing.
        assert!(!slots.would_take(Proto::Tcp, 9));
        assert!(slots.owns(Proto::Udp, 1));
        assert!(!slots.owns(Proto::Udp, MAX_COUNTER_SLOTS as u16 + 10));
    }

    #[test]
    fn a_port_would_take_a_slot_only_if_nothing_counts_it_yet_and_one_is_free() {
        let p = policy("allow = [\"tcp/8000-8002\"]");
        let mut image = compile(&p).unwrap_or_default();
        let mut slots = CounterSlots::default();
        let listened: BTreeSet<_> = [(Proto::Udp, 5353)].into_iter().collect();
        slots.stamp(&mut image, &p, &listened);
        assert!(
            !slots.would_take(Proto::Tcp, 8001),
            "its rule's slot counts it"
        );
        assert!(!slots.would_take(Proto::Udp, 5353), "it has its own");
        assert!(slots.would_take(Proto::Udp, 5354));
        assert!(slots.would_take(Proto::Tcp, 9));
        assert!(slots.owns(Proto::Udp, 5353));
        assert!(!slots.owns(Proto::Tcp, 8001), "a rule's slot is the rule's");
    }
}
