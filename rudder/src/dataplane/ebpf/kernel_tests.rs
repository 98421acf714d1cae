//! Byte-exact `BPF_PROG_TEST_RUN` tests of the encapsulating classifiers on handcrafted frames,
//! and the helpers the ingress tests (`kernel_decap_tests.rs`) share.
//!
//! They load the real BPF object into the kernel (verifier included), so they need root
//! (CAP_BPF + CAP_NET_ADMIN): without it they fail and say so, they never skip.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use rudder_ebpf::{Counter, DataplaneConfig, PeerValue};

use rudder_ebpf::names;

use super::kernel::Kernel;

pub(super) const TC_ACT_UNSPEC: i32 = -1;
pub(super) const TC_ACT_OK: i32 = 0;
pub(super) const TC_ACT_SHOT: i32 = 2;
pub(super) const TC_ACT_REDIRECT: i32 = 7;

pub(super) const OUR_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 1);
pub(super) const PEER_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 2);
pub(super) const STRANGER_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 99);
pub(super) const LOCAL_CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 5, 1, 10);
pub(super) const PEER_CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 5, 2, 20);
pub(super) const PORT: u16 = 8285;
pub(super) const MTU: u16 = 1472;

pub(super) const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub(super) const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub(super) fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "BPF_PROG_TEST_RUN tests load BPF programs and need root (CAP_BPF, CAP_NET_ADMIN); \
         run them as root, e.g. `sudo -E cargo test -p rudder`"
    );
}

/// A loaded object with one peer (10.5.2.0/24 at 192.168.64.2); we own 10.5.1.0/24.
pub(super) fn fixture() -> Kernel {
    require_root();
    let mut kernel = Kernel::load(None).expect("loading the BPF object");
    kernel
        .set_config(&DataplaneConfig {
            local_subnet: [10, 5, 1, 0],
            local_prefix_len: 24,
            network: [10, 5, 0, 0],
            network_prefix_len: 16,
            local_ip: OUR_PUBLIC.octets(),
            udp_port: PORT,
            overlay_mtu: MTU,
            underlay_ifindex: 1,
        })
        .unwrap();
    kernel
        .peers
        .insert(
            &aya::maps::lpm_trie::Key::new(24, [10, 5, 2, 0]),
            PeerValue::new(PEER_PUBLIC.octets(), 1),
            0,
        )
        .unwrap();
    kernel.senders.insert(PEER_PUBLIC.octets(), 1, 0).unwrap();
    kernel
}

pub(super) fn run(kernel: &Kernel, program: &str, frame: &[u8]) -> (i32, Vec<u8>) {
    let program: &SchedClassifier = kernel.ebpf.program(program).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value as i32, out)
}

pub(super) fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet with a valid header checksum and `payload_len` payload bytes.
pub(super) fn ipv4_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    dont_fragment: bool,
    payload_len: usize,
) -> Vec<u8> {
    let total = 20 + 8 + payload_len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[1] = 0x10;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    if dont_fragment {
        p[6] = 0x40;
    }
    p[8] = ttl;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let csum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&7u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

pub(super) fn ethernet(dst: [u8; 6], src: [u8; 6], l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + l3.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// An overlay datagram as a peer sends it: outer IPv4 + UDP around `inner`.
pub(super) fn overlay_frame(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    dst_port: u16,
    inner: &[u8],
) -> Vec<u8> {
    overlay_frame_with_tos(outer_src, outer_dst, dst_port, 0, inner)
}

/// [`overlay_frame`] with outer TOS byte `tos` (ECN marks the underlay may have set).
pub(super) fn overlay_frame_with_tos(
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    dst_port: u16,
    tos: u8,
    inner: &[u8],
) -> Vec<u8> {
    let total = 28 + inner.len();
    let mut l3 = vec![0u8; 28];
    l3[0] = 0x45;
    l3[1] = tos;
    l3[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    l3[6] = 0x40;
    l3[8] = 64;
    l3[9] = 17;
    l3[12..16].copy_from_slice(&outer_src.octets());
    l3[16..20].copy_from_slice(&outer_dst.octets());
    let csum = checksum(&l3[..20]);
    l3[10..12].copy_from_slice(&csum.to_be_bytes());
    l3[20..22].copy_from_slice(&50000u16.to_be_bytes());
    l3[22..24].copy_from_slice(&dst_port.to_be_bytes());
    l3[24..26].copy_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
    l3.extend_from_slice(inner);
    ethernet(OUR_MAC, PEER_MAC, &l3)
}

/// Offsets of `mark` and `gso_size` in `struct __sk_buff` (uapi/linux/bpf.h), which
/// `BPF_PROG_TEST_RUN` copies into the test skb.
const SKB_MARK_OFFSET: usize = 8;
const SKB_GSO_SIZE_OFFSET: usize = 176;
const SKB_CTX_LEN: usize = 192;

pub(super) fn run_gso(
    kernel: &Kernel,
    program: &str,
    frame: &[u8],
    gso_size: u32,
) -> (i32, Vec<u8>) {
    run_with_skb(kernel, program, frame, gso_size, 0)
}

pub(super) fn run_with_skb(
    kernel: &Kernel,
    program: &str,
    frame: &[u8],
    gso_size: u32,
    mark: u32,
) -> (i32, Vec<u8>) {
    let program: &SchedClassifier = kernel.ebpf.program(program).unwrap().try_into().unwrap();
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_GSO_SIZE_OFFSET..SKB_GSO_SIZE_OFFSET + 4].copy_from_slice(&gso_size.to_ne_bytes());
    ctx[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN with an skb context");
    out.truncate(result.data_size_out as usize);
    (result.return_value as i32, out)
}

/// Runs `program` on `frame` and asserts the verdict and which counter moved by one.
pub(super) fn expect_counted(
    kernel: &Kernel,
    program: &str,
    frame: &[u8],
    verdict: i32,
    counter: Counter,
) -> Vec<u8> {
    let before = kernel.packet_counts();
    let bytes_before = kernel.byte_counts();
    let (ret, out) = run(kernel, program, frame);
    let after = kernel.packet_counts();
    let bytes_after = kernel.byte_counts();
    assert_eq!(
        ret, verdict,
        "verdict of {program} (counters after: {after:?})"
    );
    // Decapsulated counts the inner packet, everything else the IPv4 bytes that arrived.
    let bytes = match counter {
        Counter::Decapsulated => frame.len() - 14 - 28,
        _ => frame.len() - 14,
    } as u64;
    for c in Counter::ALL {
        let expected = before[c.index()] + u64::from(c == counter);
        assert_eq!(
            after[c.index()],
            expected,
            "counter {} after {program}",
            c.name()
        );
        let expected_bytes = bytes_before[c.index()] + if c == counter { bytes } else { 0 };
        assert_eq!(
            bytes_after[c.index()],
            expected_bytes,
            "byte counter {} after {program}",
            c.name()
        );
    }
    out
}

fn peer_traffic(kernel: &Kernel) -> rudder_ebpf::PeerTraffic {
    kernel.peer_traffic(1)
}

#[test]
fn peer_entry_counts_its_traffic_both_ways() {
    let kernel = fixture();
    let outbound = ipv4_udp(LOCAL_CONTAINER, PEER_CONTAINER, 63, true, 100);
    for _ in 0..2 {
        run(
            &kernel,
            names::PROG_EGRESS,
            &ethernet(PEER_MAC, OUR_MAC, &outbound),
        );
    }
    let inbound = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 300);
    let (verdict, _) = run(
        &kernel,
        names::PROG_INGRESS,
        &overlay_frame(PEER_PUBLIC, OUR_PUBLIC, PORT, &inbound),
    );
    assert_eq!(verdict, TC_ACT_OK);
    // A spoofed datagram is not the peer's traffic.
    let spoofed = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 300);
    run(
        &kernel,
        names::PROG_INGRESS,
        &overlay_frame(STRANGER_PUBLIC, OUR_PUBLIC, PORT, &spoofed),
    );
    assert_eq!(
        peer_traffic(&kernel),
        rudder_ebpf::PeerTraffic {
            tx_packets: 2,
            tx_bytes: 2 * outbound.len() as u64,
            rx_packets: 1,
            rx_bytes: inbound.len() as u64,
        }
    );
}

#[test]
fn encap_wraps_peer_traffic_byte_exact() {
    let kernel = fixture();
    let inner = ipv4_udp(LOCAL_CONTAINER, PEER_CONTAINER, 63, true, 100);
    let frame = ethernet(PEER_MAC, OUR_MAC, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_OK,
        Counter::Encapsulated,
    );

    assert_eq!(out.len(), frame.len() + 28);
    assert_eq!(out[..14], frame[..14], "Ethernet header kept");
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[1], 0x10, "TOS copied from inner");
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        inner.len() + 28
    );
    assert_eq!(ip[4..6], [0, 0], "IP id 0 with DF");
    assert_eq!(ip[6..8], [0x40, 0], "DF copied from inner");
    assert_eq!(ip[8], 64);
    assert_eq!(ip[9], 17);
    assert_eq!(ip[12..16], OUR_PUBLIC.octets());
    assert_eq!(ip[16..20], PEER_PUBLIC.octets());
    assert_eq!(checksum(ip), 0, "outer header checksum valid");
    let udp = &out[34..42];
    let src_port = u16::from_be_bytes([udp[0], udp[1]]);
    assert!(
        src_port >= 49152,
        "source port {src_port} in the ephemeral range"
    );
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), PORT);
    assert_eq!(
        u16::from_be_bytes([udp[4], udp[5]]) as usize,
        inner.len() + 8
    );
    assert_eq!(udp[6..8], [0, 0], "UDP checksum 0");
    assert_eq!(out[42..], inner[..], "inner packet unchanged");
}

#[test]
fn encap_without_df_leaves_outer_fragmentable() {
    let kernel = fixture();
    let inner = ipv4_udp(LOCAL_CONTAINER, PEER_CONTAINER, 63, false, 10);
    let frame = ethernet(PEER_MAC, OUR_MAC, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_OK,
        Counter::Encapsulated,
    );
    assert_eq!(out[20..22], [0, 0], "no DF on the outer header");
    assert_eq!(checksum(&out[14..34]), 0);
    assert_eq!(out[42..], inner[..]);
}

#[test]
fn encap_passes_non_overlay_traffic_untouched() {
    let kernel = fixture();
    let packet = ipv4_udp(
        Ipv4Addr::new(192, 168, 64, 1),
        Ipv4Addr::new(8, 8, 8, 8),
        64,
        true,
        20,
    );
    let frame = ethernet(PEER_MAC, OUR_MAC, &packet);
    let out = expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_UNSPEC,
        Counter::Passed,
    );
    assert_eq!(out, frame);
    // Local-subnet traffic is not ours to wrap either.
    let local = ipv4_udp(PEER_CONTAINER, LOCAL_CONTAINER, 64, true, 20);
    let frame = ethernet(PEER_MAC, OUR_MAC, &local);
    let out = expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_UNSPEC,
        Counter::Passed,
    );
    assert_eq!(out, frame);
}

#[test]
fn encap_lets_fast_path_output_through_uncounted() {
    let kernel = fixture();
    let inner = ipv4_udp(LOCAL_CONTAINER, PEER_CONTAINER, 63, true, 20);
    let frame = overlay_frame(OUR_PUBLIC, PEER_PUBLIC, PORT, &inner);
    let before = kernel.packet_counts();
    let (ret, out) = run(&kernel, names::PROG_EGRESS, &frame);
    assert_eq!(
        (ret, &out),
        (TC_ACT_UNSPEC, &frame),
        "already encapsulated: untouched"
    );
    assert_eq!(
        kernel.packet_counts(),
        before,
        "counted once, by rudder_br_in"
    );
}

#[test]
fn encap_drops_overlay_destination_without_peer() {
    let kernel = fixture();
    let inner = ipv4_udp(LOCAL_CONTAINER, Ipv4Addr::new(10, 5, 9, 9), 63, true, 20);
    let frame = ethernet(PEER_MAC, OUR_MAC, &inner);
    expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropNoRoute,
    );
}

#[test]
fn encap_drops_non_gso_packet_above_overlay_mtu() {
    let kernel = fixture();
    let inner = ipv4_udp(
        LOCAL_CONTAINER,
        PEER_CONTAINER,
        63,
        true,
        usize::from(MTU) + 1 - 28,
    );
    let frame = ethernet(PEER_MAC, OUR_MAC, &inner);
    expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_SHOT,
        Counter::DropTooBig,
    );
    // Exactly the overlay MTU still fits.
    let inner = ipv4_udp(
        LOCAL_CONTAINER,
        PEER_CONTAINER,
        63,
        true,
        usize::from(MTU) - 28,
    );
    let frame = ethernet(PEER_MAC, OUR_MAC, &inner);
    expect_counted(
        &kernel,
        names::PROG_EGRESS,
        &frame,
        TC_ACT_OK,
        Counter::Encapsulated,
    );
}

#[test]
fn bridge_fast_path_encapsulates_with_ttl_decremented_and_redirects() {
    let kernel = fixture();
    let inner = ipv4_udp(LOCAL_CONTAINER, PEER_CONTAINER, 64, true, 100);
    let frame = ethernet(OUR_MAC, PEER_MAC, &inner);
    let out = expect_counted(
        &kernel,
        names::PROG_BRIDGE,
        &frame,
        TC_ACT_REDIRECT,
        Counter::Encapsulated,
    );
    assert_eq!(out.len(), frame.len() + 28);
    let outer = &out[14..42];
    assert_eq!(outer[12..16], OUR_PUBLIC.octets());
    assert_eq!(outer[16..20], PEER_PUBLIC.octets());
    assert_eq!(checksum(&outer[..20]), 0);
    assert_eq!(u16::from_be_bytes([outer[22], outer[23]]), PORT);
    let mut expected = inner.clone();
    expected[8] = 63;
    expected[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(&expected[..20]);
    expected[10..12].copy_from_slice(&csum.to_be_bytes());
    assert_eq!(out[42..], expected[..], "inner packet with TTL - 1");
}

#[test]
fn bridge_fast_path_leaves_exceptions_to_the_stack() {
    let kernel = fixture();
    let cases = [
        (
            "not for a peer",
            ipv4_udp(LOCAL_CONTAINER, Ipv4Addr::new(8, 8, 8, 8), 64, true, 20),
        ),
        (
            "TTL expiring",
            ipv4_udp(LOCAL_CONTAINER, PEER_CONTAINER, 1, true, 20),
        ),
        (
            "above the overlay MTU",
            ipv4_udp(LOCAL_CONTAINER, PEER_CONTAINER, 64, true, usize::from(MTU)),
        ),
    ];
    for (what, packet) in cases {
        let frame = ethernet(OUR_MAC, PEER_MAC, &packet);
        let before = kernel.packet_counts();
        let (ret, out) = run(&kernel, names::PROG_BRIDGE, &frame);
        assert_eq!(ret, TC_ACT_UNSPEC, "{what}: verdict");
        assert_eq!(out, frame, "{what}: packet changed");
        assert_eq!(kernel.packet_counts(), before, "{what}: counters moved");
    }
}

#[test]
fn programs_pass_the_verifier_within_budget() {
    let kernel = fixture();
    let sizes: Vec<_> = [names::PROG_EGRESS, names::PROG_INGRESS, names::PROG_BRIDGE]
        .into_iter()
        .map(|name| {
            let (count, size) = kernel.program_sizes(name).unwrap();
            eprintln!("{name}: {size} instructions, {count} processed by the verifier");
            (name, count)
        })
        .collect();
    for (name, count) in sizes {
        // The kernel allows 1M processed instructions; this budget catches an accidental
        // blow-up (an unrolled loop, a log call inlined into a hot path) early. It includes
        // the out-of-line aya-log formatting of the rare-failure path and the IPv6 paths
        // (both inner families over both outer ones: ~27000 for egress, ~34000 for ingress;
        // the extension-header walk runs in `bpf_loop`, as a plain loop it alone cost
        // 40000-80000).
        assert!(
            count > 0 && count < 65536,
            "{name} has {count} instructions"
        );
    }
}
