//! The IPv6 fast paths, as the IPv4 ones in `programs.rs`: `rudder_br_in` encapsulates a
//! local container's IPv6 packet for a peer (either outer family) and redirects it straight
//! to the underlay, and `rudder_ingress` hands a decapsulated IPv6 packet for a known local
//! container (`RUDDER_ENDPTS6`) straight into its namespace. Both make the router hop the
//! host's forwarding would (hop limit - 1); whatever the stack must answer (hop limit
//! running out, Packet Too Big) or never crosses the overlay (neighbour discovery,
//! link-local, multicast) is left to it.

use aya_ebpf::{
    bindings::{bpf_redir_neigh, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect_neigh, bpf_redirect_peer},
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use rudder_ebpf::{
    mapped_ipv4, Counter, DataplaneConfig, LocalEndpoint, MAX_LOCAL_ENDPOINTS, STACK_MARK,
};

use crate::ipv6::{
    add_traffic_of, config6, count_drop, egress_checks, encapsulate_ipv6_in_ipv4, peer6, OK,
};
use crate::programs::{
    be16, count, drop_with, gso_size, l3_len, IPPROTO_TCP, IPPROTO_UDP, L3_OFF, TCX_NEXT, UDP_HLEN,
};

const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;

/// Local container IPv6 address → where to `bpf_redirect_peer` it. Fed by the daemon.
#[map(name = "RUDDER_ENDPTS6")]
static ENDPOINTS6: HashMap<[u8; 16], LocalEndpoint> =
    HashMap::with_max_entries(MAX_LOCAL_ENDPOINTS, 0);

/// True when the IPv6 packet (`total_len` bytes, first next header `next`), or each
/// segment of a GSO packet, fits the overlay MTU. A GSO packet is judged only with TCP or
/// UDP right after the fixed header (the common case); others go to the stack.
#[inline(always)]
fn fits_overlay_mtu6(ctx: &TcContext, next: u8, total_len: u32, overlay_mtu: u16) -> bool {
    let segment_payload = u32::from(gso_size(ctx));
    if segment_payload == 0 {
        return total_len <= u32::from(overlay_mtu);
    }
    let l4_len = match next {
        IPPROTO_UDP => UDP_HLEN as u32,
        IPPROTO_TCP => match ctx.load::<u8>(L3_OFF + IPV6_HLEN + 12) {
            Ok(data_offset) => u32::from(data_offset >> 4) * 4,
            Err(_) => return false,
        },
        _ => return false,
    };
    if next == IPPROTO_TCP && l4_len < TCP_HLEN as u32 {
        return false;
    }
    segment_payload + IPV6_HLEN as u32 + l4_len <= u32::from(overlay_mtu)
}

/// `rudder_br_in` for an IPv6 frame from a local container.
// Out of line: its own stack frame, not added to the IPv4 path's.
#[inline(never)]
pub(crate) fn bridge_ingress6(ctx: &TcContext, cfg: &DataplaneConfig) -> i32 {
    if config6().is_none() {
        return TCX_NEXT;
    }
    // A NAT'd connection: only the stack completes its conntrack entry (as for IPv4).
    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.skb.skb).mark } & STACK_MARK != 0 {
        return TCX_NEXT;
    }
    let (Ok(hdr), Ok(dst)) = (
        ctx.load::<[u8; 8]>(L3_OFF),
        ctx.load::<[u8; 16]>(L3_OFF + 24),
    ) else {
        return TCX_NEXT;
    };
    if hdr[0] >> 4 != 6 {
        return TCX_NEXT;
    }
    let Some((underlay, traffic_id)) = peer6(&dst) else {
        return TCX_NEXT;
    };
    let hop_limit = hdr[7];
    let payload_len = u32::from(be16(&hdr, 4));
    let total_len = IPV6_HLEN as u32 + payload_len;
    // The stack answers these: "time exceeded", "packet too big" (the peer routes carry
    // the overlay MTU); a jumbogram (payload length 0) no overlay carries.
    if hop_limit <= 1
        || payload_len == 0
        || !fits_overlay_mtu6(ctx, hdr[6], total_len, cfg.overlay_mtu)
    {
        return TCX_NEXT;
    }
    // Malformed, or what must never cross the overlay: the stack's to handle (its
    // forwarding refuses link-local scope; `rudder_egress` drops and counts the rest).
    if egress_checks(ctx, hdr[6], total_len) != OK {
        return TCX_NEXT;
    }
    // The router hop (IPv6 has no header checksum to fix).
    if ctx.store(L3_OFF + 7, &(hop_limit - 1), 0).is_err() {
        return drop_with(ctx, Counter::DropIoError);
    }
    let traffic_class = (hdr[0] << 4) | (hdr[1] >> 4);
    let inner_bytes = l3_len(ctx);
    let result = match mapped_ipv4(&underlay) {
        Some(peer_ip) => encapsulate_ipv6_in_ipv4(ctx, cfg, total_len, traffic_class, peer_ip),
        None => {
            crate::ipv6_outer::encapsulate_in_ipv6(ctx, cfg, total_len, traffic_class, &underlay)
        }
    };
    if result != OK {
        count_drop(ctx, result);
        return TC_ACT_SHOT as i32;
    }
    count(Counter::Encapsulated, inner_bytes);
    add_traffic_of(traffic_id, false, inner_bytes);
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

/// After decapsulation (the IPv6 packet at `L3_OFF`, hop limit `hop_limit`): the host-side
/// veth of a known local container, its Ethernet header and hop limit already written for
/// `bpf_redirect_peer`; `None` leaves the packet to the stack (an unknown address such as
/// the bridge's, or a hop limit running out: the stack answers "time exceeded").
// Out of line: reads the destination itself, keeping `decap_ipv6_inner`'s frame small.
#[inline(never)]
pub(crate) fn prepare_delivery6(ctx: &TcContext, hop_limit: u8) -> Result<Option<u32>, ()> {
    if hop_limit <= 1 {
        return Ok(None);
    }
    let Ok(dst) = ctx.load::<[u8; 16]>(L3_OFF + 24) else {
        return Ok(None);
    };
    // SAFETY: the value is copied out before any other map call.
    let Some(endpoint) = unsafe { ENDPOINTS6.get(&dst) }.copied() else {
        return Ok(None);
    };
    let mut eth = [0u8; 12];
    eth[0..6].copy_from_slice(&endpoint.container_mac);
    eth[6..12].copy_from_slice(&endpoint.gateway_mac);
    // bpf_redirect_peer skips the host's forwarding: this makes its hop.
    if ctx.store(L3_OFF + 7, &(hop_limit - 1), 0).is_err() || ctx.store(0, &eth, 0).is_err() {
        return Err(());
    }
    Ok(Some(endpoint.host_ifindex))
}

/// Hands the prepared packet to the container behind `host_ifindex`.
#[inline(always)]
pub(crate) fn redirect_peer(host_ifindex: u32) -> i32 {
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT or TC_ACT_SHOT.
    unsafe { bpf_redirect_peer(host_ifindex, 0) as i32 }
}
