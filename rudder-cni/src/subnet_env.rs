//! rudder's (and flannel's) subnet file: `FLANNEL_NETWORK`, `FLANNEL_SUBNET` (the first host
//! address with the lease's prefix length), `FLANNEL_MTU`, `FLANNEL_IPMASQ`, and with IPv6 on
//! `FLANNEL_IPV6_NETWORK`, `FLANNEL_IPV6_SUBNET` (the same form).

use crate::error::{self, CniError, Result};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, len) = s.trim().split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        (len <= 32).then_some(Cidr { addr, len })
    }

    /// The same prefix with the host bits cleared (what host-local's `subnet` wants).
    pub fn network(self) -> Cidr {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        };
        Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & mask),
            len: self.len,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An IPv6 address with a prefix length, as the subnet file writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr6 {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Cidr6 {
    pub fn parse(s: &str) -> Option<Cidr6> {
        let (addr, len) = s.trim().split_once('/')?;
        let addr: Ipv6Addr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        (len <= 128).then_some(Cidr6 { addr, len })
    }

    /// The same prefix with the host bits cleared.
    pub fn network(self) -> Cidr6 {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0);
        Cidr6 {
            addr: Ipv6Addr::from(u128::from(self.addr) & mask),
            len: self.len,
        }
    }
}

impl std::fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Cidr,
    /// As written: the host's gateway address with the subnet's prefix length.
    pub subnet: Cidr,
    /// FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET, when the network has IPv6 on.
    pub ipv6: Option<(Cidr6, Cidr6)>,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    pub fn parse(text: &str) -> std::result::Result<SubnetEnv, String> {
        let get = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
        };
        let need = |key: &str| get(key).ok_or_else(|| format!("no {key}"));
        let network = need("FLANNEL_NETWORK")?;
        let network = Cidr::parse(&network).ok_or(format!("bad FLANNEL_NETWORK {network:?}"))?;
        let subnet = need("FLANNEL_SUBNET")?;
        let subnet = Cidr::parse(&subnet).ok_or(format!("bad FLANNEL_SUBNET {subnet:?}"))?;
        let ipv6 = match (get("FLANNEL_IPV6_NETWORK"), get("FLANNEL_IPV6_SUBNET")) {
            (None, None) => None,
            (Some(network), Some(subnet)) => Some((
                Cidr6::parse(&network).ok_or(format!("bad FLANNEL_IPV6_NETWORK {network:?}"))?,
                Cidr6::parse(&subnet).ok_or(format!("bad FLANNEL_IPV6_SUBNET {subnet:?}"))?,
            )),
            _ => return Err("FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET come together".into()),
        };
        let mtu = need("FLANNEL_MTU")?;
        let mtu = mtu
            .parse()
            .ok()
            .filter(|m| *m >= 68)
            .ok_or(format!("bad FLANNEL_MTU {mtu:?}"))?;
        let ipmasq = match get("FLANNEL_IPMASQ").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(format!("bad FLANNEL_IPMASQ {other:?}")),
        };
        Ok(SubnetEnv {
            network,
            subnet,
            ipv6,
            mtu,
            ipmasq,
        })
    }

    /// Reads and parses the file. A missing file means the daemon has not leased a subnet yet
    /// (or is not running): "try again later".
    pub fn load(path: &Path) -> Result<SubnetEnv> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CniError::new(
                    error::TRY_AGAIN_LATER,
                    format!(
                        "rudder's subnet file {} does not exist: is the rudder daemon running \
                         on this host? It writes the file once it holds a subnet lease",
                        path.display()
                    ),
                )
            } else {
                CniError::new(
                    error::IO_FAILURE,
                    format!("cannot read rudder's subnet file {}", path.display()),
                )
                .details(e.to_string())
            }
        })?;
        SubnetEnv::parse(&text).map_err(|e| {
            CniError::new(
                error::IO_FAILURE,
                format!("rudder's subnet file {} is malformed", path.display()),
            )
            .details(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_rudder_writes() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        assert_eq!(env.network.to_string(), "10.1.0.0/16");
        assert_eq!(env.subnet.to_string(), "10.1.74.1/24");
        assert_eq!(env.subnet.network().to_string(), "10.1.74.0/24");
        assert_eq!(env.mtu, 1472);
        assert!(env.ipmasq);
    }

    #[test]
    fn parses_the_ipv6_lines() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:22::1/64\n\
             FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let (network, subnet) = env.ipv6.unwrap();
        assert_eq!(network.to_string(), "fc00::/48");
        assert_eq!(subnet.network().to_string(), "fc00:0:0:22::/64");
        assert_eq!(
            SubnetEnv::parse(
                "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\n"
            )
            .unwrap_err(),
            "FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET come together"
        );
    }

    #[test]
    fn rejects_missing_and_bad_fields() {
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=10.1.0.0/16\n")
            .unwrap_err()
            .contains("FLANNEL_SUBNET"));
        assert!(SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=nonsense\nFLANNEL_MTU=1472\n"
        )
        .is_err());
        assert!(SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=12\n"
        )
        .is_err());
    }

    #[test]
    fn a_missing_file_says_try_again_and_names_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let err = SubnetEnv::load(&dir.path().join("subnet.env")).unwrap_err();
        assert_eq!(err.code, error::TRY_AGAIN_LATER);
        assert!(err.msg.contains("daemon running"), "{err}");
    }
}
