//! The lab that portwatch's integration tests (`tests/`) and its development
//! tasks (`xtask/`) share: network namespaces and veth pairs between them,
//! child processes and commands bounded in time, cgroups, temporary files, and a
//! guard running with pins and a control socket of its own.
//!
//! Everything that creates something (a namespace, a process, a pin
//! directory, a temporary directory or file) removes it when dropped, so
//! also when a test or a task panics. Names are unique per process and
//! call ([`unique_name`]), so concurrent runs never collide.
//!
//! The lab knows nothing of portwatch's crates: where it runs portwatch,
//! it takes the binary's path. Errors are `anyhow` with context: the
//! callers (tests, xtask) only report them, and the test files return the
//! lab's results as their own.

pub mod bounded;
pub mod cgroup;
pub mod guard;
pub mod lines;
pub mod listening;
pub mod name;
pub mod netns;
pub mod orphans;
pub mod process;
pub mod tcx;
pub mod temp;
pub mod tools;
pub mod veth;

pub use bounded::{Outcome, run, run_bounded, run_within};
pub use cgroup::TestCgroup;
pub use guard::{Guard, GuardPaths};
pub use lines::{Lines, line_reader, wait_line};
pub use listening::{spawn_server, wait_listening};
pub use name::unique_name;
pub use netns::Netns;
pub use process::{ChildGuard, command_line, describe_status, signal};
pub use temp::{TempDir, TempFile};
pub use tools::{find_in_path, require_tools};
pub use veth::Lab;
