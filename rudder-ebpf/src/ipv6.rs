//! Inner IPv6 on the stack path: `rudder_egress` encapsulates IPv6 packets the kernel routed
//! to a peer's IPv6 subnet (through a placeholder gateway, see `routes6.rs`) and redirects
//! them to the outer destination's neighbour, and
//! `rudder_ingress` decapsulates overlay datagrams carrying IPv6 and hands them to the stack,
//! whose forwarding makes the router hop (hop limit, "time exceeded"). The checks are the
//! TUN rules of `rudder/src/packet6.rs` and `dataplane/forwarding6.rs`, in the same order.
//! The IPv6 bridge fast path and the direct delivery into containers: `ipv6_fast.rs`.

use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT,
    },
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_redirect_neigh, bpf_skb_load_bytes},
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
    programs::TcContext,
};
use rudder_ebpf::{
    ipv6_in_subnet, mapped_ipv4, Counter, DataplaneConfig, DataplaneConfig6, PeerValue, PeerValue6,
    Senders6, UnderlayAddr, MAX_PEERS,
};

use crate::ipv4_headers::encapsulate_in_ipv4;
use crate::programs::{
    add_traffic, be16, count, drop_with, io_error, is_gso, l3_len, pass, ECN_CE, ECN_MASK,
    ECN_NOT_ECT, ETH_P_IP, IP_DF, L3_OFF, TCX_NEXT,
};
use crate::train_senders::to_socket_path;

pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;

// Extension headers `packet6::parse_ipv6` walks.
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_ESP: u8 = 50;
const NEXT_AH: u8 = 51;
const NEXT_NONE: u8 = 59;
const NEXT_DESTINATION_OPTIONS: u8 = 60;
const MAX_EXTENSION_HEADERS: u32 = 8;

#[map(name = "RUDDER_CONFIG6")]
static CONFIG6: Array<DataplaneConfig6> = Array::with_max_entries(1, 0);

/// Peer IPv6 subnet → the peer's underlay address (either family) and traffic slot.
#[map(name = "RUDDER_PEERS6")]
static PEERS6: LpmTrie<[u8; 16], PeerValue6> = LpmTrie::with_max_entries(MAX_PEERS, 0);

/// Underlay address (IPv4-mapped or IPv6) → how many IPv6 subnets its host leases.
#[map(name = "RUDDER_SENDERS6")]
pub(crate) static SENDERS6: HashMap<UnderlayAddr, Senders6> =
    HashMap::with_max_entries(MAX_PEERS, 0);

/// The peer entry holding `dst`: (its underlay address, its traffic id).
#[inline(always)]
pub(crate) fn peer6(dst: &[u8; 16]) -> Option<(UnderlayAddr, u32)> {
    PEERS6
        .get(Key::new(128, *dst))
        .map(|peer| (peer.underlay, peer.traffic_id))
}

#[inline(always)]
pub(crate) fn config6() -> Option<&'static DataplaneConfig6> {
    CONFIG6.get(0).filter(|c| c.enabled != 0)
}

#[inline(always)]
pub(crate) fn in_network(a: &[u8; 16], cfg: &DataplaneConfig6) -> bool {
    ipv6_in_subnet(a, &cfg.network, &cfg.network_mask)
}

#[inline(always)]
fn in_local_subnet(a: &[u8; 16], cfg: &DataplaneConfig6) -> bool {
    ipv6_in_subnet(a, &cfg.local_subnet, &cfg.local_mask)
}

/// The upper layer after the extension headers, as `packet6::parse_ipv6` finds it.
#[derive(Clone, Copy)]
struct UpperLayer {
    protocol: u8,
    /// From the start of the IPv6 header.
    offset: u32,
    non_first_fragment: bool,
}

/// State of `parse_ipv6`'s extension-header walk, one `bpf_loop` round per header: the
/// verifier checks the round once instead of every unrolled path (measured: the walk as a
/// plain loop cost ~40000-80000 verified instructions per call site).
#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    l3_off: u32,
    total_len: u32,
    /// Where the current header starts, from the IPv6 header.
    at: u32,
    protocol: u8,
    seen_fragment: u8,
    non_first_fragment: u8,
    /// 0 while walking, [`WALK_DONE`] or [`WALK_MALFORMED`].
    state: u8,
}

const WALK_DONE: u8 = 1;
const WALK_MALFORMED: u8 = 2;

#[inline(always)]
fn load_at<const N: usize>(w: &Walk, off: u32) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    // SAFETY: `w.skb` is the program's context; `out` is N writable bytes.
    let ret = unsafe {
        bpf_skb_load_bytes(
            w.skb as *const c_void,
            w.l3_off + off,
            out.as_mut_ptr() as *mut c_void,
            N as u32,
        )
    };
    (ret == 0).then_some(out)
}

/// One round of the walk: round `walked` looks at the header at `w.at`. Returns 1 to stop.
extern "C" fn walk_round(walked: u32, data: *mut c_void) -> i64 {
    // SAFETY: `bpf_loop` passes back the pointer `upper_layer` gave it.
    let w = unsafe { &mut *(data as *mut Walk) };
    let header_len = match w.protocol {
        NEXT_HOP_BY_HOP if walked > 0 => 0,
        NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DESTINATION_OPTIONS => {
            load_at::<1>(w, w.at + 1).map_or(0, |[len]| (u32::from(len) + 1) * 8)
        }
        NEXT_FRAGMENT => 8,
        NEXT_AH => load_at::<1>(w, w.at + 1).map_or(0, |[len]| (u32::from(len) + 2) * 4),
        // ESP, No Next Header and every upper layer end the walk.
        _ => {
            w.state = WALK_DONE;
            return 1;
        }
    };
    if header_len == 0 || walked == MAX_EXTENSION_HEADERS || w.at + header_len > w.total_len {
        w.state = WALK_MALFORMED;
        return 1;
    }
    let Some([next, _, offset_hi, offset_lo]) = load_at::<4>(w, w.at) else {
        w.state = WALK_MALFORMED;
        return 1;
    };
    if w.protocol == NEXT_FRAGMENT {
        if w.seen_fragment != 0 {
            w.state = WALK_MALFORMED;
            return 1;
        }
        w.seen_fragment = 1;
        if u16::from_be_bytes([offset_hi, offset_lo]) >> 3 != 0 {
            // Fragment data follows: nothing more to walk.
            w.non_first_fragment = 1;
            w.protocol = next;
            w.at += header_len;
            w.state = WALK_DONE;
            return 1;
        }
    }
    w.protocol = next;
    w.at += header_len;
    0
}

/// `parse_ipv6`'s walk over the packet at `l3_off` (`total_len` bytes, first next header
/// `next`); `None` is [`Counter::DropMalformed`].
#[inline(always)]
fn upper_layer(ctx: &TcContext, l3_off: usize, next: u8, total_len: u32) -> Option<UpperLayer> {
    let mut walk = Walk {
        skb: ctx.skb.skb,
        l3_off: l3_off as u32,
        total_len,
        at: IPV6_HLEN as u32,
        protocol: next,
        seen_fragment: 0,
        non_first_fragment: 0,
        state: 0,
    };
    // SAFETY: the callback only touches `walk`, which outlives the call.
    unsafe {
        bpf_loop(
            MAX_EXTENSION_HEADERS + 1,
            walk_round as *mut c_void,
            &mut walk as *mut Walk as *mut c_void,
            0,
        )
    };
    (walk.state == WALK_DONE).then_some(UpperLayer {
        protocol: walk.protocol,
        offset: walk.at,
        non_first_fragment: walk.non_first_fragment != 0,
    })
}

#[inline(always)]
fn is_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// `packet6::check_overlay_scope` for the IPv6 packet at `l3_off`: what must never cross
/// the overlay (neighbour discovery, link-local or multicast addresses, an unspecified
/// source).
// Out of line: reads the addresses itself, keeping its callers' stack frames small.
#[inline(never)]
fn out_of_overlay_scope(
    ctx: &TcContext,
    l3_off: usize,
    upper: &UpperLayer,
    total_len: u32,
) -> bool {
    let (Ok(src), Ok(dst)) = (
        ctx.load::<[u8; 16]>(l3_off + 8),
        ctx.load::<[u8; 16]>(l3_off + 24),
    ) else {
        return true;
    };
    if is_link_local(&src) || is_link_local(&dst) || dst[0] == 0xff || src[0] == 0xff {
        return true;
    }
    if src == [0u8; 16] {
        return true;
    }
    let has_l4 = !upper.non_first_fragment && !matches!(upper.protocol, NEXT_ESP | NEXT_NONE);
    if upper.protocol != IPPROTO_ICMPV6 || !has_l4 || upper.offset >= total_len {
        return false;
    }
    matches!(
        ctx.load::<u8>(l3_off + upper.offset as usize),
        Ok(133..=137)
    )
}

/// Outer IPv4 + UDP around the IPv6 packet at `L3_OFF`, DF set: routers never fragment
/// IPv6, so neither may the underlay fragment its carrier.
#[inline(never)]
pub(crate) fn encapsulate_ipv6_in_ipv4(
    ctx: &TcContext,
    cfg: &DataplaneConfig,
    total_len: u32,
    traffic_class: u8,
    peer_ip: [u8; 4],
) -> u32 {
    if let Err(counter) =
        encapsulate_in_ipv4(ctx, cfg, total_len as u16, traffic_class, IP_DF, peer_ip)
    {
        return counter as u32;
    }
    // The helper set skb->protocol to IPv4; the frame must say so too.
    if ctx.store(L3_OFF - 2, &ETH_P_IP.to_be_bytes(), 0).is_err() {
        return Counter::DropIoError as u32;
    }
    OK
}

/// "No counter": success of an out-of-line step that returns a [`Counter`] index.
pub(crate) const OK: u32 = u32::MAX;

/// The walk and the scope rule for the IPv6 packet at `L3_OFF`: [`OK`], or the counter.
// Out of line: the walk's state lives in this frame, not in `egress6`'s.
#[inline(never)]
pub(crate) fn egress_checks(ctx: &TcContext, next: u8, total_len: u32) -> u32 {
    let Some(upper) = upper_layer(ctx, L3_OFF, next, total_len) else {
        return Counter::DropMalformed as u32;
    };
    if out_of_overlay_scope(ctx, L3_OFF, &upper, total_len) {
        return Counter::DropNoRoute as u32;
    }
    OK
}

/// `rudder_egress` for an IPv6 packet the stack routed out of the underlay device.
// Out of line, as `decap_ipv6_inner`: its own stack frame, not added to the IPv4 path's.
#[inline(never)]
pub(crate) fn egress6(ctx: &TcContext, cfg: &DataplaneConfig) -> i32 {
    let Some(cfg6) = config6() else {
        return pass(ctx);
    };
    let (Ok(hdr), Ok(dst)) = (
        ctx.load::<[u8; 8]>(L3_OFF),
        ctx.load::<[u8; 16]>(L3_OFF + 24),
    ) else {
        return pass(ctx);
    };
    if hdr[0] >> 4 != 6 {
        return pass(ctx);
    }
    let Some(peer) = PEERS6.get(Key::new(128, dst)) else {
        // Overlay traffic without a peer must not leak unencapsulated onto the underlay;
        // the underlay's own IPv6 (neighbour discovery included) is not ours.
        if in_network(&dst, cfg6) && !in_local_subnet(&dst, cfg6) {
            return drop_with(ctx, Counter::DropNoRoute);
        }
        return pass(ctx);
    };
    let total_len = IPV6_HLEN as u32 + u32::from(be16(&hdr, 4));
    match egress_checks(ctx, hdr[6], total_len) {
        OK => {}
        counter if counter == Counter::DropMalformed as u32 => {
            return drop_with(ctx, Counter::DropMalformed)
        }
        _ => return drop_with(ctx, Counter::DropNoRoute),
    }
    // The peer routes carry the overlay MTU: the stack already sent "packet too big".
    if !is_gso(ctx) && total_len > u32::from(cfg.overlay_mtu) {
        return drop_with(ctx, Counter::DropTooBig);
    }
    let traffic_class = (hdr[0] << 4) | (hdr[1] >> 4);
    let inner_bytes = l3_len(ctx);
    let traffic_id = peer.traffic_id;
    let result = match mapped_ipv4(&peer.underlay) {
        Some(peer_ip) => encapsulate_ipv6_in_ipv4(ctx, cfg, total_len, traffic_class, peer_ip),
        None => crate::ipv6_outer::encapsulate_in_ipv6(
            ctx,
            cfg,
            total_len,
            traffic_class,
            &peer.underlay,
        ),
    };
    if result != OK {
        count_drop(ctx, result);
        return TC_ACT_SHOT as i32;
    }
    count(Counter::Encapsulated, inner_bytes);
    add_traffic_of(traffic_id, false, inner_bytes);
    // The IPv6 peer routes lead to a placeholder gateway (the kernel has no IPv6 routes with
    // IPv4 gateways): the outer IPv4 destination's route and ARP entry give the real MACs.
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

#[inline(always)]
pub(crate) fn add_traffic_of(traffic_id: u32, rx: bool, bytes: u32) {
    add_traffic(&PeerValue::new([0; 4], traffic_id), rx, bytes);
}

/// Counts a drop by the counter index an out-of-line step returned.
#[inline(always)]
pub(crate) fn count_drop(ctx: &TcContext, counter: u32) {
    let counter = if counter == Counter::DropIoError as u32 {
        Counter::DropIoError
    } else {
        Counter::DropNoRoute
    };
    count(counter, l3_len(ctx));
}

/// Decapsulates an overlay datagram from underlay address `sender` whose payload (at
/// `inner_off`) is IPv6, in the order of `forwarding6::decide_inbound6`, and hands the inner
/// packet to the stack. `outer_ecn_byte` is the outer TOS (or traffic class).
#[inline(never)]
pub(crate) fn decap_ipv6_inner(
    ctx: &TcContext,
    sender: &UnderlayAddr,
    outer_ecn_byte: u8,
    inner_off: usize,
) -> i32 {
    let Some(cfg6) = config6() else {
        return drop_with(ctx, Counter::DropNotIpv4);
    };
    let payload_len = ctx.len().saturating_sub(inner_off as u32);
    // Only the first 8 bytes live on the stack: the addresses are read where they are needed.
    let Ok(hdr) = ctx.load::<[u8; 8]>(inner_off) else {
        return drop_with(ctx, Counter::DropTruncated);
    };
    if payload_len < IPV6_HLEN as u32 {
        return drop_with(ctx, Counter::DropTruncated);
    }
    let ipv6_payload = u32::from(be16(&hdr, 4));
    if ipv6_payload == 0 {
        // A jumbogram: no overlay MTU carries one.
        return drop_with(ctx, Counter::DropMalformed);
    }
    let total_len = IPV6_HLEN as u32 + ipv6_payload;
    if total_len > payload_len {
        return drop_with(ctx, Counter::DropTruncated);
    }
    // A UDP GSO train, which only the daemon's socket can split, or a datagram behind one.
    if to_socket_path(ctx, sender, is_gso(ctx) && total_len < payload_len) {
        return TCX_NEXT;
    }
    let Some(upper) = upper_layer(ctx, inner_off, hdr[6], total_len) else {
        return drop_with(ctx, Counter::DropMalformed);
    };
    // `packet6::check_received6`: the sender holds IPv6 subnets, the destination is ours,
    // the source lies in one of the sender's subnets.
    // SAFETY: the value is copied out at once.
    let sender_subnets = unsafe { SENDERS6.get(sender) }.map_or(0, |s| s.ipv6_subnets);
    if sender_subnets == 0 {
        return drop_with(ctx, Counter::DropUnknownSender);
    }
    let (Ok(src), Ok(dst)) = (
        ctx.load::<[u8; 16]>(inner_off + 8),
        ctx.load::<[u8; 16]>(inner_off + 24),
    ) else {
        return drop_with(ctx, Counter::DropTruncated);
    };
    if !in_local_subnet(&dst, cfg6) {
        return drop_with(ctx, Counter::DropNotOurSubnet);
    }
    let Some(owner) = PEERS6
        .get(Key::new(128, src))
        .filter(|peer| peer.underlay == *sender)
    else {
        return drop_with(ctx, Counter::DropSpoofedSource);
    };
    let traffic_id = owner.traffic_id;
    if out_of_overlay_scope(ctx, inner_off, &upper, total_len) {
        return drop_with(ctx, Counter::DropNoRoute);
    }
    // RFC 6040 as `packet6::decapsulate_ecn6`; the ECN bits are bits 4-5 of byte 1.
    let inner_ecn = (hdr[1] >> 4) & ECN_MASK;
    let mark_ce = outer_ecn_byte & ECN_MASK == ECN_CE && inner_ecn != ECN_CE;
    if mark_ce && inner_ecn == ECN_NOT_ECT {
        return drop_with(ctx, Counter::DropCeNotEct);
    }
    let overhead = (inner_off - L3_OFF) as i32;
    // FIXED_GSO keeps the inner MSS; DECAP_L3_IPV6 sets skb->protocol to the inner family.
    if let Err(e) = ctx.adjust_room(
        -overhead,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV6),
    ) {
        return drop_with(ctx, io_error(ctx, "decap6: bpf_skb_adjust_room", e));
    }
    let byte1 = if mark_ce {
        hdr[1] | (ECN_CE << 4)
    } else {
        hdr[1]
    };
    if ctx.store(L3_OFF - 2, &ETH_P_IPV6.to_be_bytes(), 0).is_err()
        || (mark_ce && ctx.store(L3_OFF + 1, &byte1, 0).is_err())
    {
        return drop_with(ctx, Counter::DropIoError);
    }
    let inner_bytes = l3_len(ctx);
    // A reply of a flow the stack forwarded (maybe NAT'd) goes up for conntrack. (Checked
    // here, not in `prepare_delivery6`: one call deeper would overflow the BPF stack.)
    let endpoint = if crate::stack_flows::reply_to_stack_flow6(ctx) {
        Ok(None)
    } else {
        crate::ipv6_fast::prepare_delivery6(ctx, hdr[7])
    };
    let Ok(endpoint) = endpoint else {
        return drop_with(ctx, Counter::DropIoError);
    };
    count(Counter::Decapsulated, inner_bytes);
    add_traffic_of(traffic_id, true, inner_bytes);
    match endpoint {
        Some(host_ifindex) => crate::ipv6_fast::redirect_peer(host_ifindex),
        // Up the stack: the kernel's forwarding makes the hop (hop limit, "time exceeded").
        None => TC_ACT_OK as i32,
    }
}
