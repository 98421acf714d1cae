//! Arbitrary bytes as `<prefix>/config`: no panic, and an accepted config is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rudder::config::NetworkConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = NetworkConfig::parse(data) {
        assert!(config.subnet_min <= config.subnet_max);
        assert!(config.subnet_len <= 30 && config.subnet_len >= config.network.prefix_len() + 2);
        let range = config.range();
        assert!(range.len() >= 1);
        for subnet in [range.get(0), range.get(range.len() - 1)] {
            assert!(
                config.network.contains(&subnet),
                "{subnet} outside {}",
                config.network
            );
            assert!(range.contains(subnet));
        }
    }
});
