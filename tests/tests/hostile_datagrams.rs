//! (7) Garbage datagrams and packets with a spoofed inner source, sent from one host to
//! another's UDP port 8285, are dropped and counted; real traffic goes on.

use rudder_tests::cluster::UDP_PORT;
use rudder_tests::packet::ipv4_udp;
use rudder_tests::{
    add_hosts, check, e2e, ping, send_udp, tcp_transfer, wait_mesh, wait_until, UdpProbe,
};
use std::net::SocketAddrV4;
use std::time::Duration;

const PROBE_PORT: u16 = 9999;

#[test]
fn garbage_and_spoofed_datagrams_are_dropped_and_counted() {
    e2e(|c| {
        let hosts = add_hosts(c, 3)?;
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let (a, b, other) = (&hosts[0], &hosts[1], &hosts[2]);
        let to_b = SocketAddrV4::new(b.underlay_ip(), UDP_PORT);
        let probe = UdpProbe::bind(
            b.container_netns(),
            SocketAddrV4::new(b.container_ip(), PROBE_PORT),
        )?;

        // Control: a well-formed packet from a's own container address, sent the same way,
        // is delivered (so the drops below are the daemon's decision, not the test's).
        let legit = ipv4_udp(
            a.container_ip(),
            b.container_ip(),
            4000,
            PROBE_PORT,
            64,
            b"legit",
        );
        send_udp(a.netns(), to_b, &legit)?;
        let got = probe.collect(Duration::from_secs(3))?;
        check!(
            got.iter().any(|(p, _)| p == b"legit"),
            "control packet not delivered; got {got:?}"
        );

        let counters = |h: &rudder_tests::Host| -> anyhow::Result<(u64, u64, u64)> {
            let bad = h.counter("malformed")? + h.counter("truncated")? + h.counter("not_ipv4")?;
            Ok((bad, h.counter("not_ipv4")?, h.counter("spoofed_source")?))
        };
        let (bad0, v6_0, spoof0) = counters(b)?;

        // Garbage: too short for an IPv4 header; an IPv6-looking packet; an IPv4 header with
        // IHL 4 (shorter than the minimum) and a total length beyond the datagram.
        send_udp(a.netns(), to_b, b"\x45\x00\x00")?;
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        send_udp(a.netns(), to_b, &v6)?;
        let mut bad_ihl = ipv4_udp(
            a.container_ip(),
            b.container_ip(),
            4000,
            PROBE_PORT,
            64,
            b"bad",
        );
        bad_ihl[0] = 0x44;
        bad_ihl[2..4].copy_from_slice(&1400u16.to_be_bytes());
        send_udp(a.netns(), to_b, &bad_ihl)?;

        // Spoofed: a well-formed packet from a's underlay address whose inner source lies in
        // another host's subnet.
        let spoofed = ipv4_udp(
            other.container_ip(),
            b.container_ip(),
            4000,
            PROBE_PORT,
            64,
            b"spoofed",
        );
        send_udp(a.netns(), to_b, &spoofed)?;

        wait_until(
            "the garbage and spoofed counters to grow",
            Duration::from_secs(10),
            || {
                let (bad, v6n, spoof) = counters(b)?;
                Ok(bad >= bad0 + 3 && v6n > v6_0 && spoof > spoof0)
            },
        )
        .map_err(|e| anyhow::anyhow!("{e:#}; /status now: {}", b.status().unwrap_or_default()))?;
        let got = probe.collect(Duration::from_secs(1))?;
        check!(
            !got.iter().any(|(p, _)| p == b"spoofed" || p == b"bad"),
            "dropped packets were delivered: {got:?}"
        );

        b.check_alive()?;
        ping(&a.container(), b.container_ip())?;
        ping(&b.container(), a.container_ip())?;
        tcp_transfer(&a.container(), &b.container(), 1 << 20)?;
        Ok(())
    });
}
