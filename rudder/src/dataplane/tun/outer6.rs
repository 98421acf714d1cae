//! The outer IPv6 header of what the TUN plane sends to a peer at its PublicIPv6, as the
//! eBPF plane writes it (`rudder-ebpf/src/ipv6_outer.rs`): the traffic class copied from
//! the inner packet (DSCP and ECN, RFC 2983 uniform model / RFC 6040 normal mode) and a flow
//! label per inner flow (RFC 6438), so the underlay's ECMP keeps a flow on one path and
//! spreads flows. The kernel writes both: the label through `sin6_flowinfo` on a socket
//! with `IPV6_FLOWINFO_SEND`, the class through an `IPV6_TCLASS` control message.

use crate::packet::{parse_ipv4, PROTO_TCP, PROTO_UDP};
use crate::packet6::{flow_hash6, inner_traffic_class, outer_flow_label, parse_ipv6, FlowHasher};

/// The outer traffic class and flow label for an inner packet (either family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OuterFlow6 {
    pub(super) traffic_class: u8,
    /// 20 bits, never 0.
    pub(super) flow_label: u32,
}

impl OuterFlow6 {
    pub(super) fn of(packet: &[u8]) -> Self {
        OuterFlow6 {
            traffic_class: inner_traffic_class(packet).unwrap_or(0),
            flow_label: outer_flow_label(inner_flow_hash(packet)),
        }
    }
}

/// A hash of the inner flow: [`flow_hash6`] for IPv6; for IPv4 the same FNV-1a over the
/// addresses, protocol and (unless fragmented) ports.
fn inner_flow_hash(packet: &[u8]) -> u32 {
    if let Ok(view) = parse_ipv6(packet) {
        return flow_hash6(packet, &view);
    }
    let Ok(view) = parse_ipv4(packet) else {
        return 0;
    };
    let mut hash = FlowHasher::new();
    hash.eat(&view.src.octets());
    hash.eat(&view.dst.octets());
    hash.eat(&[view.protocol]);
    // Every fragment of a flow must hash alike: only unfragmented packets show ports.
    if matches!(view.protocol, PROTO_TCP | PROTO_UDP) && !view.is_fragment() {
        if let Some(ports) = packet.get(view.header_len..view.header_len + 4) {
            hash.eat(ports);
        }
    }
    hash.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tun::device_tests::udp_packet;
    use crate::packet6::tests::udp6;

    #[test]
    fn class_is_copied_and_flows_get_their_own_stable_label() {
        let a = udp_packet([10, 5, 1, 2], [10, 5, 2, 3], 64, (4000, 80), b"a");
        let b = udp_packet([10, 5, 1, 2], [10, 5, 2, 3], 64, (4001, 80), b"a");
        let outer = OuterFlow6::of(&a);
        assert_ne!(outer.flow_label, OuterFlow6::of(&b).flow_label);
        // Another packet of flow a, other payload: same label.
        let again = udp_packet([10, 5, 1, 2], [10, 5, 2, 3], 64, (4000, 80), b"other");
        assert_eq!(OuterFlow6::of(&again).flow_label, outer.flow_label);
        assert!(outer.flow_label != 0 && outer.flow_label < 1 << 20);
        let mut marked = a.clone();
        marked[1] = 0xb9;
        assert_eq!(OuterFlow6::of(&marked).traffic_class, 0xb9);

        // udp6 writes traffic class 0xb9.
        let six = udp6("fc00:0:0:1::2", "fc00:0:0:2::3", 64, b"x");
        let outer6 = OuterFlow6::of(&six);
        assert_eq!(outer6.traffic_class, 0xb9);
        let view = parse_ipv6(&six).unwrap();
        assert_eq!(outer6.flow_label, outer_flow_label(flow_hash6(&six, &view)));
    }
}
