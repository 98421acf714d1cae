//! The IPv6 outer header (peers reached at their PublicIPv6), for both inner families: hop
//! limit 64, traffic class from the inner packet, flow label from the flow hash, UDP
//! checksum zero (RFC 6935/6936 tunnel rules, which keep GSO of the encapsulated packet
//! possible). The routes lead to the placeholder gateway of `routes6.rs`, so every packet
//! leaves through `bpf_redirect_neigh` (the outer destination's route and neighbour entry
//! give the MACs). Ingress accepts overlay datagrams to our PublicIPv6 and port, zero
//! checksum or not (the programs read before the UDP stack), and hands the inner packet to
//! the stack after the same checks as over IPv4.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh, BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_redirect_neigh},
    macros::map,
    maps::{lpm_trie::Key, LpmTrie},
    programs::TcContext,
};
use rudder_ebpf::{
    ipv4_in_subnet, Counter, DataplaneConfig, DataplaneConfig6, PeerValue6, UnderlayAddr,
    ENCAP_OVERHEAD6, MAX_PEERS, OUTER_TTL,
};

use crate::ipv4_headers::{header_checksum_ok, set_tos};
use crate::ipv6::{
    add_traffic_of, config6, count_drop, decap_ipv6_inner, in_network, ETH_P_IPV6, OK, SENDERS6,
};
use crate::programs::{
    addr, be16, count, drop_with, io_error, is_gso, l3_len, pass, ECN_CE, ECN_MASK, ECN_NOT_ECT,
    ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, L3_OFF, SRC_PORT_BASE, SRC_PORT_MASK, TCX_NEXT, UDP_HLEN,
};
use crate::train_senders::to_socket_path;

const IPV6_HLEN: usize = 40;
/// Where the inner packet starts behind an outer IPv6 + UDP header.
const INNER_OFF6: usize = L3_OFF + IPV6_HLEN + UDP_HLEN;

/// IPv4 peer subnets whose host is reached over IPv6 → its PublicIPv6 and traffic slot
/// (those over IPv4 stay in `RUDDER_PEERS`).
#[map(name = "RUDDER_PEERS46")]
static PEERS46: LpmTrie<[u8; 4], PeerValue6> = LpmTrie::with_max_entries(MAX_PEERS, 0);

/// Inserts outer IPv6 + UDP between the Ethernet header and the inner packet (`inner_len`
/// bytes, traffic class or TOS `traffic_class`) towards `peer`; returns [`OK`] or a counter.
#[inline(never)]
pub(crate) fn encapsulate_in_ipv6(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    inner_len: u32,
    traffic_class: u8,
    peer: &UnderlayAddr,
) -> u32 {
    let Some(cfg6) = config6() else {
        return Counter::DropNoRoute as u32;
    };
    if cfg6.local_ip == [0; 16] {
        // No PublicIPv6 here: the control plane never picks an IPv6 outer header then.
        return Counter::DropNoRoute as u32;
    }
    // SAFETY: helper call on the program's own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    if let Err(e) = ctx.adjust_room(
        i32::from(ENCAP_OVERHEAD6),
        BPF_ADJ_ROOM_MAC,
        u64::from(
            BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        ),
    ) {
        return io_error(ctx, "encap6: bpf_skb_adjust_room", e) as u32;
    }
    // A GSO packet's lengths are rewritten per segment; clamp the super-packet's value.
    let udp_len = (inner_len + UDP_HLEN as u32).min(0xffff) as u16;
    // Never 0 ("unlabelled", RFC 6437), as `packet6::outer_flow_label`.
    let mut label = (hash ^ (hash >> 20)) & 0x000f_ffff;
    if label == 0 {
        label = 1;
    }
    let first_word = (6u32 << 28) | (u32::from(traffic_class) << 20) | label;
    let mut ip = [0u8; IPV6_HLEN];
    ip[0..4].copy_from_slice(&first_word.to_be_bytes());
    ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
    ip[6] = IPPROTO_UDP;
    ip[7] = OUTER_TTL;
    ip[8..24].copy_from_slice(&cfg6.local_ip);
    ip[24..40].copy_from_slice(peer);
    let src_port = SRC_PORT_BASE | ((hash ^ (hash >> 16)) & SRC_PORT_MASK) as u16;
    let mut udp = [0u8; UDP_HLEN];
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&cfg.udp_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    // udp[6..8] = 0: RFC 6935/6936 zero checksum for tunnels; every rudder accepts it.
    if ctx.store(L3_OFF - 2, &ETH_P_IPV6.to_be_bytes(), 0).is_err()
        || ctx.store(L3_OFF, &ip, 0).is_err()
        || ctx.store(L3_OFF + IPV6_HLEN, &udp, 0).is_err()
    {
        return Counter::DropIoError as u32;
    }
    OK
}

#[inline(always)]
fn redirect_to_underlay(cfg: &DataplaneConfig) -> i32 {
    // SAFETY: a null params pointer with length 0 is the documented "do the lookup" form.
    unsafe {
        bpf_redirect_neigh(
            cfg.underlay_ifindex,
            core::ptr::null_mut::<bpf_redir_neigh>(),
            0,
            0,
        ) as i32
    }
}

/// `rudder_egress` for an IPv4 packet without an IPv4-underlay peer: if its destination's
/// host is reached over IPv6, encapsulates it so and returns the verdict.
#[inline(never)]
pub(crate) fn egress_ipv4_over_ipv6(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    inner: &[u8; IPV4_HLEN],
) -> Option<i32> {
    let peer = PEERS46.get(Key::new(32, addr(inner, 16)))?;
    let inner_len = be16(inner, 2);
    if !is_gso(ctx) && inner_len > cfg.overlay_mtu {
        return Some(drop_with(ctx, Counter::DropTooBig));
    }
    let traffic_id = peer.traffic_id;
    let inner_bytes = l3_len(ctx);
    let result = encapsulate_in_ipv6(ctx, cfg, u32::from(inner_len), inner[1], &peer.underlay);
    if result != OK {
        count_drop(ctx, result);
        return Some(TC_ACT_SHOT as i32);
    }
    count(Counter::Encapsulated, inner_bytes);
    add_traffic_of(traffic_id, false, inner_bytes);
    Some(redirect_to_underlay(cfg))
}

/// `rudder_ingress` for a frame whose outer header is IPv6: overlay datagrams to our
/// PublicIPv6 are decapsulated; a plain IPv6 packet between overlay addresses is forged
/// (only the tunnel carries those), as for IPv4; everything else is the underlay's.
#[inline(never)]
pub(crate) fn ingress_ipv6_outer(ctx: &TcContext, cfg: &DataplaneConfig) -> i32 {
    let Some(cfg6) = config6() else {
        return pass(ctx);
    };
    let Ok(head) = ctx.load::<[u8; 8]>(L3_OFF) else {
        return pass(ctx);
    };
    if head[0] >> 4 != 6 {
        return pass(ctx);
    }
    if forged_overlay_packet(ctx, cfg6) {
        return drop_with(ctx, Counter::DropUnencapsulated);
    }
    // Only UDP right after the header (no extension headers, no fragments) to our
    // PublicIPv6 and port is overlay traffic.
    if head[6] != IPPROTO_UDP || !to_our_public_ipv6(ctx, cfg6) {
        return pass(ctx);
    }
    let Ok(udp) = ctx.load::<[u8; 4]>(L3_OFF + IPV6_HLEN) else {
        return pass(ctx);
    };
    if be16(&udp, 2) != cfg.udp_port {
        return pass(ctx);
    }
    let Ok(sender) = ctx.load::<UnderlayAddr>(L3_OFF + 8) else {
        return pass(ctx);
    };
    let outer_traffic_class = (head[0] << 4) | (head[1] >> 4);
    let Ok(first) = ctx.load::<u8>(INNER_OFF6) else {
        return drop_with(ctx, Counter::DropTruncated);
    };
    match first >> 4 {
        6 => decap_ipv6_inner(ctx, &sender, outer_traffic_class, INNER_OFF6),
        4 => decap_ipv4_inner(ctx, cfg, &sender, outer_traffic_class),
        _ => drop_with(ctx, Counter::DropNotIpv4),
    }
}

/// Source and destination both in the overlay network: only the tunnel carries those.
// Out of line, as the next one: keeps `ingress_ipv6_outer`'s frame small.
#[inline(never)]
fn forged_overlay_packet(ctx: &TcContext, cfg6: &DataplaneConfig6) -> bool {
    let (Ok(src), Ok(dst)) = (
        ctx.load::<[u8; 16]>(L3_OFF + 8),
        ctx.load::<[u8; 16]>(L3_OFF + 24),
    ) else {
        return false;
    };
    in_network(&src, cfg6) && in_network(&dst, cfg6)
}

#[inline(never)]
fn to_our_public_ipv6(ctx: &TcContext, cfg6: &DataplaneConfig6) -> bool {
    let Ok(dst) = ctx.load::<[u8; 16]>(L3_OFF + 24) else {
        return false;
    };
    cfg6.local_ip != [0; 16] && dst == cfg6.local_ip
}

/// The IPv4 ingress checks (`programs.rs`, the order of `forwarding::decide_inbound`) for
/// an IPv4 packet that came over IPv6 from `sender`; delivered up the stack.
#[inline(never)]
fn decap_ipv4_inner(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    sender: &UnderlayAddr,
    outer_ecn_byte: u8,
) -> i32 {
    let payload_len = ctx.len().saturating_sub(INNER_OFF6 as u32);
    let Ok(inner) = ctx.load::<[u8; IPV4_HLEN]>(INNER_OFF6) else {
        return drop_with(ctx, Counter::DropTruncated);
    };
    let header_len = u32::from(inner[0] & 0x0f) * 4;
    let total_len = u32::from(be16(&inner, 2));
    if header_len < IPV4_HLEN as u32 || total_len < header_len {
        return drop_with(ctx, Counter::DropMalformed);
    }
    if total_len > payload_len {
        return drop_with(ctx, Counter::DropTruncated);
    }
    // A UDP GSO train, which only the daemon's socket can split, or a datagram behind one.
    if to_socket_path(ctx, sender, is_gso(ctx) && total_len < payload_len) {
        return TCX_NEXT;
    }
    if !header_checksum_ok(ctx, INNER_OFF6, &inner, header_len) {
        return drop_with(ctx, Counter::DropMalformed);
    }
    if !ipv4_in_subnet(addr(&inner, 16), cfg.local_subnet, cfg.local_prefix_len) {
        return drop_with(ctx, Counter::DropNotOurSubnet);
    }
    let owner = PEERS46
        .get(Key::new(32, addr(&inner, 12)))
        .filter(|peer| peer.underlay == *sender);
    let Some(owner) = owner else {
        // SAFETY: the value is copied out at once.
        let known = unsafe { SENDERS6.get(sender) }.is_some_and(|s| s.ipv4_subnets > 0);
        return drop_with(
            ctx,
            if known {
                Counter::DropSpoofedSource
            } else {
                Counter::DropUnknownSender
            },
        );
    };
    let traffic_id = owner.traffic_id;
    let inner_tos = inner[1];
    let mark_ce = outer_ecn_byte & ECN_MASK == ECN_CE && inner_tos & ECN_MASK != ECN_CE;
    if mark_ce && inner_tos & ECN_MASK == ECN_NOT_ECT {
        return drop_with(ctx, Counter::DropCeNotEct);
    }
    if let Err(e) = ctx.adjust_room(
        -i32::from(ENCAP_OVERHEAD6),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
    ) {
        return drop_with(ctx, io_error(ctx, "decap4of6: bpf_skb_adjust_room", e));
    }
    if ctx.store(L3_OFF - 2, &ETH_P_IP.to_be_bytes(), 0).is_err() {
        return drop_with(ctx, Counter::DropIoError);
    }
    if mark_ce {
        if let Err(counter) = set_tos(ctx, L3_OFF, inner[0], inner_tos, inner_tos | ECN_CE) {
            return drop_with(ctx, counter);
        }
    }
    let inner_bytes = l3_len(ctx);
    // Up the stack, whose forwarding makes the router hop.
    count(Counter::Decapsulated, inner_bytes);
    add_traffic_of(traffic_id, true, inner_bytes);
    TC_ACT_OK as i32
}
