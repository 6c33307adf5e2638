//! Lockout protection: before enforcing, find the sessions the policy would
//! cut off, above all the SSH session the operator is typing in.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    model::{Listener, Proto},
    policy::Policy,
};

/// Problems that make enforcing unsafe without `--force`.
pub fn problems<'a>(
    policy: &Policy,
    listeners: impl Iterator<Item = &'a Listener>,
    ssh_connection: Option<&str>,
    established: &[(IpAddr, u16, IpAddr)],
) -> Vec<String> {
    let mut out = Vec::new();
    // The session counts only if it ends in this network namespace: a guard
    // started with `ip netns exec` does not stand between the operator and sshd.
    if let Some((client, server, port)) = ssh_connection.and_then(parse_ssh_connection)
        && established
            .iter()
            .any(|(local, lport, remote)| *local == server && *lport == port && *remote == client)
        && !policy.permits(Proto::Tcp, port, client)
    {
        out.push(format!(
            "this command runs over SSH from {client} to port {port}, which the policy does not permit from {client}: \
             enforcing would cut this session off (allow tcp/{port})"
        ));
    }
    let sshd_ports: BTreeSet<u16> = listeners
        .filter(|l| l.proto == Proto::Tcp && l.process.comm.as_deref() == Some("sshd"))
        .map(|l| l.port)
        .collect();
    for (local, port, remote) in established {
        if sshd_ports.contains(port)
            && !remote.is_loopback()
            && !policy.permits(Proto::Tcp, *port, *remote)
        {
            out.push(format!(
                "an SSH session from {remote} to {local} port {port} is established, and the policy does not \
                 permit tcp/{port} from {remote}: enforcing would cut it off"
            ));
        }
    }
    out
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
        assert!(
            found[0].contains("port 22") && found[0].contains("198.51.100.4"),
            "{found:?}"
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
            },
        };
        let local = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let remote = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
        let policy = Policy::parse("")?;
        let found = problems(&policy, [&sshd].into_iter(), None, &[(local, 2222, remote)]);
        assert_eq!(found.len(), 1, "{found:?}");
        // Other ports' sessions are not SSH.
        assert!(problems(&policy, [&sshd].into_iter(), None, &[(local, 80, remote)]).is_empty());
        Ok(())
    }
}
