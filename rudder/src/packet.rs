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
mod tests {
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
                assert!(
                    v.header_len >= 20 && v.header_len <= v.total_len && v.total_len <= p.len()
                );
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
}
