//! Lockout protection: before enforcing, find the sessions the policy would
//! cut off, above all the SSH session the operator is typing in.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

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
        .filter(|l| {
            l.proto == Proto::Tcp
                && l.process
                    .comm
                    .as_deref()
                    .is_some_and(|c| SSH_DAEMONS.contains(&c))
        })
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
    Some((
        fields[0].parse().ok()?,
        fields[2].parse().ok()?,
        fields[3].parse().ok()?,
    ))
}

/// Established TCP connections of this network namespace: (local address,
/// local port, remote address), from /proc/net/tcp{,6}.
pub fn established_tcp() -> Vec<(IpAddr, u16, IpAddr)> {
    let mut out = Vec::new();
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st ...; 01 is ESTABLISHED
            if cols.len() < 4 || cols[3] != "01" {
                continue;
            }
            if let (Some((local, port)), Some((remote, _))) =
                (parse_proc_addr(cols[1], v6), parse_proc_addr(cols[2], v6))
            {
                out.push((local, port, remote));
            }
        }
    }
    out
}

/// `0100007F:0016` -> 127.0.0.1, 22. The kernel prints each 32-bit word of
/// the address as it sits in memory, read as a native integer.
fn parse_proc_addr(text: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = if v6 {
        let mut octets = [0u8; 16];
        for i in 0..4 {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_addresses() {
        assert_eq!(
            parse_proc_addr("0100007F:0016", false),
            Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 22))
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:1F90", true),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 8080))
        );
        assert_eq!(parse_proc_addr("zz:1", false), None);
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
