//! Local endpoints on the eBPF plane, whoever made the bridge or veth: containers plugged
//! one by one into a bridge the harness made (no `--bridge`), and a bridgeless veth with a
//! /32 route (CNI ptp style), reach the fast delivery path; the time from a container's
//! first packet to its fast-path entry is printed (not asserted).

use std::net::SocketAddrV4;
use std::time::Duration;

use rudder_tests::outside_bridge::{
    add_routed_container, fast_path_endpoints, first_packet_to_fast_path, forwarded_datagrams,
    make_bridge, time_to_fast_path, wait_adopted,
};
use rudder_tests::traffic::ping_series;
use rudder_tests::util::{ip, percentile};
use rudder_tests::{check, e2e, send_udp, wait_ping, wait_until, HostOpts};

/// Pings that must not pass the receiving host's forwarding.
const PINGS: u64 = 20;

#[test]
fn containers_on_an_outside_bridge_reach_the_fast_path_as_they_appear() {
    e2e(|c| {
        let ebpf = || HostOpts {
            dataplane: Some("ebpf".into()),
            ..HostOpts::default()
        };
        let a = c.add_host(ebpf())?;
        let b = c.add_host(HostOpts {
            external_bridge: true,
            ..ebpf()
        })?;
        wait_until(
            "the hosts to see each other",
            Duration::from_secs(30),
            || Ok(a.sees_peer(&b)? && b.sees_peer(&a)?),
        )?;
        make_bridge(&b)?;
        wait_adopted(&b)?;

        let mut times = Vec::new();
        let mut containers = Vec::new();
        for n in 1..=5 {
            let (ctr, took) = time_to_fast_path(&b, n)?;
            println!(
                "container {} on the fast path after {:.1} ms",
                ctr.ip,
                took.as_secs_f64() * 1e3
            );
            times.push(took.as_secs_f64() * 1e3);
            containers.push(ctr);
        }
        println!(
            "container on the fast path after {:.1} ms (median of {})",
            percentile(&times, 50),
            times.len()
        );

        // Delivered by the fast path: the receiving host's stack forwards none of the pings
        // (decapsulated straight into the container, answered through the bridge program).
        for ctr in &containers {
            wait_ping(&a.container(), ctr.ip, Duration::from_secs(10))?;
            let before = forwarded_datagrams(&b)?;
            let (sent, received) = ping_series(
                &a.container(),
                ctr.ip,
                PINGS as u32,
                Duration::from_millis(10),
            )?;
            let forwarded = forwarded_datagrams(&b)? - before;
            println!(
                "{}: {received} of {sent} pings answered, {forwarded} datagrams forwarded by the host",
                ctr.ip
            );
            check!(
                sent == received,
                "{received} of {sent} pings to {} answered",
                ctr.ip
            );
            check!(
                forwarded < PINGS / 2,
                "{forwarded} datagrams forwarded by {}'s stack for {PINGS} pings to {}: not the fast path",
                b.name(),
                ctr.ip
            );
        }

        // A container whose veth goes: its entry goes too.
        let before = fast_path_endpoints(&b)?;
        ip(&["-n", b.netns(), "link", "del", "ov1"])?;
        wait_until(
            "the removed container's fast-path entry to go",
            Duration::from_secs(10),
            || Ok(fast_path_endpoints(&b)? < before),
        )?;
        Ok(())
    });
}

#[test]
fn a_bridgeless_veth_with_a_host_route_gets_the_fast_path() {
    e2e(|c| {
        let a = c.add_host(HostOpts {
            dataplane: Some("ebpf".into()),
            ..HostOpts::default()
        })?;
        let b = c.add_host(HostOpts {
            dataplane: Some("ebpf".into()),
            external_bridge: true,
            ..HostOpts::default()
        })?;
        wait_until(
            "the hosts to see each other",
            Duration::from_secs(30),
            || Ok(a.sees_peer(&b)? && b.sees_peer(&a)?),
        )?;
        let before = fast_path_endpoints(&b)?;
        let ctr = add_routed_container(&b, 1)?;
        // A datagram, not a ping: an ICMP flow the host forwarded before the fast path was
        // there keeps its replies on the host's path (`stack_flows`), as a NAT'd flow must.
        let peer = SocketAddrV4::new(a.container_ip(), 7);
        let took = first_packet_to_fast_path(&b, &ctr, before, || {
            send_udp(&ctr.ns, peer, b"first packet")
        })?;
        println!(
            "routed container {} on the fast path after {:.1} ms",
            ctr.ip,
            took.as_secs_f64() * 1e3
        );
        // Both ways on the fast paths: the host's stack forwards none of them.
        let before = forwarded_datagrams(&b)?;
        let (sent, received) = ping_series(
            &a.container(),
            ctr.ip,
            PINGS as u32,
            Duration::from_millis(10),
        )?;
        let forwarded = forwarded_datagrams(&b)? - before;
        println!(
            "{received} of {sent} pings answered, {forwarded} datagrams forwarded by the host"
        );
        check!(
            sent == received,
            "{received} of {sent} pings to {} answered",
            ctr.ip
        );
        check!(
            forwarded < PINGS / 2,
            "{forwarded} datagrams forwarded by {}'s stack for {PINGS} pings to {}: not the fast path",
            b.name(),
            ctr.ip
        );
        Ok(())
    });
}
