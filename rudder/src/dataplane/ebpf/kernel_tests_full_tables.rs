//! `BPF_PROG_TEST_RUN` with the peer maps full: a /8 cut into /24s is 65,536 subnets
//! ([`MAX_PEERS`]), and the first and last of them still encapsulate to their own peer and
//! decapsulate from it, byte-exact in the outer addresses.

use std::net::Ipv4Addr;

use aya::maps::lpm_trie::Key;
use rudder_ebpf::{names, Counter, DataplaneConfig, PeerValue, MAX_PEERS};

use super::kernel::Kernel;
use super::kernel_tests::{
    checksum, ethernet, expect_counted, ipv4_udp, overlay_frame, require_root, OUR_MAC, OUR_PUBLIC,
    PEER_MAC, PORT, TC_ACT_OK,
};

const _: () = assert!(MAX_PEERS >= 65_536, "a /8 in /24s is 65,536 subnets");

/// Our subnet, outside the /8 of peers (the network is 10.0.0.0/7).
const LOCAL: Ipv4Addr = Ipv4Addr::new(11, 0, 0, 10);

/// Peer `i`: 10.0.0.0/24 + i at public IP 172.16.0.0 + i.
fn peer(i: u32) -> ([u8; 4], Ipv4Addr) {
    (
        Ipv4Addr::from(0x0a00_0000 + (i << 8)).octets(),
        Ipv4Addr::from(0xac10_0000 + i),
    )
}

fn full_kernel() -> Kernel {
    require_root();
    let mut kernel = Kernel::load(None).expect("loading the BPF object");
    kernel
        .set_config(&DataplaneConfig {
            local_subnet: [11, 0, 0, 0],
            local_prefix_len: 24,
            network: [10, 0, 0, 0],
            network_prefix_len: 7,
            local_ip: OUR_PUBLIC.octets(),
            udp_port: PORT,
            overlay_mtu: 1472,
            underlay_ifindex: 1,
        })
        .unwrap();
    for i in 0..MAX_PEERS {
        let (subnet, ip) = peer(i);
        kernel
            .peers
            .insert(&Key::new(24, subnet), PeerValue::new(ip.octets(), i + 1), 0)
            .unwrap_or_else(|e| panic!("peer {i} of {MAX_PEERS} into the LPM trie: {e}"));
        kernel
            .senders
            .insert(ip.octets(), 1, 0)
            .unwrap_or_else(|e| panic!("sender {i} of {MAX_PEERS}: {e}"));
    }
    kernel
}

#[test]
fn every_peer_of_a_full_slash_8_encapsulates_and_decapsulates() {
    let kernel = full_kernel();
    for i in [0, MAX_PEERS / 2, MAX_PEERS - 1] {
        let (subnet, peer_ip) = peer(i);
        let container = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 20);

        let inner = ipv4_udp(LOCAL, container, 64, true, 100);
        let out = expect_counted(
            &kernel,
            names::PROG_EGRESS,
            &ethernet(PEER_MAC, OUR_MAC, &inner),
            TC_ACT_OK,
            Counter::Encapsulated,
        );
        let ip = &out[14..34];
        assert_eq!(ip[12..16], OUR_PUBLIC.octets(), "peer {i}: outer source");
        assert_eq!(ip[16..20], peer_ip.octets(), "peer {i}: outer destination");
        assert_eq!(checksum(ip), 0, "peer {i}: outer header checksum");
        assert_eq!(out[42..], inner[..], "peer {i}: inner packet unchanged");

        let inner = ipv4_udp(container, LOCAL, 64, true, 100);
        let out = expect_counted(
            &kernel,
            names::PROG_INGRESS,
            &overlay_frame(peer_ip, OUR_PUBLIC, PORT, &inner),
            TC_ACT_OK,
            Counter::Decapsulated,
        );
        assert_eq!(out[14..], inner[..], "peer {i}: decapsulated packet");
    }
}

#[test]
fn the_peer_maps_hold_exactly_max_peers() {
    let mut kernel = full_kernel();
    let (subnet, ip) = peer(MAX_PEERS);
    assert!(
        kernel
            .peers
            .insert(&Key::new(24, subnet), PeerValue::new(ip.octets(), 0), 0)
            .is_err(),
        "the LPM trie took a peer beyond MAX_PEERS"
    );
    assert!(kernel.senders.insert(ip.octets(), 1, 0).is_err());
}
