//! `BPF_PROG_TEST_RUN` tests of the IPv6 stack flows: the replies of an IPv6 flow the host's
//! stack forwarded to a peer (maybe NAT'd) are handed to the stack after decapsulation,
//! never redirected into the container, and so is IPv6 whose flow BPF cannot tell.

use rudder_ebpf::{names, Counter};

use super::kernel::Kernel;
use super::kernel_tests::*;
use super::kernel_tests6::{ethernet6, fixture6};
use super::kernel_tests_fast6::{with_local_endpoint6, LOCAL_HOST6, PEER_HOST6};
use crate::packet6::tests::{ipv6_packet, udp6};

/// `udp6` with other ports (nothing on the way checks the UDP checksum).
fn udp6_ports(src: &str, dst: &str, src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut p = udp6(src, dst, 64, &[0x42; 100]);
    p[40..42].copy_from_slice(&src_port.to_be_bytes());
    p[42..44].copy_from_slice(&dst_port.to_be_bytes());
    p
}

/// Decapsulates `inner` (sent by the peer) and returns the verdict and the packet.
fn deliver(kernel: &Kernel, inner: &[u8], verdict: i32) -> Vec<u8> {
    let frame = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, inner);
    expect_counted(
        kernel,
        names::PROG_INGRESS,
        &frame,
        verdict,
        Counter::Decapsulated,
    )
}

#[test]
fn replies_of_ipv6_flows_the_stack_forwarded_go_back_through_the_stack() {
    let kernel = with_local_endpoint6(fixture6());
    let request = udp6_ports(LOCAL_HOST6, PEER_HOST6, 40000, 80);
    let reply = udp6_ports(PEER_HOST6, LOCAL_HOST6, 80, 40000);
    let other_flow = udp6_ports(PEER_HOST6, LOCAL_HOST6, 80, 40001);

    // Before any request: the fast path.
    deliver(&kernel, &reply, TC_ACT_REDIRECT);

    // The request as the stack forwards it (after a DNAT, say) to the peer.
    expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &ethernet6(PEER_MAC, OUR_MAC, &request),
        TC_ACT_REDIRECT,
        Counter::Encapsulated,
    );

    // Its reply: to the stack, as decapsulated (the stack's forwarding makes the hop).
    let out = deliver(&kernel, &reply, TC_ACT_OK);
    assert_eq!(out[14..], reply[..], "inner packet as sent");
    // Another flow between the same containers keeps the fast path.
    deliver(&kernel, &other_flow, TC_ACT_REDIRECT);
}

#[test]
fn ipv6_whose_flow_bpf_cannot_tell_is_never_redirected() {
    let kernel = with_local_endpoint6(fixture6());
    // A hop-by-hop options header (PadN) before UDP: conntrack sees the flow, BPF does not.
    let mut payload = vec![17, 0, 1, 4, 0, 0, 0, 0];
    payload.extend_from_slice(&udp6(PEER_HOST6, LOCAL_HOST6, 64, &[0x42; 60])[40..]);
    let inner = ipv6_packet(PEER_HOST6, LOCAL_HOST6, 64, 0, &payload);
    let out = deliver(&kernel, &inner, TC_ACT_OK);
    assert_eq!(out[14..], inner[..]);
}
