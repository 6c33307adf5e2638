//! Two namespaces joined by a veth pair: the lab's network. Only
//! 198.18.X.0/24, 198.19.X.0/24, fd7e:X::/64 and fd7e:X:1::/64 are used, and traffic never leaves the
//! lab's namespaces.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

use crate::{bounded::run, netns::Netns, temp::TempDir};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Two fresh namespaces joined by a veth pair:
/// server `198.18.X.1/24` + `fd7e:X::1/64` on `server_if` (MAC `server_mac`),
/// client `198.18.X.2/24` + `fd7e:X::2/64` on `client_if` (MAC `client_mac`).
/// `dir` holds the lab's files (control sockets, lock files, policies).
/// Dropping the lab removes `dir`, then both namespaces and with them the
/// veths.
pub struct Lab {
    pub server_if: String,
    pub client_if: String,
    pub server_mac: String,
    pub client_mac: String,
    /// The X in the lab's prefixes (and MACs): different for every lab of
    /// this process.
    pub net: u8,
    pub dir: TempDir,
    // Last: the namespaces go after everything that may run in them.
    pub server: Netns,
    pub client: Netns,
}

impl Lab {
    pub fn new() -> Result<Self> {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let net = u8::try_from((pid % 254 + n) % 254 + 1).context("lab number")?;
        // 2 + 5 + up to 4 + 1 characters: within IFNAMSIZ (15). The names
        // only exist inside the lab's namespaces.
        let ifname = |end: char| format!("pw{}{}{end}", pid % 100_000, n % 10_000);
        let lab = Self {
            server_if: ifname('s'),
            client_if: ifname('c'),
            server_mac: format!("02:70:77:00:{net:02x}:01"),
            client_mac: format!("02:70:77:00:{net:02x}:02"),
            net,
            dir: TempDir::new("lab")?,
            server: Netns::new("s")?,
            client: Netns::new("c")?,
        };
        lab.connect()?;
        Ok(lab)
    }

    /// Creates the veth pair between the namespaces, with its addresses.
    /// `new` does this; a test that deletes the link can do it again.
    pub fn connect(&self) -> Result<()> {
        // Created inside the namespaces: the names never exist on the host.
        run(
            "ip",
            &[
                "link",
                "add",
                &self.server_if,
                "address",
                &self.server_mac,
                "netns",
                &self.server.name,
                "type",
                "veth",
                "peer",
                "name",
                &self.client_if,
                "address",
                &self.client_mac,
                "netns",
                &self.client.name,
            ],
        )?;
        for (ns, iface, host) in [
            (&self.server, &self.server_if, 1),
            (&self.client, &self.client_if, 2),
        ] {
            let v4 = format!("{}/24", self.v4(host));
            let v6 = format!("{}/64", self.v6(u16::from(host)));
            run("ip", &["-n", &ns.name, "addr", "add", &v4, "dev", iface])?;
            run(
                "ip",
                &["-n", &ns.name, "addr", "add", &v6, "dev", iface, "nodad"],
            )?;
            run("ip", &["-n", &ns.name, "link", "set", iface, "up"])?;
        }
        Ok(())
    }

    /// Static IPv4 neighbours on both sides: no ARP on the veth (the
    /// benchmarks count every frame).
    pub fn pin_neighbours(&self) -> Result<()> {
        for (ns, iface, ip, mac) in [
            (
                &self.server,
                &self.server_if,
                self.client_v4(),
                &self.client_mac,
            ),
            (
                &self.client,
                &self.client_if,
                self.server_v4(),
                &self.server_mac,
            ),
        ] {
            let ip = ip.to_string();
            run(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    mac,
                    "dev",
                    iface,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(())
    }

    pub fn v4(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.net, host))
    }

    pub fn v6(&self, host: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd7e,
            u16::from(self.net),
            0,
            0,
            0,
            0,
            0,
            host,
        ))
    }

    pub fn server_v4(&self) -> IpAddr {
        self.v4(1)
    }

    pub fn client_v4(&self) -> IpAddr {
        self.v4(2)
    }

    pub fn server_v6(&self) -> IpAddr {
        self.v6(1)
    }

    pub fn client_v6(&self) -> IpAddr {
        self.v6(2)
    }

    /// Gives the client's veth one more address, `198.18.X.host/24`.
    pub fn add_client_v4(&self, host: u8) -> Result<IpAddr> {
        let addr = self.v4(host);
        run(
            "ip",
            &[
                "-n",
                &self.client.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &self.client_if,
            ],
        )?;
        Ok(addr)
    }

    /// A second veth pair between the namespaces, `198.19.X.1/25` on the
    /// server's end and `.2` on the client's: a way into the server that a
    /// guard on `server_if` does not cover. Returns the server's end's name
    /// and the client's. It goes with the namespaces.
    pub fn add_side_link(&self) -> Result<(String, String)> {
        let pid = std::process::id();
        let n = u32::from(self.net);
        let server_if = format!("pw{}{}u", pid % 100_000, n);
        let client_if = format!("pw{}{}v", pid % 100_000, n);
        run(
            "ip",
            &[
                "link",
                "add",
                &server_if,
                "netns",
                &self.server.name,
                "type",
                "veth",
                "peer",
                "name",
                &client_if,
                "netns",
                &self.client.name,
            ],
        )?;
        for (ns, iface, host) in [(&self.server, &server_if, 1), (&self.client, &client_if, 2)] {
            let v4 = format!("{}/25", self.side_v4(host));
            run("ip", &["-n", &ns.name, "addr", "add", &v4, "dev", iface])?;
            run("ip", &["-n", &ns.name, "link", "set", iface, "up"])?;
        }
        Ok((server_if, client_if))
    }

    /// A third namespace routed behind the server (a container, a VM, the
    /// networks of a router): `198.19.X.130/25` and `fd7e:X:1::2/64` on
    /// its end of a veth to the server (`.129`, `::1`), its default route
    /// through the server, the server forwarding, and the client routing
    /// those networks through the server. Goes with the lab.
    pub fn add_routed(&self) -> Result<Netns> {
        let routed = Netns::new("r")?;
        let pid = std::process::id();
        let n = u32::from(self.net);
        let server_if = format!("pw{}{}f", pid % 100_000, n);
        let routed_if = format!("pw{}{}g", pid % 100_000, n);
        run(
            "ip",
            &[
                "link",
                "add",
                &server_if,
                "netns",
                &self.server.name,
                "type",
                "veth",
                "peer",
                "name",
                &routed_if,
                "netns",
                &routed.name,
            ],
        )?;
        let net = self.net;
        for (ns, iface, v4, v6) in [
            (&self.server.name, &server_if, 129, 1),
            (&routed.name, &routed_if, 130, 2),
        ] {
            let v4 = format!("198.19.{net}.{v4}/25");
            let v6 = format!("fd7e:{net:x}:1::{v6}/64");
            run("ip", &["-n", ns, "addr", "add", &v4, "dev", iface])?;
            run("ip", &["-n", ns, "addr", "add", &v6, "dev", iface, "nodad"])?;
            // Forwarding needs the link-local addresses at once, not after
            // a second of duplicate address detection.
            let no_dad = format!("net.ipv6.conf.{iface}.accept_dad=0");
            run("ip", &["netns", "exec", ns, "sysctl", "-qw", &no_dad])?;
            run("ip", &["-n", ns, "link", "set", iface, "up"])?;
        }
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            run(
                "ip",
                &["netns", "exec", &self.server.name, "sysctl", "-qw", sysctl],
            )?;
        }
        let via4 = format!("198.19.{net}.129");
        let via6 = format!("fd7e:{net:x}:1::1");
        run(
            "ip",
            &["-n", &routed.name, "route", "add", "default", "via", &via4],
        )?;
        run(
            "ip",
            &[
                "-n",
                &routed.name,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &via6,
            ],
        )?;
        let (server4, server6) = (self.server_v4().to_string(), self.server_v6().to_string());
        let (net4, net6) = (
            format!("198.19.{net}.128/25"),
            format!("fd7e:{net:x}:1::/64"),
        );
        run(
            "ip",
            &[
                "-n",
                &self.client.name,
                "route",
                "add",
                &net4,
                "via",
                &server4,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &self.client.name,
                "-6",
                "route",
                "add",
                &net6,
                "via",
                &server6,
            ],
        )?;
        Ok(routed)
    }

    /// The routed namespace's addresses (see [`Lab::add_routed`]).
    pub fn routed_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, self.net, 130))
    }

    pub fn routed_v6(&self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd7e, u16::from(self.net), 1, 0, 0, 0, 0, 2))
    }

    /// `198.19.X.host`: an address on the side link.
    pub fn side_v4(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, self.net, host))
    }

    /// A control socket path for a guard in this lab (in `dir`).
    pub fn socket(&self) -> Result<String> {
        let path = self.dir.join("control.sock");
        Ok(path
            .to_str()
            .context("socket path is not UTF-8")?
            .to_string())
    }

    /// `ip -n SERVER link show SERVER_IF`.
    pub fn server_link(&self) -> Result<String> {
        run(
            "ip",
            &["-n", &self.server.name, "link", "show", &self.server_if],
        )
    }

    /// How portwatch's guard sits on the server's veth (see
    /// [`crate::tcx::guard_mode`]).
    pub fn server_guard_mode(&self) -> Result<Option<&'static str>> {
        crate::tcx::guard_mode(&self.server, &self.server_if)
    }
}
