//! Tests of the packet rules, on handcrafted packets.

use super::*;

const SRC: [u8; 4] = [10, 5, 2, 9];
const DST: [u8; 4] = [10, 5, 1, 7];

/// Checksum computed the slow, obvious way, independent of `internet_checksum`: sum
/// 16-bit big-endian words in a u64, fold, invert.
fn reference_checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i < data.len() {
        let hi = u64::from(data[i]) << 8;
        let lo = if i + 1 < data.len() {
            u64::from(data[i + 1])
        } else {
            0
        };
        sum += hi | lo;
        i += 2;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn header_checksum_ok(packet: &[u8]) -> bool {
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    reference_checksum(&packet[..header_len]) == 0
}

/// A UDP packet with `payload`, handcrafted field by field, checksum filled in.
fn udp_packet(src: [u8; 4], dst: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![
        0x45,
        0x00,
        (total >> 8) as u8,
        total as u8, // version/IHL, TOS, total length
        0x12,
        0x34,
        0x40,
        0x00, // id, DF
        ttl,
        17,
        0x00,
        0x00, // TTL, UDP, checksum placeholder
    ];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let udp_len = 8 + payload.len();
    p.extend_from_slice(&[
        0x30,
        0x39,
        0x1f,
        0x90,
        (udp_len >> 8) as u8,
        udp_len as u8,
        0,
        0,
    ]);
    p.extend_from_slice(payload);
    fix_header_checksum(&mut p);
    p
}

fn fix_header_checksum(p: &mut [u8]) {
    let header_len = usize::from(p[0] & 0x0f) * 4;
    p[10] = 0;
    p[11] = 0;
    let c = reference_checksum(&p[..header_len]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

fn icmp_packet(icmp_type: u8) -> Vec<u8> {
    let mut p = udp_packet(SRC, DST, 64, &[0; 8]);
    p[9] = PROTO_ICMP;
    p[20] = icmp_type;
    fix_header_checksum(&mut p);
    p
}

#[test]
fn parses_a_plain_udp_packet() {
    let p = udp_packet(SRC, DST, 64, b"hello");
    let v = parse_ipv4(&p).unwrap();
    assert_eq!(v.src, Ipv4Addr::from(SRC));
    assert_eq!(v.dst, Ipv4Addr::from(DST));
    assert_eq!(
        (v.ttl, v.protocol, v.header_len, v.total_len),
        (64, 17, 20, 33)
    );
    assert!(!v.is_fragment());
}

#[test]
fn empty_and_short_buffers_are_truncated() {
    assert_eq!(parse_ipv4(&[]), Err(Counter::DropTruncated));
    let p = udp_packet(SRC, DST, 64, b"");
    assert_eq!(parse_ipv4(&p[..19]), Err(Counter::DropTruncated));
    assert_eq!(parse_ipv4(&p[..1]), Err(Counter::DropTruncated));
}

#[test]
fn other_versions_are_not_ipv4() {
    let mut p = udp_packet(SRC, DST, 64, b"x");
    p[0] = 0x60;
    assert_eq!(parse_ipv4(&p), Err(Counter::DropNotIpv4));
    assert_eq!(parse_ipv4(b"garbage!"), Err(Counter::DropNotIpv4));
}

#[test]
fn ihl_below_five_is_malformed() {
    let mut p = udp_packet(SRC, DST, 64, b"x");
    p[0] = 0x44;
    assert_eq!(parse_ipv4(&p), Err(Counter::DropMalformed));
}

#[test]
fn header_longer_than_buffer_is_truncated() {
    let mut p = udp_packet(SRC, DST, 64, b"");
    p[0] = 0x4f; // 60-byte header in a 28-byte buffer
    assert_eq!(parse_ipv4(&p), Err(Counter::DropTruncated));
}

#[test]
fn total_length_below_header_is_malformed() {
    let mut p = udp_packet(SRC, DST, 64, b"x");
    p[2..4].copy_from_slice(&19u16.to_be_bytes());
    fix_header_checksum(&mut p);
    assert_eq!(parse_ipv4(&p), Err(Counter::DropMalformed));
}

#[test]
fn total_length_beyond_buffer_is_truncated() {
    let p = udp_packet(SRC, DST, 64, b"hello");
    assert_eq!(parse_ipv4(&p[..p.len() - 1]), Err(Counter::DropTruncated));
}

#[test]
fn bad_header_checksum_is_malformed() {
    let mut p = udp_packet(SRC, DST, 64, b"x");
    p[11] ^= 0x01;
    assert_eq!(parse_ipv4(&p), Err(Counter::DropMalformed));
}

#[test]
fn trailing_bytes_are_left_for_the_caller_to_trim() {
    let mut p = udp_packet(SRC, DST, 64, b"hello");
    let real_len = p.len();
    p.extend_from_slice(&[0xee; 7]);
    let v = parse_ipv4(&p).unwrap();
    assert_eq!(v.total_len, real_len);
}

#[test]
fn ip_options_are_accepted() {
    // IHL 6: one 4-byte option word (NOP NOP NOP EOL) between header and payload.
    let mut p = udp_packet(SRC, DST, 64, b"opt");
    p.splice(20..20, [1, 1, 1, 0]);
    p[0] = 0x46;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    fix_header_checksum(&mut p);
    let v = parse_ipv4(&p).unwrap();
    assert_eq!((v.header_len, v.total_len), (24, p.len()));
}

#[test]
fn fragments_are_recognised() {
    let mut p = udp_packet(SRC, DST, 64, b"x");
    p[6..8].copy_from_slice(&0x2000u16.to_be_bytes()); // first fragment: MF, offset 0
    fix_header_checksum(&mut p);
    let v = parse_ipv4(&p).unwrap();
    assert!(v.is_fragment() && !v.is_non_first_fragment());
    p[6..8].copy_from_slice(&0x0005u16.to_be_bytes()); // last fragment, offset 40 bytes
    fix_header_checksum(&mut p);
    let v = parse_ipv4(&p).unwrap();
    assert!(v.is_fragment() && v.is_non_first_fragment());
    assert_eq!(v.fragment_offset, 5);
}

#[test]
fn checksum_matches_the_reference_on_odd_and_even_lengths() {
    for len in [0usize, 1, 2, 19, 20, 21, 1500] {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(
            internet_checksum(&data),
            reference_checksum(&data),
            "len {len}"
        );
    }
    // RFC 1071's worked example: words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert_eq!(
        internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
        !0xddf2
    );
}

/// RFC 6040 normal mode, every (outer, inner) ECN pair: CE is copied into an ECN-capable
/// inner header (checksum patched incrementally, equal to a recomputed one), dropped
/// around Not-ECT, and nothing else changes the packet.
#[test]
fn ecn_decapsulation_follows_rfc_6040() {
    for dscp in [0x00u8, 0xb8, 0xfc] {
        for inner in 0..4u8 {
            for outer in 0..4u8 {
                let mut p = udp_packet(SRC, DST, 64, b"payload");
                p[1] = dscp | inner;
                fix_header_checksum(&mut p);
                let sent = p.clone();
                let result = decapsulate_ecn(&mut p, 0xe0 | outer);
                let what = format!("dscp {dscp:#x} inner {inner:02b} outer {outer:02b}");
                match (outer, inner) {
                    (0b11, 0b00) => {
                        assert_eq!(result, Err(Counter::DropCeNotEct), "{what}");
                        assert_eq!(p, sent, "{what}: left as received");
                    }
                    (0b11, 0b01 | 0b10) => {
                        assert_eq!(result, Ok(()), "{what}");
                        let mut expected = sent.clone();
                        expected[1] = dscp | 0b11;
                        fix_header_checksum(&mut expected);
                        assert_eq!(p, expected, "{what}");
                        assert!(header_checksum_ok(&p), "{what}");
                    }
                    _ => {
                        assert_eq!(result, Ok(()), "{what}");
                        assert_eq!(p, sent, "{what}: unchanged");
                    }
                }
            }
        }
    }
    assert_eq!(
        decapsulate_ecn(&mut [0x45; 10], 0b11),
        Err(Counter::DropTruncated)
    );
}

#[test]
fn ttl_decrement_keeps_the_checksum_valid() {
    for ttl in [2u8, 64, 128, 255] {
        // Many ids, so that carries through the checksum are exercised.
        for id in (0..=u16::MAX).step_by(257) {
            let mut p = udp_packet(SRC, DST, ttl, b"payload");
            p[4..6].copy_from_slice(&id.to_be_bytes());
            fix_header_checksum(&mut p);
            assert_eq!(decrement_ttl(&mut p), Ok(ttl - 1));
            assert_eq!(p[8], ttl - 1);
            assert!(header_checksum_ok(&p), "ttl {ttl} id {id}");
            let mut expected = p.clone();
            fix_header_checksum(&mut expected);
            assert_eq!(p[10..12], expected[10..12], "ttl {ttl} id {id}");
        }
    }
}

#[test]
fn ttl_one_and_zero_expire_and_leave_the_packet_untouched() {
    for ttl in [0u8, 1] {
        let mut p = udp_packet(SRC, DST, ttl, b"x");
        let before = p.clone();
        assert_eq!(decrement_ttl(&mut p), Err(Counter::DropTtlExceeded));
        assert_eq!(p, before);
    }
    assert_eq!(decrement_ttl(&mut [0x45; 10]), Err(Counter::DropTruncated));
}

#[test]
fn incremental_update_matches_rfc1624_corner_case() {
    // RFC 1624 section 3: eqn. 3 must not turn a 0xffff-sum header into 0x0000.
    assert_eq!(checksum_update(0xdd2f, 0x5555, 0x3285), 0x0000);
    assert_eq!(checksum_update(0x0000, 0x3285, 0x5555), 0xdd2f);
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[test]
fn received_packet_checks() {
    let local = net("10.5.1.0/24");
    let peer = [net("10.5.2.0/24")];
    let ok = parse_ipv4(&udp_packet(SRC, DST, 64, b"x")).unwrap();
    assert_eq!(check_received(&ok, local, &peer), Ok(()));
    // A host that re-acquired may briefly hold two subnets.
    assert_eq!(
        check_received(&ok, local, &[net("10.5.3.0/24"), net("10.5.2.0/24")]),
        Ok(())
    );
    assert_eq!(
        check_received(&ok, local, &[]),
        Err(Counter::DropUnknownSender)
    );
    let elsewhere = parse_ipv4(&udp_packet(SRC, [10, 5, 3, 1], 64, b"x")).unwrap();
    assert_eq!(
        check_received(&elsewhere, local, &peer),
        Err(Counter::DropNotOurSubnet)
    );
    let spoofed = parse_ipv4(&udp_packet([10, 5, 3, 9], DST, 64, b"x")).unwrap();
    assert_eq!(
        check_received(&spoofed, local, &peer),
        Err(Counter::DropSpoofedSource)
    );
    let outside = parse_ipv4(&udp_packet([8, 8, 8, 8], DST, 64, b"x")).unwrap();
    assert_eq!(
        check_received(&outside, local, &peer),
        Err(Counter::DropSpoofedSource)
    );
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 5, 1, 1);

fn build(kind: IcmpError, packet: &[u8]) -> Option<Vec<u8>> {
    let view = parse_ipv4(packet).unwrap();
    let mut out = [0u8; ICMP_ERROR_MAX_LEN];
    build_icmp_error(kind, packet, &view, GATEWAY, 24, &mut out).map(|n| out[..n].to_vec())
}

#[test]
fn time_exceeded_quotes_header_and_eight_bytes() {
    let mut p = udp_packet(SRC, DST, 1, b"0123456789abcdef");
    let before = p.clone();
    assert_eq!(decrement_ttl(&mut p), Err(Counter::DropTtlExceeded));
    let e = build(IcmpError::TimeExceeded, &p).unwrap();
    assert_eq!(e.len(), 20 + 8 + 20 + 8);
    // Our IPv4 header.
    let v = parse_ipv4(&e).unwrap();
    assert_eq!(v.src, GATEWAY);
    assert_eq!(v.dst, Ipv4Addr::from(SRC));
    assert_eq!((v.protocol, v.ttl, v.total_len), (PROTO_ICMP, 64, e.len()));
    assert!(header_checksum_ok(&e));
    // ICMP header and its checksum over the whole message.
    assert_eq!(&e[20..28], &[11, 0, e[22], e[23], 0, 0, 0, 0]);
    assert_eq!(reference_checksum(&e[20..]), 0);
    // Quote: the original header and the UDP header, byte for byte.
    assert_eq!(&e[28..], &before[..28]);
}

#[test]
fn net_unreachable_type_and_short_packet_quote() {
    // Only 3 payload bytes: the quote is the whole packet.
    let p = udp_packet(SRC, [10, 5, 77, 1], 64, b"");
    let p = {
        let mut q = p[..20].to_vec();
        q.extend_from_slice(&[1, 2, 3]);
        q[2..4].copy_from_slice(&23u16.to_be_bytes());
        q[9] = 6;
        fix_header_checksum(&mut q);
        q
    };
    let e = build(IcmpError::NetUnreachable, &p).unwrap();
    assert_eq!(e.len(), 20 + 8 + 23);
    assert_eq!((e[20], e[21]), (3, 0));
    assert_eq!(reference_checksum(&e[20..]), 0);
    assert!(header_checksum_ok(&e));
    assert_eq!(&e[28..], &p[..]);
}

#[test]
fn quote_includes_options_and_ignores_trailing_bytes() {
    let mut p = udp_packet(SRC, DST, 1, b"");
    p.splice(20..20, [1, 1, 1, 0]);
    p[0] = 0x46;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    fix_header_checksum(&mut p);
    let real = p.clone();
    p.extend_from_slice(&[0xaa; 30]);
    let e = build(IcmpError::TimeExceeded, &p).unwrap();
    // 24-byte header + the 8-byte UDP header; the padding is not quoted.
    assert_eq!(&e[28..], &real[..32]);
    assert_eq!(reference_checksum(&e[20..]), 0);
}

#[test]
fn never_an_error_about_an_icmp_error() {
    for error_type in [3u8, 4, 5, 11, 12, 42] {
        assert_eq!(
            build(IcmpError::NetUnreachable, &icmp_packet(error_type)),
            None
        );
    }
    // An echo request is a query: it does get an error.
    assert!(build(IcmpError::NetUnreachable, &icmp_packet(8)).is_some());
    // An ICMP packet with no room for a type is treated as an error.
    let mut bare = udp_packet(SRC, DST, 64, b"")[..20].to_vec();
    bare[2..4].copy_from_slice(&20u16.to_be_bytes());
    bare[9] = PROTO_ICMP;
    fix_header_checksum(&mut bare);
    assert_eq!(build(IcmpError::TimeExceeded, &bare), None);
}

#[test]
fn never_an_error_about_a_non_first_fragment() {
    let mut p = udp_packet(SRC, DST, 1, b"x");
    p[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
    fix_header_checksum(&mut p);
    assert_eq!(build(IcmpError::TimeExceeded, &p), None);
    // The first fragment may be answered.
    p[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
    fix_header_checksum(&mut p);
    assert!(build(IcmpError::TimeExceeded, &p).is_some());
}

/// Mutated and random inputs: no panic, and whatever is accepted is self-consistent
/// (a cheap stand-in for the fuzzing the design asks for).
#[test]
fn arbitrary_bytes_never_panic() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let valid = udp_packet(SRC, DST, 2, b"0123456789");
    let mut out = [0u8; ICMP_ERROR_MAX_LEN];
    for round in 0..20_000 {
        let mut p = if round % 2 == 0 {
            let mut p = valid.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % p.len();
                p[at] = next() as u8;
            }
            p.truncate((next() as usize) % (p.len() + 8));
            p
        } else {
            let len = (next() as usize) % 80;
            (0..len).map(|_| next() as u8).collect()
        };
        if let Ok(v) = parse_ipv4(&p) {
            assert!(v.header_len >= 20 && v.header_len <= v.total_len && v.total_len <= p.len());
            assert!(header_checksum_ok(&p));
            for kind in [IcmpError::NetUnreachable, IcmpError::TimeExceeded] {
                if let Some(n) = build_icmp_error(kind, &p, &v, GATEWAY, 24, &mut out) {
                    assert_eq!(reference_checksum(&out[20..n]), 0);
                    assert!(header_checksum_ok(&out[..n]));
                }
            }
            if decrement_ttl(&mut p).is_ok() {
                assert!(header_checksum_ok(&p));
            }
        }
    }
}

#[test]
fn never_an_error_about_broadcast_or_multicast() {
    for dst in [
        [255, 255, 255, 255],
        [224, 0, 0, 1],
        [239, 1, 2, 3],
        [10, 5, 1, 255], // directed broadcast of a /24 lease
        [240, 0, 0, 1],
    ] {
        assert_eq!(
            build(IcmpError::TimeExceeded, &udp_packet(SRC, dst, 1, b"x")),
            None,
            "{dst:?}"
        );
    }
    for src in [
        [0, 0, 0, 0],
        [224, 0, 0, 1],
        [10, 5, 2, 255],
        [127, 0, 0, 1],
    ] {
        assert_eq!(
            build(IcmpError::TimeExceeded, &udp_packet(src, DST, 1, b"x")),
            None,
            "{src:?}"
        );
    }
}

/// The pseudo header (RFC 793/768) as bytes, for the reference checksums below.
fn pseudo_header(p: &[u8]) -> Vec<u8> {
    let header_len = usize::from(p[0] & 0x0f) * 4;
    let l4_len = (p.len() - header_len) as u16;
    let mut pseudo = p[12..20].to_vec();
    pseudo.extend_from_slice(&[0, p[9]]);
    pseudo.extend_from_slice(&l4_len.to_be_bytes());
    pseudo
}

/// A TCP segment (20-byte header, `payload`) in an IPv4 packet, its checksum correct.
fn tcp_packet(payload: &[u8]) -> Vec<u8> {
    let mut p = udp_packet(SRC, DST, 64, &[]);
    p.truncate(20);
    p[9] = 6;
    let mut tcp = vec![
        0x30, 0x39, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
    ];
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    p.extend_from_slice(&tcp);
    p.extend_from_slice(payload);
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    fix_header_checksum(&mut p);
    let mut summed = pseudo_header(&p);
    summed.extend_from_slice(&p[20..]);
    let c = reference_checksum(&summed);
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

/// What a kernel with checksum offload leaves in the field: the pseudo-header sum, folded.
fn make_partial(p: &mut [u8], check_at: usize) {
    let partial = !reference_checksum(&pseudo_header(p));
    p[check_at..check_at + 2].copy_from_slice(&partial.to_be_bytes());
}

#[test]
fn a_partial_tcp_checksum_is_completed_and_a_correct_one_left_alone() {
    for payload_len in [0usize, 1, 2, 1399, 1400] {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + 3) as u8).collect();
        let correct = tcp_packet(&payload);
        let mut partial = correct.clone();
        make_partial(&mut partial, 36);
        assert_ne!(partial, correct);
        let view = parse_ipv4(&partial).unwrap();
        assert!(
            complete_partial_checksum(&mut partial, &view),
            "{payload_len}"
        );
        assert_eq!(
            partial, correct,
            "completed checksum, payload {payload_len}"
        );

        let mut untouched = correct.clone();
        let view = parse_ipv4(&untouched).unwrap();
        assert!(!complete_partial_checksum(&mut untouched, &view));
        assert_eq!(untouched, correct);
    }
}

#[test]
fn a_partial_udp_checksum_is_completed_but_no_checksum_stays_none() {
    let mut p = udp_packet(SRC, DST, 64, b"some datagram");
    let view = parse_ipv4(&p).unwrap();
    let none = p.clone();
    assert!(
        !complete_partial_checksum(&mut p, &view),
        "UDP checksum 0 = none"
    );
    assert_eq!(p, none);

    make_partial(&mut p, 26);
    assert!(complete_partial_checksum(&mut p, &view));
    let mut summed = pseudo_header(&p);
    summed.extend_from_slice(&p[20..]);
    assert_eq!(
        reference_checksum(&summed),
        0,
        "the completed UDP checksum verifies"
    );
}

#[test]
fn fragments_and_other_protocols_are_not_touched() {
    let mut p = tcp_packet(b"payload");
    make_partial(&mut p, 36);
    p[6] = 0x20; // MF: the L4 header is only in this first fragment, not all of it
    fix_header_checksum(&mut p);
    let before = p.clone();
    let view = parse_ipv4(&p).unwrap();
    assert!(!complete_partial_checksum(&mut p, &view));
    assert_eq!(p, before);

    let mut icmp = icmp_packet(8);
    let before = icmp.clone();
    let view = parse_ipv4(&icmp).unwrap();
    assert!(!complete_partial_checksum(&mut icmp, &view));
    assert_eq!(icmp, before);
}

#[test]
fn a_whole_tso_packet_is_recognised_for_kernel_segmentation() {
    let payload = vec![7u8; 4000];
    let mut p = tcp_packet(&payload);
    let view = parse_ipv4(&p).unwrap();
    // A complete checksum: an ordinary (if oversized) packet, left alone.
    assert_eq!(tcp_super_packet(&p, &view, 1472), None);
    make_partial(&mut p, 36);
    assert_eq!(tcp_super_packet(&p, &view, 1472), Some((40, 1432)));
    // Not longer than the MTU: a single packet, its checksum completed instead.
    assert_eq!(tcp_super_packet(&p, &view, 9000), None);
    let mut udp = udp_packet(SRC, DST, 64, &[1u8; 4000]);
    make_partial(&mut udp, 26);
    let view = parse_ipv4(&udp).unwrap();
    assert_eq!(tcp_super_packet(&udp, &view, 1472), None, "only TCP");
}
