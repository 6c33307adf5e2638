//! portwatch: live listener monitor and XDP port guard.
//!
//! One module per responsibility: `loader` (kernel programs), `maps` (typed
//! map access), `events` (ring buffer reading and decoding), `snapshot`
//! (listeners at start, via sock_diag), `procinfo` (/proc), `listeners` (the
//! live set), `sinks` (outputs), `watch` (the command), `cli`.

pub mod cli;
pub mod commands;
pub mod compile;
pub mod control;
pub mod docs;
pub mod error;
pub mod events;
pub mod fuzzing;
pub mod guard;
pub mod listeners;
pub mod loader;
pub mod logging;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod procinfo;
pub mod sinks;
pub mod snapshot;
pub mod stream;
pub mod sys;
pub mod tui;
pub mod watch;
