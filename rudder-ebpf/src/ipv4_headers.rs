//! Writing IPv4 headers: the outer IPv4 + UDP header around an inner packet of either
//! family, TTL and TOS patches with their checksum, and the inner header checksum check.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_get_prandom_u32},
    programs::TcContext,
};
use rudder_ebpf::{Counter, DataplaneConfig, ENCAP_OVERHEAD, OUTER_TTL};

use crate::programs::{
    be16, io_error, IPPROTO_UDP, IPV4_HLEN, IP_DF, L3_OFF, SRC_PORT_BASE, SRC_PORT_MASK, UDP_HLEN,
    UDP_OFF,
};

/// Folds a 32-bit one's complement sum to 16 bits.
#[inline(always)]
pub(crate) fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's complement sum of a 20-byte header, read as big-endian 16-bit words.
#[inline(always)]
pub(crate) fn sum_header(hdr: &[u8; IPV4_HLEN]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_HLEN {
        sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    sum
}

/// Inserts outer IPv4 + UDP between the Ethernet header and `inner` (the packet's
/// current IPv4 header).
#[inline(always)]
pub(crate) fn encapsulate(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    inner: &[u8; IPV4_HLEN],
    peer_ip: [u8; 4],
) -> Result<(), Counter> {
    encapsulate_in_ipv4(
        ctx,
        cfg,
        be16(inner, 2),
        inner[1],
        be16(inner, 6) & IP_DF,
        peer_ip,
    )
}

/// Inserts outer IPv4 + UDP between the Ethernet header and an inner packet of either
/// family (`inner_len` bytes, TOS or traffic class `tos`, `df` the outer DF bit).
#[inline(always)]
pub(crate) fn encapsulate_in_ipv4(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    inner_len: u16,
    tos: u8,
    df: u16,
    peer_ip: [u8; 4],
) -> Result<(), Counter> {
    // SAFETY: helper calls on the program's own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let inner_frag = df;
    let outer_id: u16 = if inner_frag & IP_DF != 0 {
        0
    } else {
        // Without DF the outer packet may be fragmented: ids must vary.
        // SAFETY: plain helper call.
        unsafe { bpf_get_prandom_u32() as u16 }
    };

    ctx.adjust_room(
        i32::from(ENCAP_OVERHEAD),
        BPF_ADJ_ROOM_MAC,
        u64::from(
            BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        ),
    )
    .map_err(|e| io_error(ctx, "encap: bpf_skb_adjust_room", e))?;

    // A GSO packet's lengths are rewritten per segment; clamp the super-packet's value.
    let outer_len = (u32::from(inner_len) + u32::from(ENCAP_OVERHEAD)).min(0xffff) as u16;
    let udp_len = outer_len - IPV4_HLEN as u16;
    let src_port = SRC_PORT_BASE | ((hash ^ (hash >> 16)) & SRC_PORT_MASK) as u16;

    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[1] = tos; // TOS/ECN follows the inner packet
    ip[2..4].copy_from_slice(&outer_len.to_be_bytes());
    ip[4..6].copy_from_slice(&outer_id.to_be_bytes());
    ip[6..8].copy_from_slice(&(inner_frag & IP_DF).to_be_bytes());
    ip[8] = OUTER_TTL;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&cfg.local_ip);
    ip[16..20].copy_from_slice(&peer_ip);
    let csum = !fold(sum_header(&ip));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());

    let mut udp = [0u8; UDP_HLEN];
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&cfg.udp_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    // udp[6..8] = 0: no UDP checksum, legal over IPv4 and what keeps GSO cheap.

    if ctx.store(L3_OFF, &ip, 0).is_err() || ctx.store(UDP_OFF, &udp, 0).is_err() {
        return Err(Counter::DropIoError);
    }
    Ok(())
}

/// Writes `ttl - 1` into the IPv4 header at `l3_off` and patches its checksum
/// (TTL is the high byte of the TTL/protocol word).
#[inline(always)]
pub(crate) fn decrement_ttl(
    ctx: &TcContext,
    l3_off: usize,
    ttl: u8,
    protocol: u8,
) -> Result<(), Counter> {
    set_header_byte(ctx, l3_off, 8, [ttl, protocol], ttl - 1)
}

/// Writes `new` into the IPv4 header byte at `l3_off + at` and patches the header checksum
/// for the 16-bit word holding it, which was `old_word` (`at` even: the byte is its high
/// half; odd: its low half).
#[inline(always)]
pub(crate) fn set_header_byte(
    ctx: &TcContext,
    l3_off: usize,
    at: usize,
    old_word: [u8; 2],
    new: u8,
) -> Result<(), Counter> {
    let mut new_word = old_word;
    new_word[at % 2] = new;
    if ctx.store(l3_off + at, &new, 0).is_err()
        || ctx
            .l3_csum_replace(
                l3_off + 10,
                u64::from(u16::from_be_bytes(old_word).to_be()),
                u64::from(u16::from_be_bytes(new_word).to_be()),
                2,
            )
            .is_err()
    {
        return Err(Counter::DropIoError);
    }
    Ok(())
}

/// Writes `new_tos` into the IPv4 header at `l3_off` and patches its checksum (TOS is the
/// low byte of the version/IHL/TOS word).
#[inline(always)]
pub(crate) fn set_tos(
    ctx: &TcContext,
    l3_off: usize,
    version_ihl: u8,
    old_tos: u8,
    new_tos: u8,
) -> Result<(), Counter> {
    set_header_byte(ctx, l3_off, 1, [version_ihl, old_tos], new_tos)
}

/// Verifies the inner header checksum, options included (IHL up to 15 words).
#[inline(always)]
pub(crate) fn header_checksum_ok(
    ctx: &TcContext,
    inner_off: usize,
    base: &[u8; IPV4_HLEN],
    header_len: u32,
) -> bool {
    let mut sum = sum_header(base);
    let mut off = IPV4_HLEN as u32;
    while off < 60 {
        if off >= header_len {
            break;
        }
        let Ok(word) = ctx.load::<[u8; 4]>(inner_off + off as usize) else {
            return false;
        };
        sum += u32::from(be16(&word, 0)) + u32::from(be16(&word, 2));
        off += 4;
    }
    fold(sum) == 0xffff
}
