//! Flows the host's stack forwarded to peers (maybe NAT'd there): `rudder_egress` records
//! the reversed 5-tuple of each, `rudder_ingress` hands their decapsulated replies to the
//! stack, where conntrack un-NATs them, instead of redirecting them into the container.

use aya_ebpf::{macros::map, maps::LruHashMap, programs::TcContext};
use rudder_ebpf::{FlowKey, MAX_STACK_FLOWS};

use crate::programs::{addr, be16, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IP_FRAG_MASK, L3_OFF};

/// Replies of flows the host's stack sent to peers (stored reversed by `rudder_egress`): the
/// stack may have NAT'd them, so their replies go back through it (conntrack), never through
/// `bpf_redirect_peer`. LRU: idle flows age out as new ones come.
#[map(name = "RUDDER_STK_FLOWS")]
static STACK_FLOWS: LruHashMap<FlowKey, u8> = LruHashMap::with_max_entries(MAX_STACK_FLOWS, 0);

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
