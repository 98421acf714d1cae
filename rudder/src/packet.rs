//! Packet rules of the overlay as pure functions over byte slices.
//!
//! No I/O and no allocation: the TUN data plane calls these once per packet, and the eBPF
//! programs implement the same rules, so every decision here returns a [`Counter`] reason
//! that both data planes report under the same name.
//!
//! Conventions: every function takes the inner IPv4 packet as it travels inside the
//! overlay (no outer header); addresses are [`Ipv4Addr`]; a rejected packet yields the
//! [`Counter`] that records why.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rudder_ebpf::Counter;

/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Largest IPv4 header (IHL 15).
pub const IPV4_MAX_HEADER_LEN: usize = 60;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// ICMP header of an error message: type, code, checksum, 4 unused bytes.
pub const ICMP_ERROR_HEADER_LEN: usize = 8;
/// How much of the offending packet's payload an ICMP error quotes (RFC 792).
pub const ICMP_QUOTED_PAYLOAD_LEN: usize = 8;
/// Largest ICMP error we build: our IPv4 header, the ICMP header, the quoted header with
/// all options and 8 payload bytes. A buffer of this size always suffices.
pub const ICMP_ERROR_MAX_LEN: usize =
    IPV4_MIN_HEADER_LEN + ICMP_ERROR_HEADER_LEN + IPV4_MAX_HEADER_LEN + ICMP_QUOTED_PAYLOAD_LEN;
/// TTL of the ICMP errors we originate (Linux's default).
pub const ICMP_ERROR_TTL: u8 = 64;

const FLAG_MORE_FRAGMENTS: u16 = 0x2000;
const FRAGMENT_OFFSET_MASK: u16 = 0x1fff;

/// The fields of a validated inner IPv4 header that forwarding needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub protocol: u8,
    /// Header length in bytes (IHL * 4), options included.
    pub header_len: usize,
    /// Total length from the header: the packet proper. Bytes past it in the buffer are
    /// padding to be trimmed, never forwarded.
    pub total_len: usize,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// The MF flag.
    pub more_fragments: bool,
}

impl Ipv4View {
    /// Part of a fragmented datagram (first, middle or last piece).
    pub fn is_fragment(&self) -> bool {
        self.more_fragments || self.fragment_offset != 0
    }

    /// A fragment other than the first: it carries no transport header, so it can be
    /// neither quoted usefully nor answered with an ICMP error (RFC 1812 4.3.2.7).
    pub fn is_non_first_fragment(&self) -> bool {
        self.fragment_offset != 0
    }
}

/// Checks an inner IPv4 packet and returns its header fields.
///
/// A buffer longer than the packet's total length is accepted: the caller forwards only
/// `&buf[..view.total_len]` (link layers pad short frames, so trimming beats dropping).
pub fn parse_ipv4(buf: &[u8]) -> Result<Ipv4View, Counter> {
    let Some(&version_ihl) = buf.first() else {
        return Err(Counter::DropTruncated);
    };
    if version_ihl >> 4 != 4 {
        return Err(Counter::DropNotIpv4);
    }
    if buf.len() < IPV4_MIN_HEADER_LEN {
        return Err(Counter::DropTruncated);
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER_LEN {
        return Err(Counter::DropMalformed);
    }
    if header_len > buf.len() {
        return Err(Counter::DropTruncated);
    }
    let total_len = usize::from(read_u16(buf, 2));
    if total_len < header_len {
        return Err(Counter::DropMalformed);
    }
    if total_len > buf.len() {
        return Err(Counter::DropTruncated);
    }
    // A correct header sums to 0xffff including its checksum field.
    if internet_checksum(&buf[..header_len]) != 0 {
        return Err(Counter::DropMalformed);
    }
    let flags_fragment = read_u16(buf, 6);
    Ok(Ipv4View {
        src: read_addr(buf, 12),
        dst: read_addr(buf, 16),
        ttl: buf[8],
        protocol: buf[9],
        header_len,
        total_len,
        fragment_offset: flags_fragment & FRAGMENT_OFFSET_MASK,
        more_fragments: flags_fragment & FLAG_MORE_FRAGMENTS != 0,
    })
}

/// Decrements the TTL of a packet that [`parse_ipv4`] accepted, patching the header
/// checksum incrementally (RFC 1624) instead of recomputing it.
///
/// Returns the new TTL. A packet whose TTL would reach 0 (it arrived with 0 or 1) is
/// left untouched, so an ICMP time exceeded can quote it as received, and yields
/// [`Counter::DropTtlExceeded`].
pub fn decrement_ttl(packet: &mut [u8]) -> Result<u8, Counter> {
    if packet.len() < IPV4_MIN_HEADER_LEN {
        return Err(Counter::DropTruncated);
    }
    let ttl = packet[8];
    if ttl <= 1 {
        return Err(Counter::DropTtlExceeded);
    }
    // TTL shares its 16-bit checksum word with the protocol byte.
    let old_word = u16::from_be_bytes([ttl, packet[9]]);
    let new_word = u16::from_be_bytes([ttl - 1, packet[9]]);
    let checksum = read_u16(packet, 10);
    let patched = checksum_update(checksum, old_word, new_word);
    packet[8] = ttl - 1;
    packet[10..12].copy_from_slice(&patched.to_be_bytes());
    Ok(ttl - 1)
}

/// The ECN field's values (the low two bits of the TOS byte, RFC 3168).
pub const ECN_MASK: u8 = 0x03;
/// Congestion experienced.
pub const ECN_CE: u8 = 0x03;
/// Not ECN-capable transport.
pub const ECN_NOT_ECT: u8 = 0x00;

/// RFC 6040 decapsulation (normal mode) for an inner packet that [`parse_ipv4`] accepted,
/// given the outer header's TOS byte: a congestion mark (CE) the underlay put on the outer
/// header is copied into an ECN-capable inner header (checksum patched), so the receiver's
/// transport sees it. Around a Not-ECT inner packet a CE mark cannot be passed on, and the
/// RFC has the packet dropped ([`Counter::DropCeNotEct`]), as Linux's tunnels do. Any other
/// outer value leaves the inner header as it is.
pub fn decapsulate_ecn(packet: &mut [u8], outer_tos: u8) -> Result<(), Counter> {
    if packet.len() < IPV4_MIN_HEADER_LEN {
        return Err(Counter::DropTruncated);
    }
    let inner_tos = packet[1];
    if outer_tos & ECN_MASK != ECN_CE || inner_tos & ECN_MASK == ECN_CE {
        return Ok(());
    }
    if inner_tos & ECN_MASK == ECN_NOT_ECT {
        return Err(Counter::DropCeNotEct);
    }
    // TOS shares its 16-bit checksum word with the version/IHL byte.
    let old_word = u16::from_be_bytes([packet[0], inner_tos]);
    let new_word = u16::from_be_bytes([packet[0], inner_tos | ECN_CE]);
    let patched = checksum_update(read_u16(packet, 10), old_word, new_word);
    packet[1] = inner_tos | ECN_CE;
    packet[10..12].copy_from_slice(&patched.to_be_bytes());
    Ok(())
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`, for one 16-bit word changing from `old`
/// to `new`. Unlike eqn. 2 it never produces 0x0000 from a non-zero sum.
pub fn checksum_update(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's-complement sum of `data` folded and inverted (RFC 1071): the value to store in a
/// checksum field whose bytes are zero, or 0 when `data` already holds a correct
/// checksum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;

/// Finishes a TCP or UDP checksum its sender's kernel left for a NIC to complete.
///
/// With checksum offload (`CHECKSUM_PARTIAL`) the field holds only the folded pseudo-header
/// sum. An eBPF sender encapsulates such packets in the kernel, and a veth or virtio underlay
/// (no NIC on the way) hands them over unfinished: a kernel receiver takes them as they are,
/// but here, in userspace, the inner stack would drop them as corrupt. When the field equals
/// that pseudo-header sum, the checksum is computed and written, and `true` returned. A
/// packet whose correct checksum happens to have that value is recomputed to the same value,
/// so a correct packet is never changed.
pub fn complete_partial_checksum(packet: &mut [u8], view: &Ipv4View) -> bool {
    if !has_partial_l4_checksum(packet, view) {
        return false;
    }
    let (check_at, l4) = match view.protocol {
        PROTO_TCP => (16, &mut packet[view.header_len..view.total_len]),
        _ => (6, &mut packet[view.header_len..view.total_len]),
    };
    let pseudo = pseudo_header_sum(view.src, view.dst, view.protocol, l4.len());
    l4[check_at..check_at + 2].fill(0);
    let mut sum = u32::from(!internet_checksum(l4)) + u32::from(pseudo);
    sum = (sum & 0xffff) + (sum >> 16);
    let mut checksum = !(sum as u16);
    if view.protocol == PROTO_UDP && checksum == 0 {
        checksum = 0xffff; // 0 means "no checksum" in UDP
    }
    l4[check_at..check_at + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// Whether the packet is TCP or UDP (not a fragment) whose checksum field holds only the
/// pseudo-header sum, as a kernel with checksum offload leaves it.
pub fn has_partial_l4_checksum(packet: &[u8], view: &Ipv4View) -> bool {
    if view.fragment_offset != 0 || view.more_fragments {
        return false;
    }
    let (check_at, min_len) = match view.protocol {
        PROTO_TCP => (16, 20),
        PROTO_UDP => (6, 8),
        _ => return false,
    };
    let Some(l4) = packet.get(view.header_len..view.total_len) else {
        return false;
    };
    if l4.len() < min_len {
        return false;
    }
    let field = read_u16(l4, check_at);
    if view.protocol == PROTO_UDP && field == 0 {
        return false; // UDP without a checksum
    }
    field == pseudo_header_sum(view.src, view.dst, view.protocol, l4.len())
}

/// For a TCP packet longer than `mtu` whose checksum is left partial (a sender's whole TSO
/// packet, which a veth or virtio underlay delivers unsegmented inside one datagram): the
/// TCP header's end and the segment size that fits `mtu`, so the kernel can segment it
/// (a virtio GSO header on a TUN write). `None` for anything else.
pub fn tcp_super_packet(packet: &[u8], view: &Ipv4View, mtu: usize) -> Option<(usize, usize)> {
    if view.protocol != PROTO_TCP || view.total_len <= mtu || !has_partial_l4_checksum(packet, view)
    {
        return None;
    }
    let tcp_header_len = usize::from(packet.get(view.header_len + 12)? >> 4) * 4;
    let headers = view.header_len + tcp_header_len;
    if tcp_header_len < 20 || headers >= mtu || headers >= view.total_len {
        return None;
    }
    Some((headers, mtu - headers))
}

/// The TCP/UDP pseudo-header's one's-complement sum, folded, not inverted (what a kernel
/// with checksum offload leaves in the field).
fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: usize) -> u16 {
    let words = |a: Ipv4Addr| {
        let o = a.octets();
        u32::from(u16::from_be_bytes([o[0], o[1]])) + u32::from(u16::from_be_bytes([o[2], o[3]]))
    };
    let mut sum = words(src) + words(dst) + u32::from(protocol) + l4_len as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Checks a packet received from the underlay before it is delivered into our subnet.
///
/// `sender_subnets` are the subnets leased by the host at the datagram's outer source
/// address (usually one; two while a host re-acquires). The sender is checked first so
/// that strangers learn nothing from which rule fired.
pub fn check_received(
    view: &Ipv4View,
    local_subnet: Ipv4Net,
    sender_subnets: &[Ipv4Net],
) -> Result<(), Counter> {
    if sender_subnets.is_empty() {
        return Err(Counter::DropUnknownSender);
    }
    if !local_subnet.contains(&view.dst) {
        return Err(Counter::DropNotOurSubnet);
    }
    // flannel defect fixed: without this any host could inject packets under any source.
    if !sender_subnets.iter().any(|net| net.contains(&view.src)) {
        return Err(Counter::DropSpoofedSource);
    }
    Ok(())
}

/// The ICMP errors the overlay originates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Type 3 code 0: the destination is inside the overlay network but no host leases it.
    NetUnreachable,
    /// Type 11 code 0: the TTL ran out in transit.
    TimeExceeded,
}

impl IcmpError {
    /// ICMP (type, code).
    pub const fn type_code(self) -> (u8, u8) {
        match self {
            IcmpError::NetUnreachable => (3, 0),
            IcmpError::TimeExceeded => (11, 0),
        }
    }
}

/// Whether the rules allow answering `packet` with an ICMP error (RFC 1812 4.3.2.7):
/// never for an ICMP error, a non-first fragment, or a packet whose source or destination
/// is not a single host (broadcast, multicast, unspecified, class E).
///
/// `subnet_prefix_len` is the lease length of the overlay (every lease of a flannel
/// network has the same length), used to spot directed broadcasts to a subnet.
pub fn may_send_icmp_error(packet: &[u8], view: &Ipv4View, subnet_prefix_len: u8) -> bool {
    if view.is_non_first_fragment() {
        return false;
    }
    if !is_single_host(view.src, subnet_prefix_len) || !is_single_host(view.dst, subnet_prefix_len)
    {
        return false;
    }
    if view.protocol == PROTO_ICMP {
        // A packet too short to show its ICMP type is treated as an error message.
        return match packet.get(view.header_len) {
            Some(&icmp_type) if view.header_len < view.total_len => !is_icmp_error_type(icmp_type),
            _ => false,
        };
    }
    true
}

/// ICMP types that are queries or replies, so that errors about them are allowed; every
/// other type (3, 4, 5, 11, 12, and anything unknown) is treated as an error message.
fn is_icmp_error_type(icmp_type: u8) -> bool {
    !matches!(icmp_type, 0 | 8 | 9 | 10 | 13..=18)
}

/// A unicast host address: not 0.0.0.0/8, loopback, multicast, class E, the limited
/// broadcast, nor the broadcast address of a subnet of length `subnet_prefix_len`.
fn is_single_host(addr: Ipv4Addr, subnet_prefix_len: u8) -> bool {
    let octets = addr.octets();
    if octets[0] == 0 || addr.is_loopback() || octets[0] >= 224 {
        return false;
    }
    if (1..=30).contains(&subnet_prefix_len) {
        let host_mask = u32::MAX >> subnet_prefix_len;
        if u32::from(addr) & host_mask == host_mask {
            return false;
        }
    }
    true
}

/// Builds an ICMP error about `packet` into `out` and returns its length, or `None` when
/// [`may_send_icmp_error`] forbids answering this packet.
///
/// The error goes from `source` (our subnet's gateway address) to the offending packet's
/// source, and quotes the packet's IP header (options included) and the first 8 bytes of
/// its payload, as received.
pub fn build_icmp_error(
    kind: IcmpError,
    packet: &[u8],
    view: &Ipv4View,
    source: Ipv4Addr,
    subnet_prefix_len: u8,
    out: &mut [u8; ICMP_ERROR_MAX_LEN],
) -> Option<usize> {
    if !may_send_icmp_error(packet, view, subnet_prefix_len) {
        return None;
    }
    let quoted_len = view
        .total_len
        .min(view.header_len + ICMP_QUOTED_PAYLOAD_LEN)
        .min(packet.len());
    let icmp_len = ICMP_ERROR_HEADER_LEN + quoted_len;
    let total_len = IPV4_MIN_HEADER_LEN + icmp_len;

    let (ip, rest) = out.split_at_mut(IPV4_MIN_HEADER_LEN);
    let icmp = &mut rest[..icmp_len];

    ip.copy_from_slice(&[0; IPV4_MIN_HEADER_LEN]);
    ip[0] = 0x45;
    // DSCP CS6 (internetwork control), as Linux marks the ICMP errors it originates.
    ip[1] = 0xc0;
    ip[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
    ip[8] = ICMP_ERROR_TTL;
    ip[9] = PROTO_ICMP;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&view.src.octets());
    let ip_checksum = internet_checksum(ip);
    ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());

    let (type_, code) = kind.type_code();
    icmp[..ICMP_ERROR_HEADER_LEN].copy_from_slice(&[type_, code, 0, 0, 0, 0, 0, 0]);
    icmp[ICMP_ERROR_HEADER_LEN..].copy_from_slice(&packet[..quoted_len]);
    let icmp_checksum = internet_checksum(icmp);
    icmp[2..4].copy_from_slice(&icmp_checksum.to_be_bytes());

    Some(total_len)
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn read_addr(buf: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3])
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
