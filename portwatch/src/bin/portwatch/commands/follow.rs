//! `portwatch watch` while a guard runs: the guard's own stream instead of
//! a second set of kernel hooks.

use std::{io, path::Path};

use portwatch::control::{
    Format,
    client::{self, ClientError, CopyError},
};

/// `portwatch watch` while a guard runs: the guard's own stream instead of
/// a second set of kernel hooks. Copies its lines to stdout, each flushed,
/// until the guard ends the stream or stdout goes away; Ctrl-C ends the
/// process as usual. Ok(false) when no guard runs.
pub fn watch_via_guard(socket: &Path, json: bool, colour: bool) -> anyhow::Result<bool> {
    if !client::guard_running(socket) {
        return Ok(false);
    }
    let format = if json { Format::Json } else { Format::Human };
    let lines = match client::subscribe(socket, format, colour) {
        Ok(lines) => lines,
        // It went away in between.
        Err(ClientError::NoGuard { .. }) => return Ok(false),
        // Not ours to follow (or a stale socket we may not even touch): watch
        // on our own, which says what it needs if we lack that too.
        Err(ClientError::PermissionDenied(why)) => {
            log::warn!("not following the guard at {}: {why}", socket.display());
            return Ok(false);
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "a portwatch guard is running (control socket {}), but its stream is not available",
                socket.display()
            )));
        }
    };
    let mut out = crate::terminal::stream_stdout();
    let mut lines = lines;
    match lines.copy_lines(&mut out) {
        Ok(()) => {}
        // Whoever read stdout went away.
        Err(CopyError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(true),
        Err(e) => return Err(anyhow::Error::new(e)),
    }
    // Not an end we asked for: the guard stopped or restarted.
    anyhow::bail!(
        "the guard ended its stream (it stopped or is restarting; control socket {}): no \
         more events follow",
        socket.display()
    )
}
