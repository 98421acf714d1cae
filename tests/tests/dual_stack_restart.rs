//! Dual stack (issue 17) across a restart while etcd is down: the state file keeps the IPv6
//! halves of the peers, so a host brought up before etcd answers reaches its peers over the
//! same outer family as before (IPv6 here: IPv4 UDP between the underlay addresses is
//! dropped) and carries IPv6 containers' traffic at once; etcd's return changes nothing.

use std::time::Duration;

use rudder_tests::dual_stack::{
    add_dual_stack_host, drop_ipv4_underlay_udp, ipv4_underlay_drops, wait_mesh6, DUAL_STACK_CONFIG,
};
use rudder_tests::traffic6::{tcp_transfer6, wait_ping6};
use rudder_tests::{check, e2e, tcp_transfer, wait_mesh, wait_ping, wait_until, HostOpts};

#[test]
fn restart_during_an_etcd_outage_keeps_ipv6_peers_and_the_ipv6_underlay() {
    e2e(|c| {
        // Without --cleanup-on-exit: a stop leaves the data plane and the state file.
        c.put_config(DUAL_STACK_CONFIG)?;
        let opts = HostOpts {
            cleanup_on_exit: false,
            ..HostOpts::default()
        };
        let hosts = vec![
            add_dual_stack_host(c, opts.clone())?,
            add_dual_stack_host(c, opts)?,
        ];
        for h in &hosts {
            drop_ipv4_underlay_udp(h)?;
        }
        wait_mesh(&hosts, Duration::from_secs(30))?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let (a, b) = (&hosts[0], &hosts[1]);
        let saved = std::fs::read_to_string(a.subnet_file().with_file_name("rudder-state.json"))?;
        check!(
            saved.contains("\"ipv6_peers\"") && saved.contains(&b.ipv6_subnet()?.to_string()),
            "the state file has no IPv6 halves:\n{saved}"
        );

        c.stop_etcd()?;
        a.stop()?;
        a.start()?;
        // Ready from the state file alone.
        a.wait_ready_dual_stack(Duration::from_secs(30))?;
        check!(
            a.log().contains("before etcd answered"),
            "the restart did not come up from the state file:\n{}",
            a.log()
        );
        for (from, to) in [(a, b), (b, a)] {
            wait_ping6(
                &from.container6()?,
                to.container_ip6()?,
                Duration::from_secs(10),
            )?;
            // IPv4 containers too, over the IPv6 underlay (IPv4 UDP is dropped).
            wait_ping(
                &from.container(),
                to.container_ip(),
                Duration::from_secs(10),
            )?;
        }
        tcp_transfer6(&a.container6()?, &b.container6()?, 2 << 20)?;
        tcp_transfer(&b.container(), &a.container(), 2 << 20)?;

        c.start_etcd()?;
        wait_until(
            "a to list b's IPv6 half after etcd returned",
            Duration::from_secs(60),
            || a.sees_peer6(b),
        )?;
        tcp_transfer6(&b.container6()?, &a.container6()?, 2 << 20)?;
        for h in &hosts {
            let dropped = ipv4_underlay_drops(h)?;
            check!(
                dropped == 0,
                "{}: {dropped} overlay datagrams tried the IPv4 underlay",
                h.name()
            );
        }
        Ok(())
    });
}
