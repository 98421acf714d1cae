//! Byte-exact `BPF_PROG_TEST_RUN` tests of the IPv6 outer header (peers reached at their
//! PublicIPv6) around both inner families: encapsulation on egress, decapsulation on
//! ingress, and the anti-spoofing by IPv6 sender. Root needed, as in `kernel_tests.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use rudder_ebpf::{names, Counter, PeerValue6, Senders6};

use super::kernel::Kernel;
use super::kernel_tests::*;
use super::kernel_tests6::ethernet6;
use super::peers6::{config6_of, underlay_key};
use crate::dataplane::Ipv6Plane;
use crate::packet6::tests::udp6;

pub(super) const OUR_PUBLIC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
pub(super) const PEER_PUBLIC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 3);
pub(super) const STRANGER_PUBLIC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 99);
/// The peer at PEER_PUBLIC6 holds 10.5.3.0/24 and fd00:5:3::/64.
pub(super) const PEER3_CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 5, 3, 30);
pub(super) const PEER3_HOST6: &str = "fd00:5:3::30";
const LOCAL_HOST6: &str = "fd00:5:1::10";

pub(super) fn fixture_outer6() -> Kernel {
    let mut kernel = fixture();
    let plane = Ipv6Plane {
        network: "fd00:5::/32".parse().unwrap(),
        local_subnet: "fd00:5:1::/64".parse().unwrap(),
        public_ipv6: Some(OUR_PUBLIC6),
    };
    kernel.set_config6(&config6_of(Some(&plane))).unwrap();
    let underlay = underlay_key(IpAddr::V6(PEER_PUBLIC6));
    kernel
        .peers6
        .insert(
            &Key::new(64, "fd00:5:3::".parse::<Ipv6Addr>().unwrap().octets()),
            PeerValue6 {
                underlay,
                traffic_id: 31,
            },
            0,
        )
        .unwrap();
    kernel
        .peers46
        .insert(
            &Key::new(24, [10, 5, 3, 0]),
            PeerValue6 {
                underlay,
                traffic_id: 32,
            },
            0,
        )
        .unwrap();
    kernel
        .senders6
        .insert(
            underlay,
            Senders6 {
                ipv6_subnets: 1,
                ipv4_subnets: 1,
            },
            0,
        )
        .unwrap();
    kernel
}

/// An overlay datagram over IPv6 as a peer sends it (UDP checksum `udp_check`).
pub(super) fn overlay_frame6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    traffic_class: u8,
    udp_check: u16,
    inner: &[u8],
) -> Vec<u8> {
    let mut l3 = vec![0u8; 48];
    let first = (6u32 << 28) | (u32::from(traffic_class) << 20) | 0x12345;
    l3[0..4].copy_from_slice(&first.to_be_bytes());
    l3[4..6].copy_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
    l3[6] = 17;
    l3[7] = 64;
    l3[8..24].copy_from_slice(&src.octets());
    l3[24..40].copy_from_slice(&dst.octets());
    l3[40..42].copy_from_slice(&50000u16.to_be_bytes());
    l3[42..44].copy_from_slice(&PORT.to_be_bytes());
    l3[44..46].copy_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
    l3[46..48].copy_from_slice(&udp_check.to_be_bytes());
    l3.extend_from_slice(inner);
    ethernet6(OUR_MAC, PEER_MAC, &l3)
}

/// The outer IPv6 + UDP header the programs must have written around `inner`.
pub(super) fn assert_outer6(out: &[u8], inner: &[u8], traffic_class: u8) {
    assert_eq!(out[12..14], [0x86, 0xdd], "EtherType IPv6");
    let ip = &out[14..54];
    let first = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
    assert_eq!(first >> 28, 6, "version");
    assert_eq!(
        (first >> 20) as u8,
        traffic_class,
        "traffic class from the inner packet"
    );
    assert_ne!(first & 0xfffff, 0, "flow label set from the flow hash");
    assert_eq!(
        usize::from(u16::from_be_bytes([ip[4], ip[5]])),
        inner.len() + 8,
        "payload length"
    );
    assert_eq!((ip[6], ip[7]), (17, 64), "UDP, hop limit 64");
    assert_eq!(ip[8..24], OUR_PUBLIC6.octets());
    assert_eq!(ip[24..40], PEER_PUBLIC6.octets());
    let udp = &out[54..62];
    assert!(u16::from_be_bytes([udp[0], udp[1]]) >= 49152);
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), PORT);
    assert_eq!(
        usize::from(u16::from_be_bytes([udp[4], udp[5]])),
        inner.len() + 8
    );
    assert_eq!(udp[6..8], [0, 0], "zero UDP checksum (RFC 6935/6936)");
    assert_eq!(out[62..], inner[..], "inner packet unchanged");
}

#[test]
fn encap_wraps_ipv4_inner_in_ipv6_byte_exact() {
    let kernel = fixture_outer6();
    let inner = ipv4_udp(LOCAL_CONTAINER, PEER3_CONTAINER, 63, true, 200);
    let frame = ethernet(PEER_MAC, OUR_MAC, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Encapsulated,
    );
    assert_eq!(out.len(), frame.len() + 48);
    assert_outer6(&out, &inner, 0x10);
    assert_eq!(kernel.peer_traffic(32).tx_packets, 1);
}

#[test]
fn encap_wraps_ipv6_inner_in_ipv6_byte_exact() {
    let kernel = fixture_outer6();
    let inner = udp6(LOCAL_HOST6, PEER3_HOST6, 63, &[0x33; 150]);
    let frame = ethernet6(PEER_MAC, OUR_MAC, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Encapsulated,
    );
    assert_eq!(out.len(), frame.len() + 48);
    assert_outer6(&out, &inner, 0xb9);
    assert_eq!(kernel.peer_traffic(31).tx_packets, 1);
}

/// Zero UDP checksum (what rudder sends) and a non-zero one are both accepted; the
/// inner packet goes up the stack with its EtherType.
#[test]
fn decap_of_ipv6_outer_hands_both_families_to_the_stack_byte_exact() {
    let kernel = fixture_outer6();
    for udp_check in [0, 0x1234] {
        let inner4 = ipv4_udp(PEER3_CONTAINER, LOCAL_CONTAINER, 64, true, 120);
        let frame = overlay_frame6(PEER_PUBLIC6, OUR_PUBLIC6, 0, udp_check, &inner4);
        let (verdict, out) = run(&kernel, names::PROG_INGRESS, &frame);
        assert_eq!(verdict, TC_ACT_OK, "IPv4 inner, checksum {udp_check:#x}");
        assert_eq!(out[12..14], [0x08, 0x00]);
        assert_eq!(out[14..], inner4[..], "IPv4 inner as sent");

        let inner6 = udp6(PEER3_HOST6, LOCAL_HOST6, 64, &[9; 80]);
        let frame = overlay_frame6(PEER_PUBLIC6, OUR_PUBLIC6, 0, udp_check, &inner6);
        let (verdict, out) = run(&kernel, names::PROG_INGRESS, &frame);
        assert_eq!(verdict, TC_ACT_OK, "IPv6 inner, checksum {udp_check:#x}");
        assert_eq!(out[12..14], [0x86, 0xdd]);
        assert_eq!(out[14..], inner6[..], "IPv6 inner as sent");
    }
    let traffic = kernel.peer_traffic(32);
    assert_eq!(traffic.rx_packets, 2, "IPv4 subnet's entry");
    assert_eq!(kernel.peer_traffic(31).rx_packets, 2, "IPv6 subnet's entry");
    // RFC 6040 from an IPv6 outer traffic class: CE into an ECT inner header.
    let mut ect = ipv4_udp(PEER3_CONTAINER, LOCAL_CONTAINER, 64, true, 20);
    ect[1] = 0x02;
    ect[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&ect[..20]);
    ect[10..12].copy_from_slice(&csum.to_be_bytes());
    let (verdict, out) = run(
        &kernel,
        names::PROG_INGRESS,
        &overlay_frame6(PEER_PUBLIC6, OUR_PUBLIC6, 0x03, 0, &ect),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out[15] & 0x03, 0x03, "CE copied inside");
    assert_eq!(checksum(&out[14..34]), 0, "inner checksum patched");
}

#[test]
fn decap_of_ipv6_outer_checks_the_sender() {
    let kernel = fixture_outer6();
    let cases = [
        // 10.5.2.0/24 is the IPv4-underlay peer's: not this sender's.
        (
            "spoofed IPv4 source",
            PEER_PUBLIC6,
            ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 20),
            Counter::DropSpoofedSource,
        ),
        (
            "unknown sender, IPv4 inner",
            STRANGER_PUBLIC6,
            ipv4_udp(PEER3_CONTAINER, LOCAL_CONTAINER, 64, true, 20),
            Counter::DropUnknownSender,
        ),
        (
            "spoofed IPv6 source",
            PEER_PUBLIC6,
            udp6("fd00:5:2::20", LOCAL_HOST6, 64, &[1; 20]),
            Counter::DropSpoofedSource,
        ),
        (
            "unknown sender, IPv6 inner",
            STRANGER_PUBLIC6,
            udp6(PEER3_HOST6, LOCAL_HOST6, 64, &[1; 20]),
            Counter::DropUnknownSender,
        ),
        (
            "not our subnet",
            PEER_PUBLIC6,
            ipv4_udp(PEER3_CONTAINER, PEER_CONTAINER, 64, true, 20),
            Counter::DropNotOurSubnet,
        ),
    ];
    for (what, sender, inner, reason) in cases {
        let frame = overlay_frame6(sender, OUR_PUBLIC6, 0, 0, &inner);
        let before = kernel.packet_counts();
        let (verdict, _) = run(&kernel, names::PROG_INGRESS, &frame);
        let after = kernel.packet_counts();
        assert_eq!(verdict, TC_ACT_SHOT, "{what}");
        assert_eq!(
            after[reason.index()],
            before[reason.index()] + 1,
            "{what}: {}",
            reason.name()
        );
    }
    // Not to our PublicIPv6, or not our port: the underlay's own traffic.
    let inner = ipv4_udp(PEER3_CONTAINER, LOCAL_CONTAINER, 64, true, 20);
    let elsewhere = overlay_frame6(PEER_PUBLIC6, STRANGER_PUBLIC6, 0, 0, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &elsewhere,
        TC_ACT_UNSPEC,
        Counter::Passed,
    );
    assert_eq!(out, elsewhere);
}
