//! Turns a validated policy into the values the kernel maps hold.

use ipnet::IpNet;
use portwatch_common::{
    MAX_SRC_RULES, RULE_ANY, RULE_CIDR, RULE_LIMIT, port_slot, src_prefix_len, src4_key, src6_key,
};

use super::Policy;
use crate::datapath::maps::MapImage;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "the policy needs {needed} source entries (one per port and CIDR) but the kernel table \
         holds {MAX_SRC_RULES}: narrow the port ranges of rules with `from`"
    )]
    TooManySources { needed: usize },
}

pub fn compile(policy: &Policy) -> Result<MapImage, CompileError> {
    let mut image = MapImage::default();
    for rule in &policy.rules {
        let proto = rule.ports.proto.0;
        for port in rule.ports.lo..=rule.ports.hi {
            let bits = image.ports.entry(port_slot(proto, port)).or_insert(0);
            // The limit itself goes in with the rule's counter slot.
            if rule.limit.is_some() {
                *bits |= RULE_LIMIT;
            }
            if rule.from.is_empty() {
                *bits |= RULE_ANY;
                continue;
            }
            *bits |= RULE_CIDR;
            for net in &rule.from {
                let prefix = src_prefix_len(net.prefix_len());
                match net {
                    IpNet::V4(n) => {
                        let key = src4_key(proto, port, n.network().octets());
                        image.src4.insert((prefix, key));
                    }
                    IpNet::V6(n) => {
                        let key = src6_key(proto, port, &n.network().octets());
                        image.src6.insert((prefix, key));
                    }
                }
            }
        }
        let needed = image.src4.len().max(image.src6.len());
        if needed > MAX_SRC_RULES as usize {
            return Err(CompileError::TooManySources { needed });
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use portwatch_common::{IPPROTO_TCP, IPPROTO_UDP, SRC6_KEY_LEN};

    use super::*;

    #[test]
    fn ports_and_sources_land_in_their_slots() -> Result<(), Box<dyn std::error::Error>> {
        let policy = Policy::parse(
            "allow = [\"tcp/22\", \"udp/53\", \"tcp/8000-8002\", { port = \"tcp/5432\", from = [\"10.0.0.0/8\", \"fd00::/8\"] }]",
        )?;
        let image = compile(&policy)?;
        assert_eq!(
            image.ports.get(&port_slot(IPPROTO_TCP, 22)),
            Some(&RULE_ANY)
        );
        assert_eq!(
            image.ports.get(&port_slot(IPPROTO_UDP, 53)),
            Some(&RULE_ANY)
        );
        assert_eq!(image.ports.get(&port_slot(IPPROTO_TCP, 53)), None);
        assert_eq!(image.ports.len(), 1 + 1 + 3 + 1);
        assert_eq!(
            image.ports.get(&port_slot(IPPROTO_TCP, 5432)),
            Some(&RULE_CIDR)
        );
        let [hi, lo] = 5432u16.to_be_bytes();
        assert!(
            image
                .src4
                .contains(&(24 + 8, [IPPROTO_TCP, hi, lo, 10, 0, 0, 0, 0]))
        );
        let mut v6 = [0u8; SRC6_KEY_LEN];
        v6[..4].copy_from_slice(&[IPPROTO_TCP, hi, lo, 0xfd]);
        assert!(image.src6.contains(&(24 + 8, v6)));
        Ok(())
    }

    #[test]
    fn too_many_sources_is_an_error() -> Result<(), Box<dyn std::error::Error>> {
        let policy =
            Policy::parse("allow = [{ port = \"tcp/1-20000\", from = [\"192.0.2.0/24\"] }]")?;
        assert_eq!(
            compile(&policy),
            Err(CompileError::TooManySources { needed: 20000 })
        );
        Ok(())
    }
}
