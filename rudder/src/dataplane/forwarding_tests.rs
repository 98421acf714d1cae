//! Tests of the forwarding table and rules, on handcrafted packets.

use std::time::{Duration, Instant};

use super::*;
use crate::packet::parse_ipv4;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

const SOURCES: IcmpSources = IcmpSources {
    to_peers: Ipv4Addr::new(10, 5, 1, 1),
    into_device: Ipv4Addr::new(10, 5, 0, 1),
};

fn table(peers: &[(&str, &str)]) -> ForwardingTable {
    let peers = peers.iter().map(|(n, p)| (net(n), ip(p))).collect();
    ForwardingTable::new(net("10.5.1.0/24"), net("10.5.0.0/16"), SOURCES, &peers)
}

/// IPv4/UDP packet with a correct header checksum (recomputed from scratch).
fn udp_packet(src: &str, dst: &str, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total = (28 + payload.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0, 0, ttl, 17, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&ip(src).octets());
    p.extend_from_slice(&ip(dst).octets());
    p.extend_from_slice(&[0x30, 0x39, 0x1f, 0x90, 0, (8 + payload.len()) as u8, 0, 0]);
    p.extend_from_slice(payload);
    let c = packet::internet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

#[test]
fn longest_prefix_wins() {
    let t = table(&[
        ("10.5.0.0/16", "192.168.0.1"),
        ("10.5.2.0/24", "192.168.0.2"),
        ("10.5.2.128/25", "192.168.0.3"),
    ]);
    assert_eq!(t.lookup(ip("10.5.2.7")), Some(ip("192.168.0.2").into()));
    assert_eq!(t.lookup(ip("10.5.2.200")), Some(ip("192.168.0.3").into()));
    assert_eq!(t.lookup(ip("10.5.9.1")), Some(ip("192.168.0.1").into()));
    assert_eq!(t.lookup(ip("10.6.0.1")), None);
}

#[test]
fn own_subnet_is_never_a_forwarding_target() {
    let t = table(&[("10.5.1.0/24", "192.168.0.9")]);
    assert_eq!(t.lookup(ip("10.5.1.7")), None);
    // ... but the sender check still knows whose it is.
    assert_eq!(t.subnets_of(ip("192.168.0.9")), &[net("10.5.1.0/24")]);
}

#[test]
fn ten_thousand_peers_look_up_exactly() {
    let peers: BTreeMap<Ipv4Net, Ipv4Addr> = (0..10_000u32)
        .map(|i| {
            let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            (subnet, Ipv4Addr::from(0xc0a8_0000 + i))
        })
        .collect();
    let t = ForwardingTable::new(net("10.200.0.0/24"), net("10.0.0.0/8"), SOURCES, &peers);
    for i in (0..10_000u32).step_by(97) {
        let dst = Ipv4Addr::from(0x0a00_0000 + (i << 8) + 42);
        assert_eq!(t.lookup(dst), Some(Ipv4Addr::from(0xc0a8_0000 + i).into()));
        assert_eq!(t.subnets_of(Ipv4Addr::from(0xc0a8_0000 + i)).len(), 1);
    }
    assert!(t.subnets_of(ip("1.2.3.4")).is_empty());
}

/// The incremental updates must leave exactly the table a rebuild would make.
#[test]
fn incremental_updates_match_a_rebuild() {
    let mut peers = BTreeMap::new();
    let mut t = table(&[]);
    let steps: [(&str, Option<&str>); 8] = [
        ("10.5.2.0/24", Some("192.168.0.2")),
        ("10.5.3.0/24", Some("192.168.0.3")),
        ("10.5.4.0/25", Some("192.168.0.2")),
        ("10.5.1.0/24", Some("192.168.0.1")), // our own lease
        ("10.5.2.0/24", Some("192.168.0.9")), // moved to another host
        ("10.5.4.0/25", None),                // last of its prefix length
        ("10.5.9.0/24", None),                // absent: no-op
        ("10.5.3.0/24", Some("192.168.0.3")), // unchanged
    ];
    for (subnet, public_ip) in steps {
        let subnet = net(subnet);
        match public_ip {
            Some(public_ip) => {
                let previous = peers.insert(subnet, ip(public_ip));
                t.upsert(subnet, ip(public_ip), previous, Arc::default());
            }
            None => {
                if let Some(previous) = peers.remove(&subnet) {
                    t.remove(subnet, previous);
                }
            }
        }
        let rebuilt = ForwardingTable::new(net("10.5.1.0/24"), net("10.5.0.0/16"), SOURCES, &peers);
        assert_eq!(format!("{t:?}"), format!("{rebuilt:?}"), "after {subnet}");
    }
    assert_eq!(t.lookup(ip("10.5.2.1")), Some(ip("192.168.0.9").into()));
    assert_eq!(t.lookup(ip("10.5.4.1")), None);
    assert!(t.subnets_of(ip("192.168.0.2")).is_empty());
}

#[test]
fn ten_thousand_upserts_all_land() {
    let mut t = table(&[]);
    let start = Instant::now();
    for i in 0..10_000u32 {
        let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
        t.upsert(
            subnet,
            Ipv4Addr::from(0xc0a8_0000 + (i * 7919) % 10_000),
            None::<Ipv4Addr>,
            Arc::default(),
        );
        // What publishing costs per change.
        std::hint::black_box(Arc::new(t.clone()));
    }
    // The time is printed, not asserted (the control-plane bench measures it); a rebuild
    // per change took 12 s here, incremental upserts well under 1 s.
    eprintln!("10k upserts with a publish each: {:?}", start.elapsed());
    for i in [0u32, 4_999, 9_999] {
        let inside = Ipv4Addr::from(0x0a00_0000 + (i << 8) + 7);
        assert!(t.slot_of(inside).is_some(), "{inside} has no peer");
    }
}

#[test]
fn sender_with_two_leases_owns_both() {
    let t = table(&[
        ("10.5.2.0/24", "192.168.0.2"),
        ("10.5.3.0/24", "192.168.0.2"),
        ("10.5.4.0/24", "192.168.0.4"),
    ]);
    assert_eq!(
        t.subnets_of(ip("192.168.0.2")),
        &[net("10.5.2.0/24"), net("10.5.3.0/24")]
    );
}

#[test]
fn outbound_to_a_peer_is_encapsulated_unchanged() {
    let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
    let mut p = udp_packet("10.5.1.7", "10.5.2.9", 64, b"hi");
    let len = p.len();
    p.extend_from_slice(&[0; 5]); // trailing bytes are trimmed
    let mut icmp = [0; ICMP_ERROR_MAX_LEN];
    assert_eq!(
        decide_outbound(&mut p, &t, 1472, &mut icmp),
        Outbound::Encapsulate {
            len,
            peer: ip("192.168.0.2").into(),
            slot: t.slot_of(ip("10.5.2.9")).unwrap(),
        }
    );
    // The kernel's forwarding into the device already made this host's hop.
    assert_eq!(p[..len], udp_packet("10.5.1.7", "10.5.2.9", 64, b"hi")[..]);
}

#[test]
fn outbound_without_lease_is_net_unreachable() {
    let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
    let mut p = udp_packet("10.5.1.7", "10.5.77.1", 64, b"hi");
    let mut icmp = [0; ICMP_ERROR_MAX_LEN];
    let Outbound::Drop {
        reason: Counter::DropNoRoute,
        icmp_len: Some(n),
    } = decide_outbound(&mut p, &t, 1472, &mut icmp)
    else {
        panic!("expected a no-route drop with an ICMP error");
    };
    let v = parse_ipv4(&icmp[..n]).unwrap();
    assert_eq!((v.src, v.dst), (ip("10.5.0.1"), ip("10.5.1.7")));
    assert_eq!((icmp[20], icmp[21]), (3, 0));
    // Outside the overlay: dropped silently.
    let mut p = udp_packet("10.5.1.7", "8.8.8.8", 64, b"hi");
    assert_eq!(
        decide_outbound(&mut p, &t, 1472, &mut icmp),
        Outbound::Drop {
            reason: Counter::DropNoRoute,
            icmp_len: None
        }
    );
}

#[test]
fn outbound_ttl_one_goes_on_to_the_receiving_host() {
    // Its kernel forwards it next and answers with time exceeded, as a router would.
    let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
    let mut p = udp_packet("10.5.1.7", "10.5.2.9", 1, b"hi");
    let mut icmp = [0; ICMP_ERROR_MAX_LEN];
    assert!(matches!(
        decide_outbound(&mut p, &t, 1472, &mut icmp),
        Outbound::Encapsulate { .. }
    ));
    assert_eq!(p[8], 1);
}

#[test]
fn outbound_garbage_and_oversize_are_dropped() {
    let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
    let mut icmp = [0; ICMP_ERROR_MAX_LEN];
    assert_eq!(
        decide_outbound(&mut [0x60; 40], &t, 1472, &mut icmp),
        Outbound::Drop {
            reason: Counter::DropNotIpv4,
            icmp_len: None
        }
    );
    let mut big = udp_packet("10.5.1.7", "10.5.2.9", 64, &[0; 1500]);
    assert_eq!(
        decide_outbound(&mut big, &t, 1472, &mut icmp),
        Outbound::Drop {
            reason: Counter::DropTooBig,
            icmp_len: None
        }
    );
}

#[test]
fn inbound_rules() {
    let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
    let peer = ip("192.168.0.2");
    let mut icmp = [0; ICMP_ERROR_MAX_LEN];
    let mut p = udp_packet("10.5.2.9", "10.5.1.7", 64, b"hi");
    let len = p.len();
    assert_eq!(
        decide_inbound(&mut p, peer, 0, &t, ReceiverHop::Rules, &mut icmp),
        Inbound::Deliver {
            len,
            from: t.slot_of(ip("10.5.2.9")),
        }
    );
    assert_eq!(p[8], 63);

    let cases = [
        (
            udp_packet("10.5.2.9", "10.5.1.7", 64, b"hi"),
            ip("192.168.0.99"),
            Counter::DropUnknownSender,
        ),
        (
            udp_packet("10.5.3.9", "10.5.1.7", 64, b"hi"),
            peer,
            Counter::DropSpoofedSource,
        ),
        (
            udp_packet("10.5.2.9", "10.5.4.7", 64, b"hi"),
            peer,
            Counter::DropNotOurSubnet,
        ),
        (b"garbage".to_vec(), peer, Counter::DropNotIpv4),
    ];
    for (mut packet, sender, expected) in cases {
        assert_eq!(
            decide_inbound(&mut packet, sender, 0, &t, ReceiverHop::Rules, &mut icmp),
            Inbound::Drop {
                reason: expected,
                icmp_len: None
            },
            "{}",
            expected.name()
        );
    }

    let mut p = udp_packet("10.5.2.9", "10.5.1.7", 1, b"hi");
    let Inbound::Drop {
        reason: Counter::DropTtlExceeded,
        icmp_len: Some(n),
    } = decide_inbound(&mut p, peer, 0, &t, ReceiverHop::Rules, &mut icmp)
    else {
        panic!("expected a TTL drop with an ICMP error");
    };
    let v = parse_ipv4(&icmp[..n]).unwrap();
    assert_eq!((v.src, v.dst), (ip("10.5.1.1"), ip("10.5.2.9")));
}

#[test]
fn inbound_hop_is_the_kernels_when_the_packet_goes_through_its_forwarding() {
    let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
    let peer = ip("192.168.0.2");
    let mut icmp = [0; ICMP_ERROR_MAX_LEN];
    for ttl in [64, 1, 0] {
        let mut p = udp_packet("10.5.2.9", "10.5.1.7", ttl, b"hi");
        let sent = p.clone();
        assert!(
            matches!(
                decide_inbound(&mut p, peer, 0, &t, ReceiverHop::Kernel, &mut icmp),
                Inbound::Deliver { .. }
            ),
            "ttl {ttl}"
        );
        assert_eq!(p, sent, "ttl {ttl}: unchanged, the kernel decrements");
    }
}

#[test]
fn inbound_outer_congestion_mark_reaches_the_inner_header() {
    let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
    let peer = ip("192.168.0.2");
    let mut icmp = [0; ICMP_ERROR_MAX_LEN];
    let with_tos = |tos: u8| {
        let mut p = udp_packet("10.5.2.9", "10.5.1.7", 64, b"hi");
        p[1] = tos;
        p[10..12].fill(0);
        let c = packet::internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    };
    // ECT(0) inside, CE outside: delivered as CE, DSCP kept, checksum valid.
    let mut p = with_tos(0xb8 | 0b10);
    let hop = ReceiverHop::Kernel;
    assert!(matches!(
        decide_inbound(&mut p, peer, 0b11, &t, hop, &mut icmp),
        Inbound::Deliver { .. }
    ));
    assert_eq!(p, with_tos(0xb8 | 0b11));
    // Not-ECT inside, CE outside: dropped (RFC 6040).
    let mut p = with_tos(0xb8);
    assert_eq!(
        decide_inbound(&mut p, peer, 0b11, &t, hop, &mut icmp),
        Inbound::Drop {
            reason: Counter::DropCeNotEct,
            icmp_len: None
        }
    );
    // No mark outside: nothing changes.
    let mut p = with_tos(0b01);
    decide_inbound(&mut p, peer, 0b01, &t, hop, &mut icmp);
    assert_eq!(p, with_tos(0b01));
}

#[test]
fn icmp_rate_limit_allows_a_burst_then_one_per_interval() {
    let start = Instant::now();
    let mut limit = IcmpRateLimit::with_rate(1000, 50, start);
    let allowed = (0..200).filter(|_| limit.allow(start)).count();
    assert_eq!(allowed, 50, "the burst");
    assert!(!limit.allow(start + Duration::from_micros(999)));
    assert!(limit.allow(start + Duration::from_millis(1)));
    assert!(!limit.allow(start + Duration::from_millis(1)));
    // 10 ms later: 10 more, not a whole new burst.
    let later = start + Duration::from_millis(11);
    assert_eq!((0..200).filter(|_| limit.allow(later)).count(), 10);
    // After a long quiet spell the bucket is full again, and no fuller.
    let much_later = start + Duration::from_secs(60);
    assert_eq!((0..200).filter(|_| limit.allow(much_later)).count(), 50);
}

#[test]
fn published_table_reaches_readers() {
    let published = PublishedTable {
        version: AtomicU64::new(0),
        current: RwLock::new(Arc::new(table(&[]))),
    };
    let mut reader = published.reader();
    assert_eq!(reader.current(&published).lookup(ip("10.5.2.1")), None);
    published.publish(table(&[("10.5.2.0/24", "192.168.0.2")]));
    assert_eq!(
        reader.current(&published).lookup(ip("10.5.2.1")),
        Some(ip("192.168.0.2").into())
    );
}
