//! Building raw IPv4 and IPv6 packets for the overlay's wire format (payload = the inner
//! packet).

use std::net::{Ipv4Addr, Ipv6Addr};

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A valid IPv4/UDP packet (header checksum set, UDP checksum 0 = none).
pub fn ipv4_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
    p.extend_from_slice(&[ttl, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// A valid IPv6 packet: header, then `next_header`'s bytes `l4` (taken as they are).
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, hop_limit: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + l4.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(l4);
    p
}

/// The checksum of an IPv6 upper-layer message `l4` (checksum field zeroed).
pub fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + l4.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next_header]);
    pseudo.extend_from_slice(l4);
    checksum(&pseudo)
}

/// A valid IPv6/UDP packet, UDP checksum set (mandatory over IPv6).
pub fn ipv6_udp(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let c = match checksum6(src, dst, 17, &udp) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    ipv6(src, dst, 17, hop_limit, &udp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checksum_verifies_to_zero() {
        let p = ipv4_udp(
            Ipv4Addr::new(10, 5, 1, 2),
            Ipv4Addr::new(10, 5, 2, 2),
            1000,
            2000,
            64,
            b"hi",
        );
        assert_eq!(p.len(), 30);
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 30);
    }

    #[test]
    fn ipv6_udp_checksum_verifies() {
        let (src, dst) = (
            "fc00:0:0:1::2".parse().unwrap(),
            "fc00:0:0:2::2".parse().unwrap(),
        );
        let p = ipv6_udp(src, dst, 1000, 2000, 64, b"hello");
        assert_eq!(p.len(), 40 + 8 + 5);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 13);
        assert_eq!(checksum6(src, dst, 17, &p[40..]), 0);
    }
}
