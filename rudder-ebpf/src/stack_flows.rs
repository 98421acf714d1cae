//! Flows the host's stack forwarded to peers (maybe NAT'd there): `rudder_egress` records
//! the reversed 5-tuple of each, `rudder_ingress` hands their decapsulated replies to the
//! stack, where conntrack un-NATs them, instead of redirecting them into the container.

use aya_ebpf::{macros::map, maps::LruHashMap, programs::TcContext};
use rudder_ebpf::{FlowKey, FlowKey6, MAX_STACK_FLOWS};

use crate::programs::{
    addr, be16, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IP_FRAG_MASK, L3_OFF, UDP_HLEN,
};

/// Replies of flows the host's stack sent to peers (stored reversed by `rudder_egress`): the
/// stack may have NAT'd them, so their replies go back through it (conntrack), never through
/// `bpf_redirect_peer`. LRU: idle flows age out as new ones come.
#[map(name = "RUDDER_STK_FLOWS")]
static STACK_FLOWS: LruHashMap<FlowKey, u8> = LruHashMap::with_max_entries(MAX_STACK_FLOWS, 0);

/// The same for IPv6 flows.
#[map(name = "RUDDER_STK_FLOWS6")]
static STACK_FLOWS6: LruHashMap<FlowKey6, u8> = LruHashMap::with_max_entries(MAX_STACK_FLOWS, 0);

const IPV6_HLEN: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;

#[inline(always)]
fn is_fragment(hdr: &[u8; IPV4_HLEN]) -> bool {
    be16(hdr, 6) & IP_FRAG_MASK != 0
}

/// The flow of the unfragmented IPv4 packet whose header (`hdr`, `header_len` bytes with
/// options) starts at `l3_off`: TCP and UDP with their ports, other protocols with ports 0.
#[inline(always)]
fn flow_of(ctx: &TcContext, l3_off: usize, hdr: &[u8; IPV4_HLEN], header_len: usize) -> FlowKey {
    let protocol = hdr[9];
    let (mut src_port, mut dst_port) = (0, 0);
    if protocol == IPPROTO_TCP || protocol == IPPROTO_UDP {
        if let Ok(ports) = ctx.load::<[u8; 4]>(l3_off + header_len) {
            src_port = be16(&ports, 0);
            dst_port = be16(&ports, 2);
        }
    }
    FlowKey::new(addr(hdr, 12), addr(hdr, 16), src_port, dst_port, protocol)
}

/// Remembers that the stack forwarded this flow to a peer, so its replies take the stack too.
// Out of line: its branches would otherwise multiply with encapsulate's in the verifier.
#[inline(never)]
pub(crate) fn remember_stack_flow(ctx: &TcContext, hdr: &[u8; IPV4_HLEN]) {
    if is_fragment(hdr) {
        // Fragmented: the ports are not in every piece; their replies take the stack anyway.
        return;
    }
    let reply = flow_of(ctx, L3_OFF, hdr, usize::from(hdr[0] & 0x0f) * 4).reversed();
    // A lookup marks the entry as used for the LRU; only a new flow pays for an update.
    if STACK_FLOWS.get_ptr(reply).is_none() {
        let _ = STACK_FLOWS.insert(reply, 0, 0);
    }
}

/// True for a decapsulated packet (now at `L3_OFF`) of a flow the stack forwarded out, and for
/// fragments (their ports are not in every piece; conntrack reassembles them).
#[inline(never)]
pub(crate) fn reply_to_stack_flow(
    ctx: &TcContext,
    inner: &[u8; IPV4_HLEN],
    header_len: u32,
) -> bool {
    if is_fragment(inner) {
        return true;
    }
    let flow = flow_of(ctx, L3_OFF, inner, header_len as usize);
    STACK_FLOWS.get_ptr(flow).is_some()
}

/// The flow of the IPv6 packet at `l3_off` (`reversed`: of its replies) when its upper layer
/// (TCP, UDP or ICMPv6) follows the fixed header; `None` for anything else (extension headers,
/// fragments).
#[inline(always)]
fn flow_of6(ctx: &TcContext, l3_off: usize, reversed: bool) -> Option<FlowKey6> {
    let protocol = ctx.load::<u8>(l3_off + 6).ok()?;
    let mut key = FlowKey::new([0; 16], [0; 16], 0, 0, protocol);
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports = ctx.load::<[u8; 4]>(l3_off + IPV6_HLEN).ok()?;
            key.src_port = be16(&ports, 0);
            key.dst_port = be16(&ports, 2);
        }
        IPPROTO_ICMPV6 => {}
        _ => return None,
    }
    let (first, second) = if reversed {
        (&mut key.dst, &mut key.src)
    } else {
        (&mut key.src, &mut key.dst)
    };
    *first = ctx.load::<[u8; 16]>(l3_off + 8).ok()?;
    *second = ctx.load::<[u8; 16]>(l3_off + 24).ok()?;
    if reversed {
        core::mem::swap(&mut key.src_port, &mut key.dst_port);
    }
    Some(key)
}

/// [`remember_stack_flow`] for an IPv6 packet the stack forwarded to a peer, just
/// encapsulated: it follows the outer header (IPv4 or IPv6) and its UDP header.
#[inline(never)]
pub(crate) fn remember_stack_flow6(ctx: &TcContext) {
    let Ok(version) = ctx.load::<u8>(L3_OFF) else {
        return;
    };
    let inner_off = if version >> 4 == 6 {
        L3_OFF + IPV6_HLEN + UDP_HLEN
    } else {
        L3_OFF + IPV4_HLEN + UDP_HLEN
    };
    // Without a flow, its replies are not redirected anyway (see `reply_to_stack_flow6`).
    if let Some(reply) = flow_of6(ctx, inner_off, true) {
        if STACK_FLOWS6.get_ptr(&reply).is_none() {
            let _ = STACK_FLOWS6.insert(&reply, &0, 0);
        }
    }
}

/// True for a decapsulated IPv6 packet (at `L3_OFF`) that must take the stack: a reply of a
/// flow the stack forwarded out, or one whose flow cannot be told (extension headers,
/// fragments: conntrack sees them whole).
#[inline(never)]
pub(crate) fn reply_to_stack_flow6(ctx: &TcContext) -> bool {
    match flow_of6(ctx, L3_OFF, false) {
        Some(flow) => STACK_FLOWS6.get_ptr(&flow).is_some(),
        None => true,
    }
}
