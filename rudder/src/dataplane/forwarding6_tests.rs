//! Tests of the IPv6 forwarding verdicts over a small peer table.

use super::*;
use crate::packet6::parse_ipv6;
use crate::packet6::tests::{icmp6, l4_checksum_ok, udp6};

fn net(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

const PEER2: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 0, 2));
const PEER3: &str = "2001:db8::3";

/// Peers as (subnet, underlay address): a linear scan is all a test needs.
struct Peers(Vec<(Ipv6Net, IpAddr)>, Vec<Ipv6Net>);

impl Peers {
    fn new(entries: &[(&str, IpAddr)]) -> Self {
        Peers(
            entries.iter().map(|(n, a)| (net(n), *a)).collect(),
            Vec::new(),
        )
    }
}

impl PeerRoutes6 for Peers {
    type Peer = IpAddr;
    fn route(&self, dst: Ipv6Addr) -> Option<IpAddr> {
        let best = self.0.iter().filter(|(n, _)| n.contains(&dst));
        best.max_by_key(|(n, _)| n.prefix_len()).map(|(_, a)| *a)
    }
    fn subnets_of(&self, sender: IpAddr) -> &[Ipv6Net] {
        // The test tables hold one subnet per sender, stored in order.
        match self.0.iter().position(|(_, a)| *a == sender) {
            Some(i) => std::slice::from_ref(&self.0[i].0),
            None => &self.1,
        }
    }
}

fn peers() -> Peers {
    Peers::new(&[
        ("fd00:5:2::/64", PEER2),
        ("fd00:5:3::/64", PEER3.parse().unwrap()),
    ])
}

const OVERLAY: Overlay6 = Overlay6 {
    local_subnet: Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 0, 0), 64),
    network: Ipv6Net::new_assert(Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 0), 32),
    icmp_to_peers: Ipv6Addr::new(0xfd00, 5, 1, 0, 0, 0, 0, 1),
    icmp_into_device: Ipv6Addr::new(0xfd00, 5, 0, 0, 0, 0, 0, 1),
};

fn outbound(packet: &[u8], mtu: usize) -> (Outbound6<IpAddr>, Vec<u8>) {
    let mut icmp = [0u8; ICMP6_ERROR_MAX_LEN];
    let verdict = decide_outbound6(packet, &OVERLAY, &peers(), mtu, &mut icmp);
    let len = match verdict {
        Outbound6::Drop {
            icmp_len: Some(n), ..
        } => n,
        _ => 0,
    };
    (verdict, icmp[..len].to_vec())
}

fn inbound(
    packet: &mut [u8],
    sender: IpAddr,
    tos: u8,
    hop: ReceiverHop,
) -> (Inbound6<IpAddr>, Vec<u8>) {
    let mut icmp = [0u8; ICMP6_ERROR_MAX_LEN];
    let verdict = decide_inbound6(packet, sender, tos, &OVERLAY, &peers(), hop, &mut icmp);
    let len = match verdict {
        Inbound6::Drop {
            icmp_len: Some(n), ..
        } => n,
        _ => 0,
    };
    (verdict, icmp[..len].to_vec())
}

/// The ICMPv6 error's (type, code, 4-byte field, destination), its checksum verified.
fn icmp_fields(error: &[u8]) -> (u8, u8, u32, Ipv6Addr, Ipv6Addr) {
    let v = parse_ipv6(error).unwrap();
    assert!(
        l4_checksum_ok(v.src, v.dst, 58, &error[40..]),
        "ICMPv6 checksum"
    );
    let rest = u32::from_be_bytes([error[44], error[45], error[46], error[47]]);
    (error[40], error[41], rest, v.src, v.dst)
}

#[test]
fn outbound_goes_to_the_peer_holding_the_destination() {
    let p = udp6("fd00:5:1::7", "fd00:5:3::9", 64, b"hi");
    let (verdict, _) = outbound(&p, 1452);
    assert_eq!(
        verdict,
        Outbound6::Encapsulate {
            len: p.len(),
            peer: PEER3.parse().unwrap()
        }
    );
    let mut padded = p.clone();
    padded.extend_from_slice(&[0; 6]);
    assert_eq!(
        outbound(&padded, 1452).0,
        Outbound6::Encapsulate {
            len: p.len(),
            peer: PEER3.parse().unwrap()
        }
    );
}

#[test]
fn outbound_without_a_peer_is_unreachable_inside_the_network_only() {
    let p = udp6("fd00:5:1::7", "fd00:5:9::1", 64, b"hi");
    let (verdict, error) = outbound(&p, 1452);
    assert!(matches!(
        verdict,
        Outbound6::Drop {
            reason: Counter::DropNoRoute,
            icmp_len: Some(_)
        }
    ));
    let src = ip6("fd00:5:1::7");
    assert_eq!(
        icmp_fields(&error),
        (1, 0, 0, OVERLAY.icmp_into_device, src)
    );
    assert_eq!(error[48..], p[..], "the packet quoted whole");

    let p = udp6("fd00:5:1::7", "2001:db8:77::1", 64, b"hi");
    assert_eq!(
        outbound(&p, 1452).0,
        Outbound6::Drop {
            reason: Counter::DropNoRoute,
            icmp_len: None
        }
    );
}

#[test]
fn outbound_too_big_gets_packet_too_big_with_the_overlay_mtu() {
    let p = udp6("fd00:5:1::7", "fd00:5:2::9", 64, &[7; 1500]);
    let (verdict, error) = outbound(&p, 1452);
    assert!(matches!(
        verdict,
        Outbound6::Drop {
            reason: Counter::DropTooBig,
            icmp_len: Some(1280)
        }
    ));
    assert_eq!(
        icmp_fields(&error),
        (2, 0, 1452, OVERLAY.icmp_into_device, ip6("fd00:5:1::7"))
    );
    assert_eq!(error[48..], p[..1232]);
    let fits = udp6("fd00:5:1::7", "fd00:5:2::9", 64, &[7; 1452 - 48]);
    assert!(matches!(
        outbound(&fits, 1452).0,
        Outbound6::Encapsulate { .. }
    ));
}

#[test]
fn link_scoped_traffic_never_leaves() {
    for p in [
        icmp6("fd00:5:1::7", "fd00:5:2::9", 135),
        icmp6("fe80::1", "ff02::1", 134),
        udp6("fe80::1", "fd00:5:2::9", 64, b""),
        udp6("fd00:5:1::7", "ff0e::1", 64, &[0; 2000]),
    ] {
        let verdict = outbound(&p, 1452);
        assert_eq!(verdict, (dropped(packet6::DROP_LINK_SCOPED), vec![]));
    }
}

#[test]
fn malformed_packets_are_dropped_with_their_reason() {
    let mut p = udp6("fd00:5:1::7", "fd00:5:2::9", 64, b"x");
    p[6] = 60; // destination options that run past the payload
    p[41] = 200;
    assert_eq!(outbound(&p, 1452).0, dropped(Counter::DropMalformed));
    assert_eq!(
        inbound(&mut p, PEER2, 0, ReceiverHop::Rules).0,
        refused(Counter::DropMalformed)
    );
    assert_eq!(outbound(&p[..30], 1452).0, dropped(Counter::DropTruncated));
}

#[test]
fn inbound_is_delivered_from_a_leased_sender() {
    let mut p = udp6("fd00:5:2::9", "fd00:5:1::7", 64, b"hi");
    let before = p.clone();
    let (verdict, _) = inbound(&mut p, PEER2, 0, ReceiverHop::Kernel);
    assert_eq!(
        verdict,
        Inbound6::Deliver {
            len: p.len(),
            from: Some(PEER2)
        }
    );
    assert_eq!(p, before, "the kernel makes the hop");
    let (verdict, _) = inbound(&mut p, PEER2, 0, ReceiverHop::Rules);
    assert!(matches!(verdict, Inbound6::Deliver { .. }));
    assert_eq!(p[7], 63, "the rules make the hop");
}

#[test]
fn inbound_spoofed_unknown_or_misdirected_is_refused() {
    let mut p = udp6("fd00:5:3::9", "fd00:5:1::7", 64, b"hi");
    assert_eq!(
        inbound(&mut p, PEER2, 0, ReceiverHop::Kernel).0,
        refused(Counter::DropSpoofedSource)
    );
    let stranger: IpAddr = "2001:db8::66".parse().unwrap();
    assert_eq!(
        inbound(&mut p, stranger, 0, ReceiverHop::Kernel).0,
        refused(Counter::DropUnknownSender)
    );
    let mut p = udp6("fd00:5:2::9", "fd00:5:3::7", 64, b"hi");
    assert_eq!(
        inbound(&mut p, PEER2, 0, ReceiverHop::Kernel).0,
        refused(Counter::DropNotOurSubnet)
    );
    let mut p = udp6("fe80::9", "fd00:5:1::7", 64, b"hi");
    assert_eq!(
        inbound(&mut p, PEER2, 0, ReceiverHop::Kernel).0,
        refused(Counter::DropSpoofedSource)
    );
    let mut nd = icmp6("fd00:5:2::9", "fd00:5:1::7", 136);
    assert_eq!(
        inbound(&mut nd, PEER2, 0, ReceiverHop::Kernel).0,
        refused(packet6::DROP_LINK_SCOPED)
    );
}

#[test]
fn inbound_ecn_ce_is_copied_or_dropped() {
    let mut p = udp6("fd00:5:2::9", "fd00:5:1::7", 64, b"hi");
    p[1] = (p[1] & 0xcf) | (2 << 4); // ECT(0)
    assert!(matches!(
        inbound(&mut p, PEER2, 0x03, ReceiverHop::Kernel).0,
        Inbound6::Deliver { .. }
    ));
    assert_eq!(parse_ipv6(&p).unwrap().traffic_class & 3, 3);
    p[1] &= 0xcf; // Not-ECT
    assert_eq!(
        inbound(&mut p, PEER2, 0x03, ReceiverHop::Kernel).0,
        refused(Counter::DropCeNotEct)
    );
}

#[test]
fn inbound_hop_limit_expiry_answers_the_sender() {
    let mut p = udp6("fd00:5:2::9", "fd00:5:1::7", 1, b"hi");
    let received = p.clone();
    let (verdict, error) = inbound(&mut p, PEER2, 0, ReceiverHop::Rules);
    assert!(matches!(
        verdict,
        Inbound6::Drop {
            reason: Counter::DropTtlExceeded,
            icmp_len: Some(_)
        }
    ));
    assert_eq!(
        icmp_fields(&error),
        (3, 0, 0, OVERLAY.icmp_to_peers, ip6("fd00:5:2::9"))
    );
    assert_eq!(error[48..], received[..], "quoted as received");
    // Where the kernel makes the hop, the rules leave it alone.
    let (verdict, _) = inbound(&mut p, PEER2, 0, ReceiverHop::Kernel);
    assert!(matches!(verdict, Inbound6::Deliver { .. }));
}
