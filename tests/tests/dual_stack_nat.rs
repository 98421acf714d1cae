//! IPv6 flows DNATed on one host (an IPv6 service address, as kube-proxy makes) to a
//! container on another host: their replies are un-NATed by conntrack, on either plane (the
//! eBPF IPv6 fast paths must leave such flows to the host's stack), TCP and UDP.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::Duration;

use anyhow::Context as _;
use rudder_tests::dual_stack::{dual_stack_cluster, wait_mesh6};
use rudder_tests::netns::{self, exec_ok};
use rudder_tests::traffic::tcp_echo_between;
use rudder_tests::traffic6::{tcp_transfer6, Endpoint6};
use rudder_tests::{check, e2e};

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
        udp_echo_via6(&client, &backend, service)?;
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

/// One datagram to `service` (DNATed to `backend`'s port), echoed by `backend`: the answer
/// must come back from the service address (un-NATed), with the same bytes.
fn udp_echo_via6(
    client: &Endpoint6,
    backend: &Endpoint6,
    service: SocketAddrV6,
) -> anyhow::Result<()> {
    let echo = netns::spawn_in(&backend.ns, || {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, BACKEND_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        s.send_to(&buf[..n], from)?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let answer = netns::run_in(&client.ns, move || {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.send_to(b"service request", service)?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((buf[..n].to_vec(), from))
    })
    .context("UDP answer through the IPv6 service address")?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo panicked"))??;
    check!(
        answer == (b"service request".to_vec(), SocketAddr::V6(service)),
        "UDP answer {answer:?}, expected the request back from {service}"
    );
    Ok(())
}
