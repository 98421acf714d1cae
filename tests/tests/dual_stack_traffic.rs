//! Dual stack (issue 17), the data plane: containers exchange IPv6 (and IPv4 at the same
//! time) across hosts on whichever plane `$RUDDER_TEST_DATAPLANE` picks.

use rudder_tests::dual_stack::{dual_stack_cluster, ip6};
use rudder_tests::traffic6::ping6;
use rudder_tests::{check, e2e, netns};

/// The harness's dual-stack hosts: IPv6 underlay between hosts, the bridge's IPv6 gateway
/// (rudder's `--bridge`), the container's address and route to it.
#[test]
fn harness_gives_hosts_and_containers_ipv6() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        ping6(a.netns(), b.underlay_ipv6())?;
        let a6 = a.ipv6_subnet()?;
        check!(a6.prefix_len() == 64, "{a6}");
        let bridge = ip6(a.netns(), &["addr", "show", "dev", "rbr0"])?;
        check!(
            bridge.contains(&format!("{}/64", a.gateway_ip6()?)),
            "bridge: {bridge}"
        );
        // The container reaches its gateway over the bridge (no overlay involved).
        ping6(a.container_netns(), a.gateway_ip6()?)?;
        let routes = ip6(a.container_netns(), &["route", "show", "default"])?;
        check!(
            routes.contains(&a.gateway_ip6()?.to_string()),
            "container routes: {routes}"
        );
        let fwd = netns::exec_ok(a.netns(), "sysctl", &["-n", "net.ipv6.conf.all.forwarding"])?;
        check!(fwd.trim() == "1", "IPv6 forwarding: {fwd}");
        Ok(())
    });
}
