//! IPv6 flows DNATed on one host (an IPv6 service address, as kube-proxy makes) to a
//! container on another host: their replies are un-NATed by conntrack, on either plane (the
//! eBPF IPv6 fast paths must leave such flows to the host's stack), TCP and UDP.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use rudder_tests::dual_stack::{dual_stack_cluster, wait_mesh6};
use rudder_tests::e2e;
use rudder_tests::netns::exec_ok;
use rudder_tests::traffic::{tcp_echo_between, udp_echo_via};
use rudder_tests::traffic6::tcp_transfer6;

const SERVICE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

#[test]
fn ipv6_dnat_to_a_container_on_another_host_works_both_ways_tcp_and_udp() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 2)?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let (a, b) = (&hosts[0], &hosts[1]);
        let backend = b.container6()?;
        let ruleset = format!(
            "table ip6 svc6 {{
  chain prerouting {{ type nat hook prerouting priority dstnat; ip6 daddr {SERVICE6} meta l4proto {{ tcp, udp }} th dport {SERVICE_PORT} dnat to [{}]:{BACKEND_PORT}; }}
}}
",
            backend.ip
        );
        let rules = c.dir().join("service6-dnat.nft");
        std::fs::write(&rules, ruleset)?;
        exec_ok(a.netns(), "nft", &["-f", rules.to_str().unwrap()])?;
        let service = SocketAddrV6::new(SERVICE6, SERVICE_PORT, 0, 0);
        let client = a.container6()?;
        udp_echo_via(
            &client.ns,
            &backend.ns,
            BACKEND_PORT,
            SocketAddr::V6(service),
        )?;
        tcp_echo_between(
            &client.ns,
            &backend.ns,
            BACKEND_PORT,
            SocketAddr::V6(service),
            4 << 20,
        )?;
        // Plain container-to-container IPv6 is unaffected.
        tcp_transfer6(&client, &backend, 4 << 20)?;
        tcp_transfer6(&backend, &client, 4 << 20)?;
        Ok(())
    });
}
