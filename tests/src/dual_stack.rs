//! Dual-stack clusters (issue 17): the network config with `EnableIPv6`, hosts whose eth0
//! has an IPv6 underlay address (`fd00:77::<10+i>/64`, added before the daemon starts), and
//! containers with an IPv6 address in their host's IPv6 subnet (its second address, as for
//! IPv4) with a default route via the bridge's IPv6 gateway (the subnet's first address,
//! which the daemon's `--bridge` puts there). Plane-neutral: the hosts run
//! `$RUDDER_TEST_DATAPLANE` like every other e2e host.

use std::net::Ipv6Addr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ipnet::Ipv6Net;

use crate::netns;
use crate::traffic6::{wait_ping6, Endpoint6};
use crate::util::{ip, wait_until};
use crate::{Cluster, Host, HostOpts};

/// The overlay's IPv6 network in [`DUAL_STACK_CONFIG`].
pub const IPV6_NETWORK: &str = "fc00::/48";
/// A dual-stack flannel config: `10.5.0.0/16` and `fc00::/48`, udp backend.
pub const DUAL_STACK_CONFIG: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"udp"}}"#;
/// Prefix length of the underlay's IPv6 segment.
pub const UNDERLAY_IPV6_PREFIX_LEN: u8 = 64;

/// The IPv6 underlay address [`add_dual_stack_host`] gives host `index`: `fd00:77::<10+i>`
/// (the same digits as its IPv4 address's last byte).
pub fn underlay_ipv6_of(index: usize) -> Ipv6Addr {
    format!("fd00:77::{}", 10 + index)
        .parse()
        .expect("a valid IPv6 address")
}

/// Writes [`DUAL_STACK_CONFIG`] and adds `n` dual-stack hosts with default options.
pub fn dual_stack_cluster(c: &Cluster, n: usize) -> Result<Vec<Host>> {
    c.put_config(DUAL_STACK_CONFIG)?;
    (0..n)
        .map(|_| add_dual_stack_host(c, HostOpts::default()))
        .collect()
}

/// Adds a host with an IPv6 underlay address on eth0 (before its daemon starts, as an
/// operator's would be); with `opts.wait_ready` waits until ready and gives the container
/// its IPv6 address and route.
pub fn add_dual_stack_host(c: &Cluster, opts: HostOpts) -> Result<Host> {
    let wait = opts.wait_ready;
    let h = c.add_host_without_daemon(opts)?;
    let address = format!("{}/{UNDERLAY_IPV6_PREFIX_LEN}", h.underlay_ipv6());
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
    h.start()?;
    if wait {
        h.wait_ready_dual_stack(Duration::from_secs(30))?;
    }
    Ok(h)
}

/// Adds a dual-stack host without an IPv6 underlay address: IPv6 is leased, peers are
/// reached over IPv4 (PublicIPv6 null); waits until ready and gives the container its IPv6.
pub fn add_ipv4_underlay_host(c: &Cluster, opts: HostOpts) -> Result<Host> {
    let h = c.add_host_without_daemon(HostOpts {
        wait_ready: false,
        ..opts
    })?;
    h.start()?;
    h.wait_ready_dual_stack(Duration::from_secs(30))?;
    Ok(h)
}

impl Host {
    /// The host's IPv6 underlay address (see [`underlay_ipv6_of`]).
    pub fn underlay_ipv6(&self) -> Ipv6Addr {
        underlay_ipv6_of(self.index())
    }

    /// The IPv6 subnet the subnet file names now (`FLANNEL_IPV6_SUBNET`, truncated).
    pub fn ipv6_subnet(&self) -> Result<Ipv6Net> {
        let text = std::fs::read_to_string(self.subnet_file())
            .with_context(|| format!("reading {}", self.subnet_file().display()))?;
        let subnet: Ipv6Net = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("FLANNEL_IPV6_SUBNET="))
            .ok_or_else(|| anyhow!("no FLANNEL_IPV6_SUBNET in the subnet file: {text}"))?
            .trim()
            .parse()?;
        Ok(subnet.trunc())
    }

    /// The container's IPv6 address: the IPv6 subnet's second address.
    pub fn container_ip6(&self) -> Result<Ipv6Addr> {
        Ok(Ipv6Addr::from(
            u128::from(self.ipv6_subnet()?.network()) + 2,
        ))
    }

    /// The bridge's IPv6 (gateway) address: the IPv6 subnet's first address.
    pub fn gateway_ip6(&self) -> Result<Ipv6Addr> {
        Ok(Ipv6Addr::from(
            u128::from(self.ipv6_subnet()?.network()) + 1,
        ))
    }

    /// The container as an IPv6 traffic endpoint.
    pub fn container6(&self) -> Result<Endpoint6> {
        Ok(Endpoint6 {
            ns: self.container_netns().to_string(),
            ip: self.container_ip6()?,
        })
    }

    /// [`Host::wait_ready`], then the container's IPv6 address and default route
    /// ([`Host::ensure_container6`]).
    pub fn wait_ready_dual_stack(&self, timeout: Duration) -> Result<()> {
        self.wait_ready(timeout)?;
        self.ensure_container6()
    }

    /// Gives the container (made by [`Host::wait_ready`]) its IPv6 address (replacing one of
    /// an old subnet) and a default IPv6 route via the bridge's IPv6 gateway; waits until
    /// the bridge has that gateway address.
    pub fn ensure_container6(&self) -> Result<()> {
        let subnet = self.ipv6_subnet()?;
        let gateway = self.gateway_ip6()?;
        let ns = self.netns().to_string();
        wait_until(
            &format!("{gateway} on the bridge of {}", self.name()),
            Duration::from_secs(10),
            || {
                let out = ip(&[
                    "-n",
                    &ns,
                    "-6",
                    "addr",
                    "show",
                    "dev",
                    crate::cluster::BRIDGE,
                ])?;
                Ok(out.contains(&format!("{gateway}/{}", subnet.prefix_len())))
            },
        )?;
        let c = self.container_netns();
        let mine = format!("{}/{}", self.container_ip6()?, subnet.prefix_len());
        let present = ip(&[
            "-n", c, "-6", "addr", "show", "dev", "eth0", "scope", "global",
        ])?;
        for line in present.lines() {
            if let Some(old) = line.trim().strip_prefix("inet6 ") {
                let old = old.split_whitespace().next().unwrap_or_default();
                if old != mine {
                    ip(&["-n", c, "-6", "addr", "del", old, "dev", "eth0"])?;
                }
            }
        }
        ip(&[
            "-n", c, "-6", "addr", "replace", &mine, "dev", "eth0", "nodad",
        ])?;
        ip(&[
            "-n",
            c,
            "-6",
            "route",
            "replace",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        Ok(())
    }

    /// Whether `/status` lists `other`'s IPv6 subnet among its IPv6 peers.
    pub fn sees_peer6(&self, other: &Host) -> Result<bool> {
        let want = other.ipv6_subnet()?.to_string();
        let st = self.status()?;
        Ok(st["ipv6_peers"]
            .as_array()
            .is_some_and(|peers| peers.iter().any(|p| p["ipv6_subnet"] == want)))
    }
}

/// Waits until every host lists every other's IPv6 subnet in `/status`, then until every
/// container pings every other over IPv6 (both directions).
pub fn wait_mesh6(hosts: &[Host], timeout: Duration) -> Result<()> {
    for a in hosts {
        for b in hosts {
            if a.index() != b.index() {
                wait_until(
                    &format!("{} to list {}'s IPv6 subnet", a.name(), b.name()),
                    timeout,
                    || a.sees_peer6(b),
                )?;
            }
        }
    }
    for a in hosts {
        for b in hosts {
            if a.index() != b.index() {
                wait_ping6(&a.container6()?, b.container_ip6()?, timeout)?;
            }
        }
    }
    Ok(())
}

/// nft: drop IPv4 UDP between the underlay addresses, counted (inside the host namespace).
pub fn drop_ipv4_underlay_udp(h: &Host) -> Result<()> {
    let rules = "table inet v4block {
    chain input {
        type filter hook input priority -300;
        ip saddr 192.168.77.0/24 udp dport 8285 counter drop
    }
    chain output {
        type filter hook output priority -300;
        ip daddr 192.168.77.0/24 udp dport 8285 counter drop
    }
}
";
    let file = std::env::temp_dir().join(format!("v4block-{}.nft", h.netns()));
    std::fs::write(&file, rules)?;
    netns::exec_ok(h.netns(), "nft", &["-f", file.to_str().unwrap()])?;
    Ok(())
}

/// Packets the v4block rules dropped in `h`.
pub fn ipv4_underlay_drops(h: &Host) -> Result<u64> {
    let out = netns::exec_ok(h.netns(), "nft", &["list", "table", "inet", "v4block"])?;
    Ok(out
        .split("packets ")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// Runs `args` with `ip -6` inside namespace `ns` (a small convenience for tests).
pub fn ip6(ns: &str, args: &[&str]) -> Result<String> {
    netns::exec_ok(ns, "ip", &[&["-6"], args].concat())
}
