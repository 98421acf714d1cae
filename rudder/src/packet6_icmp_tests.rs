//! Byte-exact tests of the ICMPv6 errors, checksums verified by an independent reference.

use super::*;
use crate::packet6::parse_ipv6;
use crate::packet6::tests::{icmp6, ipv6_packet, l4_checksum_ok, udp6, DST, SRC};

const ROUTER: &str = "fd00:5::1";

fn build(kind: Icmp6Error, packet: &[u8]) -> Option<Vec<u8>> {
    let view = parse_ipv6(packet).unwrap();
    let mut out = [0u8; ICMP6_ERROR_MAX_LEN];
    let len = build_icmp6_error(kind, packet, &view, ROUTER.parse().unwrap(), &mut out)?;
    Some(out[..len].to_vec())
}

#[test]
fn time_exceeded_is_byte_exact() {
    let offending = udp6(SRC, DST, 1, b"hello");
    let e = build(Icmp6Error::HopLimitExceeded, &offending).unwrap();
    let mut want = vec![0x6c, 0x00, 0x00, 0x00];
    want.extend_from_slice(&((8 + offending.len()) as u16).to_be_bytes());
    want.extend_from_slice(&[58, 64]);
    want.extend_from_slice(&ROUTER.parse::<Ipv6Addr>().unwrap().octets());
    want.extend_from_slice(&SRC.parse::<Ipv6Addr>().unwrap().octets());
    want.extend_from_slice(&[3, 0]);
    want.extend_from_slice(&e[42..44]); // checksum: verified below
    want.extend_from_slice(&[0, 0, 0, 0]);
    want.extend_from_slice(&offending);
    assert_eq!(e, want);
    assert!(l4_checksum_ok(
        ROUTER.parse().unwrap(),
        SRC.parse().unwrap(),
        58,
        &e[40..]
    ));
    let v = parse_ipv6(&e).unwrap();
    assert_eq!(
        (v.protocol, v.total_len, v.traffic_class),
        (58, e.len(), 0xc0)
    );
}

#[test]
fn no_route_and_packet_too_big_carry_their_type_and_mtu() {
    let offending = udp6(SRC, DST, 64, b"x");
    let e = build(Icmp6Error::NoRoute, &offending).unwrap();
    assert_eq!(e[40..48], [1, 0, e[42], e[43], 0, 0, 0, 0]);
    assert!(l4_checksum_ok(
        ROUTER.parse().unwrap(),
        SRC.parse().unwrap(),
        58,
        &e[40..]
    ));

    let e = build(Icmp6Error::PacketTooBig { mtu: 1452 }, &offending).unwrap();
    assert_eq!(e[40..42], [2, 0]);
    assert_eq!(e[44..48], 1452u32.to_be_bytes());
    assert!(l4_checksum_ok(
        ROUTER.parse().unwrap(),
        SRC.parse().unwrap(),
        58,
        &e[40..]
    ));
}

#[test]
fn the_quote_fills_but_never_exceeds_1280_bytes() {
    let offending = udp6(SRC, DST, 64, &[0x5a; 1400]);
    let e = build(Icmp6Error::PacketTooBig { mtu: 1280 }, &offending).unwrap();
    assert_eq!(e.len(), 1280);
    assert_eq!(e[48..], offending[..1280 - 48]);
    assert_eq!(u16::from_be_bytes([e[4], e[5]]), 1240, "payload length");
    assert!(l4_checksum_ok(
        ROUTER.parse().unwrap(),
        SRC.parse().unwrap(),
        58,
        &e[40..]
    ));
}

#[test]
fn padding_past_the_packet_is_not_quoted() {
    let mut offending = udp6(SRC, DST, 1, b"abc");
    let real = offending.len();
    offending.extend_from_slice(&[0xee; 20]);
    let e = build(Icmp6Error::HopLimitExceeded, &offending).unwrap();
    assert_eq!(e.len(), 48 + real);
}

#[test]
fn never_about_icmpv6_errors_or_neighbour_discovery() {
    for t in [1, 2, 3, 4, 127, 133, 134, 135, 136, 137] {
        assert_eq!(
            build(Icmp6Error::HopLimitExceeded, &icmp6(SRC, DST, t)),
            None,
            "type {t}"
        );
    }
    for t in [128, 129, 130, 200] {
        assert!(
            build(Icmp6Error::HopLimitExceeded, &icmp6(SRC, DST, t)).is_some(),
            "type {t}"
        );
    }
    // ICMPv6 after a destination options header, the payload ending before its type.
    let short = ipv6_packet(SRC, DST, 64, 60, &[58, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        build(Icmp6Error::HopLimitExceeded, &short),
        None,
        "ICMPv6 without a type"
    );
}

#[test]
fn multicast_destinations_get_only_packet_too_big() {
    let p = udp6(SRC, "ff0e::1", 1, b"m");
    assert_eq!(build(Icmp6Error::HopLimitExceeded, &p), None);
    assert_eq!(build(Icmp6Error::NoRoute, &p), None);
    assert!(build(Icmp6Error::PacketTooBig { mtu: 1400 }, &p).is_some());
}

#[test]
fn never_to_a_source_that_is_not_one_reachable_node() {
    for src in ["::", "ff02::1", "::1", "fe80::1"] {
        let p = udp6(src, DST, 1, b"s");
        for kind in [
            Icmp6Error::HopLimitExceeded,
            Icmp6Error::PacketTooBig { mtu: 1280 },
        ] {
            assert_eq!(build(kind, &p), None, "{src} {kind:?}");
        }
    }
}
