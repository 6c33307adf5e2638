//! The interfaces of a network namespace and their addresses, dumped from
//! rtnetlink: the ways in through which a listener can be reached, for
//! telling whether the guard stands in each of them.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::mpsc,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// One interface, as a way in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    /// Administratively up.
    pub up: bool,
    pub loopback: bool,
    /// Enslaved to a bridge or bond: what arrives is the master's.
    pub has_master: bool,
    /// A dummy device: nothing arrives on it from a wire.
    pub dummy: bool,
    /// The kind of a software device (`veth`, `bridge`, `tun`, ...); None
    /// for a hardware one.
    pub kind: Option<String>,
    pub addrs: Vec<IpAddr>,
    /// IPv4 subnet broadcast addresses of its networks.
    pub broadcast: Vec<IpAddr>,
    /// The XDP programs attached (by id), whatever their mode.
    pub xdp_programs: Vec<u32>,
}

impl Iface {
    /// Whether packets from outside the host can arrive through it.
    pub fn is_way_in(&self) -> bool {
        self.up && !self.loopback && !self.has_master && !self.dummy
    }
}

/// Every address that makes a frame the host's own: each interface's
/// addresses (loopback's too) and IPv4 subnet broadcasts. Multicast and
/// the limited broadcast are the host's by their form; the XDP program
/// knows those.
pub fn local_addresses(ifaces: &[Iface]) -> std::collections::BTreeSet<IpAddr> {
    ifaces
        .iter()
        .flat_map(|i| i.addrs.iter().chain(&i.broadcast))
        .copied()
        .collect()
}

/// The interfaces of the calling thread's network namespace.
pub fn dump() -> io::Result<Vec<Iface>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut ifaces: Vec<Iface> = Vec::new();
    for msg in request(
        &socket,
        1,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
    )? {
        if let RouteNetlinkMessage::NewLink(link) = msg {
            ifaces.push(iface_of(&link));
        }
    }
    for msg in request(
        &socket,
        2,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
    )? {
        if let RouteNetlinkMessage::NewAddress(addr) = msg
            && let Some(iface) = ifaces.iter_mut().find(|i| i.index == addr.header.index)
        {
            // IFA_LOCAL is the interface's own address on point-to-point
            // links; IFA_ADDRESS elsewhere.
            let local = addr.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = addr.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(address) {
                iface.addrs.push(ip);
            }
            let broadcast = addr.attributes.iter().find_map(|a| match a {
                AddressAttribute::Broadcast(ip) => Some(IpAddr::V4(*ip)),
                _ => None,
            });
            iface.broadcast.extend(broadcast);
        }
    }
    ifaces.sort_by_key(|i| i.index);
    Ok(ifaces)
}

/// The interfaces of the network namespace `ns_file` refers to (such as
/// /proc/PID/ns/net), if it is still namespace `inode`: dumped on a thread
/// of its own that enters it, so the caller's namespace never changes.
pub fn dump_in(ns_file: &Path, inode: u64) -> io::Result<Vec<Iface>> {
    let path: PathBuf = ns_file.to_owned();
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("portwatch-netns".into())
            .spawn_scoped(scope, move || enter_and_dump(&path, inode))?
            .join()
            .map_err(|_| io::Error::other("the netns thread panicked"))?
    })
}

/// Enters the namespace `ns_file` refers to, if it is still `inode`, and
/// dumps its interfaces. Only for a thread that does nothing else.
fn enter_and_dump(ns_file: &Path, inode: u64) -> io::Result<Vec<Iface>> {
    crate::sys::enter_netns(ns_file, inode)?;
    dump()
}

/// A request to [`NetnsDumper`]'s thread and where its answer goes.
type DumpRequest = (PathBuf, u64, mpsc::SyncSender<io::Result<Vec<Iface>>>);

/// [`dump_in`] on one long-lived thread that enters each namespace in
/// turn and returns to its own after each dump: a thread inside a
/// namespace keeps it alive (and a container's veth with it) after every
/// process of the container is gone. A thread started for each dump waits
/// for a CPU behind a burst's busy processes before it runs (~10 ms
/// measured, with the events of a new namespace's first listeners held
/// meanwhile); a sleeping one is woken at once.
pub struct NetnsDumper {
    requests: Option<mpsc::Sender<DumpRequest>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Its thread's id (tests look at its namespace).
    #[cfg_attr(not(test), allow(dead_code))]
    tid: i32,
}

impl NetnsDumper {
    pub fn start() -> io::Result<Self> {
        let (requests, inbox) = mpsc::channel::<DumpRequest>();
        let (started, start_result) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("portwatch-netns".into())
            .spawn(move || {
                let home = match std::fs::File::open("/proc/thread-self/ns/net") {
                    Ok(home) => home,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let _ = started.send(Ok(nix::unistd::gettid().as_raw()));
                for (path, inode, reply) in inbox {
                    let dumped = enter_and_dump(&path, inode);
                    let back = nix::sched::setns(&home, nix::sched::CloneFlags::CLONE_NEWNET);
                    // The asker may have given up: nothing to tell.
                    let _ = reply.send(dumped);
                    if let Err(e) = back {
                        // Ending the thread leaves the namespace; the
                        // asker gets a thread per dump from now on.
                        log::warn!("the netns thread could not return to its namespace: {e}");
                        return;
                    }
                }
            })?;
        let started = start_result
            .recv()
            .map_err(|_| io::Error::other("the netns thread ended at its start"));
        let mut dumper = Self {
            requests: Some(requests),
            thread: Some(thread),
            tid: 0,
        };
        // Joined on drop if it did not start.
        dumper.tid = started??;
        Ok(dumper)
    }

    /// The interfaces of the namespace `ns_file` refers to, if it is still
    /// `inode` (as [`dump_in`]).
    pub fn dump_in(&self, ns_file: &Path, inode: u64) -> io::Result<Vec<Iface>> {
        let gone = || io::Error::other("the netns thread is gone");
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .as_ref()
            .ok_or_else(gone)?
            .send((ns_file.to_owned(), inode, reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// Whether its thread still runs (it ends if it cannot return to its
    /// namespace, or if a dump panicked).
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for NetnsDumper {
    fn drop(&mut self) {
        // Its inbox closes and its loop ends after the dump under way.
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn iface_of(link: &LinkMessage) -> Iface {
    let mut iface = Iface {
        index: link.header.index,
        name: String::new(),
        up: link.header.flags.contains(LinkFlags::Up),
        loopback: link.header.flags.contains(LinkFlags::Loopback),
        has_master: false,
        dummy: false,
        kind: None,
        addrs: Vec::new(),
        broadcast: Vec::new(),
        xdp_programs: Vec::new(),
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(name) => iface.name = name.clone(),
            LinkAttribute::Controller(_) => iface.has_master = true,
            LinkAttribute::LinkInfo(infos) => {
                iface.dummy = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Dummy)));
                iface.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                });
            }
            LinkAttribute::Xdp(xdp) => {
                for attr in xdp {
                    if let LinkXdp::ProgId(id)
                    | LinkXdp::DrvProgId(id)
                    | LinkXdp::SkbProgId(id)
                    | LinkXdp::HwProgId(id) = attr
                        && *id != 0
                        && !iface.xdp_programs.contains(id)
                    {
                        iface.xdp_programs.push(*id);
                    }
                }
            }
            _ => {}
        }
    }
    iface
}

/// Sends one dump request and collects its answers up to NLMSG_DONE.
fn request(
    socket: &Socket,
    seq: u32,
    msg: RouteNetlinkMessage,
) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    request.finalize();
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let len = match socket.recv(&mut &mut buf[..], 0) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if len == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut rest = buf.get(..len).unwrap_or_default();
        while rest.len() >= 16 {
            let msg_len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if msg_len < 16 || msg_len > rest.len() {
                return Err(io::Error::other("a truncated rtnetlink message"));
            }
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let msg_seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
            if msg_seq == seq {
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = rest
                            .get(16..20)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(0);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                    }
                    _ => {
                        if let Ok(msg) =
                            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..msg_len])
                            && let NetlinkPayload::InnerMessage(inner) = msg.payload
                        {
                            out.push(inner);
                        }
                    }
                }
            }
            let step = msg_len.next_multiple_of(4).min(rest.len());
            rest = rest.get(step..).unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn the_loopback_interface_is_found_and_is_no_way_in() -> io::Result<()> {
        let ifaces = dump()?;
        let lo = ifaces
            .iter()
            .find(|i| i.name == "lo")
            .ok_or_else(|| io::Error::other("no lo"))?;
        assert!(lo.loopback && !lo.is_way_in(), "{lo:?}");
        assert!(lo.addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{lo:?}");
        Ok(())
    }

    /// A process of ours in a network namespace of its own (`unshare -n`),
    /// killed and reaped on drop.
    struct OtherNetns(std::process::Child);

    impl OtherNetns {
        fn start() -> io::Result<Self> {
            let child = std::process::Command::new("unshare")
                .args(["-n", "sleep", "60"])
                .spawn()?;
            let other = Self(child);
            // unshare enters the namespace, then execs sleep.
            let ours = std::fs::metadata("/proc/self/ns/net")?.ino();
            for _ in 0..200 {
                if other.inode()? != ours {
                    return Ok(other);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(io::Error::other("unshare -n never entered a namespace"))
        }

        fn ns_file(&self) -> PathBuf {
            PathBuf::from(format!("/proc/{}/ns/net", self.0.id()))
        }

        fn inode(&self) -> io::Result<u64> {
            Ok(std::fs::metadata(self.ns_file())?.ino())
        }
    }

    impl Drop for OtherNetns {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn one_dumper_thread_reads_namespace_after_namespace_as_a_thread_each_would() -> io::Result<()>
    {
        let other = OtherNetns::start()?;
        let own = PathBuf::from("/proc/self/ns/net");
        let own_inode = std::fs::metadata(&own)?.ino();
        let dumper = NetnsDumper::start()?;
        let loopback_addrs = |ifaces: &[Iface]| {
            ifaces
                .iter()
                .find(|i| i.loopback)
                .map(|lo| lo.addrs.clone())
                .ok_or_else(|| io::Error::other(format!("no loopback in {ifaces:?}")))
        };
        let ns_of_thread =
            || std::fs::metadata(format!("/proc/self/task/{}/ns/net", dumper.tid)).map(|m| m.ino());
        assert_eq!(ns_of_thread()?, own_inode, "it starts in ours");
        // There and back: after a dump elsewhere the thread is home again
        // (staying would keep that namespace alive), and the next dump
        // must not see the one visited before.
        let theirs = dumper.dump_in(&other.ns_file(), other.inode()?)?;
        assert_eq!(ns_of_thread()?, own_inode, "back home after the dump");
        let ours = dumper.dump_in(&own, own_inode)?;
        let lo = theirs
            .iter()
            .find(|i| i.loopback)
            .ok_or_else(|| io::Error::other(format!("no loopback in {theirs:?}")))?;
        assert!(
            !lo.up && lo.addrs.is_empty(),
            "a fresh namespace's loopback is down, without 127.0.0.1: {lo:?}"
        );
        assert_eq!(theirs, dump_in(&other.ns_file(), other.inode()?)?);
        assert!(
            loopback_addrs(&ours)?.contains(&IpAddr::from([127, 0, 0, 1])),
            "ours, not the one visited before: {ours:?}"
        );
        // The pid's namespace is no longer the one asked for.
        assert!(dumper.dump_in(&other.ns_file(), own_inode).is_err());
        Ok(())
    }
}
