//! The eBPF plane's IPv6 fast paths on dual-stack hosts: a container behind a bridge rudder
//! did not create (the harness's `obr0`, holding both gateway addresses) is found by its
//! IPv6 neighbour entry, and IPv6 pings and TCP between it and a container on another host
//! pass none of its host's forwarding (`Ip6OutForwDatagrams`): decapsulated straight into
//! the container, encapsulated straight from the bridge. The same for a bridgeless veth with
//! a /128 route (CNI ptp style).

use std::time::Duration;

use rudder_tests::dual_stack::{add_dual_stack_host, DUAL_STACK_CONFIG};
use rudder_tests::outside_bridge::{make_bridge, wait_adopted};
use rudder_tests::outside_bridge6::{
    add_bridge_ipv6, add_dual_stack_container, add_routed_dual_stack_container,
    forwarded_datagrams6, ping6_series, wait_fast_path6,
};
use rudder_tests::traffic6::{tcp_transfer6, wait_ping6, Endpoint6};
use rudder_tests::{check, e2e, wait_until, Host, HostOpts};

/// Pings both ways between `remote` and `ctr` (on `host`): all answered, (almost) none
/// through `host`'s forwarding.
fn pings_skip_forwarding(
    host: &Host,
    remote: &Endpoint6,
    ctr: &Endpoint6,
    kind: &str,
) -> anyhow::Result<()> {
    for (what, from, to) in [
        (format!("to the {kind} container"), remote, ctr),
        (format!("from the {kind} container"), ctr, remote),
    ] {
        let before = forwarded_datagrams6(host)?;
        let (sent, received) = ping6_series(from, to.ip, PINGS as u32, Duration::from_millis(10))?;
        let forwarded = forwarded_datagrams6(host)? - before;
        println!(
            "pings {what}: {received} of {sent} answered, {forwarded} IPv6 packets forwarded by {}",
            host.name()
        );
        check!(
            sent == received,
            "{received} of {sent} pings {what} answered"
        );
        check!(
            forwarded < PINGS / 2,
            "{forwarded} IPv6 packets forwarded by {}'s stack for {PINGS} pings {what}: not the fast path",
            host.name()
        );
    }
    Ok(())
}

/// Pings that must not pass the receiving host's forwarding.
const PINGS: u64 = 20;
/// Bytes of the TCP transfer each way.
const TCP_BYTES: usize = 4 << 20;

#[test]
fn ipv6_between_containers_skips_the_forwarding_of_a_host_with_an_outside_bridge() {
    e2e(|c| {
        c.put_config(DUAL_STACK_CONFIG)?;
        let ebpf = || HostOpts {
            dataplane: Some("ebpf".into()),
            ..HostOpts::default()
        };
        let a = add_dual_stack_host(c, ebpf())?;
        let b = add_dual_stack_host(
            c,
            HostOpts {
                external_bridge: true,
                wait_ready: false,
                ..ebpf()
            },
        )?;
        b.wait_ready(Duration::from_secs(30))?;
        wait_until(
            "the hosts to see each other's IPv6 subnets",
            Duration::from_secs(30),
            || Ok(a.sees_peer6(&b)? && b.sees_peer6(&a)?),
        )?;
        make_bridge(&b)?;
        add_bridge_ipv6(&b)?;
        wait_adopted(&b)?;
        let (_, ctr) = add_dual_stack_container(&b, 1)?;
        wait_fast_path6(&b, &ctr)?;

        let remote = a.container6()?;
        wait_ping6(&remote, ctr.ip, Duration::from_secs(10))?;
        wait_ping6(&ctr, remote.ip, Duration::from_secs(10))?;
        pings_skip_forwarding(&b, &remote, &ctr, "outside-bridge")?;
        for (what, from, to) in [
            ("to the outside-bridge container", &remote, &ctr),
            ("from the outside-bridge container", &ctr, &remote),
        ] {
            let before = forwarded_datagrams6(&b)?;
            let transfer = tcp_transfer6(from, to, TCP_BYTES)?;
            let forwarded = forwarded_datagrams6(&b)? - before;
            println!(
                "TCP {what}: {:.0} Mbit/s, {forwarded} IPv6 packets forwarded by {}",
                transfer.mbit_per_s(),
                b.name()
            );
            // A handful may pass the stack (e.g. a segment too big for the fast path); the
            // transfer's thousands of segments must not.
            check!(
                forwarded < 64,
                "{forwarded} IPv6 packets forwarded by {}'s stack for a TCP transfer {what}: not the fast path",
                b.name()
            );
        }
        Ok(())
    });
}

#[test]
fn ipv6_of_a_bridgeless_veth_with_a_host_route_skips_the_hosts_forwarding() {
    e2e(|c| {
        c.put_config(DUAL_STACK_CONFIG)?;
        let ebpf = || HostOpts {
            dataplane: Some("ebpf".into()),
            ..HostOpts::default()
        };
        let a = add_dual_stack_host(c, ebpf())?;
        let b = add_dual_stack_host(
            c,
            HostOpts {
                external_bridge: true,
                wait_ready: false,
                ..ebpf()
            },
        )?;
        b.wait_ready(Duration::from_secs(30))?;
        wait_until(
            "the hosts to see each other's IPv6 subnets",
            Duration::from_secs(30),
            || Ok(a.sees_peer6(&b)? && b.sees_peer6(&a)?),
        )?;
        let (_, ctr) = add_routed_dual_stack_container(&b, 1)?;
        wait_fast_path6(&b, &ctr)?;
        let remote = a.container6()?;
        wait_ping6(&remote, ctr.ip, Duration::from_secs(10))?;
        wait_ping6(&ctr, remote.ip, Duration::from_secs(10))?;
        pings_skip_forwarding(&b, &remote, &ctr, "routed")
    });
}
