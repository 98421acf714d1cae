//! The fast paths leave to the host's stack what only the stack can do right, on both planes:
//! - a flow (TCP and UDP) DNATed on one host (a service address, as kube-proxy makes) to a
//!   container on another: its replies are un-NATed by conntrack;
//! - a container whose interface MTU exceeds the overlay MTU: bulk TCP gets "fragmentation
//!   needed" instead of a blackhole;
//! - plain (unencapsulated) packets that claim an overlay source, sent from the underlay to
//!   a container: dropped and counted (`unencapsulated`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use rudder_tests::netns::exec_ok;
use rudder_tests::traffic::udp_echo_via;
use rudder_tests::util::ip;
use rudder_tests::{
    add_hosts, check, e2e, send_udp_from, tcp_echo_via, tcp_transfer, wait_mesh, wait_until,
    UdpProbe,
};

const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;

#[test]
fn dnat_to_a_container_on_another_host_works_both_ways_tcp_and_udp() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let (a, b) = (&hosts[0], &hosts[1]);
        // What kube-proxy does for a ClusterIP reached from a container: DNAT in prerouting.
        let dnat = format!(
            "ip daddr {SERVICE} meta l4proto {{ tcp, udp }} th dport {SERVICE_PORT} dnat to {}:{BACKEND_PORT}",
            b.container_ip()
        );
        let ruleset = format!(
            "table ip svc {{
  chain prerouting {{ type nat hook prerouting priority dstnat; {dnat}; }}
}}
"
        );
        let rules = c.dir().join("service-dnat.nft");
        std::fs::write(&rules, ruleset)?;
        exec_ok(a.netns(), "nft", &["-f", rules.to_str().unwrap()])?;
        let service = SocketAddrV4::new(SERVICE, SERVICE_PORT);
        const BYTES: usize = 4 << 20;
        udp_echo_via(
            &a.container().ns,
            &b.container().ns,
            BACKEND_PORT,
            SocketAddr::V4(service),
        )?;
        tcp_echo_via(&a.container(), &b.container(), BACKEND_PORT, service, BYTES)?;
        // Plain container-to-container traffic is unaffected.
        tcp_transfer(&a.container(), &b.container(), BYTES)?;
        tcp_transfer(&b.container(), &a.container(), BYTES)?;
        Ok(())
    });
}

#[test]
fn container_mtu_above_the_overlay_mtu_does_not_blackhole_bulk_tcp() {
    e2e(|c| mtu_1500_containers_move_bulk_tcp(c, true));
}

/// The same with default offloads (what users run): the veth carries GSO packets whole, so
/// nothing is lost on the wire; the transfers must complete both ways.
#[test]
fn container_mtu_above_the_overlay_mtu_moves_bulk_tcp_with_default_offloads() {
    e2e(|c| mtu_1500_containers_move_bulk_tcp(c, false));
}

/// Containers at MTU 1500 over a 1472 overlay, 8 MB TCP each way. With `model_wire` the
/// underlay segments as a NIC does and no too-large packet may be sent.
fn mtu_1500_containers_move_bulk_tcp(
    c: &rudder_tests::Cluster,
    model_wire: bool,
) -> anyhow::Result<()> {
    let hosts = add_hosts(c, 2)?;
    wait_mesh(&hosts, Duration::from_secs(30))?;
    let (a, b) = (&hosts[0], &hosts[1]);
    let overlay_mtu = a.subnet_env().mtu;
    check!(overlay_mtu < 1500, "overlay MTU {overlay_mtu}");
    // Containers set up without the subnet file's MTU (veths at the underlay's 1500), on
    // both ends: each advertises an MSS that only fits 1500.
    for h in [a, b] {
        ip(&[
            "-n",
            h.container_netns(),
            "link",
            "set",
            "eth0",
            "mtu",
            "1500",
        ])?;
        ip(&["-n", h.netns(), "link", "set", "vc0", "mtu", "1500"])?;
        // The underlay segments what it sends as a NIC does, so a too-large segment is
        // lost on the wire rather than carried whole by the veth.
        if model_wire {
            h.model_wire()?;
        }
    }
    let dropped_before = [underlay_tx_dropped(a)?, underlay_tx_dropped(b)?];
    const BYTES: usize = 8 << 20;
    let t = tcp_transfer(&a.container(), &b.container(), BYTES)?;
    println!(
        "MTU 1500 containers (overlay MTU {overlay_mtu}): {:.0} Mbit/s",
        t.mbit_per_s()
    );
    let t = tcp_transfer(&b.container(), &a.container(), BYTES)?;
    println!("and back: {:.0} Mbit/s", t.mbit_per_s());
    for (h, before) in [a, b].into_iter().zip(dropped_before) {
        let retransmitted = exec_ok(h.container_netns(), "nstat", &["-az", "TcpRetransSegs"])?;
        println!(
            "{}: {}",
            h.name(),
            retransmitted.lines().last().unwrap_or_default()
        );
        // A segment too large for the underlay is what the wire drops (the veth counts
        // it); the sender would only recover by timeouts. None may be sent.
        let dropped = underlay_tx_dropped(h)? - before;
        check!(
            dropped == 0,
            "{}: {dropped} packets too large for the underlay were sent",
            h.name()
        );
    }
    Ok(())
}

/// Packets the host's underlay veth dropped on sending (larger than its peer's MTU allows).
fn underlay_tx_dropped(h: &rudder_tests::Host) -> anyhow::Result<u64> {
    let out = ip(&["-n", h.netns(), "-j", "-s", "link", "show", "eth0"])?;
    let links: serde_json::Value = serde_json::from_str(&out)?;
    links[0]["stats64"]["tx"]["dropped"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no tx dropped in {out}"))
}

#[test]
fn plain_packets_with_overlay_sources_from_the_underlay_are_dropped_and_counted() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let (a, b) = (&hosts[0], &hosts[1]);
        const PROBE_PORT: u16 = 9999;
        let probe = UdpProbe::bind(
            a.container_netns(),
            SocketAddrV4::new(a.container_ip(), PROBE_PORT),
        )?;
        let target = SocketAddrV4::new(a.container_ip(), PROBE_PORT);
        // A neighbour on the underlay routes the overlay to a's underlay address and forges
        // a source in b's subnet.
        let u = c.underlay_ns();
        let forged = Ipv4Addr::from(u32::from(b.subnet().network()) + 77);
        ip(&["-n", u, "addr", "add", &format!("{forged}/32"), "dev", "lo"])?;
        ip(&[
            "-n",
            u,
            "route",
            "add",
            &a.subnet().to_string(),
            "via",
            &a.underlay_ip().to_string(),
        ])?;

        // Control: the same path with the neighbour's own (underlay) source is delivered.
        send_udp_from(u, Ipv4Addr::new(192, 168, 77, 1), target, b"control")?;
        let got = probe.collect(Duration::from_secs(2))?;
        check!(
            got.iter().any(|(p, _)| p == b"control"),
            "control packet not delivered; got {got:?}"
        );

        const SENT: u64 = 5;
        for _ in 0..SENT {
            send_udp_from(u, forged, target, b"forged")?;
        }
        let got = probe.collect(Duration::from_secs(2))?;
        check!(
            got.iter().all(|(p, _)| p != b"forged"),
            "forged overlay-source packet delivered: {got:?}"
        );
        wait_until(
            "the unencapsulated counter to count the forged packets",
            Duration::from_secs(10),
            || Ok(a.counter("unencapsulated")? >= SENT),
        )?;
        // Real overlay traffic goes on.
        tcp_transfer(&b.container(), &a.container(), 1 << 20)?;

        // A stop removes rudder's nftables tables (the guard on TUN, the NAT mark on eBPF).
        let tables = exec_ok(a.netns(), "nft", &["list", "tables"])?;
        check!(
            tables.contains("rudder_guard") || tables.contains("rudder_fastpath"),
            "no rudder table while running: {tables}"
        );
        a.stop()?;
        let tables = exec_ok(a.netns(), "nft", &["list", "tables"])?;
        check!(
            !tables.contains("rudder_guard") && !tables.contains("rudder_fastpath"),
            "left behind after stop: {tables}"
        );
        Ok(())
    });
}
