//! Arbitrary etcd keys and values as leases: no panic; keys round-trip; accepted peers lie
//! inside the network.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rudder::peers::parse_peer;
use rudder::subnet::{key_to_subnet, subnet_to_key, LeaseValue};

const PREFIX: &str = "/coreos.com/network/subnets/";

fuzz_target!(|data: &[u8]| {
    // key NUL value
    let (key, value) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"{}"[..]),
    };
    if let Ok(text) = std::str::from_utf8(key) {
        if let Some(subnet) = key_to_subnet(text) {
            assert_eq!(key_to_subnet(&subnet_to_key(subnet)), Some(subnet));
        }
    }
    if let Ok(lease) = LeaseValue::parse(value) {
        assert_eq!(
            LeaseValue::parse(lease.encode().as_bytes()).ok(),
            Some(lease)
        );
    }
    let network = "10.5.0.0/16".parse().unwrap();
    let mut full_key = PREFIX.as_bytes().to_vec();
    full_key.extend_from_slice(key);
    if let Ok((subnet, _)) = parse_peer(PREFIX, network, &full_key, value) {
        assert!(network.contains(&subnet));
    }
});
