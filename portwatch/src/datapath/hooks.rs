//! The links of the guard's monitor hooks (which also judge binds of owned
//! ports), pinned like its XDP and
//! tc links, so that they keep running while no guard does: binds of owned
//! ports are still judged, and listener events wait in the pinned ring for
//! the next guard. A new guard adopts a pinned link when it runs the same
//! program (same tag: the same build); otherwise it attaches its own first
//! and then lets the old one go (an upgrade: for that moment both run, and
//! an event may come twice; none is missed).

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};

use crate::error::{Error, Result};

/// A hook's link as the guard holds it: the kernel keeps the program
/// attached while the pin (if any) or this descriptor exists.
#[derive(Debug)]
pub struct HookLink {
    fd: FdLink,
    pin: Option<PathBuf>,
}

impl HookLink {
    /// Detaches the hook: unpins it, then lets the descriptor go.
    pub fn release(self) {
        if let Some(pin) = &self.pin
            && let Err(e) = std::fs::remove_file(pin)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!("cannot unpin {}: {e}", pin.display());
        }
        drop(self.fd);
    }
}

/// The tag (hash of the instructions) of the program behind a link.
fn program_tag(link: &FdLink) -> Option<u64> {
    let id = link.info().ok()?.program_id();
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .map(|p| p.tag())
}

/// The link pinned at `pin`, when it runs a program with `tag`; a pinned
/// link of another build is returned apart, to be released once the new
/// one is attached.
pub(crate) fn adopt(pin: &Path, tag: u64) -> (Option<HookLink>, Option<HookLink>) {
    let Ok(pinned) = PinnedLink::from_pin(pin) else {
        return (None, None);
    };
    let fd = FdLink::from(pinned);
    let link = HookLink {
        fd,
        pin: Some(pin.to_path_buf()),
    };
    if program_tag(&link.fd) == Some(tag) {
        (Some(link), None)
    } else {
        (None, Some(link))
    }
}

/// Pins a newly attached link at `pin` (where a stale one of another build
/// may still be: it is moved out of the way first, and released after).
pub(crate) fn pin(fd: FdLink, pin: &Path, stale: Option<HookLink>) -> Result<HookLink> {
    if let Some(old) = stale {
        // Unpinned first so the new pin can take the name; its descriptor
        // keeps it attached until released below, after the new one.
        let _ = std::fs::remove_file(pin);
        let pinned = fd.pin(pin).map_err(|e| Error::Io {
            what: format!("pinning {}", pin.display()),
            source: std::io::Error::other(e.to_string()),
        });
        HookLink {
            fd: old.fd,
            pin: None,
        }
        .release();
        return pinned.map(|p| HookLink {
            fd: FdLink::from(p),
            pin: Some(pin.to_path_buf()),
        });
    }
    let pinned = fd.pin(pin).map_err(|e| Error::Io {
        what: format!("pinning {}", pin.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(HookLink {
        fd: FdLink::from(pinned),
        pin: Some(pin.to_path_buf()),
    })
}

/// A link that is not pinned (the watch command's, or where the kernel
/// cannot pin it): attached while held.
pub(crate) fn unpinned(fd: FdLink) -> HookLink {
    HookLink { fd, pin: None }
}
