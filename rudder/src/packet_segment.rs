//! Cutting a TCP super-packet (a sender's whole TSO packet, delivered unsegmented inside one
//! datagram by a veth or virtio underlay) into segments that fit the MTU, as the sender's NIC
//! would have: for a TUN device without offloads (`--tun-offload false`), which can only take
//! packets of at most its MTU. What the kernel's `tcp_gso_segment` does: sequence numbers
//! advance by the payload, IP ids by one, FIN/PSH only on the last segment, CWR only on the
//! first, every header and TCP checksum complete. IPv6 likewise, without an IP id.

use crate::packet::{internet_checksum, Ipv4View, PROTO_TCP};
use crate::packet6::{l4_checksum6, Ipv6View, IPV6_HEADER_LEN};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Appends the segments of `packet` (IPv4 + TCP headers of `headers` bytes, then payload) of
/// at most `mss` payload bytes each to `out`, one buffer each (reusing `out`'s capacity).
/// Returns how many.
pub fn segment_tcp(
    packet: &[u8],
    view: &Ipv4View,
    headers: usize,
    mss: usize,
    out: &mut Vec<Vec<u8>>,
) -> usize {
    debug_assert_eq!(view.protocol, PROTO_TCP);
    let ip_len = view.header_len;
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    let ip = |seg: &mut [u8], i: usize| {
        let total = seg.len() as u16;
        seg[2..4].copy_from_slice(&total.to_be_bytes());
        seg[4..6].copy_from_slice(&first_id.wrapping_add(i as u16).to_be_bytes());
        seg[10..12].fill(0);
        let header_sum = internet_checksum(&seg[..ip_len]);
        seg[10..12].copy_from_slice(&header_sum.to_be_bytes());
    };
    let checksum = |tcp: &[u8]| tcp_checksum(view, tcp);
    let tcp_at = ip_len;
    segment_with(
        &packet[..view.total_len],
        tcp_at,
        headers,
        mss,
        out,
        ip,
        checksum,
    )
}

/// [`segment_tcp`] for IPv6 (extension headers kept in every segment): no IP id, the
/// payload length per segment, the TCP checksum over the IPv6 pseudo-header.
pub fn segment_tcp6(
    packet: &[u8],
    view: &Ipv6View,
    headers: usize,
    mss: usize,
    out: &mut Vec<Vec<u8>>,
) -> usize {
    debug_assert_eq!(view.protocol, PROTO_TCP);
    let ip = |seg: &mut [u8], _: usize| {
        let payload_len = (seg.len() - IPV6_HEADER_LEN) as u16;
        seg[4..6].copy_from_slice(&payload_len.to_be_bytes());
    };
    let checksum = |tcp: &[u8]| l4_checksum6(view.src, view.dst, PROTO_TCP, tcp);
    let tcp_at = view.l4_offset;
    segment_with(
        &packet[..view.total_len],
        tcp_at,
        headers,
        mss,
        out,
        ip,
        checksum,
    )
}

/// The TCP side of segmentation, either IP version: `fix_ip` completes segment `i`'s IP
/// header(s), `checksum` computes a TCP checksum (field zeroed) for the version.
fn segment_with(
    packet: &[u8],
    tcp_at: usize,
    headers: usize,
    mss: usize,
    out: &mut Vec<Vec<u8>>,
    fix_ip: impl Fn(&mut [u8], usize),
    checksum: impl Fn(&[u8]) -> u16,
) -> usize {
    let payload = &packet[headers..];
    let first_seq = u32::from_be_bytes([
        packet[tcp_at + 4],
        packet[tcp_at + 5],
        packet[tcp_at + 6],
        packet[tcp_at + 7],
    ]);
    let flags = packet[tcp_at + 13];
    let chunks = payload.len().div_ceil(mss).max(1);
    for (i, chunk) in payload.chunks(mss.max(1)).enumerate() {
        let mut seg = Vec::with_capacity(headers + chunk.len());
        seg.extend_from_slice(&packet[..headers]);
        seg.extend_from_slice(chunk);
        fix_ip(&mut seg, i);

        let tcp = &mut seg[tcp_at..];
        let seq = first_seq.wrapping_add((i * mss) as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        let mut seg_flags = flags;
        if i + 1 < chunks {
            seg_flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            seg_flags &= !TCP_CWR;
        }
        tcp[13] = seg_flags;
        tcp[16..18].fill(0);
        let sum = checksum(tcp);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        out.push(seg);
    }
    chunks
}

/// The complete TCP checksum of `tcp` (header + payload) between the view's addresses.
fn tcp_checksum(view: &Ipv4View, tcp: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&view.src.octets());
    pseudo[4..8].copy_from_slice(&view.dst.octets());
    pseudo[9] = PROTO_TCP;
    pseudo[10..12].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
    let sum = u32::from(!internet_checksum(&pseudo)) + u32::from(!internet_checksum(tcp));
    let folded = (sum & 0xffff) + (sum >> 16);
    !(folded as u16)
}

#[cfg(test)]
#[path = "packet_segment6_tests.rs"]
mod tests6;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{parse_ipv4, tcp_super_packet};
    use std::net::Ipv4Addr;

    /// A TSO packet as an offloading sender leaves it: IPv4 (id 0x1234, DF) + TCP (seq
    /// 1000, PSH|ACK|FIN|CWR) + `payload_len` bytes, TCP checksum = the pseudo-header sum.
    fn super_packet(payload_len: usize) -> Vec<u8> {
        let total = 20 + 20 + payload_len;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&Ipv4Addr::new(10, 5, 1, 2).octets());
        p[16..20].copy_from_slice(&Ipv4Addr::new(10, 5, 2, 2).octets());
        let sum = internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&1000u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = TCP_PSH | 0x10 | TCP_FIN | TCP_CWR;
        p[34..36].copy_from_slice(&0xffffu16.to_be_bytes());
        for (i, b) in p[40..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        // Partial checksum: the pseudo-header sum, not inverted.
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&p[12..20]);
        pseudo[9] = PROTO_TCP;
        pseudo[10..12].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
        let partial = !internet_checksum(&pseudo);
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        p
    }

    fn checksum_ok(seg: &[u8]) -> bool {
        let view = parse_ipv4(seg).unwrap();
        internet_checksum(&seg[..20]) == 0 && tcp_checksum(&view, &seg[20..view.total_len]) == 0
    }

    #[test]
    fn a_super_packet_becomes_mtu_sized_segments_with_complete_headers() {
        let payload = 4000;
        let packet = super_packet(payload);
        let view = parse_ipv4(&packet).unwrap();
        let (headers, mss) = tcp_super_packet(&packet, &view, 1472).expect("a super-packet");
        assert_eq!((headers, mss), (40, 1432));
        let mut out = Vec::new();
        assert_eq!(segment_tcp(&packet, &view, headers, mss, &mut out), 3);
        let mut reassembled = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            assert!(seg.len() <= 1472, "segment {i} is {} bytes", seg.len());
            let v = parse_ipv4(seg).unwrap();
            assert_eq!(v.total_len, seg.len());
            assert!(checksum_ok(seg), "segment {i} checksums");
            assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + i as u16);
            let seq = u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]);
            assert_eq!(seq, 1000 + (i * mss) as u32);
            let flags = seg[33];
            let last = i == out.len() - 1;
            assert_eq!(
                flags & (TCP_FIN | TCP_PSH) != 0,
                last,
                "FIN/PSH on the last only"
            );
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on the first only");
            assert_eq!(flags & 0x10, 0x10, "ACK on every segment");
            reassembled.extend_from_slice(&seg[40..]);
        }
        assert_eq!(reassembled, packet[40..], "payload unchanged and in order");
    }

    #[test]
    fn a_payload_of_exactly_one_mss_is_one_segment() {
        let packet = super_packet(1432);
        let view = parse_ipv4(&packet).unwrap();
        let mut out = Vec::new();
        assert_eq!(segment_tcp(&packet, &view, 40, 1432, &mut out), 1);
        assert_eq!(out[0].len(), 1472);
        assert!(checksum_ok(&out[0]));
        assert_eq!(out[0][33] & TCP_FIN, TCP_FIN);
    }
}
