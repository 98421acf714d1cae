//! (1) Three hosts get distinct subnets; every container reaches every other one (ping and a
//! 10 MB TCP transfer with content check, both directions of every pair).

use anyhow::Context;
use ipnet::Ipv4Net;
use rudder_tests::cluster::DEFAULT_NETWORK;
use rudder_tests::util::test_dataplane;
use rudder_tests::{add_hosts, check, e2e, full_mesh_traffic};
use std::collections::HashSet;

#[test]
fn three_hosts_distinct_subnets_full_mesh_traffic() {
    e2e(|c| {
        let hosts = add_hosts(c, 3)?;
        let network: Ipv4Net = DEFAULT_NETWORK.parse()?;

        let subnets: HashSet<Ipv4Net> = hosts.iter().map(|h| h.subnet()).collect();
        check!(subnets.len() == 3, "subnets not distinct: {subnets:?}");
        for h in &hosts {
            let env = h.subnet_env();
            check!(
                env.network == network,
                "{}: FLANNEL_NETWORK {}",
                h.name(),
                env.network
            );
            check!(
                h.subnet().prefix_len() == 24,
                "{}: subnet {}",
                h.name(),
                h.subnet()
            );
            check!(
                network.contains(&h.subnet()),
                "{}: {} outside {network}",
                h.name(),
                h.subnet()
            );
            check!(
                env.subnet.addr() == h.gateway_ip(),
                "{}: FLANNEL_SUBNET should be the subnet's first address, is {}",
                h.name(),
                env.subnet
            );
            check!(
                env.mtu == 1472,
                "{}: FLANNEL_MTU {} (underlay 1500 - 28 expected)",
                h.name(),
                env.mtu
            );
            check!(!env.ipmasq, "{}: FLANNEL_IPMASQ should be false", h.name());

            // The lease in etcd names the host's underlay address.
            let lease = c
                .etcd_get(&h.lease_key())?
                .with_context(|| format!("no lease key {}", h.lease_key()))?;
            let v: serde_json::Value = serde_json::from_str(&lease)?;
            check!(
                v["PublicIP"] == h.underlay_ip().to_string(),
                "{}: lease {lease} does not name {}",
                h.name(),
                h.underlay_ip()
            );

            // /status agrees.
            let st = h.status()?;
            check!(
                st["subnet"] == h.subnet().to_string(),
                "{}: /status {st}",
                h.name()
            );
            check!(
                st["network"] == DEFAULT_NETWORK,
                "{}: /status {st}",
                h.name()
            );
            check!(
                st["public_ip"] == h.underlay_ip().to_string(),
                "{}: /status {st}",
                h.name()
            );
            let dp = test_dataplane();
            if dp != "auto" {
                check!(st["dataplane"] == dp.as_str(), "{}: /status {st}", h.name());
            }
        }
        check!(
            c.lease_keys(None)?.len() == 3,
            "leases: {:?}",
            c.lease_keys(None)?
        );

        full_mesh_traffic(&hosts, 10 << 20)?;
        for h in &hosts {
            let enc = h.counter("encapsulated")?;
            let dec = h.counter("decapsulated")?;
            check!(
                enc > 0 && dec > 0,
                "{}: counters encapsulated={enc} decapsulated={dec} after traffic",
                h.name()
            );
        }
        Ok(())
    });
}
