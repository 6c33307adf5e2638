//! Whether the network can reach a listener, under the guard's policy:
//! what every listener event, `status`, `top` and the metrics call its
//! exposure. The guard hands the pipeline a new view after each change.

use std::sync::Arc;

use crate::{
    model::{Exposure, Listener},
    policy::Policy,
};

/// The policy in force and the namespace it guards.
#[derive(Clone, Debug)]
pub struct ExposureView {
    policy: Arc<Policy>,
    /// The guard's network namespace: the policy says nothing about
    /// listeners in other namespaces.
    netns: Option<u64>,
}

impl ExposureView {
    pub fn new(policy: Arc<Policy>, netns: Option<u64>) -> Self {
        Self { policy, netns }
    }

    /// The exposure of `listener`, or None when it lives in another
    /// network namespace than the guard's.
    pub fn of(&self, listener: &Listener) -> Option<Exposure> {
        (listener.netns == self.netns).then(|| exposure_of(&self.policy, listener))
    }

    pub fn netns(&self) -> Option<u64> {
        self.netns
    }
}

/// Whether the network can reach a listener under `policy`. A listener on
/// a loopback address is out of the network's reach whatever the policy.
pub fn exposure_of(policy: &Policy, listener: &Listener) -> Exposure {
    if listener.addr.is_loopback() {
        Exposure::Blocked
    } else {
        policy.exposure(listener.proto, listener.port)
    }
}
