//! Arbitrary bytes through the IPv6 packet rules and verdicts: no panic; a parse that
//! succeeds gives offsets inside the buffer; a delivered packet is unchanged but for ECN
//! (and the hop limit, down by one, where the rules make the hop); every ICMPv6 error is a
//! valid packet of at most 1280 bytes with a correct checksum, sent to the offender's
//! source; completed checksums verify; segments of a super-packet fit the MTU, verify and
//! reassemble. Each input also runs "shaped" (version 6, payload length fitted, addresses
//! in the overlay's subnets) so that the deep rules are reached without luck.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv6Net;
use libfuzzer_sys::fuzz_target;
use rudder::dataplane::forwarding::ReceiverHop;
use rudder::dataplane::forwarding6::{
    decide_inbound6, decide_outbound6, Inbound6, Outbound6, Overlay6, PeerRoutes6,
};
use rudder::packet6::{
    complete_partial_checksum6, flow_hash6, l4_checksum6, outer_flow_label, parse_ipv6,
    tcp_super_packet6, PROTO_ICMPV6,
};
use rudder::packet6_icmp::ICMP6_ERROR_MAX_LEN;
use rudder::packet_segment::segment_tcp6;

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 2));
const MTU: usize = 1452;

const OVERLAY: Overlay6 = Overlay6 {
    local_subnet: Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 0, 0), 64),
    network: Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 0), 32),
    icmp_to_peers: Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 0, 1),
    icmp_into_device: Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 1),
};

const PEER_SUBNET: [Ipv6Net; 1] = [Ipv6Net::new_assert(
    Ipv6Addr::new(0xfd00, 5, 2, 0, 0, 0, 0, 0),
    64,
)];

struct Peers;

impl PeerRoutes6 for Peers {
    type Peer = IpAddr;
    fn route(&self, dst: Ipv6Addr) -> Option<IpAddr> {
        PEER_SUBNET[0].contains(&dst).then_some(PEER)
    }
    fn subnets_of(&self, sender: IpAddr) -> &[Ipv6Net] {
        if sender == PEER {
            &PEER_SUBNET
        } else {
            &[]
        }
    }
}

/// `data` made into a plausible overlay packet: version 6, payload length = the rest,
/// source in the peer's subnet and destination in ours, or the other way round.
fn shaped(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 41 {
        return None;
    }
    let mut p = data.to_vec();
    p[0] = 0x60 | (p[0] & 0x0f);
    let payload = (p.len() - 40).min(usize::from(u16::MAX)) as u16;
    p[4..6].copy_from_slice(&payload.to_be_bytes());
    let (src, dst) = if data[1] & 0x80 == 0 {
        (PEER_SUBNET[0], OVERLAY.local_subnet)
    } else {
        (OVERLAY.local_subnet, PEER_SUBNET[0])
    };
    p[8..16].copy_from_slice(&src.network().octets()[..8]);
    p[24..32].copy_from_slice(&dst.network().octets()[..8]);
    Some(p)
}

fn check_icmp_error(error: &[u8], offender_src: Ipv6Addr) {
    assert!(error.len() <= 1280);
    let view = parse_ipv6(error).expect("an ICMPv6 error is a valid packet");
    assert_eq!((view.protocol, view.total_len), (PROTO_ICMPV6, error.len()));
    assert_eq!(view.dst, offender_src);
    assert_eq!(
        l4_checksum6(view.src, view.dst, PROTO_ICMPV6, &error[40..]),
        0
    );
}

fn rules(data: &[u8]) {
    let parsed = parse_ipv6(data).ok();
    if let Some(view) = parsed {
        assert!(40 <= view.l4_offset && view.l4_offset <= view.total_len);
        assert!(view.total_len <= data.len());
        let label = outer_flow_label(flow_hash6(data, &view));
        assert!(label != 0 && label <= 0xf_ffff);

        let mut completed = data[..view.total_len].to_vec();
        if complete_partial_checksum6(&mut completed, &view) {
            let l4 = &completed[view.l4_offset..];
            assert_eq!(l4_checksum6(view.src, view.dst, view.protocol, l4), 0);
        }
        if let Some((headers, mss)) = tcp_super_packet6(data, &view, MTU) {
            let mut segments = Vec::new();
            segment_tcp6(data, &view, headers, mss, &mut segments);
            let mut payload = Vec::new();
            for seg in &segments {
                assert!(seg.len() <= MTU);
                let v = parse_ipv6(seg).expect("a segment parses");
                assert_eq!(v.total_len, seg.len());
                assert_eq!(
                    l4_checksum6(v.src, v.dst, v.protocol, &seg[v.l4_offset..]),
                    0
                );
                payload.extend_from_slice(&seg[headers..]);
            }
            assert_eq!(payload, data[headers..view.total_len]);
        }
    }

    let outer_tos = data.last().copied().unwrap_or(0);
    let mut icmp = [0u8; ICMP6_ERROR_MAX_LEN];
    for hop in [ReceiverHop::Kernel, ReceiverHop::Rules] {
        let mut inbound = data.to_vec();
        match decide_inbound6(
            &mut inbound,
            PEER,
            outer_tos,
            &OVERLAY,
            &Peers,
            hop,
            &mut icmp,
        ) {
            Inbound6::Deliver { len, .. } => {
                let before = parsed.expect("a delivered packet parsed");
                assert_eq!(len, before.total_len);
                let after = parse_ipv6(&inbound[..len]).expect("a delivered packet parses");
                let hops = u8::from(hop == ReceiverHop::Rules);
                assert_eq!(after.hop_limit + hops, before.hop_limit);
                // Only the ECN bits (byte 1, bits 4-5) and the hop limit may change.
                assert_eq!(inbound[1] & 0xcf, data[1] & 0xcf);
                assert_eq!((inbound[0], &inbound[2..7]), (data[0], &data[2..7]));
                assert_eq!(inbound[8..len], data[8..len]);
            }
            Inbound6::Drop {
                icmp_len: Some(n), ..
            } => check_icmp_error(&icmp[..n], parsed.expect("answered packets parse").src),
            Inbound6::Drop { .. } => {}
        }
    }

    match decide_outbound6(data, &OVERLAY, &Peers, MTU, &mut icmp) {
        Outbound6::Encapsulate { len, .. } => {
            let view = parsed.expect("a sent packet parsed");
            assert!(len == view.total_len && len <= MTU);
            assert!(PEER_SUBNET[0].contains(&view.dst));
        }
        Outbound6::Drop {
            icmp_len: Some(n), ..
        } => check_icmp_error(&icmp[..n], parsed.expect("answered packets parse").src),
        Outbound6::Drop { .. } => {}
    }
}

fuzz_target!(|data: &[u8]| {
    rules(data);
    if let Some(p) = shaped(data) {
        rules(&p);
    }
});
