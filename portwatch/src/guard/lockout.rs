//! Lockout protection: before enforcing, find the sessions the policy would
//! cut off, above all the SSH session the operator is typing in.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use crate::{
    model::{Listener, Proto},
    policy::Policy,
};

/// The SSH daemons whose listeners mark a port as a way in for people.
const SSH_DAEMONS: &[&str] = &["sshd", "dropbear"];

/// A session a policy would cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lockout {
    /// The SSH session the command runs in (its `SSH_CONNECTION`).
    Own {
        client: IpAddr,
        server: IpAddr,
        port: u16,
    },
    /// An established connection to an SSH daemon's port.
    Established {
        remote: IpAddr,
        local: IpAddr,
        port: u16,
    },
}

impl fmt::Display for Lockout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lockout::Own {
                client,
                server: _,
                port,
            } => write!(
                f,
                "this command runs over SSH from {client} to port {port}, which the policy does \
                 not permit from {client}: enforcing would cut this session off (allow tcp/{port})"
            ),
            Lockout::Established {
                remote,
                local,
                port,
            } => write!(
                f,
                "an SSH session from {remote} to {local} port {port} is established, and the \
                 policy does not permit tcp/{port} from {remote}: enforcing would cut it off"
            ),
        }
    }
}

/// The sessions `policy` would cut off: the one `ssh_connection` names (if
/// it ends in this network namespace, as `established` says) and every
/// established connection to the port of an SSH daemon among `listeners`.
pub fn problems<'a>(
    policy: &Policy,
    listeners: impl Iterator<Item = &'a Listener>,
    ssh_connection: Option<&str>,
    established: &[(IpAddr, u16, IpAddr)],
) -> Vec<Lockout> {
    sessions(listeners, ssh_connection, established)
        .into_iter()
        .filter(|s| !policy.permits(Proto::Tcp, s.port(), s.client()))
        .collect()
}

/// Every SSH session into this namespace, whatever the policy: the one
/// `ssh_connection` names (if it ends here, as `established` says) and
/// every established connection to an SSH daemon's port among `listeners`
/// (from elsewhere than loopback).
pub fn sessions<'a>(
    listeners: impl Iterator<Item = &'a Listener>,
    ssh_connection: Option<&str>,
    established: &[(IpAddr, u16, IpAddr)],
) -> Vec<Lockout> {
    let mut out = Vec::new();
    // The session counts only if it ends in this network namespace: a guard
    // started with `ip netns exec` does not stand between the operator and sshd.
    if let Some((client, server, port)) = ssh_connection.and_then(parse_ssh_connection)
        && established
            .iter()
            .any(|(local, lport, remote)| *local == server && *lport == port && *remote == client)
    {
        out.push(Lockout::Own {
            client,
            server,
            port,
        });
    }
    let sshd_ports: BTreeSet<u16> = listeners
        .filter(|l| is_ssh_daemon(l))
        .map(|l| l.port)
        .collect();
    for (local, port, remote) in established {
        if sshd_ports.contains(port) && !remote.is_loopback() {
            out.push(Lockout::Established {
                remote: *remote,
                local: *local,
                port: *port,
            });
        }
    }
    out
}

impl Lockout {
    /// Where the session comes from.
    pub fn client(&self) -> IpAddr {
        match self {
            Lockout::Own { client, .. } => *client,
            Lockout::Established { remote, .. } => *remote,
        }
    }

    /// The SSH port it comes in through.
    pub fn port(&self) -> u16 {
        match self {
            Lockout::Own { port, .. } | Lockout::Established { port, .. } => *port,
        }
    }
}

/// What a change from `current` to `next` would cut off that `current` did
/// not already: `current` is None when nothing was enforced.
pub fn new_problems<'a>(
    current: Option<&Policy>,
    next: &Policy,
    listeners: impl Iterator<Item = &'a Listener> + Clone,
    ssh_connection: Option<&str>,
    established: &[(IpAddr, u16, IpAddr)],
) -> Vec<Lockout> {
    let before: BTreeSet<Lockout> = current
        .map(|p| problems(p, listeners.clone(), ssh_connection, established))
        .unwrap_or_default()
        .into_iter()
        .collect();
    problems(next, listeners, ssh_connection, established)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect()
}

/// `SSH_CONNECTION` = "client_ip client_port server_ip server_port" ->
/// (client, server, server port).
pub fn parse_ssh_connection(value: &str) -> Option<(IpAddr, IpAddr, u16)> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    if fields.len() != 4 {
        return None;
    }
    // A daemon behind a dual-stack socket may name an IPv4 client by its
    // IPv4-mapped IPv6 address; the kernel's table and the policy name it
    // as IPv4.
    let addr = |text: &str| text.parse::<IpAddr>().ok().map(|a| a.to_canonical());
    Some((addr(fields[0])?, addr(fields[2])?, fields[3].parse().ok()?))
}

/// Established TCP connections of this network namespace, (local address,
/// local port, remote address), that may be SSH sessions: to the port
/// `SSH_CONNECTION` names or to an SSH daemon's among `listeners` (none,
/// without reading any, when there is neither). The kernel picks them by
/// port: a busy server's other connections are never read. Addresses are
/// canonical: a session from an IPv4 client to a dual-stack listener
/// (`[::]:22`, as systemd's ssh.socket opens it) is named as
/// `SSH_CONNECTION` names it, by IPv4 addresses.
pub fn established_tcp<'a>(
    listeners: impl IntoIterator<Item = &'a Listener>,
    ssh_connection: Option<&str>,
) -> Vec<(IpAddr, u16, IpAddr)> {
    let mut ports: BTreeSet<u16> = listeners
        .into_iter()
        .filter(|l| is_ssh_daemon(l))
        .map(|l| l.port)
        .collect();
    ports.extend(
        ssh_connection
            .and_then(parse_ssh_connection)
            .map(|(_, _, port)| port),
    );
    if ports.is_empty() {
        return Vec::new();
    }
    let ports: Vec<u16> = ports.into_iter().collect();
    match crate::snapshot::connected(Proto::Tcp, Some(&ports)) {
        Ok(found) => found
            .into_iter()
            .map(|c| (c.local.ip(), c.local.port(), c.remote.ip()))
            .collect(),
        Err(e) => {
            log::warn!(
                "cannot list the established TCP connections ({e}): SSH sessions are not checked"
            );
            Vec::new()
        }
    }
}

fn is_ssh_daemon(l: &Listener) -> bool {
    l.proto == Proto::Tcp
        && l.process
            .comm
            .as_deref()
            .is_some_and(|c| SSH_DAEMONS.contains(&c))
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{Ipv4Addr, TcpListener, TcpStream},
        os::fd::AsRawFd as _,
    };

    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt::Ipv6V6Only,
    };

    use super::*;

    /// A listener on `[::]` that takes IPv4 too, whatever the host's
    /// `bindv6only`, as systemd's ssh.socket opens port 22.
    fn dual_stack_listener() -> Result<TcpListener, Box<dyn std::error::Error>> {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, Ipv6V6Only, &false)?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::UNSPECIFIED,
                0,
                0,
                0,
            )),
        )?;
        listen(&fd, Backlog::new(8)?)?;
        Ok(TcpListener::from(fd))
    }

    /// An SSH session from an IPv4 client to a dual-stack listener: the
    /// kernel names its ends as IPv4-mapped IPv6 addresses, SSH_CONNECTION
    /// as IPv4 ones. The session must still be found, and a policy that
    /// does not permit its port must be refused.
    #[test]
    fn an_ipv4_session_to_a_dual_stack_listener_is_found() -> Result<(), Box<dyn std::error::Error>>
    {
        let listener = dual_stack_listener()?;
        let port = listener.local_addr()?.port();
        let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        client.write_all(b"SSH-2.0-test\r\n")?;
        let (_server, _) = listener.accept()?;
        let client_port = client.local_addr()?.port();
        let ssh = format!("127.0.0.1 {client_port} 127.0.0.1 {port}");

        let established = established_tcp(std::iter::empty(), Some(&ssh));
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert!(
            established.contains(&(loopback, port, loopback)),
            "{established:?}"
        );
        let policy = Policy::parse("allow = [\"tcp/80\"]")?;
        let found = problems(&policy, std::iter::empty(), Some(&ssh), &established);
        assert_eq!(
            found,
            vec![Lockout::Own {
                client: loopback,
                server: loopback,
                port
            }]
        );
        // The daemon may name the ends as IPv4-mapped addresses.
        let mapped = format!("::ffff:127.0.0.1 {client_port} ::ffff:127.0.0.1 {port}");
        assert_eq!(
            problems(&policy, std::iter::empty(), Some(&mapped), &established),
            found
        );
        // Nothing to look for: nothing is read.
        assert!(established_tcp(std::iter::empty(), None).is_empty());
        Ok(())
    }

    #[test]
    fn ssh_session_not_permitted_is_a_problem() -> Result<(), Box<dyn std::error::Error>> {
        let ssh = Some("198.51.100.4 50000 192.0.2.1 22");
        let session = [(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            22,
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 4)),
        )];
        let policy = Policy::parse("allow = [\"tcp/80\"]")?;
        let found = problems(&policy, std::iter::empty(), ssh, &session);
        assert_eq!(found.len(), 1);
        let text = found[0].to_string();
        assert!(
            text.contains("port 22") && text.contains("198.51.100.4"),
            "{text}"
        );
        // A change only counts what it newly cuts off.
        let open = Policy::parse("allow = [\"tcp/22\"]")?;
        let none: Vec<&Listener> = Vec::new();
        assert_eq!(
            new_problems(Some(&open), &policy, none.iter().copied(), ssh, &session),
            found
        );
        assert!(
            new_problems(Some(&policy), &policy, none.iter().copied(), ssh, &session).is_empty()
        );
        assert_eq!(
            new_problems(None, &policy, none.iter().copied(), ssh, &session).len(),
            1,
            "nothing was enforced before"
        );
        // The same session in another namespace is not this guard's business.
        assert!(problems(&policy, std::iter::empty(), ssh, &[]).is_empty());
        let policy =
            Policy::parse("allow = [{ port = \"tcp/22\", from = [\"198.51.100.0/24\"] }]")?;
        assert!(problems(&policy, std::iter::empty(), ssh, &session).is_empty());
        Ok(())
    }

    #[test]
    fn established_sshd_sessions_are_checked() -> Result<(), Box<dyn std::error::Error>> {
        use crate::model::{ProcessInfo, SockId};
        let sshd = Listener {
            proto: Proto::Tcp,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 2222,
            sock_id: SockId::Cookie(1),
            netns: None,
            process: ProcessInfo {
                comm: Some("sshd".into()),
                ..ProcessInfo::default()
            }
            .into(),
        };
        let local = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let remote = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
        let policy = Policy::parse("")?;
        let found = problems(&policy, [&sshd].into_iter(), None, &[(local, 2222, remote)]);
        assert_eq!(found.len(), 1, "{found:?}");
        // Other ports' sessions are not SSH.
        assert!(problems(&policy, [&sshd].into_iter(), None, &[(local, 80, remote)]).is_empty());
        // Dropbear is an SSH daemon too.
        let mut dropbear = sshd.clone();
        std::sync::Arc::make_mut(&mut dropbear.process).comm = Some("dropbear".into());
        let found = problems(
            &policy,
            [&dropbear].into_iter(),
            None,
            &[(local, 2222, remote)],
        );
        assert_eq!(found.len(), 1, "{found:?}");
        Ok(())
    }
}
