//! Real IPv6 traffic through `EbpfDataplane` over the IPv4 underlay of `smoke_tests.rs`:
//! the containers get fd00:5:1::10 and fd00:5:2::10 behind their bridges; the peer routes
//! are `via inet <peer>`, the programs encapsulate on egress and decapsulate on ingress.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv6Addr, SocketAddrV6, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use ipnet::{Ipv4Net, Ipv6Net};
use rudder_ebpf::Counter;

use super::smoke_tests::{rudder_routes, Topology, UNDERLAY_A, UNDERLAY_B};
use super::{EbpfDataplane, EbpfOptions};
use crate::dataplane::{Dataplane as _, Ipv6Plane};

const CONTAINER_A6: &str = "fd00:5:1::10";
const CONTAINER_B6: &str = "fd00:5:2::10";

fn load6(
    topo: &Topology,
    host: &str,
    public_ip: std::net::Ipv4Addr,
    subnet: &str,
    subnet6: &str,
    public_ipv6: Option<Ipv6Addr>,
) -> EbpfDataplane {
    let (ifindex, _) = topo.link(host, "eth0");
    let opts = EbpfOptions {
        underlay_ifname: "eth0".into(),
        underlay_ifindex: ifindex,
        local_ip: public_ip,
        network: "10.5.0.0/16".parse().unwrap(),
        local_subnet: subnet.parse().unwrap(),
        udp_port: rudder_ebpf::DEFAULT_UDP_PORT,
        overlay_mtu: if public_ipv6.is_some() { 1452 } else { 1472 },
        bridge: Some("br0".into()),
        force_fail: false,
        pin_dir: None,
        ipv6: Some(Ipv6Plane {
            network: "fd00:5::/32".parse().unwrap(),
            local_subnet: subnet6.parse().unwrap(),
            public_ipv6,
        }),
    };
    let host = host.to_string();
    topo.in_ns(&host.clone(), move || EbpfDataplane::load(opts))
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("loading the data plane in {host}: {e:#}"))
}

fn add_ipv6(topo: &Topology) {
    for (host, container, gateway, addr) in [
        ("hA", "cA", "fd00:5:1::1", CONTAINER_A6),
        ("hB", "cB", "fd00:5:2::1", CONTAINER_B6),
    ] {
        topo.exec(host, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        topo.ip(host, &format!("-6 addr add {gateway}/64 dev br0 nodad"));
        topo.ip(container, &format!("-6 addr add {addr}/64 dev eth0 nodad"));
        topo.ip(container, &format!("-6 route add default via {gateway}"));
    }
}

/// Sends `bytes` from container A to B over TCP/IPv6; every byte must arrive intact.
fn tcp6_transfer(topo: &Topology, bytes: usize) -> Duration {
    let dst: Ipv6Addr = CONTAINER_B6.parse().unwrap();
    let server = topo.in_ns("cB", move || {
        let listener = TcpListener::bind(SocketAddrV6::new(dst, 5202, 0, 0)).unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        let mut received = Vec::with_capacity(bytes);
        stream.read_to_end(&mut received).unwrap();
        received
    });
    let client = topo.in_ns("cA", move || {
        let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stream = loop {
            match TcpStream::connect_timeout(
                &SocketAddrV6::new(dst, 5202, 0, 0).into(),
                Duration::from_secs(2),
            ) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("connect to {dst}: {e}"),
            }
        };
        let start = Instant::now();
        stream.write_all(&payload).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        start
    });
    let start = client.join().expect("client thread");
    let received = server.join().expect("server thread");
    let elapsed = start.elapsed();
    assert_eq!(received.len(), bytes, "bytes received");
    assert!(
        received
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8),
        "payload corrupted in transit"
    );
    elapsed
}

#[test]
fn containers_talk_ipv6_through_the_ebpf_overlay_over_an_ipv4_underlay() {
    super::kernel_tests::require_root();
    let topo = Topology::build();
    add_ipv6(&topo);
    let a = load6(
        &topo,
        "hA",
        UNDERLAY_A,
        "10.5.1.0/24",
        "fd00:5:1::/64",
        None,
    );
    let b = load6(
        &topo,
        "hB",
        UNDERLAY_B,
        "10.5.2.0/24",
        "fd00:5:2::/64",
        None,
    );
    let subnet_a: Ipv4Net = "10.5.1.0/24".parse().unwrap();
    let subnet_b: Ipv4Net = "10.5.2.0/24".parse().unwrap();
    let subnet_a6: Ipv6Net = "fd00:5:1::/64".parse().unwrap();
    let subnet_b6: Ipv6Net = "fd00:5:2::/64".parse().unwrap();
    a.upsert_peer(subnet_b, UNDERLAY_B.into()).unwrap();
    b.upsert_peer(subnet_a, UNDERLAY_A.into()).unwrap();
    for _ in 0..2 {
        // Twice: upserts are idempotent.
        a.upsert_peer6(subnet_b6, UNDERLAY_B.into()).unwrap();
        b.upsert_peer6(subnet_a6, UNDERLAY_A.into()).unwrap();
    }
    let routes = topo.ip("hA", "-6 route show proto 211");
    assert!(
        routes.contains("fd00:5:2::/64 via fe80::7275:6464:6572 dev eth0"),
        "IPv6 peer route: {routes}"
    );
    assert!(routes.contains("mtu 1472"), "route MTU: {routes}");
    assert!(
        routes.contains("unreachable fd00:5::/32"),
        "network route: {routes}"
    );

    let before = a.counters();
    topo.exec(
        "cA",
        &[
            "ping",
            "-6",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            CONTAINER_B6,
        ],
    );
    let bytes = 16 << 20;
    let elapsed = tcp6_transfer(&topo, bytes);
    let after = a.counters();
    let after_bytes = a.byte_counters();
    let encapsulated = after[Counter::Encapsulated.index()] - before[Counter::Encapsulated.index()];
    assert!(encapsulated > 0, "hA encapsulated nothing: {after:?}");
    let b_counts = b.counters();
    assert!(
        b_counts[Counter::Decapsulated.index()] > 0,
        "hB decapsulated nothing: {b_counts:?}"
    );
    // Figures, printed not asserted: GSO packets encapsulated whole show as inner packets
    // larger than the overlay MTU.
    eprintln!(
        "IPv6 over IPv4: {bytes} bytes in {elapsed:?}; hA encapsulated {encapsulated} packets, \
         {} bytes on average; hB decapsulated {} packets ({} bytes on average)",
        after_bytes[Counter::Encapsulated.index()] / after[Counter::Encapsulated.index()].max(1),
        b_counts[Counter::Decapsulated.index()],
        b.byte_counters()[Counter::Decapsulated.index()]
            / b_counts[Counter::Decapsulated.index()].max(1),
    );

    // A flushed neighbour entry and a deleted route come back with the periodic refresh.
    topo.ip("hA", "-6 neigh flush dev eth0 nud permanent");
    topo.ip("hA", "-6 route del fd00:5:2::/64 proto 211");
    let refresh = std::sync::Arc::new(a);
    let in_ns = refresh.clone();
    topo.in_ns("hA", move || in_ns.refresh_host_state())
        .join()
        .unwrap()
        .unwrap();
    let a = std::sync::Arc::try_unwrap(refresh).ok().expect("one owner");
    let routes = topo.ip("hA", "-6 route show proto 211");
    assert!(
        routes.contains("fd00:5:2::/64 via fe80::7275:6464:6572"),
        "route not restored: {routes}"
    );
    let neighbours = topo.ip("hA", "-6 neigh show dev eth0");
    assert!(
        neighbours.contains("fe80::7275:6464:6572"),
        "neighbour not restored: {neighbours}"
    );
    topo.exec("cA", &["ping", "-6", "-c", "1", "-W", "2", CONTAINER_B6]);

    // Removing the peer removes its route: the network's unreachable route answers.
    a.remove_peer6(subnet_b6).unwrap();
    let routes = topo.ip("hA", "-6 route show proto 211");
    assert!(
        !routes.contains("fd00:5:2::/64"),
        "route left behind: {routes}"
    );
    let v4_routes = rudder_routes(&topo, "hA");
    assert!(
        v4_routes.contains("10.5.2.0/24"),
        "IPv4 peer route kept: {v4_routes}"
    );
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    let routes = topo.ip("hA", "-6 route show proto 211");
    assert!(
        routes.trim().is_empty(),
        "shutdown left IPv6 routes: {routes}"
    );
}

/// Both hosts have a PublicIPv6: IPv4 and IPv6 containers' traffic travels in IPv6 outer
/// headers (zero UDP checksum), routed to the placeholder gateway and redirected by BPF.
#[test]
fn both_families_travel_over_an_ipv6_underlay() {
    super::kernel_tests::require_root();
    let topo = Topology::build();
    add_ipv6(&topo);
    let public6_a: Ipv6Addr = "fd00:77::1".parse().unwrap();
    let public6_b: Ipv6Addr = "fd00:77::2".parse().unwrap();
    for (host, addr) in [("hA", public6_a), ("hB", public6_b)] {
        topo.ip(host, &format!("-6 addr add {addr}/64 dev eth0 nodad"));
        topo.exec(host, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    }
    for container in ["cA", "cB"] {
        topo.ip(container, "link set eth0 mtu 1452");
    }
    let a = load6(
        &topo,
        "hA",
        UNDERLAY_A,
        "10.5.1.0/24",
        "fd00:5:1::/64",
        Some(public6_a),
    );
    let b = load6(
        &topo,
        "hB",
        UNDERLAY_B,
        "10.5.2.0/24",
        "fd00:5:2::/64",
        Some(public6_b),
    );
    a.upsert_peer("10.5.2.0/24".parse().unwrap(), public6_b.into())
        .unwrap();
    b.upsert_peer("10.5.1.0/24".parse().unwrap(), public6_a.into())
        .unwrap();
    a.upsert_peer6("fd00:5:2::/64".parse().unwrap(), public6_b.into())
        .unwrap();
    b.upsert_peer6("fd00:5:1::/64".parse().unwrap(), public6_a.into())
        .unwrap();
    let routes = rudder_routes(&topo, "hA");
    assert!(
        routes.contains("10.5.2.0/24 via inet6 fe80::7275:6464:6572 dev eth0"),
        "IPv4 peer route over IPv6: {routes}"
    );
    topo.exec(
        "cA",
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.5.2.10"],
    );
    topo.exec(
        "cA",
        &[
            "ping",
            "-6",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            CONTAINER_B6,
        ],
    );
    let bytes = 16 << 20;
    let before = a.counters();
    let before_bytes = a.byte_counters();
    let elapsed = tcp6_transfer(&topo, bytes);
    let after = a.counters();
    let packets = after[Counter::Encapsulated.index()] - before[Counter::Encapsulated.index()];
    let encap_bytes = a.byte_counters()[Counter::Encapsulated.index()]
        - before_bytes[Counter::Encapsulated.index()];
    assert!(packets > 0, "nothing encapsulated: {after:?}");
    let stats = a.peer_stats();
    assert!(
        stats
            .iter()
            .any(|p| p.public_ip == std::net::IpAddr::V6(public6_b) && p.traffic.tx_packets > 0),
        "the IPv4 subnet's traffic over IPv6 is reported: {stats:?}"
    );
    eprintln!(
        "IPv6 over IPv6: {bytes} bytes in {elapsed:?}; {packets} packets encapsulated, {} bytes on average",
        encap_bytes / packets.max(1)
    );
    let drops: Vec<_> = Counter::ALL
        .into_iter()
        .filter(|c| c.is_drop() && b.counters()[c.index()] > 0)
        .map(|c| (c.name(), b.counters()[c.index()]))
        .collect();
    assert!(drops.is_empty(), "hB dropped: {drops:?}");
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}
