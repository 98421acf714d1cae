//! The overlay network's configuration as stored in etcd at `<prefix>/config`.
//!
//! Same JSON as flannel's etcd mode (keys matched case-insensitively, same defaults and
//! checks), so an existing flannel etcd works unchanged. The IPv6 keys are in `config_ipv6`.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

pub use crate::config_ipv6::Ipv6Config;
use crate::json::field;
use crate::subnet::{ipv4_add, SubnetRange, BACKEND_UDP};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config must be a JSON object")]
    NotAnObject,
    #[error("network config has no \"Network\": add e.g. \"Network\": \"10.5.0.0/16\"")]
    MissingNetwork,
    #[error("network config field \"{field}\" must be {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("\"{field}\" value {value:?} is not an {what}")]
    Unparsable {
        field: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("Network {network} has host bits set: did you mean {suggested}?")]
    NetworkHostBits {
        network: Ipv4Net,
        suggested: Ipv4Net,
    },
    #[error("Network {0} is too small: it must be /28 or larger")]
    NetworkTooSmall(Ipv4Net),
    #[error("SubnetLen {0} is too long: it must be 30 or less")]
    SubnetLenTooLong(u8),
    #[error(
        "SubnetLen {subnet_len} is too short for Network {network}: it must be at least /{min}"
    )]
    SubnetLenTooShort {
        subnet_len: u8,
        network: Ipv4Net,
        min: u8,
    },
    #[error("{field} {addr} is not inside Network {network}")]
    OutsideNetwork {
        field: &'static str,
        addr: Ipv4Addr,
        network: Ipv4Net,
    },
    #[error("{field} {addr} is not aligned to the subnet length /{subnet_len}")]
    Misaligned {
        field: &'static str,
        addr: Ipv4Addr,
        subnet_len: u8,
    },
    #[error("SubnetMin {min} is greater than SubnetMax {max}")]
    MinAboveMax { min: Ipv4Addr, max: Ipv4Addr },
    #[error("backend type \"{0}\" is not supported by rudder: use \"udp\" (or leave Backend out)")]
    UnsupportedBackend(String),
    #[error("Backend Port {0} is out of range: it must be 1..=65535")]
    BadPort(i64),
    #[error("EnableIPv4 and EnableIPv6 are both false: nothing to lease; enable at least one")]
    NothingEnabled,
    #[error(
        "network config has EnableIPv6 but no \"IPv6Network\": add e.g. \"IPv6Network\": \"fc00::/48\""
    )]
    MissingIpv6Network,
    #[error("IPv6Network {network} has host bits set: did you mean {suggested}?")]
    Ipv6NetworkHostBits {
        network: Ipv6Net,
        suggested: Ipv6Net,
    },
    #[error("IPv6Network {0} is too small: it must be /124 or larger")]
    Ipv6NetworkTooSmall(Ipv6Net),
    #[error("IPv6SubnetLen {0} is too long: it must be 126 or less")]
    Ipv6SubnetLenTooLong(u8),
    #[error(
        "IPv6SubnetLen {subnet_len} is too short for IPv6Network {network}: it must be at least /{min}"
    )]
    Ipv6SubnetLenTooShort {
        subnet_len: u8,
        network: Ipv6Net,
        min: u8,
    },
    #[error("{field} {addr} is not inside IPv6Network {network}")]
    Ipv6OutsideNetwork {
        field: &'static str,
        addr: Ipv6Addr,
        network: Ipv6Net,
    },
    #[error("{field} {addr} is not aligned to the IPv6 subnet length /{subnet_len}")]
    Ipv6Misaligned {
        field: &'static str,
        addr: Ipv6Addr,
        subnet_len: u8,
    },
    #[error("IPv6SubnetMin {min} is greater than IPv6SubnetMax {max}")]
    Ipv6MinAboveMax { min: Ipv6Addr, max: Ipv6Addr },
}

/// A validated network configuration with every default filled in.
///
/// With `EnableIPv4: false` (IPv6-only) the IPv4 fields hold flannel's empty values
/// (0.0.0.0/0, length 0): check `enable_ipv4` before using them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    /// `EnableIPv6` with its `IPv6*` keys; `None` when IPv6 is off.
    pub ipv6: Option<Ipv6Config>,
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend_type: String,
    pub port: u16,
}

impl NetworkConfig {
    /// Parses and validates the JSON stored at `<prefix>/config`.
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let obj = value.as_object().ok_or(ConfigError::NotAnObject)?;

        // flannel's ParseConfig: EnableIPv4 defaults to true, EnableIPv6 to false.
        let enable_ipv4 = match field(obj, "EnableIPv4").filter(|v| !v.is_null()) {
            None => true,
            Some(v) => as_bool(v, "EnableIPv4")?,
        };
        let enable_ipv6 = match field(obj, "EnableIPv6").filter(|v| !v.is_null()) {
            None => false,
            Some(v) => as_bool(v, "EnableIPv6")?,
        };
        if !enable_ipv4 && !enable_ipv6 {
            return Err(ConfigError::NothingEnabled);
        }
        // flannel's CheckNetworkConfig order: IPv4 keys first, then IPv6.
        let ipv6 = || -> Result<Option<Ipv6Config>, ConfigError> {
            enable_ipv6
                .then(|| crate::config_ipv6::parse(obj))
                .transpose()
        };
        if !enable_ipv4 {
            let ipv6 = ipv6()?;
            let (backend_type, port) = backend(obj)?;
            // flannel's CheckNetworkConfig skips every IPv4 key then.
            return Ok(NetworkConfig {
                enable_ipv4,
                ipv6,
                network: Ipv4Net::default(),
                subnet_len: 0,
                subnet_min: Ipv4Addr::UNSPECIFIED,
                subnet_max: Ipv4Addr::UNSPECIFIED,
                backend_type,
                port,
            });
        }

        let network_text = field(obj, "Network")
            .filter(|v| !v.is_null())
            .ok_or(ConfigError::MissingNetwork)?;
        let network_text = as_str(network_text, "Network")?;
        let network: Ipv4Net = network_text.parse().map_err(|_| ConfigError::Unparsable {
            field: "Network",
            value: network_text.to_string(),
            what: "IPv4 network in CIDR form (e.g. 10.5.0.0/16)",
        })?;
        if network.trunc() != network {
            return Err(ConfigError::NetworkHostBits {
                network,
                suggested: network.trunc(),
            });
        }
        if network.prefix_len() > 28 {
            return Err(ConfigError::NetworkTooSmall(network));
        }

        let subnet_len = match field(obj, "SubnetLen").filter(|v| !v.is_null()) {
            None => {
                if network.prefix_len() <= 22 {
                    24
                } else {
                    network.prefix_len() + 2
                }
            }
            Some(v) => {
                let len = as_int(v, "SubnetLen")?;
                if len > 30 {
                    return Err(ConfigError::SubnetLenTooLong(len.min(255) as u8));
                }
                let min = network.prefix_len() + 2;
                if len < i64::from(min) {
                    return Err(ConfigError::SubnetLenTooShort {
                        subnet_len: len.max(0) as u8,
                        network,
                        min,
                    });
                }
                len as u8
            }
        };

        let subnet_size = 1u32 << (32 - subnet_len);
        let default_min = ipv4_add(network.network(), subnet_size);
        let default_max = Ipv4Addr::from(u32::from(network.broadcast()) - subnet_size + 1);
        let subnet_min = bound(obj, "SubnetMin", default_min, network, subnet_len)?;
        let subnet_max = bound(obj, "SubnetMax", default_max, network, subnet_len)?;
        if subnet_min > subnet_max {
            return Err(ConfigError::MinAboveMax {
                min: subnet_min,
                max: subnet_max,
            });
        }

        let ipv6 = ipv6()?;
        let (backend_type, port) = backend(obj)?;
        Ok(NetworkConfig {
            enable_ipv4,
            ipv6,
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend_type,
            port,
        })
    }

    /// The IPv4 subnets this network hands out, SubnetMin..=SubnetMax (none when IPv6-only).
    pub fn range(&self) -> SubnetRange {
        if !self.enable_ipv4 {
            return SubnetRange::EMPTY;
        }
        SubnetRange::new(self.subnet_min, self.subnet_max, self.subnet_len)
    }
}

fn backend(obj: &Map<String, Value>) -> Result<(String, u16), ConfigError> {
    Ok(match field(obj, "Backend").filter(|v| !v.is_null()) {
        None => (BACKEND_UDP.to_string(), rudder_ebpf::DEFAULT_UDP_PORT),
        Some(Value::Object(backend)) => {
            let kind = match field(backend, "Type").filter(|v| !v.is_null()) {
                None => BACKEND_UDP.to_string(),
                Some(v) => as_str(v, "Backend.Type")?.to_string(),
            };
            if kind != BACKEND_UDP {
                return Err(ConfigError::UnsupportedBackend(kind));
            }
            let port = match field(backend, "Port").filter(|v| !v.is_null()) {
                None => rudder_ebpf::DEFAULT_UDP_PORT,
                Some(v) => {
                    let port = as_int(v, "Backend.Port")?;
                    u16::try_from(port)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(ConfigError::BadPort(port))?
                }
            };
            (kind, port)
        }
        Some(other) => {
            return Err(ConfigError::WrongType {
                field: "Backend",
                expected: "an object like {\"Type\":\"udp\"}",
                got: other.to_string(),
            });
        }
    })
}

pub(crate) fn as_str<'a>(v: &'a Value, name: &'static str) -> Result<&'a str, ConfigError> {
    v.as_str().ok_or_else(|| wrong_type(name, "a string", v))
}

pub(crate) fn as_int(v: &Value, name: &'static str) -> Result<i64, ConfigError> {
    v.as_i64().ok_or_else(|| wrong_type(name, "an integer", v))
}

fn as_bool(v: &Value, name: &'static str) -> Result<bool, ConfigError> {
    v.as_bool()
        .ok_or_else(|| wrong_type(name, "true or false", v))
}

fn wrong_type(field: &'static str, expected: &'static str, got: &Value) -> ConfigError {
    ConfigError::WrongType {
        field,
        expected,
        got: got.to_string(),
    }
}

fn bound(
    obj: &Map<String, Value>,
    name: &'static str,
    default: Ipv4Addr,
    network: Ipv4Net,
    subnet_len: u8,
) -> Result<Ipv4Addr, ConfigError> {
    let Some(v) = field(obj, name).filter(|v| !v.is_null()) else {
        return Ok(default);
    };
    let text = as_str(v, name)?;
    let addr: Ipv4Addr = text.parse().map_err(|_| ConfigError::Unparsable {
        field: name,
        value: text.to_string(),
        what: "IPv4 address",
    })?;
    if !network.contains(&addr) {
        return Err(ConfigError::OutsideNetwork {
            field: name,
            addr,
            network,
        });
    }
    let mask = u32::MAX << (32 - subnet_len);
    if u32::from(addr) & !mask != 0 {
        return Err(ConfigError::Misaligned {
            field: name,
            addr,
            subnet_len,
        });
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(json.as_bytes())
    }

    fn err(json: &str) -> String {
        parse(json)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn defaults_for_a_slash_16() {
        let c = parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert_eq!(c.network, "10.5.0.0/16".parse::<Ipv4Net>().unwrap());
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 255, 0));
        assert_eq!(c.backend_type, "udp");
        assert_eq!(c.port, 8285);
    }

    #[test]
    fn subnet_len_defaults_to_prefix_plus_two_above_slash_22() {
        let c = parse(r#"{"Network":"10.5.0.0/25"}"#).unwrap();
        assert_eq!(c.subnet_len, 27);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 5, 0, 32));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 5, 0, 96));
        assert_eq!(
            parse(r#"{"Network":"10.5.0.0/22"}"#).unwrap().subnet_len,
            24
        );
        assert_eq!(
            parse(r#"{"Network":"10.5.0.0/23"}"#).unwrap().subnet_len,
            25
        );
    }

    #[test]
    fn keys_match_case_insensitively() {
        let c = parse(
            r#"{"network":"10.6.0.0/16","subnetlen":26,"SUBNETMIN":"10.6.2.0","backend":{"type":"udp","port":9000}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 6, 2, 0));
        assert_eq!(c.port, 9000);
    }

    #[test]
    fn missing_network_is_an_error() {
        assert_eq!(
            err(r#"{"SubnetLen":24}"#),
            "network config has no \"Network\": add e.g. \"Network\": \"10.5.0.0/16\""
        );
    }

    #[test]
    fn malformed_json_and_wrong_types() {
        assert!(err(r#"{"Network":"10.5.0.0/16""#).starts_with("network config is not valid JSON"));
        assert_eq!(err("[1]"), "network config must be a JSON object");
        assert_eq!(
            err(r#"{"Network":16}"#),
            "network config field \"Network\" must be a string, got 16"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","SubnetLen":"24"}"#),
            "network config field \"SubnetLen\" must be an integer, got \"24\""
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0"}"#),
            "\"Network\" value \"10.5.0.0\" is not an IPv4 network in CIDR form (e.g. 10.5.0.0/16)"
        );
    }

    #[test]
    fn network_must_be_at_least_slash_28() {
        assert!(parse(r#"{"Network":"10.5.0.0/28"}"#).is_ok());
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/29"}"#),
            "Network 10.5.0.0/29 is too small: it must be /28 or larger"
        );
    }

    #[test]
    fn network_with_host_bits_is_rejected_with_a_suggestion() {
        assert_eq!(
            err(r#"{"Network":"10.5.3.0/16"}"#),
            "Network 10.5.3.0/16 has host bits set: did you mean 10.5.0.0/16?"
        );
    }

    #[test]
    fn subnet_len_at_most_30() {
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#),
            "SubnetLen 31 is too long: it must be 30 or less"
        );
        assert!(parse(r#"{"Network":"10.5.0.0/16","SubnetLen":30}"#).is_ok());
    }

    #[test]
    fn subnet_len_at_least_prefix_plus_two() {
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","SubnetLen":17}"#),
            "SubnetLen 17 is too short for Network 10.5.0.0/16: it must be at least /18"
        );
        assert!(parse(r#"{"Network":"10.5.0.0/16","SubnetLen":18}"#).is_ok());
    }

    #[test]
    fn bounds_must_be_inside_and_aligned() {
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.1.0"}"#),
            "SubnetMin 10.6.1.0 is not inside Network 10.5.0.0/16"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.9.128"}"#),
            "SubnetMax 10.5.9.128 is not aligned to the subnet length /24"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.3.0"}"#),
            "SubnetMin 10.5.9.0 is greater than SubnetMax 10.5.3.0"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","SubnetMin":"ten"}"#),
            "\"SubnetMin\" value \"ten\" is not an IPv4 address"
        );
    }

    #[test]
    fn backend_must_be_udp() {
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#),
            "backend type \"vxlan\" is not supported by rudder: use \"udp\" (or leave Backend out)"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":70000}}"#),
            "Backend Port 70000 is out of range: it must be 1..=65535"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","Backend":"udp"}"#),
            "network config field \"Backend\" must be an object like {\"Type\":\"udp\"}, got \"udp\""
        );
        let c = parse(r#"{"Network":"10.5.0.0/16","Backend":{}}"#).unwrap();
        assert_eq!((c.backend_type.as_str(), c.port), ("udp", 8285));
    }

    #[test]
    fn ipv4_is_on_by_default_and_both_off_is_an_error() {
        let c = parse(r#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert!(c.enable_ipv4);
        assert_eq!(c.ipv6, None);
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","EnableIPv4":false}"#),
            "EnableIPv4 and EnableIPv6 are both false: nothing to lease; enable at least one"
        );
        assert_eq!(
            err(r#"{"Network":"10.5.0.0/16","EnableIPv4":"yes"}"#),
            "network config field \"EnableIPv4\" must be true or false, got \"yes\""
        );
    }
}
