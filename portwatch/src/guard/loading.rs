//! Reading and checking a policy file off the event loop: a reload of a
//! policy with thousands of sources parses and checks it on a blocking
//! thread, so that the stream and the control socket go on meanwhile;
//! only putting the result into the maps runs on the loop.

use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

use crate::{
    control::server::Reply,
    model::Requester,
    policy::{Policy, PolicyError, PortRange},
};

/// A policy file read and checked, for the loop to put in force.
pub struct Loaded {
    /// What the file said when it was read (None: no file): the loop
    /// reads it again if a change wrote it meanwhile.
    pub text: Option<String>,
    /// The policy it holds with the start-up `--allow` rules, or why not.
    pub policy: Result<Policy, String>,
    pub by: Requester,
    pub force: bool,
    /// Where the answer goes; None for SIGHUP.
    pub reply: Option<oneshot::Sender<Reply>>,
}

/// Reads and checks `path` on a blocking thread and sends the result to
/// `done`.
pub fn spawn(
    path: PathBuf,
    allow: Vec<PortRange>,
    by: Requester,
    force: bool,
    reply: Option<oneshot::Sender<Reply>>,
    done: mpsc::UnboundedSender<Loaded>,
) {
    tokio::task::spawn_blocking(move || {
        let (text, policy) = read(&path, &allow);
        // The guard holds the receiver for its whole life.
        let _ = done.send(Loaded {
            text,
            policy,
            by,
            force,
            reply,
        });
    });
}

/// The file's text and the policy it gives, with the messages a reload on
/// the loop gives.
fn read(path: &std::path::Path, allow: &[PortRange]) -> (Option<String>, Result<Policy, String>) {
    let unchanged = |e: anyhow::Error| format!("{e:#}; the policy in force is unchanged");
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            let e = PolicyError::Io {
                path: path.to_owned(),
                error,
            };
            return (None, Err(unchanged(e.into())));
        }
    };
    let policy = Policy::parse(&text)
        .map_err(|error| PolicyError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
        .map_err(anyhow::Error::from)
        .and_then(|policy| super::with_start_rules(policy, allow))
        .map_err(unchanged);
    (Some(text), policy)
}
