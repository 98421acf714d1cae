//! Subnet arithmetic and the etcd encodings of a lease (key and value), as flannel writes them.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
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

/// The subnets SubnetMin..=SubnetMax of one length, addressed by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetRange {
    first: u32,
    count: u32,
    len: u8,
}

impl SubnetRange {
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

/// Key suffix under `<prefix>/subnets/`: `10.5.34.0-24`.
pub fn subnet_to_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// Parses a key suffix; the IPv6 half flannel appends for dual stack (`&fc00::-64`) is ignored.
pub fn key_to_subnet(key: &str) -> Option<Ipv4Net> {
    let v4 = key.split('&').next()?;
    let (addr, len) = v4.rsplit_once('-')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let net = Ipv4Net::new(addr, len).ok()?;
    (net.network() == addr).then_some(net)
}

/// What a lease's value says about the host holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseValue {
    pub public_ip: Ipv4Addr,
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
}

impl LeaseValue {
    pub fn udp(public_ip: Ipv4Addr) -> Self {
        LeaseValue {
            public_ip,
            backend_type: Some(BACKEND_UDP.to_string()),
        }
    }

    pub fn encode(&self) -> String {
        serde_json::json!({
            "PublicIP": self.public_ip.to_string(),
            "PublicIPv6": null,
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
        let backend_type = field(obj, "BackendType")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(LeaseValue {
            public_ip,
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
