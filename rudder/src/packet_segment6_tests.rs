//! Segmentation of IPv6 TCP super-packets.

use super::*;
use crate::packet6::tests::{ipv6_packet, l4_checksum_ok, pseudo_header, reference_checksum};
use crate::packet6::{parse_ipv6, tcp_super_packet6};

const SRC: &str = "fd00:5:1::2";
const DST: &str = "fd00:5:2::2";

/// A TSO packet as an offloading sender leaves it: IPv6, `ext` extension-header bytes
/// (destination options when non-zero), TCP (seq 1000, PSH|ACK|FIN|CWR), `payload_len`
/// bytes; TCP checksum = the pseudo-header sum.
fn super_packet6(ext: usize, payload_len: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    if ext > 0 {
        l4.extend_from_slice(&[PROTO_TCP, (ext / 8 - 1) as u8]);
        l4.resize(ext, 1);
    }
    let tcp_at = l4.len();
    l4.resize(tcp_at + 20 + payload_len, 0);
    let tcp = &mut l4[tcp_at..];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_PSH | 0x10 | TCP_FIN | TCP_CWR;
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    for (i, b) in tcp[20..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let pseudo = pseudo_header(
        SRC.parse().unwrap(),
        DST.parse().unwrap(),
        PROTO_TCP,
        20 + payload_len,
    );
    let partial = !reference_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&partial.to_be_bytes());
    ipv6_packet(SRC, DST, 64, if ext > 0 { 60 } else { PROTO_TCP }, &l4)
}

#[test]
fn an_ipv6_super_packet_becomes_mtu_sized_segments() {
    for ext in [0, 16] {
        let packet = super_packet6(ext, 4000);
        let view = parse_ipv6(&packet).unwrap();
        let (headers, mss) = tcp_super_packet6(&packet, &view, 1452).expect("a super-packet");
        assert_eq!((headers, mss), (60 + ext, 1452 - 60 - ext));
        let mut out = Vec::new();
        let n = segment_tcp6(&packet, &view, headers, mss, &mut out);
        assert_eq!(n, 4000usize.div_ceil(mss));
        let mut reassembled = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            assert!(seg.len() <= 1452, "segment {i} is {} bytes", seg.len());
            let v = parse_ipv6(seg).unwrap();
            assert_eq!(v.total_len, seg.len(), "payload length per segment");
            assert_eq!(v.l4_offset, 40 + ext, "extension headers kept");
            assert_eq!(seg[..4], packet[..4], "traffic class and flow label kept");
            assert!(
                l4_checksum_ok(v.src, v.dst, PROTO_TCP, &seg[v.l4_offset..]),
                "segment {i}"
            );
            let tcp = &seg[v.l4_offset..];
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            assert_eq!(seq, 1000 + (i * mss) as u32);
            let last = i == out.len() - 1;
            assert_eq!(
                tcp[13] & (TCP_FIN | TCP_PSH) != 0,
                last,
                "FIN/PSH on the last only"
            );
            assert_eq!(tcp[13] & TCP_CWR != 0, i == 0, "CWR on the first only");
            reassembled.extend_from_slice(&seg[headers..]);
        }
        assert_eq!(
            reassembled,
            packet[headers..],
            "payload unchanged and in order"
        );
    }
}

#[test]
fn small_or_complete_packets_are_not_super_packets() {
    let packet = super_packet6(0, 1000);
    let view = parse_ipv6(&packet).unwrap();
    assert_eq!(
        tcp_super_packet6(&packet, &view, 1452),
        None,
        "fits the MTU"
    );
    let mut complete = super_packet6(0, 4000);
    let view = parse_ipv6(&complete).unwrap();
    assert!(crate::packet6::complete_partial_checksum6(
        &mut complete,
        &view
    ));
    assert_eq!(
        tcp_super_packet6(&complete, &view, 1452),
        None,
        "checksum not partial"
    );
}
