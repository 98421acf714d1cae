//! The ICMPv6 errors the overlay originates (RFC 4443), as pure functions: the IPv6
//! counterpart of [`crate::packet::build_icmp_error`].

use std::net::Ipv6Addr;

use crate::packet6::{
    is_link_local, l4_checksum6, Ipv6View, IPV6_HEADER_LEN, IPV6_MIN_MTU, OUTER_HOP_LIMIT,
    PROTO_ICMPV6,
};

/// ICMPv6 header of an error message: type, code, checksum, 4 bytes (unused, or the MTU).
pub const ICMP6_ERROR_HEADER_LEN: usize = 8;
/// Largest ICMPv6 error we build: the whole error fits the IPv6 minimum MTU, quoting as
/// much of the offending packet as fits (RFC 4443 §2.4 (c)).
pub const ICMP6_ERROR_MAX_LEN: usize = IPV6_MIN_MTU;
/// Traffic class of our errors: CS6 (network control), as for the IPv4 errors.
const ICMP6_ERROR_TRAFFIC_CLASS: u8 = 0xc0;

/// The ICMPv6 errors the overlay originates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Icmp6Error {
    /// Type 1 code 0, no route to destination: inside the overlay network, but no host
    /// leases it (IPv4's net unreachable).
    NoRoute,
    /// Type 3 code 0: the hop limit ran out in transit.
    HopLimitExceeded,
    /// Type 2 code 0: larger than the overlay can carry; `mtu` is the overlay MTU.
    PacketTooBig { mtu: u32 },
}

impl Icmp6Error {
    /// ICMPv6 (type, code).
    pub const fn type_code(self) -> (u8, u8) {
        match self {
            Icmp6Error::NoRoute => (1, 0),
            Icmp6Error::PacketTooBig { .. } => (2, 0),
            Icmp6Error::HopLimitExceeded => (3, 0),
        }
    }

    /// The 4 bytes after the checksum: the MTU for Packet Too Big, else unused (zero).
    fn rest_of_header(self) -> [u8; 4] {
        match self {
            Icmp6Error::PacketTooBig { mtu } => mtu.to_be_bytes(),
            _ => [0; 4],
        }
    }
}

/// Whether RFC 4443 §2.4 (e) allows answering `packet` with `kind`: never about an ICMPv6
/// error or a neighbour discovery/redirect message (nor an ICMPv6 packet whose type cannot
/// be seen: too short, or a non-first fragment), never to a multicast destination except
/// with Packet Too Big, and never to a source that does not name one reachable node
/// (unspecified, multicast, loopback, link-local: our errors come from a routable address).
pub fn may_send_icmp6_error(packet: &[u8], view: &Ipv6View, kind: Icmp6Error) -> bool {
    let src = view.src;
    if src.is_unspecified() || src.is_multicast() || src.is_loopback() || is_link_local(src) {
        return false;
    }
    let too_big = matches!(kind, Icmp6Error::PacketTooBig { .. });
    if view.dst.is_multicast() && !too_big {
        return false;
    }
    if view.protocol == PROTO_ICMPV6 {
        return match view.l4(packet).and_then(|l4| l4.first()) {
            // Informational messages (128-255) but not ND (133-137).
            Some(&icmp_type) => icmp_type >= 128 && !(133..=137).contains(&icmp_type),
            None => false,
        };
    }
    true
}

/// Builds an ICMPv6 error about `packet` from `source` to the packet's source into `out`
/// and returns its length, or `None` when [`may_send_icmp6_error`] forbids it. The error
/// quotes the packet as received, as much as fits in [`ICMP6_ERROR_MAX_LEN`].
pub fn build_icmp6_error(
    kind: Icmp6Error,
    packet: &[u8],
    view: &Ipv6View,
    source: Ipv6Addr,
    out: &mut [u8; ICMP6_ERROR_MAX_LEN],
) -> Option<usize> {
    if !may_send_icmp6_error(packet, view, kind) {
        return None;
    }
    let quoted_len = view
        .total_len
        .min(packet.len())
        .min(ICMP6_ERROR_MAX_LEN - IPV6_HEADER_LEN - ICMP6_ERROR_HEADER_LEN);
    let icmp_len = ICMP6_ERROR_HEADER_LEN + quoted_len;
    let total_len = IPV6_HEADER_LEN + icmp_len;

    let (ip, rest) = out.split_at_mut(IPV6_HEADER_LEN);
    let icmp = &mut rest[..icmp_len];
    // Version 6, traffic class, flow label 0.
    ip[..4].copy_from_slice(&[
        0x60 | (ICMP6_ERROR_TRAFFIC_CLASS >> 4),
        ICMP6_ERROR_TRAFFIC_CLASS << 4,
        0,
        0,
    ]);
    ip[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    ip[6] = PROTO_ICMPV6;
    ip[7] = OUTER_HOP_LIMIT;
    ip[8..24].copy_from_slice(&source.octets());
    ip[24..40].copy_from_slice(&view.src.octets());

    let (type_, code) = kind.type_code();
    icmp[..4].copy_from_slice(&[type_, code, 0, 0]);
    icmp[4..8].copy_from_slice(&kind.rest_of_header());
    icmp[ICMP6_ERROR_HEADER_LEN..].copy_from_slice(&packet[..quoted_len]);
    let checksum = l4_checksum6(source, view.src, PROTO_ICMPV6, icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    Some(total_len)
}

#[cfg(test)]
#[path = "packet6_icmp_tests.rs"]
mod tests;
