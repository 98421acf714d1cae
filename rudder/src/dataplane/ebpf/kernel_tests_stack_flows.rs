//! `BPF_PROG_TEST_RUN` tests of the rules that keep the fast paths out of the stack's way:
//! replies of flows the stack forwarded (maybe NAT'd) go back through it, GSO segments that
//! would not fit the overlay MTU are left to the stack, and plain overlay-to-overlay packets
//! from the underlay are dropped.

use std::net::Ipv4Addr;

use rudder_ebpf::{names, Counter, LocalEndpoint, STACK_MARK};

use super::kernel::Kernel;
use super::kernel_tests::{
    checksum, ethernet, expect_counted, fixture, ipv4_udp, overlay_frame, run, run_gso,
    run_with_skb, LOCAL_CONTAINER, MTU, OUR_MAC, OUR_PUBLIC, PEER_CONTAINER, PEER_MAC, PEER_PUBLIC,
    PORT, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
};

const CONTAINER_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x10];
const BRIDGE_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];

fn with_local_endpoint() -> Kernel {
    let mut kernel = fixture();
    kernel
        .endpoints
        .insert(
            LOCAL_CONTAINER.octets(),
            LocalEndpoint {
                host_ifindex: 1,
                container_mac: CONTAINER_MAC,
                gateway_mac: BRIDGE_MAC,
            },
            0,
        )
        .unwrap();
    kernel
}

/// `ipv4_udp` with other ports (the header checksum does not cover them; UDP's is 0).
fn udp(src: Ipv4Addr, dst: Ipv4Addr, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut p = ipv4_udp(src, dst, 64, true, 100);
    p[20..22].copy_from_slice(&src_port.to_be_bytes());
    p[22..24].copy_from_slice(&dst_port.to_be_bytes());
    p
}

/// Decapsulates `reply` (sent by the peer), asserts the verdict and returns the packet.
fn deliver_reply(kernel: &Kernel, reply: &[u8], verdict: i32) -> Vec<u8> {
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, reply);
    expect_counted(
        kernel,
        names::PROG_INGRESS,
        &frame,
        verdict,
        Counter::Decapsulated,
    )
}

#[test]
fn replies_of_flows_the_stack_forwarded_go_back_through_the_stack() {
    let kernel = with_local_endpoint();
    // The request as the stack forwards it after DNAT (service address → peer container).
    let request = udp(LOCAL_CONTAINER, PEER_CONTAINER, 40000, 80);
    let reply = udp(PEER_CONTAINER, LOCAL_CONTAINER, 80, 40000);
    let other_flow = udp(PEER_CONTAINER, LOCAL_CONTAINER, 80, 40001);

    // Before any request: the fast path.
    deliver_reply(&kernel, &reply, TC_ACT_REDIRECT);

    expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &ethernet(PEER_MAC, OUR_MAC, &request),
        TC_ACT_OK,
        Counter::Encapsulated,
    );

    // The reply of a stack-forwarded flow: to the stack.
    let out = deliver_reply(&kernel, &reply, TC_ACT_OK);
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &reply);
    assert_eq!(out[..14], frame[..14], "Ethernet header kept for the stack");
    // The stack's forwarding makes the hop (TTL - 1) on its way to the container.
    assert_eq!(out[14..], reply[..], "decapsulated, TTL unchanged");

    // Another port pair: still the fast path.
    deliver_reply(&kernel, &other_flow, TC_ACT_REDIRECT);
}

#[test]
fn flows_of_the_bridge_fast_path_keep_the_redirect() {
    let kernel = with_local_endpoint();
    let request = udp(LOCAL_CONTAINER, PEER_CONTAINER, 40002, 80);
    let (verdict, _) = run(
        &kernel,
        names::PROG_BRIDGE,
        &ethernet(OUR_MAC, PEER_MAC, &request),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "request took the fast path");
    // Its output, seen by rudder_egress, is skipped there and not remembered.
    let (_, encapsulated) = run(
        &kernel,
        names::PROG_BRIDGE,
        &ethernet(OUR_MAC, PEER_MAC, &request),
    );
    assert_eq!(
        run(&kernel, names::PROG_EGRESS, &encapsulated).0,
        TC_ACT_UNSPEC
    );
    deliver_reply(
        &kernel,
        &udp(PEER_CONTAINER, LOCAL_CONTAINER, 80, 40002),
        TC_ACT_REDIRECT,
    );
}

#[test]
fn bridge_fast_path_leaves_packets_of_nat_connections_to_the_stack() {
    let kernel = fixture();
    // After a bridge-level DNAT the destination is the peer container: only the mark that
    // rudder's nftables rule sets tells it apart.
    let frame = ethernet(
        OUR_MAC,
        PEER_MAC,
        &udp(LOCAL_CONTAINER, PEER_CONTAINER, 40003, 80),
    );
    let before = kernel.packet_counts();
    let (verdict, out) = run_with_skb(&kernel, names::PROG_BRIDGE, &frame, 0, STACK_MARK | 0x4000);
    assert_eq!(verdict, TC_ACT_UNSPEC, "marked: to the stack");
    assert_eq!(out, frame);
    assert_eq!(kernel.packet_counts(), before);
    let (verdict, _) = run_with_skb(&kernel, names::PROG_BRIDGE, &frame, 0, 0x4000);
    assert_eq!(verdict, TC_ACT_REDIRECT, "other mark bits: fast path");
}

#[test]
fn inner_fragments_go_to_the_stack() {
    let kernel = with_local_endpoint();
    let mut fragment = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, false, 100);
    fragment[6] = 0x20; // MF
    fragment[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&fragment[..20]);
    fragment[10..12].copy_from_slice(&csum.to_be_bytes());
    deliver_reply(&kernel, &fragment, TC_ACT_OK);
}

#[test]
fn plain_overlay_to_overlay_packets_from_the_underlay_are_dropped() {
    let kernel = with_local_endpoint();
    let plain = udp(PEER_CONTAINER, LOCAL_CONTAINER, 4000, 9999);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &ethernet(OUR_MAC, PEER_MAC, &plain),
        TC_ACT_SHOT,
        Counter::DropUnencapsulated,
    );
    // To another overlay address (forwarded by the host) as well.
    let elsewhere = udp(PEER_CONTAINER, Ipv4Addr::new(10, 5, 9, 9), 4000, 9999);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &ethernet(OUR_MAC, PEER_MAC, &elsewhere),
        TC_ACT_SHOT,
        Counter::DropUnencapsulated,
    );
    // An overlay source to the host's underlay address (a peer container without
    // masquerade) is not ours to judge.
    let to_host = udp(PEER_CONTAINER, OUR_PUBLIC, 4000, 9999);
    expect_counted(
        &kernel,
        names::PROG_INGRESS,
        &ethernet(OUR_MAC, PEER_MAC, &to_host),
        TC_ACT_UNSPEC,
        Counter::Passed,
    );
}

/// IPv4 (DF) + TCP with a 32-byte header (timestamps) and `payload_len` bytes.
fn ipv4_tcp(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let total = 20 + 32 + payload_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let csum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&80u16.to_be_bytes());
    p[32] = 8 << 4; // data offset: 8 words
    p[33] = 0x10; // ACK
    p
}

#[test]
fn bridge_fast_path_leaves_gso_packets_with_too_large_segments_to_the_stack() {
    let kernel = fixture();
    // A container with MTU 1500: segments of 1448 bytes + 52 of headers = 1500 > 1472.
    let too_large = ethernet(
        OUR_MAC,
        PEER_MAC,
        &ipv4_tcp(LOCAL_CONTAINER, PEER_CONTAINER, 2896),
    );
    let before = kernel.packet_counts();
    let (verdict, out) = run_gso(&kernel, names::PROG_BRIDGE, &too_large, 1448);
    assert_eq!(verdict, TC_ACT_UNSPEC, "too-large segments: to the stack");
    assert_eq!(out, too_large, "packet unchanged");
    assert_eq!(kernel.packet_counts(), before, "nothing counted");

    // Segments that fit exactly (1420 + 52 = the overlay MTU) take the fast path: the program
    // encapsulates. (A test skb cannot carry a gso_type, so the kernel's adjust_room refuses
    // the GSO encapsulation: counted io_error. A non-GSO packet of this size would have gone
    // to the stack uncounted, so this shows the segment size decided.)
    let segment = usize::from(MTU) - 52;
    let fitting = ethernet(
        OUR_MAC,
        PEER_MAC,
        &ipv4_tcp(LOCAL_CONTAINER, PEER_CONTAINER, 2 * segment),
    );
    let before = kernel.packet_counts();
    let (verdict, _) = run_gso(&kernel, names::PROG_BRIDGE, &fitting, segment as u32);
    assert_eq!(verdict, TC_ACT_SHOT, "fitting segments: fast path tried");
    let after = kernel.packet_counts();
    assert_eq!(
        after[Counter::DropIoError.index()],
        before[Counter::DropIoError.index()] + 1
    );
    // One byte more per segment: to the stack again.
    let (verdict, _) = run_gso(&kernel, names::PROG_BRIDGE, &fitting, segment as u32 + 1);
    assert_eq!(verdict, TC_ACT_UNSPEC, "segments one byte too large");
}
