//! Subnet arithmetic and the etcd encodings of a lease (key and value), as flannel writes them.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use serde_json::Value;

use crate::json::field;
use crate::subnet_set::SubnetSet;

/// The only backend rudder speaks on the wire (flannel's `udp`).
pub const BACKEND_UDP: &str = "udp";

pub fn ipv4_add(addr: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(addr).wrapping_add(n))
}

/// The first host address of a subnet: the bridge/gateway address (`FLANNEL_SUBNET`).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    ipv4_add(subnet.network(), 1)
}

/// The first host address of an IPv6 subnet (`FLANNEL_IPV6_SUBNET`, as flannel's IncrementIP).
pub fn gateway6(subnet: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet.network()).wrapping_add(1))
}

/// The subnets SubnetMin..=SubnetMax of one length, addressed by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetRange {
    first: u32,
    count: u32,
    len: u8,
}

impl SubnetRange {
    /// No subnets (IPv4 off).
    pub const EMPTY: SubnetRange = SubnetRange {
        first: 0,
        count: 0,
        len: 32,
    };

    pub fn new(min: Ipv4Addr, max: Ipv4Addr, len: u8) -> Self {
        let step = 1u32 << (32 - len);
        SubnetRange {
            first: u32::from(min),
            count: (u32::from(max) - u32::from(min)) / step + 1,
            len,
        }
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn subnet_len(&self) -> u8 {
        self.len
    }

    pub fn get(&self, index: u32) -> Ipv4Net {
        let step = 1u32 << (32 - self.len);
        Ipv4Net::new(Ipv4Addr::from(self.first + index * step), self.len)
            .expect("subnet length validated by the config")
    }

    /// Whether `subnet` is one this range hands out.
    pub fn contains(&self, subnet: Ipv4Net) -> bool {
        let step = 1u32 << (32 - self.len);
        let addr = u32::from(subnet.network());
        subnet.prefix_len() == self.len
            && subnet.addr() == subnet.network()
            && addr >= self.first
            && (addr - self.first) / step < self.count
            && (addr - self.first).is_multiple_of(step)
    }

    /// A random subnet of the range overlapping nothing in `taken` (leases of any length),
    /// or `None` when there is none.
    /// Starts at a random index and scans forward, so it is O(range) at worst and never loops.
    pub fn pick_free(&self, taken: &SubnetSet, rng: &mut impl Rng) -> Option<Ipv4Net> {
        if self.count == 0 {
            return None;
        }
        let start = rng.random_range(0..self.count);
        (0..self.count)
            .map(|i| self.get((start + i) % self.count))
            .find(|s| taken.overlapping(*s).is_none())
    }
}

/// Key suffix under `<prefix>/subnets/` for an IPv4 subnet alone: `10.5.34.0-24`.
pub fn subnet_to_key(subnet: Ipv4Net) -> String {
    lease_key(Some(subnet), None)
}

/// Key suffix as flannel's `MakeSubnetKey` (pkg/subnet/subnet.go) writes it: `10.5.34.0-24`,
/// dual stack `10.5.34.0-24&fc00:0:0:22::-64`, IPv6-only `0.0.0.0-0&fc00:0:0:22::-64` (flannel
/// puts its empty IPv4 subnet first). Both `None` is not a lease.
pub fn lease_key(ipv4: Option<Ipv4Net>, ipv6: Option<Ipv6Net>) -> String {
    let v4 = ipv4.unwrap_or_default();
    let v4 = format!("{}-{}", v4.network(), v4.prefix_len());
    match ipv6 {
        None => v4,
        Some(v6) => format!("{v4}&{}-{}", v6.network(), v6.prefix_len()),
    }
}

/// The subnets one lease key names: at least one of the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaseSubnets {
    pub ipv4: Option<Ipv4Net>,
    pub ipv6: Option<Ipv6Net>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key:?} is not a subnet key like 10.5.34.0-24 or 10.5.34.0-24&fc00:0:0:22::-64: {why}")]
pub struct KeyError {
    pub key: String,
    pub why: &'static str,
}

/// Parses a key suffix as flannel's `ParseSubnetKey`: an IPv4 half, then optionally `&` and
/// an IPv6 half; a malformed IPv6 half makes the whole key invalid, as there. Stricter than
/// flannel: no host bits, prefix lengths within the family.
pub fn parse_lease_key(key: &str) -> Result<LeaseSubnets, KeyError> {
    let fail = |why| KeyError {
        key: key.to_string(),
        why,
    };
    let (v4_text, v6_text) = match key.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (key, None),
    };
    let (addr, len) = v4_text
        .rsplit_once('-')
        .ok_or(fail("no -<prefix length> after the IPv4 address"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| fail("bad IPv4 address"))?;
    let len: u8 = len.parse().map_err(|_| fail("bad IPv4 prefix length"))?;
    let v4 = Ipv4Net::new(addr, len).map_err(|_| fail("IPv4 prefix length above 32"))?;
    if v4.network() != addr {
        return Err(fail("IPv4 host bits set"));
    }
    let ipv6 = match v6_text {
        None => None,
        Some(text) => {
            let (addr, len) = text
                .rsplit_once('-')
                .ok_or(fail("no -<prefix length> after the IPv6 address"))?;
            let addr: Ipv6Addr = addr.parse().map_err(|_| fail("bad IPv6 address"))?;
            let len: u8 = len.parse().map_err(|_| fail("bad IPv6 prefix length"))?;
            let v6 = Ipv6Net::new(addr, len).map_err(|_| fail("IPv6 prefix length above 128"))?;
            if v6.network() != addr || len == 0 {
                return Err(fail("IPv6 host bits set or empty IPv6 subnet"));
            }
            Some(v6)
        }
    };
    // flannel's empty IPv4 subnet marks an IPv6-only lease.
    let ipv4 = (v4 != Ipv4Net::default()).then_some(v4);
    if ipv4.is_none() && ipv6.is_none() {
        return Err(fail("0.0.0.0-0 without an IPv6 half names no subnet"));
    }
    Ok(LeaseSubnets { ipv4, ipv6 })
}

/// The IPv4 subnet a key names: `None` for malformed and IPv6-only keys.
pub fn key_to_subnet(key: &str) -> Option<Ipv4Net> {
    parse_lease_key(key).ok()?.ipv4
}

/// What a lease's value says about the host holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseValue {
    /// 0.0.0.0 on an IPv6-only lease, as flannel writes it.
    pub public_ip: Ipv4Addr,
    /// `PublicIPv6`: null when the host has none (every flannel udp host).
    pub public_ipv6: Option<Ipv6Addr>,
    /// `None` when the key is absent, as flannel's udp backend writes it.
    pub backend_type: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseValueError {
    #[error("lease value is not a JSON object: {0}")]
    NotJson(String),
    #[error("lease value has no PublicIP string")]
    MissingPublicIp,
    #[error("lease value PublicIP {0:?} is not an IPv4 address")]
    BadPublicIp(String),
    #[error("lease value PublicIPv6 {0} is not an IPv6 address or null")]
    BadPublicIpv6(String),
}

impl LeaseValue {
    pub fn udp(public_ip: Ipv4Addr) -> Self {
        LeaseValue {
            public_ip,
            public_ipv6: None,
            backend_type: Some(BACKEND_UDP.to_string()),
        }
    }

    pub fn with_ipv6(mut self, public_ipv6: Option<Ipv6Addr>) -> Self {
        self.public_ipv6 = public_ipv6;
        self
    }

    pub fn encode(&self) -> String {
        serde_json::json!({
            "PublicIP": self.public_ip.to_string(),
            "PublicIPv6": self.public_ipv6.map(|ip| ip.to_string()),
            "BackendType": self.backend_type,
        })
        .to_string()
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, LeaseValueError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| LeaseValueError::NotJson(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| LeaseValueError::NotJson(value.to_string()))?;
        let ip_text = field(obj, "PublicIP")
            .and_then(Value::as_str)
            .ok_or(LeaseValueError::MissingPublicIp)?;
        let public_ip = ip_text
            .parse()
            .map_err(|_| LeaseValueError::BadPublicIp(ip_text.to_string()))?;
        let public_ipv6 = match field(obj, "PublicIPv6") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| LeaseValueError::BadPublicIpv6(v.to_string()))?,
            ),
        };
        let backend_type = field(obj, "BackendType")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(LeaseValue {
            public_ip,
            public_ipv6,
            backend_type,
        })
    }

    /// Peers we can exchange packets with: udp, or unmarked (flannel's udp backend).
    pub fn speaks_udp(&self) -> bool {
        self.backend_type
            .as_deref()
            .is_none_or(|t| t.is_empty() || t == BACKEND_UDP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn key_round_trip_matches_flannel() {
        assert_eq!(subnet_to_key(net("10.5.34.0/24")), "10.5.34.0-24");
        assert_eq!(key_to_subnet("10.5.34.0-24"), Some(net("10.5.34.0/24")));
        assert_eq!(
            key_to_subnet("10.5.34.0-24&fc00::-64"),
            Some(net("10.5.34.0/24"))
        );
        for bad in [
            "10.5.34.1-24",
            "10.5.34.0",
            "x-24",
            "10.5.34.0-33",
            "",
            "10.5.34.0-",
        ] {
            assert_eq!(key_to_subnet(bad), None, "{bad:?} should not parse");
        }
    }

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn dual_stack_and_ipv6_only_keys_match_flannel() {
        let v4 = Some(net("10.5.34.0/24"));
        let v6 = Some(net6("fc00:0:0:22::/64"));
        assert_eq!(lease_key(v4, v6), "10.5.34.0-24&fc00:0:0:22::-64");
        assert_eq!(lease_key(None, v6), "0.0.0.0-0&fc00:0:0:22::-64");
        assert_eq!(lease_key(v4, None), "10.5.34.0-24");
        for (key, ipv4, ipv6) in [
            ("10.5.34.0-24&fc00:0:0:22::-64", v4, v6),
            ("0.0.0.0-0&fc00:0:0:22::-64", None, v6),
            ("10.5.34.0-24", v4, None),
        ] {
            let parsed = parse_lease_key(key).unwrap();
            assert_eq!(parsed, LeaseSubnets { ipv4, ipv6 }, "{key}");
            assert_eq!(lease_key(parsed.ipv4, parsed.ipv6), key);
        }
        assert_eq!(key_to_subnet("0.0.0.0-0&fc00:0:0:22::-64"), None);
    }

    #[test]
    fn malformed_keys_say_why() {
        for (key, why) in [
            (
                "0.0.0.0-0",
                "0.0.0.0-0 without an IPv6 half names no subnet",
            ),
            (
                "10.5.34.0-24&fc00:0:0:22::",
                "no -<prefix length> after the IPv6 address",
            ),
            ("10.5.34.0-24&zz::-64", "bad IPv6 address"),
            ("10.5.34.0-24&fc00::-129", "IPv6 prefix length above 128"),
            ("10.5.34.0-24&fc00::-x", "bad IPv6 prefix length"),
            (
                "10.5.34.0-24&fc00::1-64",
                "IPv6 host bits set or empty IPv6 subnet",
            ),
            (
                "10.5.34.0-24&::-0",
                "IPv6 host bits set or empty IPv6 subnet",
            ),
            (
                "10.5.34.0-24&",
                "no -<prefix length> after the IPv6 address",
            ),
            ("&fc00::-64", "no -<prefix length> after the IPv4 address"),
            ("10.5.34.1-24", "IPv4 host bits set"),
        ] {
            let e = parse_lease_key(key).expect_err(key);
            assert_eq!(e.why, why, "{key}");
            assert_eq!(
                e.to_string(),
                format!("{key:?} is not a subnet key like 10.5.34.0-24 or 10.5.34.0-24&fc00:0:0:22::-64: {why}")
            );
            assert_eq!(key_to_subnet(key), None, "{key}");
        }
    }

    #[test]
    fn values_carry_public_ipv6_as_flannel() {
        let v = LeaseValue::udp(Ipv4Addr::new(192, 168, 1, 10))
            .with_ipv6(Some("fd00:77::11".parse().unwrap()));
        assert_eq!(
            v.encode(),
            r#"{"BackendType":"udp","PublicIP":"192.168.1.10","PublicIPv6":"fd00:77::11"}"#
        );
        assert_eq!(LeaseValue::parse(v.encode().as_bytes()).unwrap(), v);
        // IPv6-only flannel host: its zero IPv4 address.
        let only6 =
            LeaseValue::parse(br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:77::12"}"#).unwrap();
        assert_eq!(only6.public_ip, Ipv4Addr::UNSPECIFIED);
        assert_eq!(only6.public_ipv6, Some("fd00:77::12".parse().unwrap()));
        assert_eq!(
            LeaseValue::parse(br#"{"PublicIP":"1.2.3.4"}"#)
                .unwrap()
                .public_ipv6,
            None
        );
        assert_eq!(
            LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}"#),
            Err(LeaseValueError::BadPublicIpv6("\"1.2.3.4\"".into()))
        );
        assert_eq!(
            LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","PublicIPv6":7}"#),
            Err(LeaseValueError::BadPublicIpv6("7".into()))
        );
    }

    #[test]
    fn value_round_trip_matches_flannel() {
        let v = LeaseValue::udp(Ipv4Addr::new(192, 168, 1, 10));
        assert_eq!(
            v.encode(),
            r#"{"BackendType":"udp","PublicIP":"192.168.1.10","PublicIPv6":null}"#
        );
        assert_eq!(LeaseValue::parse(v.encode().as_bytes()).unwrap(), v);
        let literal = br#"{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"udp"}"#;
        assert_eq!(LeaseValue::parse(literal).unwrap(), v);
    }

    #[test]
    fn flannel_udp_values_without_backend_type_are_peers() {
        let v = LeaseValue::parse(br#"{"PublicIP":"192.168.64.3","PublicIPv6":null}"#).unwrap();
        assert_eq!(v.backend_type, None);
        assert!(v.speaks_udp());
        let vx = LeaseValue::parse(
            br#"{"PublicIP":"192.168.64.3","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
        )
        .unwrap();
        assert!(!vx.speaks_udp());
    }

    #[test]
    fn malformed_values_are_errors() {
        assert!(matches!(
            LeaseValue::parse(b"not json"),
            Err(LeaseValueError::NotJson(_))
        ));
        assert_eq!(
            LeaseValue::parse(br#"{"PublicIPv6":null}"#),
            Err(LeaseValueError::MissingPublicIp)
        );
        assert_eq!(
            LeaseValue::parse(br#"{"PublicIP":"fe80::1"}"#),
            Err(LeaseValueError::BadPublicIp("fe80::1".into()))
        );
    }

    #[test]
    fn range_indexing_and_membership() {
        let r = SubnetRange::new(Ipv4Addr::new(10, 5, 1, 0), Ipv4Addr::new(10, 5, 255, 0), 24);
        assert_eq!(r.len(), 255);
        assert_eq!(r.get(0), net("10.5.1.0/24"));
        assert_eq!(r.get(254), net("10.5.255.0/24"));
        assert!(r.contains(net("10.5.7.0/24")));
        assert!(!r.contains(net("10.5.0.0/24")));
        assert!(!r.contains(net("10.5.7.0/25")));
        assert!(!r.contains(net("10.6.7.0/24")));
    }

    #[test]
    fn pick_free_skips_taken_and_reports_exhaustion() {
        let r = SubnetRange::new(Ipv4Addr::new(10, 5, 0, 4), Ipv4Addr::new(10, 5, 0, 12), 30);
        assert_eq!(r.len(), 3);
        let mut rng = rand::rng();
        let mut taken = SubnetSet::new();
        for _ in 0..3 {
            let s = r.pick_free(&taken, &mut rng).expect("a free subnet");
            assert!(r.contains(s));
            assert!(taken.overlapping(s).is_none(), "{s} handed out twice");
            taken.insert(s);
        }
        assert_eq!(r.pick_free(&taken, &mut rng), None);
    }

    #[test]
    fn pick_free_never_overlaps_a_lease_of_another_length() {
        // /20s wanted while /24 leases from an older config live in 10.5.0.0/20..10.5.48.0/20.
        let r = SubnetRange::new(Ipv4Addr::new(10, 5, 0, 0), Ipv4Addr::new(10, 5, 64, 0), 20);
        assert_eq!(r.len(), 5);
        let taken: SubnetSet = [
            "10.5.3.0/24",
            "10.5.17.0/24",
            "10.5.40.0/24",
            "10.5.50.0/24",
        ]
        .iter()
        .map(|s| net(s))
        .collect();
        let mut rng = rand::rng();
        for _ in 0..50 {
            assert_eq!(r.pick_free(&taken, &mut rng), Some(net("10.5.64.0/20")));
        }
        // A /16 lease covers everything.
        let all: SubnetSet = [net("10.5.0.0/16")].into_iter().collect();
        assert_eq!(r.pick_free(&all, &mut rng), None);
    }

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(gateway(net("10.5.34.0/24")), Ipv4Addr::new(10, 5, 34, 1));
    }
}
