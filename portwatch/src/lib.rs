//! portwatch: live listener monitor and XDP port guard, as a library. The
//! `portwatch` binary (src/bin/portwatch) is its command line; nothing here
//! knows about argument parsing or terminals.
//!
//! Layers, each using only those below it (see ARCHITECTURE.md):
//!
//! - [`guard`], [`watch`]: the two daemons, set up and run;
//! - [`runloop`]: the event loop both run on;
//! - [`control`]: the control socket's protocol, server and client;
//! - [`pipeline`]: kernel records to enriched events, fanned out;
//! - [`metrics`], [`sinks`]: outputs;
//! - [`policy`]: the allowlist: parse, check, compile, store;
//! - [`iface`]: network interfaces;
//! - [`datapath`]: the kernel objects: load, attach, pin, maps, rings;
//! - [`snapshot`], [`procinfo`], [`sys`]: what the system says;
//! - [`format`], [`error`], [`model`]: leaves.

pub mod control;
pub mod datapath;
pub mod error;
pub mod format;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod guard;
pub mod iface;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod policy;
pub mod procinfo;
pub mod runloop;
pub mod sinks;
pub mod snapshot;
pub mod sys;
pub mod watch;
