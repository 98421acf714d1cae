//! The IPv6 half of the network config: `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`,
//! `IPv6SubnetMax`, read when `EnableIPv6` is true.
//!
//! Defaults and checks follow flannel's `CheckNetworkConfig` (pkg/subnet/config.go): the
//! network must be /124 or larger, IPv6SubnetLen defaults to 64 (prefix + 2 above /62), is at
//! most 126 and at least prefix + 2; Min/Max default to the second and the last subnet and
//! must lie inside the network on a subnet boundary. As for IPv4, rudder also rejects host
//! bits and Min > Max where flannel silently masks or hands out nothing.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use serde_json::{Map, Value};

use crate::config::{as_int, as_str, ConfigError};
use crate::json::field;
use crate::subnet_range6::Ipv6Range;

/// A validated IPv6 network config with every default filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Config {
    pub network: Ipv6Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

impl Ipv6Config {
    /// The IPv6 subnets this network hands out, IPv6SubnetMin..=IPv6SubnetMax.
    pub fn range(&self) -> Ipv6Range {
        Ipv6Range::new(self.subnet_min, self.subnet_max, self.subnet_len)
    }
}

pub(crate) fn parse(obj: &Map<String, Value>) -> Result<Ipv6Config, ConfigError> {
    let text = field(obj, "IPv6Network")
        .filter(|v| !v.is_null())
        .ok_or(ConfigError::MissingIpv6Network)?;
    let text = as_str(text, "IPv6Network")?;
    let network: Ipv6Net = text.parse().map_err(|_| ConfigError::Unparsable {
        field: "IPv6Network",
        value: text.to_string(),
        what: "IPv6 network in CIDR form (e.g. fc00::/48)",
    })?;
    if network.trunc() != network {
        return Err(ConfigError::Ipv6NetworkHostBits {
            network,
            suggested: network.trunc(),
        });
    }
    if network.prefix_len() > 124 {
        return Err(ConfigError::Ipv6NetworkTooSmall(network));
    }

    let subnet_len = match field(obj, "IPv6SubnetLen").filter(|v| !v.is_null()) {
        // flannel treats 0 as unset.
        None => default_len(network),
        Some(v) => match as_int(v, "IPv6SubnetLen")? {
            0 => default_len(network),
            len if len > 126 => return Err(ConfigError::Ipv6SubnetLenTooLong(len.min(255) as u8)),
            len => {
                let min = network.prefix_len() + 2;
                if len < i64::from(min) {
                    return Err(ConfigError::Ipv6SubnetLenTooShort {
                        subnet_len: len.max(0) as u8,
                        network,
                        min,
                    });
                }
                len as u8
            }
        },
    };

    let size = 1u128 << (128 - subnet_len);
    let first = u128::from(network.network());
    let default_min = Ipv6Addr::from(first + size);
    let default_max = Ipv6Addr::from(u128::from(network.broadcast()) - size + 1);
    let subnet_min = bound(obj, "IPv6SubnetMin", default_min, network, subnet_len)?;
    let subnet_max = bound(obj, "IPv6SubnetMax", default_max, network, subnet_len)?;
    if subnet_min > subnet_max {
        return Err(ConfigError::Ipv6MinAboveMax {
            min: subnet_min,
            max: subnet_max,
        });
    }
    Ok(Ipv6Config {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    })
}

/// flannel: a /64 per host when the network can hold four of them, else a quarter of it.
fn default_len(network: Ipv6Net) -> u8 {
    if network.prefix_len() <= 62 {
        64
    } else {
        network.prefix_len() + 2
    }
}

fn bound(
    obj: &Map<String, Value>,
    name: &'static str,
    default: Ipv6Addr,
    network: Ipv6Net,
    subnet_len: u8,
) -> Result<Ipv6Addr, ConfigError> {
    let Some(v) = field(obj, name).filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    let text = as_str(v, name)?;
    let addr: Ipv6Addr = text.parse().map_err(|_| ConfigError::Unparsable {
        field: name,
        value: text.to_string(),
        what: "IPv6 address",
    })?;
    // flannel treats "::" as unset.
    if addr.is_unspecified() {
        return Ok(default);
    }
    if !network.contains(&addr) {
        return Err(ConfigError::Ipv6OutsideNetwork {
            field: name,
            addr,
            network,
        });
    }
    let host_bits = u128::MAX >> subnet_len;
    if u128::from(addr) & host_bits != 0 {
        return Err(ConfigError::Ipv6Misaligned {
            field: name,
            addr,
            subnet_len,
        });
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, NetworkConfig};

    use super::*;

    fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(json.as_bytes())
    }

    fn err(json: &str) -> String {
        parse(json)
            .expect_err("config should be rejected")
            .to_string()
    }

    fn v6(json: &str) -> Ipv6Config {
        parse(json).unwrap().ipv6.expect("IPv6 enabled")
    }

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    const DUAL: &str = r#""Network":"10.5.0.0/16","EnableIPv6":true"#;

    #[test]
    fn dual_stack_defaults_as_flannel() {
        let c = parse(&format!(r#"{{{DUAL},"IPv6Network":"fc00::/48"}}"#)).unwrap();
        assert!(c.enable_ipv4);
        assert_eq!(c.subnet_len, 24);
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.network, "fc00::/48".parse::<Ipv6Net>().unwrap());
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min, addr("fc00:0:0:1::"));
        assert_eq!(v6.subnet_max, addr("fc00:0:0:ffff::"));
        assert_eq!(v6.range().count(), 0xffff);
    }

    #[test]
    fn ipv6_subnet_len_defaults_to_prefix_plus_two_above_slash_62() {
        let c = v6(&format!(r#"{{{DUAL},"IPv6Network":"fc00::/100"}}"#));
        assert_eq!(c.subnet_len, 102);
        assert_eq!(c.subnet_min, addr("fc00::400:0"));
        assert_eq!(c.subnet_max, addr("fc00::c00:0"));
        let c = v6(&format!(r#"{{{DUAL},"IPv6Network":"fc00::/62"}}"#));
        assert_eq!(c.subnet_len, 64);
        let c = v6(&format!(
            r#"{{{DUAL},"IPv6Network":"fc00::/48","IPv6SubnetLen":0}}"#
        ));
        assert_eq!(c.subnet_len, 64, "0 means unset, as in flannel");
    }

    #[test]
    fn ipv6_only_skips_every_ipv4_key() {
        let c = parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"Network":"garbage","IPv6Network":"fc00::/48"}"#,
        )
        .unwrap();
        assert!(!c.enable_ipv4);
        assert!(c.range().is_empty());
        assert_eq!(c.ipv6.unwrap().subnet_len, 64);
        assert_eq!((c.backend_type.as_str(), c.port), ("udp", 8285));
    }

    #[test]
    fn ipv6_keys_are_ignored_while_ipv6_is_off() {
        let c = parse(r#"{"Network":"10.5.0.0/16","IPv6Network":"nonsense"}"#).unwrap();
        assert_eq!(c.ipv6, None);
    }

    #[test]
    fn missing_or_malformed_ipv6_network() {
        assert_eq!(
            err(&format!("{{{DUAL}}}")),
            "network config has EnableIPv6 but no \"IPv6Network\": add e.g. \"IPv6Network\": \"fc00::/48\""
        );
        assert_eq!(
            err(&format!(r#"{{{DUAL},"IPv6Network":"10.6.0.0/16"}}"#)),
            "\"IPv6Network\" value \"10.6.0.0/16\" is not an IPv6 network in CIDR form (e.g. fc00::/48)"
        );
        assert_eq!(
            err(&format!(r#"{{{DUAL},"IPv6Network":48}}"#)),
            "network config field \"IPv6Network\" must be a string, got 48"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","EnableIPv6":"true"}"#),
            "network config field \"EnableIPv6\" must be true or false, got \"true\""
        );
    }

    #[test]
    fn ipv6_network_with_host_bits_is_rejected_with_a_suggestion() {
        assert_eq!(
            err(&format!(r#"{{{DUAL},"IPv6Network":"fc00::1/48"}}"#)),
            "IPv6Network fc00::1/48 has host bits set: did you mean fc00::/48?"
        );
    }

    #[test]
    fn ipv6_network_must_be_at_least_slash_124() {
        assert!(parse(&format!(r#"{{{DUAL},"IPv6Network":"fc00::/124"}}"#)).is_ok());
        assert_eq!(
            err(&format!(r#"{{{DUAL},"IPv6Network":"fc00::/125"}}"#)),
            "IPv6Network fc00::/125 is too small: it must be /124 or larger"
        );
    }

    #[test]
    fn ipv6_subnet_len_at_most_126() {
        assert_eq!(
            err(&format!(
                r#"{{{DUAL},"IPv6Network":"fc00::/48","IPv6SubnetLen":127}}"#
            )),
            "IPv6SubnetLen 127 is too long: it must be 126 or less"
        );
        assert!(parse(&format!(
            r#"{{{DUAL},"IPv6Network":"fc00::/48","IPv6SubnetLen":126}}"#
        ))
        .is_ok());
    }

    #[test]
    fn ipv6_subnet_len_at_least_prefix_plus_two() {
        assert_eq!(
            err(&format!(
                r#"{{{DUAL},"IPv6Network":"fc00::/48","IPv6SubnetLen":49}}"#
            )),
            "IPv6SubnetLen 49 is too short for IPv6Network fc00::/48: it must be at least /50"
        );
        assert!(parse(&format!(
            r#"{{{DUAL},"IPv6Network":"fc00::/48","IPv6SubnetLen":50}}"#
        ))
        .is_ok());
    }

    #[test]
    fn ipv6_bounds_must_be_inside_and_aligned() {
        let net = r#""IPv6Network":"fc00::/48""#;
        assert_eq!(
            err(&format!(r#"{{{DUAL},{net},"IPv6SubnetMin":"fc01::"}}"#)),
            "IPv6SubnetMin fc01:: is not inside IPv6Network fc00::/48"
        );
        assert_eq!(
            err(&format!(
                r#"{{{DUAL},{net},"IPv6SubnetMax":"fc00:0:0:9::1"}}"#
            )),
            "IPv6SubnetMax fc00:0:0:9::1 is not aligned to the IPv6 subnet length /64"
        );
        assert_eq!(
            err(&format!(
                r#"{{{DUAL},{net},"IPv6SubnetMin":"fc00:0:0:9::","IPv6SubnetMax":"fc00:0:0:3::"}}"#
            )),
            "IPv6SubnetMin fc00:0:0:9:: is greater than IPv6SubnetMax fc00:0:0:3::"
        );
        assert_eq!(
            err(&format!(r#"{{{DUAL},{net},"IPv6SubnetMin":"ten"}}"#)),
            "\"IPv6SubnetMin\" value \"ten\" is not an IPv6 address"
        );
        let c = v6(&format!(
            r#"{{{DUAL},{net},"ipv6subnetmin":"fc00:0:0:22::","IPV6SUBNETMAX":"fc00:0:0:23::"}}"#
        ));
        assert_eq!(
            (c.subnet_min, c.subnet_max, c.range().count()),
            (addr("fc00:0:0:22::"), addr("fc00:0:0:23::"), 2)
        );
    }
}
