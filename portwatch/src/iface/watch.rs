//! Follows the guarded interfaces through rtnetlink: an interface that is
//! deleted takes its XDP program with it, and one that comes back (a
//! re-created veth, a reloaded driver) must be guarded again at once.

use std::io;

use bytes::BytesMut;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::io::{Interest, unix::AsyncFd};

/// RTMGRP_LINK: link changes.
const RTMGRP_LINK: u32 = 1;
/// RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE: route changes (a default route
/// appearing, e.g. once DHCP has configured an interface at boot).
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
/// RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR: addresses added or removed.
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// An interface appeared or changed (RTM_NEWLINK).
    Up { name: String, index: u32 },
    /// An interface went away (RTM_DELLINK).
    Gone { name: String, index: u32 },
}

pub struct LinkWatch {
    fd: AsyncFd<Socket>,
    buf: BytesMut,
}

impl LinkWatch {
    /// Subscribes to link changes in the current network namespace.
    pub fn open() -> io::Result<Self> {
        Self::open_groups(RTMGRP_LINK)
    }

    /// Subscribes to link and address changes: `next` then also returns (an
    /// empty batch) when an address was added or removed.
    pub fn open_with_addresses() -> io::Result<Self> {
        Self::open_groups(RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
    }

    /// Subscribes to link and route changes: `next` then also returns (an
    /// empty batch) when a route was added or removed.
    pub fn open_with_routes() -> io::Result<Self> {
        Self::open_groups(RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
    }

    fn open_groups(groups: u32) -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        // SAFETY: the socket owns its fd, which stays open and the same until
        // the AsyncFd (which owns the socket) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            fd,
            buf: BytesMut::with_capacity(64 * 1024),
        })
    }

    /// Waits for the next batch of link changes.
    pub async fn next(&mut self) -> io::Result<Vec<LinkChange>> {
        loop {
            let mut guard = self.fd.readable().await?;
            self.buf.clear();
            match guard.get_inner().recv(&mut self.buf, 0) {
                Ok(_) => return Ok(parse(&self.buf)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                // ENOBUFS: the kernel dropped notifications; what matters is
                // re-checked on the next one.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The link changes in one datagram of netlink messages.
pub fn parse(mut data: &[u8]) -> Vec<LinkChange> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..len])
            && let NetlinkPayload::InnerMessage(inner) = msg.payload
        {
            match inner {
                RouteNetlinkMessage::NewLink(link) => {
                    if let Some((name, index)) = name_of(&link) {
                        out.push(LinkChange::Up { name, index });
                    }
                }
                RouteNetlinkMessage::DelLink(link) => {
                    if let Some((name, index)) = name_of(&link) {
                        out.push(LinkChange::Gone { name, index });
                    }
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        data = data.get(step..).unwrap_or(&[]);
    }
    out
}

fn name_of(link: &LinkMessage) -> Option<(String, u32)> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some((name.clone(), link.header.index)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncated_datagrams_give_nothing() {
        assert!(parse(&[]).is_empty());
        assert!(parse(&[0xff; 15]).is_empty());
        let mut bogus = vec![0u8; 32];
        bogus[0] = 200; // claims more than there is
        assert!(parse(&bogus).is_empty());
    }
}
