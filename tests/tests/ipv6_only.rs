//! An IPv6-only network (issue 17): flannel's `EnableIPv4: false`. Each host leases only an
//! IPv6 subnet (flannel's `0.0.0.0-0&<v6>` key), writes no IPv4 lines to its subnet file, puts
//! no IPv4 address, route or rule anywhere, and containers exchange IPv6 over IPv6 outer
//! headers on whichever plane `$RUDDER_TEST_DATAPLANE` picks. A host without an IPv6 underlay
//! address cannot take part and says so.

use std::net::Ipv6Addr;
use std::time::Duration;

use anyhow::{anyhow, Result};
use ipnet::Ipv6Net;
use rudder_tests::cluster::BRIDGE;
use rudder_tests::dual_stack::ip6;
use rudder_tests::traffic6::{ping6, tcp_transfer6, wait_ping6, Endpoint6};
use rudder_tests::util::ip;
use rudder_tests::{check, e2e, netns, wait_until, Cluster, Host, HostOpts};

const IPV6_ONLY: &str =
    r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"udp"}}"#;

/// Starts a host (IPv6 underlay address first, when `with_ipv6`) and, once ready, gives it a
/// container with an address in its IPv6 subnet behind rudder's bridge.
fn ipv6_only_host(c: &Cluster, with_ipv6: bool) -> Result<Host> {
    let h = c.add_host_without_daemon(HostOpts {
        wait_ready: false,
        ..HostOpts::default()
    })?;
    if with_ipv6 {
        let address = format!("{}/64", h.underlay_ipv6());
        ip(&[
            "-n",
            h.netns(),
            "-6",
            "addr",
            "add",
            &address,
            "dev",
            "eth0",
            "nodad",
        ])?;
    } else {
        // Not even a link-local address (flanneld would announce that one).
        netns::exec_ok(
            h.netns(),
            "sysctl",
            &["-qw", "net.ipv6.conf.eth0.disable_ipv6=1"],
        )?;
    }
    h.start()?;
    Ok(h)
}

/// The IPv6 subnet once the host is ready (subnet file written, `/readyz` 200).
fn wait_ipv6_subnet(h: &Host) -> Result<(Ipv6Net, String)> {
    let mut found = None;
    wait_until(
        "an IPv6-only subnet file and /readyz 200",
        Duration::from_secs(30),
        || {
            h.check_alive()?;
            let Ok(text) = std::fs::read_to_string(h.subnet_file()) else {
                return Ok(false);
            };
            let Some(subnet) = text
                .lines()
                .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
            else {
                return Ok(false);
            };
            let subnet: Ipv6Net = subnet.trim().parse()?;
            found = Some((subnet.trunc(), text.clone()));
            Ok(h.http_get("/readyz")?.0 == 200)
        },
    )
    .map_err(|e| anyhow!("{e:#}\nlog of {}:\n{}", h.name(), h.log()))?;
    found.ok_or_else(|| anyhow!("no subnet"))
}

/// A container namespace on the host's bridge with the IPv6 subnet's second address and a
/// default route via the bridge (its first address).
fn container6(c: &Cluster, h: &Host, subnet: Ipv6Net) -> Result<Endpoint6> {
    let ns = format!("{}-c6", h.netns());
    c.resources().add_netns(&ns);
    netns::create(&ns)?;
    ip(&[
        "-n",
        h.netns(),
        "link",
        "add",
        "c6",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &ns,
    ])?;
    ip(&["-n", h.netns(), "link", "set", "c6", "master", BRIDGE, "up"])?;
    let addr = Ipv6Addr::from(u128::from(subnet.network()) + 2);
    let gateway = Ipv6Addr::from(u128::from(subnet.network()) + 1);
    ip(&[
        "-n",
        &ns,
        "-6",
        "addr",
        "add",
        &format!("{addr}/{}", subnet.prefix_len()),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &gateway.to_string(),
    ])?;
    Ok(Endpoint6 { ns, ip: addr })
}

#[test]
fn an_ipv6_only_network_carries_ipv6_and_touches_no_ipv4() {
    e2e(|c| {
        c.put_config(IPV6_ONLY)?;
        let (a, b) = (ipv6_only_host(c, true)?, ipv6_only_host(c, true)?);
        let (a6, a_file) = wait_ipv6_subnet(&a)?;
        let (b6, _) = wait_ipv6_subnet(&b)?;
        check!(
            !a_file.contains("FLANNEL_SUBNET=") && !a_file.contains("FLANNEL_NETWORK="),
            "an IPv6-only subnet file has no IPv4 lines (as flannel's): {a_file}"
        );
        // No IPv4 anywhere rudder could have put it: bridge, routes, the host still reaches etcd.
        let bridge4 = ip(&["-n", a.netns(), "-4", "addr", "show", "dev", BRIDGE])?;
        check!(!bridge4.contains("inet "), "IPv4 on the bridge: {bridge4}");
        let routes4 = ip(&["-n", a.netns(), "-4", "route", "show"])?;
        check!(
            !routes4.contains("0.0.0.0/0") && !routes4.contains("unreachable"),
            "IPv4 routes of an IPv6-only host: {routes4}"
        );
        let (from, to) = (container6(c, &a, a6)?, container6(c, &b, b6)?);
        wait_ping6(&from, to.ip, Duration::from_secs(20))?;
        ping6(&to.ns, from.ip)?;
        for (x, y) in [(&from, &to), (&to, &from)] {
            let t = tcp_transfer6(x, y, 2 << 20)?;
            eprintln!("{} -> {}: {t:?}", x.ip, y.ip);
        }
        // The peers are reached over IPv6: the status names each other's PublicIPv6.
        let (_, status) = a.http_get("/status")?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let peers6 = status["ipv6_peers"].to_string();
        check!(
            peers6.contains(&b6.to_string()) && peers6.contains(&b.underlay_ipv6().to_string()),
            "a's IPv6 peers: {peers6}"
        );
        check!(a.http_get("/readyz")?.0 == 200, "a stays ready");
        Ok(())
    });
}

#[test]
fn an_ipv6_only_host_without_an_ipv6_underlay_address_says_why() {
    e2e(|c| {
        c.put_config(IPV6_ONLY)?;
        let h = ipv6_only_host(c, false)?;
        wait_until("the daemon to exit", Duration::from_secs(20), || {
            Ok(h.check_alive().is_err())
        })?;
        let log = h.log();
        check!(
            log.contains("IPv6-only") && log.contains("needs a PublicIPv6"),
            "log: {log}"
        );
        let routes = ip6(h.netns(), &["route", "show"])?;
        eprintln!("{routes}");
        Ok(())
    });
}

/// Starts a host whose eth0 has only its IPv6 underlay address and an IPv6 default route (no
/// IPv4 address at all), reaching etcd over IPv6.
fn host_without_ipv4(c: &Cluster) -> Result<Host> {
    let h = c.add_host_without_daemon(HostOpts {
        wait_ready: false,
        etcd_endpoints: Some(c.etcd_endpoint6()),
        ..HostOpts::default()
    })?;
    let address = format!("{}/64", h.underlay_ipv6());
    ip(&["-n", h.netns(), "-4", "addr", "flush", "dev", "eth0"])?;
    ip6(
        h.netns(),
        &["addr", "add", &address, "dev", "eth0", "nodad"],
    )?;
    ip6(
        h.netns(),
        &[
            "route",
            "add",
            "default",
            "via",
            rudder_tests::underlay::UNDERLAY_GW6,
            "dev",
            "eth0",
        ],
    )?;
    h.start()?;
    Ok(h)
}

/// A host with no IPv4 address at all (an IPv6-only machine: eth0 has only an IPv6 address and
/// an IPv6 default route, etcd is reached over IPv6) joins an IPv6-only network: the underlay
/// comes from the IPv6 default route, the lease says PublicIP 0.0.0.0 as flanneld's, and its
/// containers talk to another host's.
#[test]
fn a_host_without_any_ipv4_address_joins_an_ipv6_only_network() {
    e2e(|c| {
        c.put_config(IPV6_ONLY)?;
        let a = ipv6_only_host(c, true)?;
        let b = host_without_ipv4(c)?;
        let (a6, _) = wait_ipv6_subnet(&a)?;
        let (b6, _) = wait_ipv6_subnet(&b)?;
        let key = format!("/coreos.com/network/subnets/0.0.0.0-0&{}-64", b6.network());
        let value = c
            .etcd_get(&key)?
            .ok_or_else(|| anyhow!("no {key}: {:?}", c.lease_keys(None)))?;
        let json: serde_json::Value = serde_json::from_str(&value)?;
        check!(
            json["PublicIP"] == "0.0.0.0" && json["PublicIPv6"] == b.underlay_ipv6().to_string(),
            "{key} = {value}"
        );
        let (from, to) = (container6(c, &a, a6)?, container6(c, &b, b6)?);
        wait_ping6(&from, to.ip, Duration::from_secs(20))?;
        wait_ping6(&to, from.ip, Duration::from_secs(20))?;
        tcp_transfer6(&to, &from, 2 << 20)?;
        Ok(())
    });
}

/// The same host in a network with IPv4 on cannot be reached at an IPv4 PublicIP: it stops
/// with one line saying so.
#[test]
fn a_host_without_any_ipv4_address_refuses_a_dual_stack_network() {
    e2e(|c| {
        c.put_config(rudder_tests::dual_stack::DUAL_STACK_CONFIG)?;
        let h = host_without_ipv4(c)?;
        wait_until("the daemon to exit", Duration::from_secs(30), || {
            Ok(h.check_alive().is_err())
        })?;
        let log = h.log();
        check!(
            log.contains("interface eth0 has no IPv4 address") && log.contains("IPv6-only"),
            "log: {log}"
        );
        Ok(())
    });
}
