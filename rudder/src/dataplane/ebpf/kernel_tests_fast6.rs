//! Byte-exact `BPF_PROG_TEST_RUN` tests of the IPv6 fast paths: `rudder_br_in` encapsulating
//! a local container's IPv6 packet (over both outer families) with the hop limit
//! decremented, and leaving to the stack what the stack must answer or what never crosses
//! the overlay; `rudder_ingress` redirecting decapsulated IPv6 into a known local container.
//! Root needed, as in `kernel_tests.rs`.

use std::net::Ipv6Addr;

use rudder_ebpf::{names, Counter, LocalEndpoint, STACK_MARK};

use super::kernel::Kernel;
use super::kernel_tests::*;
use super::kernel_tests6::{ethernet6, fixture6};
use super::kernel_tests_outer6::{assert_outer6, fixture_outer6, overlay_frame6, PEER_PUBLIC6};
use crate::packet6::tests::{icmp6, ipv6_packet, udp6};

pub(super) const LOCAL_HOST6: &str = "fd00:5:1::10";
/// In the peer subnet of [`fixture6`] (reached over IPv4).
pub(super) const PEER_HOST6: &str = "fd00:5:2::20";
/// In the peer subnet of [`fixture_outer6`] (reached over IPv6).
const PEER3_HOST6: &str = "fd00:5:3::30";
/// Traffic ids of those peer entries in the fixtures.
const PEER6_TRAFFIC: u32 = 7;
const PEER3_TRAFFIC: u32 = 31;
const CONTAINER_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x10];
const BRIDGE_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const CONTAINER_VETH: u32 = 1;

/// A frame from the container on the bridge: to the gateway's MAC.
fn from_container(l3: &[u8]) -> Vec<u8> {
    ethernet6(BRIDGE_MAC, CONTAINER_MAC, l3)
}

/// `packet` with its hop limit one lower: what the router hop makes of it.
fn hop_made(packet: &[u8]) -> Vec<u8> {
    let mut expected = packet.to_vec();
    expected[7] -= 1;
    expected
}

#[test]
fn bridge_fast_path6_encapsulates_over_ipv4_with_the_hop_limit_decremented() {
    let kernel = fixture6();
    let inner = udp6(LOCAL_HOST6, PEER_HOST6, 64, &[0x5a; 200]);
    let frame = from_container(&inner);
    let out = expect_counted(
        &kernel,
        names::PROG_BRIDGE,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Encapsulated,
    );
    assert_eq!(out.len(), frame.len() + 28);
    assert_eq!(out[12..14], [0x08, 0x00], "EtherType of the outer IPv4");
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[1], 0xb9, "TOS = the inner traffic class");
    assert_eq!(
        usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        inner.len() + 28
    );
    assert_eq!(ip[4..8], [0, 0, 0x40, 0], "DF: IPv6 is never fragmented");
    assert_eq!((ip[8], ip[9]), (64, 17));
    assert_eq!(ip[12..16], OUR_PUBLIC.octets());
    assert_eq!(ip[16..20], PEER_PUBLIC.octets());
    assert_eq!(checksum(ip), 0, "outer header checksum valid");
    let udp = &out[34..42];
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), PORT);
    assert_eq!(
        usize::from(u16::from_be_bytes([udp[4], udp[5]])),
        inner.len() + 8
    );
    assert_eq!(
        out[42..],
        hop_made(&inner)[..],
        "inner packet, hop limit - 1"
    );
    let traffic = kernel.peer_traffic(PEER6_TRAFFIC);
    assert_eq!(
        (traffic.tx_packets, traffic.tx_bytes),
        (1, inner.len() as u64)
    );
}

#[test]
fn bridge_fast_path6_encapsulates_over_ipv6_with_the_hop_limit_decremented() {
    let kernel = fixture_outer6();
    let inner = udp6(LOCAL_HOST6, PEER3_HOST6, 9, &[0x33; 120]);
    let frame = from_container(&inner);
    let out = expect_counted(
        &kernel,
        names::PROG_BRIDGE,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Encapsulated,
    );
    assert_eq!(out.len(), frame.len() + 48);
    // The inner packet after the outer headers, with the hop limit - 1.
    assert_outer6(&out, &hop_made(&inner), 0xb9);
    assert_eq!(kernel.peer_traffic(PEER3_TRAFFIC).tx_packets, 1);
}

#[test]
fn bridge_fast_path6_leaves_to_the_stack_what_the_stack_must_answer_or_keep() {
    let kernel = fixture6();
    let mtu = usize::from(MTU);
    let cases = [
        (
            "not for a peer",
            udp6(LOCAL_HOST6, "2001:db8::1", 64, &[1; 20]),
        ),
        (
            "to our own subnet",
            udp6(LOCAL_HOST6, "fd00:5:1::11", 64, &[1; 20]),
        ),
        (
            "hop limit running out (time exceeded)",
            udp6(LOCAL_HOST6, PEER_HOST6, 1, &[1; 20]),
        ),
        (
            "above the overlay MTU (packet too big)",
            udp6(LOCAL_HOST6, PEER_HOST6, 64, &vec![1; mtu - 40 - 8 + 1]),
        ),
        (
            "neighbour solicitation to a peer address",
            icmp6(LOCAL_HOST6, PEER_HOST6, 135),
        ),
        (
            "link-local source",
            udp6("fe80::1", PEER_HOST6, 64, &[1; 20]),
        ),
        (
            "multicast destination",
            udp6(LOCAL_HOST6, "ff02::1", 64, &[1; 20]),
        ),
        (
            "truncated extension header",
            ipv6_packet(LOCAL_HOST6, PEER_HOST6, 64, 0, &[17, 9, 0, 0]),
        ),
    ];
    for (what, packet) in cases {
        let frame = from_container(&packet);
        let before = kernel.packet_counts();
        let (ret, out) = run(&kernel, names::PROG_BRIDGE, &frame);
        assert_eq!(ret, TC_ACT_UNSPEC, "{what}: verdict");
        assert_eq!(out, frame, "{what}: packet changed");
        assert_eq!(kernel.packet_counts(), before, "{what}: counters moved");
    }
    // Exactly the overlay MTU still fits.
    let fits = udp6(LOCAL_HOST6, PEER_HOST6, 64, &vec![1; mtu - 40 - 8]);
    let (ret, _) = run(&kernel, names::PROG_BRIDGE, &from_container(&fits));
    assert_eq!(ret, TC_ACT_REDIRECT, "a packet of the overlay MTU");
    // A NAT'd connection (marked by rudder's nftables rule): the stack's.
    let packet = udp6(LOCAL_HOST6, PEER_HOST6, 64, &[1; 20]);
    let frame = from_container(&packet);
    let (ret, out) = run_with_skb(&kernel, names::PROG_BRIDGE, &frame, 0, STACK_MARK);
    assert_eq!((ret, out), (TC_ACT_UNSPEC, frame), "a marked NAT'd packet");
}

#[test]
fn bridge_fast_path6_needs_the_ipv6_overlay() {
    // IPv4-only network: an IPv6 frame is not ours.
    let kernel = fixture();
    let frame = from_container(&udp6(LOCAL_HOST6, PEER_HOST6, 64, &[1; 20]));
    let before = kernel.packet_counts();
    let (ret, out) = run(&kernel, names::PROG_BRIDGE, &frame);
    assert_eq!((ret, out), (TC_ACT_UNSPEC, frame));
    assert_eq!(kernel.packet_counts(), before);
}

pub(super) fn with_local_endpoint6(mut kernel: Kernel) -> Kernel {
    let ip: Ipv6Addr = LOCAL_HOST6.parse().unwrap();
    kernel
        .endpoints6
        .insert(
            ip.octets(),
            LocalEndpoint {
                host_ifindex: CONTAINER_VETH,
                container_mac: CONTAINER_MAC,
                gateway_mac: BRIDGE_MAC,
            },
            0,
        )
        .unwrap();
    kernel
}

#[test]
fn decap6_redirects_into_a_known_local_container_with_the_hop_limit_decremented() {
    let kernel = with_local_endpoint6(fixture6());
    let inner = udp6(PEER_HOST6, LOCAL_HOST6, 64, &[0x77; 300]);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Decapsulated,
    );
    assert_eq!(
        out[..6],
        CONTAINER_MAC,
        "Ethernet destination: the container"
    );
    assert_eq!(out[6..12], BRIDGE_MAC, "Ethernet source: its gateway");
    assert_eq!(out[12..14], [0x86, 0xdd], "EtherType IPv6");
    assert_eq!(
        out[14..],
        hop_made(&inner)[..],
        "inner packet, hop limit - 1"
    );
    let traffic = kernel.peer_traffic(PEER6_TRAFFIC);
    assert_eq!(
        (traffic.rx_packets, traffic.rx_bytes),
        (1, inner.len() as u64)
    );
}

#[test]
fn decap6_over_ipv6_redirects_into_a_known_local_container() {
    let kernel = with_local_endpoint6(fixture_outer6());
    let inner = udp6(PEER3_HOST6, LOCAL_HOST6, 2, &[0x11; 64]);
    let frame = overlay_frame6(
        PEER_PUBLIC6,
        super::kernel_tests_outer6::OUR_PUBLIC6,
        0,
        0,
        &inner,
    );
    let before = kernel.packet_counts();
    let (ret, out) = run(&kernel, names::PROG_INGRESS, &frame);
    assert_eq!(ret, TC_ACT_REDIRECT);
    let decapsulated = Counter::Decapsulated.index();
    assert_eq!(
        kernel.packet_counts()[decapsulated],
        before[decapsulated] + 1
    );
    assert_eq!(out[..12], [CONTAINER_MAC, BRIDGE_MAC].concat()[..]);
    assert_eq!(out[12..14], [0x86, 0xdd]);
    assert_eq!(
        out[14..],
        hop_made(&inner)[..],
        "inner packet, hop limit - 1"
    );
    assert_eq!(kernel.peer_traffic(PEER3_TRAFFIC).rx_packets, 1);
}

#[test]
fn decap6_leaves_expiring_and_unknown_destinations_to_the_stack() {
    let kernel = with_local_endpoint6(fixture6());
    for (what, inner) in [
        (
            "hop limit 1 (the stack answers time exceeded)",
            udp6(PEER_HOST6, LOCAL_HOST6, 1, &[0x77; 40]),
        ),
        (
            "an address with no local endpoint",
            udp6(PEER_HOST6, "fd00:5:1::99", 64, &[0x77; 40]),
        ),
    ] {
        let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
        let out = expect_counted(
            &kernel,
            names::PROG_INGRESS,
            &frame,
            TC_ACT_OK,
            Counter::Decapsulated,
        );
        assert_eq!(out[..12], frame[..12], "{what}: MAC addresses kept");
        assert_eq!(out[14..], inner[..], "{what}: inner packet as sent");
    }
}
