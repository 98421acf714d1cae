//! Byte-exact `BPF_PROG_TEST_RUN` tests of the train rule for every inner × outer family:
//! a UDP GSO train goes up to the socket path unchanged (counted `to_daemon`), and so does
//! every datagram of its sender for a while after, whatever its inner or outer family, so
//! that no flow is split between BPF and the socket path. Root needed, as in
//! `kernel_tests.rs`. (The GSO skb is faked through the test run's `__sk_buff` context.)

use rudder_ebpf::{names, Counter};

use super::kernel::Kernel;
use super::kernel_tests::*;
use super::kernel_tests6::{fixture6, LOCAL_HOST6, PEER_HOST6};
use super::kernel_tests_outer6::{
    fixture_outer6, overlay_frame6, OUR_PUBLIC6, PEER3_CONTAINER, PEER3_HOST6, PEER_PUBLIC6,
};
use crate::packet6::tests::udp6;

/// Runs `frame` as a GSO skb: it must go on to the stack untouched, counted `to_daemon`.
fn expect_up_as_train(kernel: &Kernel, frame: &[u8], segment: usize, what: &str) {
    let before = kernel.packet_counts();
    let (verdict, out) = run_gso(kernel, names::PROG_INGRESS, frame, segment as u32);
    assert_eq!(verdict, TC_ACT_UNSPEC, "{what}: on to the stack's socket");
    assert_eq!(out, frame, "{what}: unchanged");
    let after = kernel.packet_counts();
    let to_daemon = Counter::ToDaemon.index();
    assert_eq!(after[to_daemon] - before[to_daemon], 1, "{what}: counted");
}

/// Runs a single datagram (no GSO): up to the stack untouched, counted `to_daemon`.
fn expect_follows(kernel: &Kernel, frame: &[u8], what: &str) {
    let before = kernel.packet_counts();
    let (verdict, out) = run(kernel, names::PROG_INGRESS, frame);
    assert_eq!(
        verdict, TC_ACT_UNSPEC,
        "{what}: follows its sender's trains"
    );
    assert_eq!(out, frame, "{what}: unchanged");
    let after = kernel.packet_counts();
    let to_daemon = Counter::ToDaemon.index();
    assert_eq!(after[to_daemon] - before[to_daemon], 1, "{what}: counted");
}

fn twice(inner: &[u8]) -> Vec<u8> {
    [inner, inner].concat()
}

/// IPv4 outer: an IPv6 train goes up, and the sender's IPv6 and IPv4 datagrams follow it.
#[test]
fn an_ipv6_train_over_ipv4_goes_up_and_its_sender_is_followed() {
    let kernel = fixture6();
    let inner6 = udp6(PEER_HOST6, LOCAL_HOST6, 64, &[7; 100]);
    let single6 = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner6);
    let inner4 = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let single4 = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner4);
    // No train yet: BPF takes both.
    assert_eq!(run(&kernel, names::PROG_INGRESS, &single6).0, TC_ACT_OK);
    assert_eq!(run(&kernel, names::PROG_INGRESS, &single4).0, TC_ACT_OK);

    let train6 = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &twice(&inner6));
    expect_up_as_train(&kernel, &train6, inner6.len(), "IPv6 train over IPv4");
    expect_follows(&kernel, &single6, "IPv6 datagram over IPv4");
    expect_follows(&kernel, &single4, "IPv4 datagram over IPv4");
}

/// IPv4 outer: after an IPv4 train, the sender's IPv6 datagrams go up too.
#[test]
fn after_an_ipv4_train_the_senders_ipv6_datagrams_follow_it() {
    let kernel = fixture6();
    let inner4 = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let train4 = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &twice(&inner4));
    expect_up_as_train(&kernel, &train4, inner4.len(), "IPv4 train over IPv4");
    let inner6 = udp6(PEER_HOST6, LOCAL_HOST6, 64, &[7; 100]);
    let single6 = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inner6);
    expect_follows(&kernel, &single6, "IPv6 datagram over IPv4");
}

/// IPv6 outer: trains of either inner family go up; the sender's datagrams of either
/// family follow; another peer's (over IPv4) keep the BPF path.
#[test]
fn trains_over_ipv6_go_up_and_only_their_sender_is_followed() {
    let kernel = fixture_outer6();
    let inner4 = ipv4_udp(PEER3_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let inner6 = udp6(PEER3_HOST6, LOCAL_HOST6, 64, &[9; 80]);
    let single4 = overlay_frame6(PEER_PUBLIC6, OUR_PUBLIC6, 0, 0, &inner4);
    let single6 = overlay_frame6(PEER_PUBLIC6, OUR_PUBLIC6, 0, 0, &inner6);
    assert_eq!(run(&kernel, names::PROG_INGRESS, &single4).0, TC_ACT_OK);
    assert_eq!(run(&kernel, names::PROG_INGRESS, &single6).0, TC_ACT_OK);

    let train4 = overlay_frame6(PEER_PUBLIC6, OUR_PUBLIC6, 0, 0, &twice(&inner4));
    expect_up_as_train(&kernel, &train4, inner4.len(), "IPv4 train over IPv6");
    let train6 = overlay_frame6(PEER_PUBLIC6, OUR_PUBLIC6, 0, 0, &twice(&inner6));
    expect_up_as_train(&kernel, &train6, inner6.len(), "IPv6 train over IPv6");
    expect_follows(&kernel, &single4, "IPv4 datagram over IPv6");
    expect_follows(&kernel, &single6, "IPv6 datagram over IPv6");

    let other = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 100);
    let other = overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &other);
    let (verdict, out) = run(&kernel, names::PROG_INGRESS, &other);
    assert_eq!(verdict, TC_ACT_OK, "another sender keeps the BPF path");
    assert_eq!(out[14..], other[14 + 28..], "decapsulated");
}
