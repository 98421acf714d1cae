//! Tests of the IPv6 packet rules, on handcrafted packets (including hostile ones).

use super::*;

pub(crate) const SRC: &str = "fd00:5:2::9";
pub(crate) const DST: &str = "fd00:5:1::7";

/// Checksum the slow, obvious way, independent of `internet_checksum`.
pub(crate) fn reference_checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for (i, b) in data.iter().enumerate() {
        sum += u64::from(*b) << if i % 2 == 0 { 8 } else { 0 };
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The RFC 8200 §8.1 pseudo-header, spelled out byte by byte.
pub(crate) fn pseudo_header(src: Ipv6Addr, dst: Ipv6Addr, next: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next]);
    p
}

/// Whether `l4` checksums to zero over the pseudo-header, computed independently.
pub(crate) fn l4_checksum_ok(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> bool {
    let mut all = pseudo_header(src, dst, next, l4.len());
    all.extend_from_slice(l4);
    reference_checksum(&all) == 0
}

/// An IPv6 packet: header (traffic class 0xb9, flow label 0x12345), then `payload`
/// (extension headers and upper layer) with first next header `next`.
pub(crate) fn ipv6_packet(
    src: &str,
    dst: &str,
    hop_limit: u8,
    next: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x6b, 0x91, 0x23, 0x45];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, hop_limit]);
    p.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(payload);
    p
}

/// A UDP datagram (ports 12345 → 8080) with a correct checksum.
pub(crate) fn udp6(src: &str, dst: &str, hop_limit: u8, data: &[u8]) -> Vec<u8> {
    let len = 8 + data.len();
    let mut udp = vec![0x30, 0x39, 0x1f, 0x90, (len >> 8) as u8, len as u8, 0, 0];
    udp.extend_from_slice(data);
    let sum = {
        let mut all = pseudo_header(src.parse().unwrap(), dst.parse().unwrap(), 17, len);
        all.extend_from_slice(&udp);
        reference_checksum(&all)
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv6_packet(src, dst, hop_limit, 17, &udp)
}

/// An ICMPv6 message of `icmp_type` (code 0, 4 zero bytes, checksum not filled).
pub(crate) fn icmp6(src: &str, dst: &str, icmp_type: u8) -> Vec<u8> {
    ipv6_packet(
        src,
        dst,
        64,
        PROTO_ICMPV6,
        &[icmp_type, 0, 0, 0, 0, 0, 0, 0],
    )
}

/// An extension header of `len` bytes (a multiple of 8) with next header `next`.
fn ext(next: u8, len: usize) -> Vec<u8> {
    let mut h = vec![0u8; len];
    h[0] = next;
    h[1] = (len / 8 - 1) as u8;
    h
}

fn frag(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&0xdead_beefu32.to_be_bytes());
    h
}

#[test]
fn parses_a_plain_udp_packet() {
    let p = udp6(SRC, DST, 64, b"hello");
    let v = parse_ipv6(&p).unwrap();
    assert_eq!(v.src, SRC.parse::<Ipv6Addr>().unwrap());
    assert_eq!(v.dst, DST.parse::<Ipv6Addr>().unwrap());
    assert_eq!(
        (v.hop_limit, v.traffic_class, v.flow_label),
        (64, 0xb9, 0x12345)
    );
    assert_eq!((v.protocol, v.l4_offset, v.total_len), (17, 40, 53));
    assert_eq!((v.fragment, v.routing_header), (None, false));
    assert!(v.has_l4_header());
}

#[test]
fn short_buffers_are_truncated_and_other_versions_refused() {
    let p = udp6(SRC, DST, 64, b"");
    assert_eq!(parse_ipv6(&[]), Err(Counter::DropTruncated));
    assert_eq!(parse_ipv6(&p[..39]), Err(Counter::DropTruncated));
    let mut v4 = p.clone();
    v4[0] = 0x45;
    assert_eq!(parse_ipv6(&v4), Err(Counter::DropNotIpv4));
}

#[test]
fn payload_length_is_checked_against_the_buffer() {
    let mut p = udp6(SRC, DST, 64, b"hello");
    assert_eq!(parse_ipv6(&p[..p.len() - 1]), Err(Counter::DropTruncated));
    let real = p.len();
    p.extend_from_slice(&[0xee; 9]);
    assert_eq!(
        parse_ipv6(&p).unwrap().total_len,
        real,
        "padding left to trim"
    );
}

#[test]
fn a_zero_payload_length_jumbogram_is_malformed() {
    // Hop-by-hop with a jumbo payload option (type 0xc2) and payload length 0.
    let mut hbh = ext(17, 8);
    hbh[2..8].copy_from_slice(&[0xc2, 4, 0, 1, 0, 0]);
    let mut p = ipv6_packet(SRC, DST, 64, 0, &hbh);
    p[4..6].fill(0);
    assert_eq!(parse_ipv6(&p), Err(Counter::DropMalformed));
    // Without the hop-by-hop header: still refused, never read as an empty packet.
    let mut p = udp6(SRC, DST, 64, b"data");
    p[4..6].fill(0);
    assert_eq!(parse_ipv6(&p), Err(Counter::DropMalformed));
}

#[test]
fn extension_headers_are_walked_to_the_upper_layer() {
    let mut payload = ext(43, 8); // hop-by-hop → routing
    payload.extend(ext(60, 24)); // routing → destination options
    payload.extend(ext(51, 16)); // destination options → AH
    payload.extend([6, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // AH (len 2: 16 bytes) → TCP
    payload.extend([0u8; 20]);
    let p = ipv6_packet(SRC, DST, 64, 0, &payload);
    let v = parse_ipv6(&p).unwrap();
    assert_eq!((v.protocol, v.l4_offset), (6, 40 + 8 + 24 + 16 + 16));
    assert!(v.routing_header);
    assert_eq!(v.l4(&p).unwrap().len(), 20);
}

#[test]
fn hop_by_hop_anywhere_but_first_is_malformed() {
    let mut payload = ext(0, 8); // destination options → hop-by-hop
    payload.extend(ext(17, 8));
    let p = ipv6_packet(SRC, DST, 64, 60, &payload);
    assert_eq!(parse_ipv6(&p), Err(Counter::DropMalformed));
}

#[test]
fn an_extension_header_running_past_the_payload_is_malformed() {
    // Claims 16 bytes in a payload of 8.
    let mut h = ext(17, 8);
    h[1] = 1;
    assert_eq!(
        parse_ipv6(&ipv6_packet(SRC, DST, 64, 60, &h)),
        Err(Counter::DropMalformed)
    );
    // Ends mid-header: only the next-header byte is there.
    let p = ipv6_packet(SRC, DST, 64, 60, &[17]);
    assert_eq!(parse_ipv6(&p), Err(Counter::DropMalformed));
    // A fragment header cut short.
    let p = ipv6_packet(SRC, DST, 64, 44, &frag(17, 0, true)[..6]);
    assert_eq!(parse_ipv6(&p), Err(Counter::DropMalformed));
}

#[test]
fn a_truncated_buffer_is_truncated_not_misparsed() {
    let mut payload = ext(17, 16);
    payload.extend([0u8; 8]);
    let p = ipv6_packet(SRC, DST, 64, 60, &payload);
    assert!(parse_ipv6(&p).is_ok());
    assert_eq!(parse_ipv6(&p[..50]), Err(Counter::DropTruncated));
}

#[test]
fn the_walk_is_bounded() {
    let chain = |n: usize| {
        let mut payload = Vec::new();
        for i in 0..n {
            payload.extend(ext(if i + 1 < n { 60 } else { 59 }, 8));
        }
        ipv6_packet(SRC, DST, 64, 60, &payload)
    };
    let v = parse_ipv6(&chain(MAX_EXTENSION_HEADERS)).unwrap();
    assert_eq!(
        (v.protocol, v.l4_offset),
        (59, 40 + 8 * MAX_EXTENSION_HEADERS)
    );
    assert!(!v.has_l4_header(), "No Next Header");
    let too_many = chain(MAX_EXTENSION_HEADERS + 1);
    assert_eq!(parse_ipv6(&too_many), Err(Counter::DropMalformed));
}

#[test]
fn esp_ends_the_walk() {
    let p = ipv6_packet(SRC, DST, 64, 50, &[0xaa; 24]);
    let v = parse_ipv6(&p).unwrap();
    assert_eq!((v.protocol, v.l4_offset), (50, 40));
    assert!(!v.has_l4_header());
}

#[test]
fn fragments_first_and_not_first() {
    let mut payload = frag(17, 0, true);
    payload.extend([0u8; 8]);
    let v = parse_ipv6(&ipv6_packet(SRC, DST, 64, 44, &payload)).unwrap();
    assert_eq!(
        v.fragment,
        Some(Fragment {
            offset: 0,
            more: true
        })
    );
    assert!(v.is_fragment() && !v.is_non_first_fragment() && v.has_l4_header());
    assert_eq!((v.protocol, v.l4_offset), (17, 48));

    // A later fragment whose data happens to look like a routing header: not walked.
    let mut payload = frag(43, 185, false);
    payload.extend(ext(17, 8));
    let v = parse_ipv6(&ipv6_packet(SRC, DST, 64, 44, &payload)).unwrap();
    assert_eq!(
        v.fragment,
        Some(Fragment {
            offset: 185,
            more: false
        })
    );
    assert!(v.is_non_first_fragment() && !v.has_l4_header() && !v.routing_header);
    assert_eq!((v.protocol, v.l4_offset), (43, 48));
    assert_eq!(v.l4(&ipv6_packet(SRC, DST, 64, 44, &payload)), None);

    // Atomic fragment (RFC 6946): offset 0, no M, not a fragment.
    let mut payload = frag(17, 0, false);
    payload.extend([0u8; 8]);
    let v = parse_ipv6(&ipv6_packet(SRC, DST, 64, 44, &payload)).unwrap();
    assert!(!v.is_fragment());
}

#[test]
fn two_fragment_headers_are_malformed() {
    let mut payload = frag(44, 0, true);
    payload.extend(frag(17, 0, true));
    payload.extend([0u8; 8]);
    let p = ipv6_packet(SRC, DST, 64, 44, &payload);
    assert_eq!(parse_ipv6(&p), Err(Counter::DropMalformed));
}

#[test]
fn hop_limit_goes_down_by_one_and_stops_at_one() {
    let mut p = udp6(SRC, DST, 2, b"x");
    let before = p.clone();
    assert_eq!(decrement_hop_limit(&mut p), Ok(1));
    assert_eq!(p[7], 1);
    assert_eq!(p[..7], before[..7]);
    assert_eq!(p[8..], before[8..]);
    let frozen = p.clone();
    assert_eq!(decrement_hop_limit(&mut p), Err(Counter::DropTtlExceeded));
    assert_eq!(p, frozen, "left as received for the error to quote");
    p[7] = 0;
    assert_eq!(decrement_hop_limit(&mut p), Err(Counter::DropTtlExceeded));
    assert_eq!(
        decrement_hop_limit(&mut p[..39]),
        Err(Counter::DropTruncated)
    );
}

/// The packet with its traffic class's ECN bits set to `ecn`.
fn with_ecn(ecn: u8) -> Vec<u8> {
    let mut p = udp6(SRC, DST, 64, b"x");
    p[1] = (p[1] & 0xcf) | (ecn << 4);
    p
}

#[test]
fn ecn_decapsulation_follows_rfc_6040() {
    const ECT0: u8 = 2;
    const ECT1: u8 = 1;
    for inner in [ECT0, ECT1] {
        let mut p = with_ecn(inner);
        decapsulate_ecn6(&mut p, 0x03).unwrap();
        assert_eq!(
            parse_ipv6(&p).unwrap().traffic_class & 3,
            ECN_CE,
            "CE copied in"
        );
        assert_eq!(p[1] & 0x0f, with_ecn(inner)[1] & 0x0f, "flow label kept");
        assert_eq!(p[0], with_ecn(inner)[0], "DSCP kept");
    }
    let mut p = with_ecn(ECN_NOT_ECT);
    assert_eq!(decapsulate_ecn6(&mut p, 0xff), Err(Counter::DropCeNotEct));
    for outer in [0x00, 0x01, 0x02, 0xfc] {
        let mut p = with_ecn(ECT0);
        decapsulate_ecn6(&mut p, outer).unwrap();
        assert_eq!(p, with_ecn(ECT0), "outer {outer:#x} changes nothing");
    }
    let mut p = with_ecn(ECN_CE);
    decapsulate_ecn6(&mut p, 0x03).unwrap();
    assert_eq!(p, with_ecn(ECN_CE));
}

#[test]
fn inner_traffic_class_by_version() {
    assert_eq!(inner_traffic_class(&udp6(SRC, DST, 64, b"")), Some(0xb9));
    assert_eq!(inner_traffic_class(&[0x45, 0x2e]), Some(0x2e));
    assert_eq!(inner_traffic_class(&[0x60]), None);
    assert_eq!(inner_traffic_class(&[0x10, 0]), None);
    assert_eq!(inner_traffic_class(&[]), None);
}

#[test]
fn flow_labels_are_20_bits_non_zero_and_per_flow() {
    for hash in [0, 1, 0xffff_ffff, 0x0010_0001, 0xdead_beef] {
        let label = outer_flow_label(hash);
        assert!(label != 0 && label <= 0xf_ffff, "{hash:#x} → {label:#x}");
    }
    let a = udp6(SRC, DST, 64, b"one");
    let b = udp6(SRC, DST, 9, b"other payload");
    let mut c = a.clone();
    c[40] ^= 1; // another source port
    let hash = |p: &[u8]| flow_hash6(p, &parse_ipv6(p).unwrap());
    assert_eq!(hash(&a), hash(&b), "same flow, same hash");
    assert_ne!(hash(&a), hash(&c), "another port, another flow");
    let mut first = frag(17, 0, true);
    first.extend_from_slice(&a[40..]);
    let first = ipv6_packet(SRC, DST, 64, 44, &first);
    let later = ipv6_packet(SRC, DST, 64, 44, &frag(17, 3, false));
    assert_eq!(hash(&first), hash(&later), "fragments of one flow");
}

/// A UDP packet whose checksum field holds the pseudo-header sum (checksum offload).
fn partial_udp6(data: &[u8]) -> Vec<u8> {
    let mut p = udp6(SRC, DST, 64, data);
    let len = 8 + data.len();
    let partial = !reference_checksum(&pseudo_header(
        SRC.parse().unwrap(),
        DST.parse().unwrap(),
        17,
        len,
    ));
    p[46..48].copy_from_slice(&partial.to_be_bytes());
    p
}

#[test]
fn a_partial_udp_checksum_is_completed() {
    let complete = udp6(SRC, DST, 64, b"offloaded");
    let mut p = partial_udp6(b"offloaded");
    let v = parse_ipv6(&p).unwrap();
    assert!(has_partial_l4_checksum6(&p, &v));
    assert!(complete_partial_checksum6(&mut p, &v));
    assert_eq!(p, complete);
    assert!(l4_checksum_ok(v.src, v.dst, 17, &p[40..]));
    assert!(
        !complete_partial_checksum6(&mut p, &v),
        "a complete one is left alone"
    );
}

#[test]
fn checksum_helpers_match_the_reference() {
    let p = udp6(SRC, DST, 64, b"odd");
    let v = parse_ipv6(&p).unwrap();
    assert_eq!(l4_checksum6(v.src, v.dst, 17, &p[40..]), 0);
    let mut zeroed = p[40..].to_vec();
    zeroed[6..8].fill(0);
    let mut all = pseudo_header(v.src, v.dst, 17, zeroed.len());
    all.extend_from_slice(&zeroed);
    assert_eq!(
        l4_checksum6(v.src, v.dst, 17, &zeroed),
        reference_checksum(&all)
    );
}

#[test]
fn partial_checksums_are_not_touched_behind_fragments_or_routing_headers() {
    let partial = partial_udp6(b"x");
    let mut payload = ext(17, 8);
    payload.extend_from_slice(&partial[40..]);
    let routed = ipv6_packet(SRC, DST, 64, 43, &payload);
    let v = parse_ipv6(&routed).unwrap();
    assert!(!has_partial_l4_checksum6(&routed, &v));
    let mut payload = frag(17, 0, true);
    payload.extend_from_slice(&partial[40..]);
    let fragment = ipv6_packet(SRC, DST, 64, 44, &payload);
    assert!(!has_partial_l4_checksum6(
        &fragment,
        &parse_ipv6(&fragment).unwrap()
    ));
}

#[test]
fn scope_rules_keep_link_traffic_off_the_overlay() {
    let check = |p: &[u8]| check_overlay_scope(p, &parse_ipv6(p).unwrap());
    assert_eq!(check(&udp6(SRC, DST, 64, b"")), Ok(()));
    for (src, dst) in [
        ("fe80::1", DST),
        (SRC, "fe80::2"),
        (SRC, "ff02::1"),
        (SRC, "ff0e::1234"),
        ("::", DST),
        ("ff02::9", DST),
    ] {
        assert_eq!(
            check(&udp6(src, dst, 64, b"")),
            Err(DROP_LINK_SCOPED),
            "{src} → {dst}"
        );
    }
    for nd in 133..=137 {
        assert_eq!(
            check(&icmp6(SRC, DST, nd)),
            Err(DROP_LINK_SCOPED),
            "ND type {nd}"
        );
    }
    assert_eq!(check(&icmp6(SRC, DST, 128)), Ok(()), "echo request crosses");
}

#[test]
fn received_sources_must_lie_in_the_senders_subnet() {
    let local: Ipv6Net = "fd00:5:1::/64".parse().unwrap();
    let sender: Ipv6Net = "fd00:5:2::/64".parse().unwrap();
    let p = udp6(SRC, DST, 64, b"");
    let v = parse_ipv6(&p).unwrap();
    assert_eq!(check_received6(&v, local, &[sender]), Ok(()));
    assert_eq!(
        check_received6(&v, local, &[]),
        Err(Counter::DropUnknownSender)
    );
    let other: Ipv6Net = "fd00:5:3::/64".parse().unwrap();
    assert_eq!(
        check_received6(&v, local, &[other]),
        Err(Counter::DropSpoofedSource)
    );
    assert_eq!(
        check_received6(&v, other, &[sender]),
        Err(Counter::DropNotOurSubnet)
    );
    assert_eq!(
        check_received6(&v, local, &[other, sender]),
        Ok(()),
        "while re-acquiring"
    );
}
