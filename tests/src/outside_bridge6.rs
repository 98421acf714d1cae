//! The IPv6 half of [`crate::outside_bridge`] for dual-stack hosts started with
//! `HostOpts::external_bridge`: the bridge's IPv6 gateway address, containers behind it
//! with an IPv6 address of their own, and what tells the fast paths from the host's
//! forwarding for IPv6 (`Ip6OutForwDatagrams`).

use std::net::Ipv6Addr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::outside_bridge::{add_container, add_routed_container, OUTSIDE_BRIDGE};
use crate::traffic6::{ping6, Endpoint6};
use crate::util::{ip, output, wait_until};
use crate::{netns, Endpoint, Host};

/// Puts `host`'s IPv6 gateway address (its IPv6 subnet's first address) on `obr0`, made
/// by [`crate::outside_bridge::make_bridge`], as docker or CNI would on a dual-stack bridge.
pub fn add_bridge_ipv6(host: &Host) -> Result<()> {
    let gateway = format!(
        "{}/{}",
        host.gateway_ip6()?,
        host.ipv6_subnet()?.prefix_len()
    );
    ip(&[
        "-n",
        host.netns(),
        "-6",
        "addr",
        "add",
        &gateway,
        "dev",
        OUTSIDE_BRIDGE,
        "nodad",
    ])?;
    Ok(())
}

/// Container `n` behind `obr0` ([`add_container`]) with an IPv6 address too: the IPv6
/// subnet's address 10+n and a default IPv6 route via the bridge's gateway address. It has
/// sent nothing yet.
pub fn add_dual_stack_container(host: &Host, n: u8) -> Result<(Endpoint, Endpoint6)> {
    let ctr = add_container(host, n)?;
    let subnet = host.ipv6_subnet()?;
    let addr = Ipv6Addr::from(u128::from(subnet.network()) + 10 + u128::from(n));
    let cidr = format!("{addr}/{}", subnet.prefix_len());
    ip(&[
        "-n", &ctr.ns, "-6", "addr", "add", &cidr, "dev", "eth0", "nodad",
    ])?;
    let gateway = host.gateway_ip6()?.to_string();
    ip(&[
        "-n", &ctr.ns, "-6", "route", "add", "default", "via", &gateway,
    ])?;
    let ctr6 = Endpoint6 {
        ns: ctr.ns.clone(),
        ip: addr,
    };
    Ok((ctr, ctr6))
}

/// The host veth's address a routed container's default IPv6 route points at.
const ROUTED_GATEWAY6: &str = "fe80::1";

/// Routed container `n` ([`add_routed_container`]) with an IPv6 address too: the IPv6
/// subnet's address 30+n/128, the host route `<address>/128 dev rv<n>`, and a default IPv6
/// route via fe80::1, which the host veth holds.
pub fn add_routed_dual_stack_container(host: &Host, n: u8) -> Result<(Endpoint, Endpoint6)> {
    let ctr = add_routed_container(host, n)?;
    let veth = format!("rv{n}");
    let subnet = host.ipv6_subnet()?;
    let addr = Ipv6Addr::from(u128::from(subnet.network()) + 30 + u128::from(n));
    let ns = host.netns();
    ip(&[
        "-n",
        ns,
        "-6",
        "addr",
        "add",
        &format!("{ROUTED_GATEWAY6}/64"),
        "dev",
        &veth,
        "nodad",
    ])?;
    ip(&[
        "-n",
        &ctr.ns,
        "-6",
        "addr",
        "add",
        &format!("{addr}/128"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ip(&[
        "-n",
        &ctr.ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        ROUTED_GATEWAY6,
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        ns,
        "-6",
        "route",
        "add",
        &format!("{addr}/128"),
        "dev",
        &veth,
    ])?;
    let ctr6 = Endpoint6 {
        ns: ctr.ns.clone(),
        ip: addr,
    };
    Ok((ctr, ctr6))
}

/// How many local containers the daemon serves by IPv6 address on the fast path.
pub fn fast_path_endpoints6(host: &Host) -> Result<u64> {
    host.status()?["fast_path"]["local_endpoints6"]
        .as_u64()
        .context("/status has no fast_path.local_endpoints6")
}

/// Has the host ping `ctr` (it learns the container's neighbour entry) and waits until the
/// daemon serves it by IPv6 address.
pub fn wait_fast_path6(host: &Host, ctr: &Endpoint6) -> Result<()> {
    let before = fast_path_endpoints6(host)?;
    ping6(host.netns(), ctr.ip)?;
    wait_until(
        &format!("{} on {}'s IPv6 fast path", ctr.ip, host.name()),
        Duration::from_secs(10),
        || Ok(fast_path_endpoints6(host)? > before),
    )
    .map_err(|e| {
        let neighbours = ip(&[
            "-n",
            host.netns(),
            "-6",
            "neigh",
            "show",
            "dev",
            OUTSIDE_BRIDGE,
        ]);
        anyhow!(
            "{e:#}; status {}; IPv6 neighbours:\n{}",
            host.status()
                .map(|s| s["fast_path"].to_string())
                .unwrap_or_default(),
            neighbours.unwrap_or_else(|e| format!("{e:#}"))
        )
    })
}

/// IPv6 packets the host namespace's stack forwarded so far (`Ip6OutForwDatagrams`): the
/// fast paths deliver without it.
pub fn forwarded_datagrams6(host: &Host) -> Result<u64> {
    let snmp6 = netns::exec_ok(host.netns(), "cat", &["/proc/net/snmp6"])?;
    snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Ip6OutForwDatagrams"))
        .context("no Ip6OutForwDatagrams in /proc/net/snmp6")?
        .trim()
        .parse()
        .context("Ip6OutForwDatagrams is not a number")
}

/// `count` ICMPv6 echoes from `from` to `to`, `interval` apart: (sent, answered).
pub fn ping6_series(
    from: &Endpoint6,
    to: Ipv6Addr,
    count: u32,
    interval: Duration,
) -> Result<(u32, u32)> {
    let out = output(netns::exec(&from.ns, "ping").args([
        "-6",
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        &format!("{:.3}", interval.as_secs_f64()),
        "-W",
        "1",
        &to.to_string(),
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("no ping summary in {text:?}"))?;
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    match nums.as_slice() {
        [tx, rx, ..] => Ok((*tx, *rx)),
        _ => bail!("cannot parse ping summary {line:?}"),
    }
}
