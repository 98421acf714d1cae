//! IPv6 packet rules of the overlay as pure functions over byte slices: the inner IPv6
//! packet as it travels inside the overlay (no outer header), as [`crate::packet`] does for
//! IPv4. Every rejection is a [`Counter`] that both data planes report under the same name.
//!
//! Wire choices (issue 17): the UDP payload stays the raw inner packet, its version nibble
//! telling IPv4 from IPv6. Over an IPv6 outer header the UDP checksum is always computed
//! (RFC 8200 §8.1): no RFC 6935/6936 zero-checksum mode, so a peer never has to accept
//! unchecked datagrams. The outer header takes hop limit 64, the traffic class of the inner
//! packet ([`inner_traffic_class`]) and a flow label from the inner flow
//! ([`outer_flow_label`]).

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use rudder_ebpf::Counter;

use crate::packet::{internet_checksum, ECN_CE, ECN_MASK, ECN_NOT_ECT, PROTO_TCP, PROTO_UDP};

/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// The smallest link MTU IPv6 allows (RFC 8200 §5).
pub const IPV6_MIN_MTU: usize = 1280;
/// Next header value of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// Extension headers walked before the packet is refused: real stacks send at most a few.
pub const MAX_EXTENSION_HEADERS: usize = 8;
/// Hop limit of the outer IPv6 header and of the ICMPv6 errors we originate.
pub const OUTER_HOP_LIMIT: u8 = 64;

const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_ESP: u8 = 50;
const NEXT_AH: u8 = 51;
const NEXT_NONE: u8 = 59;
const NEXT_DESTINATION_OPTIONS: u8 = 60;

/// The fragment header's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Offset in 8-byte units.
    pub offset: u16,
    /// The M flag.
    pub more: bool,
}

/// The fields of a validated inner IPv6 header that forwarding needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6View {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub flow_label: u32,
    /// 40 + the payload length: the packet proper. Bytes past it in the buffer are padding
    /// to be trimmed, never forwarded.
    pub total_len: usize,
    /// The upper-layer protocol after the extension headers; ESP and No Next Header end
    /// the walk and are reported as such.
    pub protocol: u8,
    /// Where the upper-layer header starts (`<= total_len`). For a non-first fragment this
    /// is fragment data, not a header.
    pub l4_offset: usize,
    /// The fragment header, if there is one.
    pub fragment: Option<Fragment>,
    /// A routing header is present: the pseudo-header's destination is then the last
    /// segment's, not `dst`, so checksum work is left alone.
    pub routing_header: bool,
}

impl Ipv6View {
    /// Part of a fragmented packet (an atomic fragment, offset 0 without M, is not).
    pub fn is_fragment(&self) -> bool {
        self.fragment.is_some_and(|f| f.more || f.offset != 0)
    }

    /// A fragment other than the first: it carries no upper-layer header.
    pub fn is_non_first_fragment(&self) -> bool {
        self.fragment.is_some_and(|f| f.offset != 0)
    }

    /// The upper-layer header is present at `l4_offset` (not a non-first fragment, not
    /// ESP or No Next Header).
    pub fn has_l4_header(&self) -> bool {
        !self.is_non_first_fragment() && !matches!(self.protocol, NEXT_ESP | NEXT_NONE)
    }

    /// The upper-layer bytes, when [`Self::has_l4_header`].
    pub fn l4<'a>(&self, packet: &'a [u8]) -> Option<&'a [u8]> {
        self.has_l4_header()
            .then(|| packet.get(self.l4_offset..self.total_len))
            .flatten()
    }
}

/// Checks an inner IPv6 packet, walks its extension headers and returns its fields.
///
/// A buffer shorter than the payload length says is [`Counter::DropTruncated`]; an
/// extension header running past the payload length, a hop-by-hop header anywhere but
/// first, more than [`MAX_EXTENSION_HEADERS`], or a zero payload length (a jumbogram,
/// which no overlay MTU can carry) is [`Counter::DropMalformed`]. A longer buffer is
/// accepted: the caller forwards `&buf[..view.total_len]`. Another version than 6 is
/// [`Counter::DropNotIpv4`] ("not the IP version expected").
pub fn parse_ipv6(buf: &[u8]) -> Result<Ipv6View, Counter> {
    let Some(&first) = buf.first() else {
        return Err(Counter::DropTruncated);
    };
    if first >> 4 != 6 {
        return Err(Counter::DropNotIpv4);
    }
    if buf.len() < IPV6_HEADER_LEN {
        return Err(Counter::DropTruncated);
    }
    let payload_len = usize::from(read_u16(buf, 4));
    if payload_len == 0 {
        return Err(Counter::DropMalformed);
    }
    let total_len = IPV6_HEADER_LEN + payload_len;
    if total_len > buf.len() {
        return Err(Counter::DropTruncated);
    }
    let packet = &buf[..total_len];
    let mut view = Ipv6View {
        src: read_addr(packet, 8),
        dst: read_addr(packet, 24),
        hop_limit: packet[7],
        traffic_class: (packet[0] << 4) | (packet[1] >> 4),
        flow_label: u32::from_be_bytes([0, packet[1] & 0x0f, packet[2], packet[3]]),
        total_len,
        protocol: packet[6],
        l4_offset: IPV6_HEADER_LEN,
        fragment: None,
        routing_header: false,
    };
    for walked in 0..=MAX_EXTENSION_HEADERS {
        let at = view.l4_offset;
        let header_len = match view.protocol {
            NEXT_HOP_BY_HOP if walked > 0 => return Err(Counter::DropMalformed),
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DESTINATION_OPTIONS => {
                (usize::from(*packet.get(at + 1).ok_or(Counter::DropMalformed)?) + 1) * 8
            }
            NEXT_FRAGMENT => 8,
            NEXT_AH => (usize::from(*packet.get(at + 1).ok_or(Counter::DropMalformed)?) + 2) * 4,
            // ESP, No Next Header and every upper layer end the walk.
            _ => return Ok(view),
        };
        if walked == MAX_EXTENSION_HEADERS || at + header_len > total_len {
            return Err(Counter::DropMalformed);
        }
        let next = packet[at];
        match view.protocol {
            NEXT_ROUTING => view.routing_header = true,
            NEXT_FRAGMENT => {
                if view.fragment.is_some() {
                    return Err(Counter::DropMalformed);
                }
                let offset_flags = read_u16(packet, at + 2);
                let fragment = Fragment {
                    offset: offset_flags >> 3,
                    more: offset_flags & 1 != 0,
                };
                view.fragment = Some(fragment);
                if fragment.offset != 0 {
                    // What follows is fragment data: nothing more to walk.
                    view.protocol = next;
                    view.l4_offset = at + header_len;
                    return Ok(view);
                }
            }
            _ => {}
        }
        view.protocol = next;
        view.l4_offset = at + header_len;
    }
    unreachable!("the walk returns by its last round")
}

/// Decrements the hop limit of a packet [`parse_ipv6`] accepted (IPv6 has no header
/// checksum). A packet that arrived with 0 or 1 is left untouched, for the time exceeded
/// error to quote it as received, and yields [`Counter::DropTtlExceeded`].
pub fn decrement_hop_limit(packet: &mut [u8]) -> Result<u8, Counter> {
    if packet.len() < IPV6_HEADER_LEN {
        return Err(Counter::DropTruncated);
    }
    let hop_limit = packet[7];
    if hop_limit <= 1 {
        return Err(Counter::DropTtlExceeded);
    }
    packet[7] = hop_limit - 1;
    Ok(hop_limit - 1)
}

/// RFC 6040 decapsulation for an inner IPv6 packet, the rules of
/// [`crate::packet::decapsulate_ecn`]: `outer_ecn_byte` is the outer TOS or traffic class,
/// whose CE mark is copied into an ECN-capable inner header; around a Not-ECT inner packet
/// CE means drop ([`Counter::DropCeNotEct`]).
pub fn decapsulate_ecn6(packet: &mut [u8], outer_ecn_byte: u8) -> Result<(), Counter> {
    if packet.len() < IPV6_HEADER_LEN {
        return Err(Counter::DropTruncated);
    }
    // The traffic class straddles bytes 0 and 1; its ECN bits are bits 4-5 of byte 1.
    let inner_ecn = (packet[1] >> 4) & ECN_MASK;
    if outer_ecn_byte & ECN_MASK != ECN_CE || inner_ecn == ECN_CE {
        return Ok(());
    }
    if inner_ecn == ECN_NOT_ECT {
        return Err(Counter::DropCeNotEct);
    }
    packet[1] |= ECN_CE << 4;
    Ok(())
}

/// The traffic class (IPv6) or TOS (IPv4) of an inner packet, by its version nibble, for
/// the outer header to copy (RFC 6040 normal mode copies ECN at encapsulation).
pub fn inner_traffic_class(packet: &[u8]) -> Option<u8> {
    match packet.first()? >> 4 {
        4 => packet.get(1).copied(),
        6 => Some((packet[0] << 4) | (packet.get(1)? >> 4)),
        _ => None,
    }
}

/// FNV-1a over the bytes fed to it: tiny, and good enough to spread flows.
pub(crate) struct FlowHasher(u32);

impl FlowHasher {
    pub(crate) fn new() -> Self {
        FlowHasher(0x811c_9dc5)
    }

    pub(crate) fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }

    pub(crate) fn finish(self) -> u32 {
        self.0
    }
}

/// A hash of the inner flow (addresses, flow label, protocol, and ports unless fragmented):
/// one flow always gets the same value, so the underlay's ECMP keeps it on one path (RFC 6438).
pub fn flow_hash6(packet: &[u8], view: &Ipv6View) -> u32 {
    let mut hash = FlowHasher::new();
    hash.eat(&view.src.octets());
    hash.eat(&view.dst.octets());
    hash.eat(&view.flow_label.to_be_bytes());
    hash.eat(&[view.protocol]);
    // Only the first fragment shows the ports: every fragment of a flow must hash alike.
    if matches!(view.protocol, PROTO_TCP | PROTO_UDP) && !view.is_fragment() {
        if let Some(ports) = view.l4(packet).and_then(|l4| l4.get(..4)) {
            hash.eat(ports);
        }
    }
    hash.finish()
}

/// The outer header's 20-bit flow label from an inner flow hash; never 0, which would mean
/// "unlabelled" (RFC 6437).
pub fn outer_flow_label(flow_hash: u32) -> u32 {
    let label = (flow_hash ^ (flow_hash >> 20)) & 0x000f_ffff;
    if label == 0 {
        1
    } else {
        label
    }
}

/// The RFC 8200 §8.1 pseudo-header's one's-complement sum, folded, not inverted (what a
/// kernel with checksum offload leaves in a TCP/UDP checksum field).
pub fn pseudo_header_sum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4_len: usize) -> u16 {
    let mut sum = u32::from(!internet_checksum(&src.octets()))
        + u32::from(!internet_checksum(&dst.octets()))
        + (l4_len as u32 >> 16)
        + (l4_len as u32 & 0xffff)
        + u32::from(next_header);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The complete checksum of an upper-layer message `l4` (its checksum field zeroed or
/// holding a value to verify) over the pseudo-header: 0 when `l4` is correct.
pub fn l4_checksum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &[u8]) -> u16 {
    let pseudo = pseudo_header_sum6(src, dst, next_header, l4.len());
    let sum = u32::from(!internet_checksum(l4)) + u32::from(pseudo);
    !(((sum & 0xffff) + (sum >> 16)) as u16)
}

/// Where a TCP or UDP checksum field sits and the smallest header holding it.
fn checksum_field(protocol: u8) -> Option<(usize, usize)> {
    match protocol {
        PROTO_TCP => Some((16, 20)),
        PROTO_UDP => Some((6, 8)),
        _ => None,
    }
}

/// Whether the packet is unfragmented TCP or UDP whose checksum field holds only the
/// pseudo-header sum, as a kernel with checksum offload leaves it.
pub fn has_partial_l4_checksum6(packet: &[u8], view: &Ipv6View) -> bool {
    if view.fragment.is_some() || view.routing_header {
        return false;
    }
    let Some((check_at, min_len)) = checksum_field(view.protocol) else {
        return false;
    };
    let Some(l4) = view.l4(packet).filter(|l4| l4.len() >= min_len) else {
        return false;
    };
    let field = read_u16(l4, check_at);
    // UDP's zero means "no checksum" over IPv4; over IPv6 it is invalid, never partial.
    field != 0 && field == pseudo_header_sum6(view.src, view.dst, view.protocol, l4.len())
}

/// Finishes a TCP or UDP checksum left for a NIC to complete, as
/// [`crate::packet::complete_partial_checksum`] does for IPv4: returns whether it wrote one.
pub fn complete_partial_checksum6(packet: &mut [u8], view: &Ipv6View) -> bool {
    if !has_partial_l4_checksum6(packet, view) {
        return false;
    }
    let Some((check_at, _)) = checksum_field(view.protocol) else {
        return false;
    };
    let l4 = &mut packet[view.l4_offset..view.total_len];
    l4[check_at..check_at + 2].fill(0);
    let mut checksum = l4_checksum6(view.src, view.dst, view.protocol, l4);
    if view.protocol == PROTO_UDP && checksum == 0 {
        checksum = 0xffff; // a computed 0 is sent as all ones (RFC 8200 §8.1)
    }
    l4[check_at..check_at + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// For a TCP packet longer than `mtu` whose checksum is left partial (a sender's whole TSO
/// packet): the end of its headers (IPv6, extension headers, TCP) and the segment size that
/// fits `mtu`, as [`crate::packet::tcp_super_packet`]. `None` for anything else.
pub fn tcp_super_packet6(packet: &[u8], view: &Ipv6View, mtu: usize) -> Option<(usize, usize)> {
    if view.protocol != PROTO_TCP
        || view.total_len <= mtu
        || !has_partial_l4_checksum6(packet, view)
    {
        return None;
    }
    let tcp_header_len = usize::from(packet.get(view.l4_offset + 12)? >> 4) * 4;
    let headers = view.l4_offset + tcp_header_len;
    if tcp_header_len < 20 || headers >= mtu || headers >= view.total_len {
        return None;
    }
    Some((headers, mtu - headers))
}

/// Whether an IPv6 address is link-local (fe80::/10).
pub fn is_link_local(addr: Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

/// Neighbour discovery: router solicitation/advertisement, neighbour solicitation/
/// advertisement, redirect (ICMPv6 133-137, RFC 4861). Link-scoped by definition.
pub fn is_neighbour_discovery(packet: &[u8], view: &Ipv6View) -> bool {
    view.protocol == PROTO_ICMPV6
        && view
            .l4(packet)
            .and_then(|l4| l4.first())
            .is_some_and(|t| (133..=137).contains(t))
}

/// The reason a packet the overlay must never carry is dropped: link-scoped traffic has no
/// route across it. (A dedicated counter needs a change in `rudder_ebpf::Counter`.)
pub const DROP_LINK_SCOPED: Counter = Counter::DropNoRoute;

/// Refuses what must never cross the overlay, in either direction: neighbour discovery,
/// link-local sources or destinations, multicast destinations (MLD, RS, DAD...) and
/// unspecified or multicast sources.
pub fn check_overlay_scope(packet: &[u8], view: &Ipv6View) -> Result<(), Counter> {
    let scoped = is_link_local(view.src)
        || is_link_local(view.dst)
        || view.dst.is_multicast()
        || view.src.is_multicast()
        || view.src.is_unspecified()
        || is_neighbour_discovery(packet, view);
    if scoped {
        Err(DROP_LINK_SCOPED)
    } else {
        Ok(())
    }
}

/// Checks a packet received from the underlay before it is delivered into our subnet, the
/// rule of [`crate::packet::check_received`] over IPv6 subnets: the sender must hold a
/// lease, the destination must be ours, and the source must lie in the sender's subnets.
pub fn check_received6(
    view: &Ipv6View,
    local_subnet: Ipv6Net,
    sender_subnets: &[Ipv6Net],
) -> Result<(), Counter> {
    if sender_subnets.is_empty() {
        return Err(Counter::DropUnknownSender);
    }
    if !local_subnet.contains(&view.dst) {
        return Err(Counter::DropNotOurSubnet);
    }
    if !sender_subnets.iter().any(|net| net.contains(&view.src)) {
        return Err(Counter::DropSpoofedSource);
    }
    Ok(())
}

/// The IP version of a datagram payload, by its first nibble (4, 6, or anything else).
pub fn ip_version(packet: &[u8]) -> Option<u8> {
    packet.first().map(|b| b >> 4)
}

pub(crate) fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn read_addr(buf: &[u8], at: usize) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&buf[at..at + 16]);
    Ipv6Addr::from(octets)
}

#[cfg(test)]
#[path = "packet6_tests.rs"]
pub(crate) mod tests;
