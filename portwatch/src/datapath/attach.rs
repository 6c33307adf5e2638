//! Attaching the guard to an interface: tc egress (the host's own UDP
//! flows) first, then the verdicts, in XDP or at tc ingress. New links are
//! pinned so that enforcement outlives the daemon; links a previous guard
//! pinned are adopted with an atomic program swap.

use std::path::{Path, PathBuf};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
    links::{FdLink, PinnedLink},
    tc::{self, SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};
use portwatch_common::prog;

pub use crate::model::AttachedMode;

use super::{pins::PinDir, program};
use crate::{
    error::{Error, Result, program_error},
    iface::ifindex,
};

/// How the guard's verdict is asked to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Per interface (see [`auto_mode`]): generic on veth and tun
    /// devices, else native, falling back to generic with a notice.
    #[default]
    Auto,
    Native,
    Generic,
    /// At tc ingress, on the skb: no XDP at all.
    Tc,
}

impl XdpMode {
    /// The mode an attachment in this mode ends up in; None for `Auto`,
    /// which may fall back.
    pub fn attaches_as(self) -> Option<AttachedMode> {
        match self {
            XdpMode::Auto => None,
            XdpMode::Native => Some(AttachedMode::Native),
            XdpMode::Generic => Some(AttachedMode::Generic),
            XdpMode::Tc => Some(AttachedMode::Tc),
        }
    }
}

/// How the guard sits on one interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
    pub xdp_mode: AttachedMode,
    /// Why `auto` chose this mode, when not for the usual reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// What `auto` attaches with on an interface of `kind` (None: hardware),
/// and why when it is not native: native XDP on a veth or a tun device
/// must copy each packet, already in an skb, into an XDP buffer (large TCP
/// segments linearised), which costs more than generic XDP on the skb.
/// tc ingress (`--xdp-mode tc`) copies nothing there, but it is not the
/// default: it runs after the kernel has untagged VLAN frames, and drops a
/// frame whose tag is truncated before the guard sees it, uncounted.
pub fn auto_mode(kind: Option<&str>) -> (XdpMode, Option<String>) {
    match kind {
        Some(k @ ("veth" | "tun")) => (
            XdpMode::Generic,
            Some(format!(
                "{k}: native XDP would copy every packet into an XDP buffer; generic costs less \
                 here (--xdp-mode tc copies nothing; --xdp-mode native forces native)"
            )),
        ),
        _ => (XdpMode::Auto, None),
    }
}

/// Attaches (or adopts) the guard on `iface`: tc egress first, then the
/// verdict (XDP or tc ingress). New links are pinned and also kept in
/// `held` (the daemon's own reference while it runs).
pub(crate) fn attach(
    pins: &PinDir,
    ebpf: &mut aya::Ebpf,
    iface: &str,
    mode: XdpMode,
    held: &mut Vec<PinnedLink>,
) -> Result<Attached> {
    let ifindex = ifindex(iface)?;
    attach_tc(pins, ebpf, iface, held)?;
    // A link a previous guard pinned is adopted in the mode it has.
    let xdp_mode = match pins.pinned_guard(iface) {
        Some((pin, AttachedMode::Tc)) => {
            let prog = loaded_tc(ebpf, prog::TC_GUARD, TC_GUARD_HINT)?;
            swap_into_tc_link(prog, open_pinned(&pin)?, &pin, iface, TC_GUARD_HINT)?;
            AttachedMode::Tc
        }
        None if mode == XdpMode::Tc => attach_tc_guard(pins, ebpf, iface, held)?,
        pinned => attach_xdp(pins, ebpf, iface, mode, pinned, held)?,
    };
    Ok(Attached {
        why: None,
        iface: iface.to_string(),
        ifindex,
        xdp_mode,
    })
}

/// The tc program `name`, loaded if it is not yet.
fn loaded_tc<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
    hint: &'static str,
) -> Result<&'a mut SchedClassifier> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(program_error(format!("loading {name}"), hint))?;
    }
    Ok(prog)
}

/// Opens the link pinned at `pin`.
fn open_pinned(pin: &Path) -> Result<PinnedLink> {
    PinnedLink::from_pin(pin).map_err(|e| Error::Io {
        what: format!("opening the pinned link {}", pin.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Swaps `prog` into `old`, the tc link a previous guard pinned at `pin`
/// (atomic: the interface is never without it).
fn swap_into_tc_link(
    prog: &mut SchedClassifier,
    old: PinnedLink,
    pin: &Path,
    iface: &str,
    hint: &'static str,
) -> Result<()> {
    let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| Error::Io {
        what: format!("{} is not a tc link", pin.display()),
        source: std::io::Error::other(e.to_string()),
    })?;
    prog.attach_to_link(link).map_err(program_error(
        format!("replacing the tc program on {iface}"),
        hint,
    ))?;
    Ok(())
}

/// Pins a new link at `pin` and keeps the daemon's reference in `held`.
fn pin_link(fd_link: FdLink, pin: &Path, held: &mut Vec<PinnedLink>) -> Result<()> {
    held.push(fd_link.pin(pin).map_err(|e| Error::Io {
        what: format!("pinning the link at {}", pin.display()),
        source: std::io::Error::other(e.to_string()),
    })?);
    Ok(())
}

fn attach_tc(
    pins: &PinDir,
    ebpf: &mut aya::Ebpf,
    iface: &str,
    held: &mut Vec<PinnedLink>,
) -> Result<()> {
    let hint = "the guard records the host's own UDP flows with a tc egress program (CONFIG_NET_CLS_BPF, Linux 6.6+ for tcx or a clsact qdisc)";
    let prog = loaded_tc(ebpf, prog::TC_EGRESS, hint)?;
    let pin = pins.tc_link(iface);
    if let Ok(old) = PinnedLink::from_pin(&pin) {
        return swap_into_tc_link(prog, old, &pin, iface, hint);
    }
    let id = match prog.attach(iface, TcAttachType::Egress) {
        Ok(id) => id,
        Err(first) => {
            // Before tcx (Linux 6.6) the program hangs off a clsact qdisc.
            if tc::qdisc_add_clsact(iface).is_err() {
                return Err(program_error(
                    format!("attaching tc egress to {iface}"),
                    hint,
                )(first));
            }
            prog.attach(iface, TcAttachType::Egress)
                .map_err(program_error(
                    format!("attaching tc egress to {iface}"),
                    hint,
                ))?
        }
    };
    let link = prog.take_link(id).map_err(program_error(
        format!("taking the tc link of {iface}"),
        hint,
    ))?;
    match FdLink::try_from(link) {
        Ok(fd_link) => pin_link(fd_link, &pin, held)?,
        Err(_) => log::warn!(
            "{iface}: tc egress is attached through a qdisc (kernel before 6.6), which cannot be pinned: \
                 replies to the host's UDP flows pass only while the daemon runs"
        ),
    }
    Ok(())
}

const TC_GUARD_HINT: &str = "the guard judges inbound packets on software devices with a tc ingress program (CONFIG_NET_CLS_BPF; Linux 6.6+ for tcx links, which outlive the daemon): --xdp-mode generic judges them in XDP instead";

/// Attaches the guard at tc ingress as a tcx link, pinned. A kernel
/// without tcx (before 6.6) could only hang it off a clsact qdisc, which
/// cannot be pinned and would leave the interface unguarded when the
/// daemon stops: that is refused, with the XDP modes as the way out.
fn attach_tc_guard(
    pins: &PinDir,
    ebpf: &mut aya::Ebpf,
    iface: &str,
    held: &mut Vec<PinnedLink>,
) -> Result<AttachedMode> {
    let prog = loaded_tc(ebpf, prog::TC_GUARD, TC_GUARD_HINT)?;
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(program_error(
            format!("attaching the guard at tc ingress of {iface}"),
            TC_GUARD_HINT,
        ))?;
    let link = prog.take_link(id).map_err(program_error(
        format!("taking the tc ingress link of {iface}"),
        TC_GUARD_HINT,
    ))?;
    let fd_link = FdLink::try_from(link).map_err(|e| Error::Io {
        what: format!("the tc ingress attachment of {iface} is not a bpf_link"),
        source: std::io::Error::other(e.to_string()),
    })?;
    pin_link(fd_link, &pins.guard_link(iface, AttachedMode::Tc), held)?;
    Ok(AttachedMode::Tc)
}

/// The ids of the programs at `iface`'s tc ingress (tcx).
pub fn tc_ingress_programs(iface: &str) -> Result<Vec<u32>> {
    SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
        .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
        .map_err(program_error(
            format!("reading the tc ingress programs of {iface}"),
            "",
        ))
}

/// Attaches the guard in XDP, or adopts the XDP link `pinned` (never a
/// tc one: the caller adopts those).
fn attach_xdp(
    pins: &PinDir,
    ebpf: &mut aya::Ebpf,
    iface: &str,
    mode: XdpMode,
    pinned: Option<(PathBuf, AttachedMode)>,
    held: &mut Vec<PinnedLink>,
) -> Result<AttachedMode> {
    let hint = "the guard filters inbound packets with XDP (Linux 5.9+ for XDP links)";
    let xdp: &mut Xdp = program(ebpf, prog::XDP_GUARD)?;
    if xdp.fd().is_err() {
        xdp.load()
            .map_err(program_error("loading the XDP guard".into(), hint))?;
    }
    if let Some((pin, pinned_mode)) = pinned
        && let Ok(old) = PinnedLink::from_pin(&pin)
    {
        let link = XdpLink::try_from(FdLink::from(old)).map_err(|e| Error::Io {
            what: format!("{} is not an XDP link", pin.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        // Atomic: the interface is never without a program.
        xdp.attach_to_link(link).map_err(program_error(
            format!("replacing the XDP program on {iface}"),
            hint,
        ))?;
        return Ok(pinned_mode);
    }
    let (id, mode) = match mode {
        XdpMode::Native => (
            xdp.attach(iface, AyaXdpMode::Driver)
                .map_err(program_error(
                    format!("attaching XDP in native mode to {iface}"),
                    "the driver may not support native XDP: try --xdp-mode generic (or auto)",
                ))?,
            AttachedMode::Native,
        ),
        // Tc here: an XDP link an earlier guard pinned could not be
        // opened; the interface stays in XDP, the nearest mode.
        XdpMode::Generic | XdpMode::Tc => (
            xdp.attach(iface, AyaXdpMode::Skb).map_err(program_error(
                format!("attaching XDP in generic mode to {iface}"),
                hint,
            ))?,
            AttachedMode::Generic,
        ),
        XdpMode::Auto => match xdp.attach(iface, AyaXdpMode::Driver) {
            Ok(id) => (id, AttachedMode::Native),
            Err(e) => {
                log::warn!(
                    "{iface}: native XDP failed ({e}); falling back to generic XDP (slower, same verdicts)"
                );
                (
                    xdp.attach(iface, AyaXdpMode::Skb)
                        .map_err(program_error(format!("attaching XDP to {iface}"), hint))?,
                    AttachedMode::Generic,
                )
            }
        },
    };
    let link = xdp.take_link(id).map_err(program_error(
        format!("taking the XDP link of {iface}"),
        hint,
    ))?;
    let fd_link = FdLink::try_from(link).map_err(|e| Error::Io {
        what: format!(
            "the XDP attachment of {iface} is not a bpf_link (Linux 5.9+ needed to pin it)"
        ),
        source: std::io::Error::other(e.to_string()),
    })?;
    pin_link(fd_link, &pins.guard_link(iface, mode), held)?;
    Ok(mode)
}
