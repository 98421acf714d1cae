//! `BPF_PROG_TEST_RUN` tests of the ingress (decapsulation) program: byte-exact results,
//! the checks' drop reasons, TTL and ECN, and its agreement with the TUN rules. Helpers in
//! `kernel_tests.rs`; root needed, as there.

use std::net::Ipv4Addr;

use rudder_ebpf::{names, Counter, LocalEndpoint};

use super::kernel::Kernel;
use super::kernel_tests::*;

/// Not a known container: up the stack, whose forwarding makes this host's router hop.
#[test]
fn decap_hands_inner_packet_to_the_stack_with_ttl_unchanged() {
    let kernel = fixture();
    let inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_OK,
        Counter::Decapsulated,
    );
    assert_eq!(
        out[..14],
        frame[..14],
        "Ethernet header kept on the stack path"
    );
    assert_eq!(
        out[14..],
        inner[..],
        "inner packet as sent: the kernel decrements"
    );
}

fn with_endpoint(kernel: &mut Kernel) {
    kernel
        .endpoints
        .insert(
            LOCAL_CONTAINER.octets(),
            LocalEndpoint {
                host_ifindex: 1,
                container_mac: [0x02, 0xaa, 0, 0, 0, 0x10],
                gateway_mac: [0x02, 0xbb, 0, 0, 0, 0x01],
            },
            0,
        )
        .unwrap();
}

/// A TTL that runs out here goes up the stack even for a known container (no redirect):
/// the kernel's forwarding answers it with "time exceeded", through the overlay.
#[test]
fn decap_leaves_expiring_ttl_to_the_stack() {
    let mut kernel = fixture();
    with_endpoint(&mut kernel);
    for ttl in [1, 0] {
        let inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, ttl, true, 20);
        let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
        let out = expect_counted(
            &kernel,
            names::PROG_INGRESS,
            &frame,
            TC_ACT_OK,
            Counter::Decapsulated,
        );
        assert_eq!(out[..14], frame[..14], "ttl {ttl}: Ethernet header kept");
        assert_eq!(out[14..], inner[..], "ttl {ttl}: inner packet as sent");
    }
}

/// Inner `ipv4_udp` packet with TOS byte `tos`, checksum fixed.
fn inner_with_tos(ttl: u8, tos: u8) -> Vec<u8> {
    let mut inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, ttl, true, 60);
    inner[1] = tos;
    inner[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&inner[..20]);
    inner[10..12].copy_from_slice(&csum.to_be_bytes());
    inner
}

/// RFC 6040: an outer CE mark is copied into an ECT(0)/ECT(1) inner header, DSCP kept,
/// header checksum patched, on the stack path and the redirect path alike.
#[test]
fn decap_copies_outer_congestion_mark_into_ecn_capable_inner_header() {
    let mut kernel = fixture();
    for ect in [0b10, 0b01] {
        let frame = overlay_frame_with_tos(
            PEER_PUBLIC,
            OUR_PUBLIC,
            PORT,
            0x03,
            &inner_with_tos(64, 0xb8 | ect),
        );
        let out = expect_counted(
            &kernel,
            names::PROG_INGRESS,
            &frame,
            TC_ACT_OK,
            Counter::Decapsulated,
        );
        assert_eq!(
            out[14..],
            inner_with_tos(64, 0xbb)[..],
            "ECT {ect:02b} -> CE"
        );
    }
    with_endpoint(&mut kernel);
    let frame = overlay_frame_with_tos(
        PEER_PUBLIC,
        OUR_PUBLIC,
        PORT,
        0x03,
        &inner_with_tos(64, 0xb8 | 0b10),
    );
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Decapsulated,
    );
    assert_eq!(out[14..], inner_with_tos(63, 0xbb)[..], "CE and TTL - 1");
    // Outer ECT or Not-ECT: the inner header is left as it is (CE inside stays CE).
    for (outer, inner) in [(0x02, 0x01), (0x01, 0x02), (0x00, 0x03), (0x02, 0x00)] {
        let frame = overlay_frame_with_tos(
            PEER_PUBLIC,
            OUR_PUBLIC,
            PORT,
            outer,
            &inner_with_tos(64, inner),
        );
        let (_, out) = run(&kernel, names::PROG_INGRESS, &frame);
        assert_eq!(
            out[14..],
            inner_with_tos(63, inner)[..],
            "outer {outer:02b}"
        );
    }
}

#[test]
fn decap_drops_congestion_mark_around_a_not_ect_inner_packet() {
    let kernel = fixture();
    let frame = overlay_frame_with_tos(
        PEER_PUBLIC,
        OUR_PUBLIC,
        PORT,
        0x03,
        &inner_with_tos(64, 0xb8),
    );
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropCeNotEct,
    );
}

#[test]
fn decap_redirects_known_local_endpoint_into_its_namespace() {
    let mut kernel = fixture();
    let container_mac = [0x02, 0xaa, 0, 0, 0, 0x10];
    let bridge_mac = [0x02, 0xbb, 0, 0, 0, 0x01];
    kernel
        .endpoints
        .insert(
            LOCAL_CONTAINER.octets(),
            LocalEndpoint {
                host_ifindex: 1,
                container_mac,
                gateway_mac: bridge_mac,
            },
            0,
        )
        .unwrap();
    let inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Decapsulated,
    );
    assert_eq!(out[..6], container_mac);
    assert_eq!(out[6..12], bridge_mac);
    assert_eq!(out[14 + 8], 63);
    assert_eq!(checksum(&out[14..34]), 0);
    assert_eq!(out[34..], inner[20..], "inner payload unchanged");
}

#[test]
fn decap_passes_other_udp_untouched() {
    let kernel = fixture();
    let inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 20);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, 53, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_UNSPEC,
        Counter::Passed,
    );
    assert_eq!(out, frame);
    // Addressed to another underlay host.
    let frame = overlay_frame(PEER_PUBLIC, STRANGER_PUBLIC, PORT, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_UNSPEC,
        Counter::Passed,
    );
    assert_eq!(out, frame);
}

#[test]
fn decap_drops_non_ipv4_payload() {
    let kernel = fixture();
    let mut inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 40);
    inner[0] = 0x60;
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropNotIpv4,
    );
}

#[test]
fn decap_drops_truncated_payloads() {
    let kernel = fixture();
    let inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    // Total length says 128 bytes, 60 arrived.
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner[..60]);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropTruncated,
    );
    // Shorter than an IPv4 header.
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner[..12]);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropTruncated,
    );
    // Empty datagram.
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &[]);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropTruncated,
    );
}

#[test]
fn decap_drops_malformed_headers() {
    let kernel = fixture();
    let good = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 40);

    let mut short_ihl = good.clone();
    short_ihl[0] = 0x44;
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &short_ihl);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropMalformed,
    );

    let mut bad_checksum = good.clone();
    bad_checksum[10] ^= 0xff;
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &bad_checksum);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropMalformed,
    );

    let mut short_total = good;
    short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
    short_total[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&short_total[..20]);
    short_total[10..12].copy_from_slice(&csum.to_be_bytes());
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &short_total);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropMalformed,
    );
}

#[test]
fn decap_accepts_inner_header_with_options() {
    let kernel = fixture();
    let plain = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 20);
    // Insert 8 bytes of NOP options: IHL 7.
    let mut inner = plain[..20].to_vec();
    inner.extend_from_slice(&[1; 8]);
    inner.extend_from_slice(&plain[20..]);
    inner[0] = 0x47;
    let total = inner.len() as u16;
    inner[2..4].copy_from_slice(&total.to_be_bytes());
    inner[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&inner[..28]);
    inner[10..12].copy_from_slice(&csum.to_be_bytes());
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_OK,
        Counter::Decapsulated,
    );
    assert_eq!(out[14..], inner[..], "up the stack as sent");
}

#[test]
fn decap_drops_spoofed_source_from_known_peer() {
    let kernel = fixture();
    let inner = ipv4_udp(Ipv4Addr::new(10, 5, 3, 3), LOCAL_CONTAINER, 64, true, 20);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropSpoofedSource,
    );
    // A source outside the network altogether is spoofed too.
    let inner = ipv4_udp(Ipv4Addr::new(1, 2, 3, 4), LOCAL_CONTAINER, 64, true, 20);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropSpoofedSource,
    );
}

#[test]
fn decap_drops_unknown_sender() {
    let kernel = fixture();
    let inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 20);
    let frame = overlay_frame(STRANGER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropUnknownSender,
    );
}

#[test]
fn decap_drops_destination_outside_our_subnet() {
    let kernel = fixture();
    let inner = ipv4_udp(PEER_CONTAINER, Ipv4Addr::new(10, 5, 2, 5), 64, true, 20);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropNotOurSubnet,
    );
}

/// Randomized property test: mutated overlay payloads through the BPF decap program never
/// crash or leak, every packet moves exactly one counter, and the program's verdict
/// (deliver or drop, and the drop reason) agrees with the TUN data plane's rules in
/// `packet.rs` for the same bytes: both data planes enforce one set of rules.
#[test]
fn decap_agrees_with_the_tun_rules_on_mutated_packets() {
    use crate::dataplane::forwarding::{
        decide_inbound, ForwardingTable, IcmpSources, Inbound, ReceiverHop,
    };
    use crate::packet::ICMP_ERROR_MAX_LEN;
    use rand::{Rng, SeedableRng};

    let kernel = fixture();
    let peers = [("10.5.2.0/24".parse().unwrap(), PEER_PUBLIC)].into();
    let table = ForwardingTable::new(
        "10.5.1.0/24".parse().unwrap(),
        "10.5.0.0/16".parse().unwrap(),
        IcmpSources {
            to_peers: Ipv4Addr::new(10, 5, 1, 1),
            into_device: Ipv4Addr::new(10, 5, 0, 1),
        },
        &peers,
    );
    // Seeded so a failure reproduces; the seed is in the failure message.
    let seed: u64 = rand::rng().random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let valid = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 40);
    let (mut delivered, mut dropped) = (0, 0);
    for round in 0..3000 {
        let mut inner = valid.clone();
        match rng.random_range(0..4) {
            // Flip bytes of the header (the checks' territory).
            0 | 1 => {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..28);
                    inner[at] ^= 1 << rng.random_range(0..8);
                }
            }
            // Truncate.
            2 => inner.truncate(rng.random_range(0..inner.len())),
            // Random source/destination inside or outside the subnets, checksum fixed up,
            // so the address checks are exercised rather than the checksum.
            _ => {
                inner[12..16].copy_from_slice(&[10, 5, rng.random_range(0..4), 20]);
                inner[16..20].copy_from_slice(&[10, 5, rng.random_range(0..4), 10]);
                inner[10..12].copy_from_slice(&[0, 0]);
                let csum = checksum(&inner[..20]);
                inner[10..12].copy_from_slice(&csum.to_be_bytes());
            }
        }
        // Any outer ECN field, so the RFC 6040 rule is exercised too.
        let outer_tos = rng.random_range(0..4u8);
        let frame = overlay_frame_with_tos(PEER_PUBLIC, OUR_PUBLIC, PORT, outer_tos, &inner);
        let before = kernel.packet_counts();
        let (verdict, out) = run(&kernel, names::PROG_INGRESS, &frame);
        let after = kernel.packet_counts();
        let moved: Vec<Counter> = Counter::ALL
            .into_iter()
            .filter(|c| after[c.index()] != before[c.index()])
            .collect();
        assert_eq!(
            moved.len(),
            1,
            "seed {seed} round {round}: counters {moved:?} moved for {inner:02x?}"
        );

        let mut tun_copy = inner.clone();
        let mut icmp = [0u8; ICMP_ERROR_MAX_LEN];
        // No endpoints here: BPF hands what it delivers to the stack, as the TUN path does.
        let hop = ReceiverHop::Kernel;
        let tun = decide_inbound(
            &mut tun_copy,
            PEER_PUBLIC,
            outer_tos,
            &table,
            hop,
            &mut icmp,
        );
        match tun {
            Inbound::Deliver { .. } => {
                delivered += 1;
                assert_eq!(
                    moved[0],
                    Counter::Decapsulated,
                    "seed {seed} round {round}: TUN delivers, BPF says {:?} for {inner:02x?}",
                    moved[0]
                );
                assert_ne!(verdict, TC_ACT_SHOT, "seed {seed} round {round}");
                let Inbound::Deliver { len, .. } = tun else {
                    unreachable!()
                };
                assert_eq!(
                    out[14..14 + len],
                    tun_copy[..len],
                    "seed {seed} round {round}: delivered bytes differ for {inner:02x?}"
                );
            }
            Inbound::Drop { reason, .. } => {
                dropped += 1;
                assert_eq!(verdict, TC_ACT_SHOT, "seed {seed} round {round}: TUN drops ({reason:?}), BPF verdict {verdict} for {inner:02x?}");
                assert_eq!(
                    moved[0], reason,
                    "seed {seed} round {round}: drop reasons differ for {inner:02x?}"
                );
            }
        }
    }
    eprintln!("seed {seed}: {delivered} delivered, {dropped} dropped, all in agreement");
    assert!(
        delivered > 100 && dropped > 100,
        "the mutations should exercise both outcomes"
    );
}

/// A UDP GSO train (a batching TUN peer's, unsplit on a veth underlay) goes up to the
/// socket path, and so do that peer's single datagrams after it, in order behind it;
/// another peer's datagrams keep the BPF path.
#[test]
fn after_a_train_the_peers_datagrams_follow_it_to_the_socket_path() {
    const OTHER_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 3);
    const OTHER_CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 5, 3, 30);
    let mut kernel = fixture();
    let key = aya::maps::lpm_trie::Key::new(24, [10, 5, 3, 0]);
    kernel
        .peers
        .insert(
            &key,
            rudder_ebpf::PeerValue::new(OTHER_PUBLIC.octets(), 2),
            0,
        )
        .unwrap();
    kernel.senders.insert(OTHER_PUBLIC.octets(), 1, 0).unwrap();
    let inner = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let single = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner);
    let before = kernel.packet_counts();
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &single,
        TC_ACT_OK,
        Counter::Decapsulated,
    );

    let train = overlay_frame(
        PEER_PUBLIC,
        OUR_PUBLIC,
        PORT,
        &[&inner[..], &inner[..]].concat(),
    );
    let (verdict, _) = run_gso(
        &kernel,
        names::PROG_INGRESS,
        &train,
        (28 + inner.len()) as u32,
    );
    assert_eq!(
        verdict, TC_ACT_UNSPEC,
        "a train goes on to the stack's socket"
    );
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &single,
        TC_ACT_UNSPEC,
        Counter::ToDaemon,
    );

    let other_inner = ipv4_udp(OTHER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let other_frame = overlay_frame(OTHER_PUBLIC, OUR_PUBLIC, PORT, &other_inner);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &other_frame,
        TC_ACT_OK,
        Counter::Decapsulated,
    );
    let after = kernel.packet_counts();
    assert_eq!(
        after[Counter::ToDaemon.index()] - before[Counter::ToDaemon.index()],
        2,
        "the train and the datagram behind it went to the socket path"
    );
}
