//! Containers on a bridge rudder did not make: the harness makes bridge `obr0` holding the
//! subnet's gateway address (as docker's `--bip` or CNI's `isGateway` would) and plugs
//! container namespaces into it, for hosts started with `HostOpts::external_bridge`. Also
//! times how long a new container takes to reach the eBPF fast path.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::util::{ip, wait_until};
use crate::{netns, Endpoint, Host};

/// The bridge the harness makes in the host namespace.
pub const OUTSIDE_BRIDGE: &str = "obr0";

/// Makes `obr0` with the gateway address of `host`'s subnet (the daemon must be ready: the
/// subnet is its lease). On eBPF the daemon adopts it; wait with [`wait_adopted`].
pub fn make_bridge(host: &Host) -> Result<()> {
    let ns = host.netns();
    let gateway = format!("{}/{}", host.gateway_ip(), host.subnet().prefix_len());
    ip(&["-n", ns, "link", "add", OUTSIDE_BRIDGE, "type", "bridge"])?;
    ip(&["-n", ns, "addr", "add", &gateway, "dev", OUTSIDE_BRIDGE])?;
    ip(&["-n", ns, "link", "set", OUTSIDE_BRIDGE, "up"])?;
    Ok(())
}

/// Waits until the eBPF daemon of `host` reports `obr0` as its fast-path bridge.
pub fn wait_adopted(host: &Host) -> Result<()> {
    wait_until(
        &format!("{} to adopt {OUTSIDE_BRIDGE}", host.name()),
        Duration::from_secs(10),
        || Ok(host.status()?["fast_path"]["bridge"] == OUTSIDE_BRIDGE),
    )
}

/// Container `n` (1-based) behind `obr0`: namespace `<host ns>-o<n>`, address subnet
/// .(10+n), MTU from the subnet file, default route via the gateway. Returns it as an
/// endpoint once it is up (it has sent nothing yet).
pub fn add_container(host: &Host, n: u8) -> Result<Endpoint> {
    let env = host.subnet_env();
    let ns = host.netns();
    let ctr = format!("{ns}-o{n}");
    host.0.res.add_netns(&ctr);
    netns::create(&ctr)?;
    let veth = format!("ov{n}");
    let mtu = env.mtu.to_string();
    ip(&[
        "-n", ns, "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
        &mtu, "netns", &ctr,
    ])?;
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        &veth,
        "master",
        OUTSIDE_BRIDGE,
        "up",
    ])?;
    let addr = Ipv4Addr::from(u32::from(env.subnet.network()) + 10 + u32::from(n));
    let cidr = format!("{addr}/{}", env.subnet.prefix_len());
    ip(&["-n", &ctr, "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", &ctr, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &ctr,
        "route",
        "add",
        "default",
        "via",
        &host.gateway_ip().to_string(),
    ])?;
    Ok(Endpoint { ns: ctr, ip: addr })
}

/// How many local containers the daemon has on the fast delivery path.
pub fn fast_path_endpoints(host: &Host) -> Result<u64> {
    host.status()?["fast_path"]["local_endpoints"]
        .as_u64()
        .context("/status has no fast_path.local_endpoints")
}

/// Adds container `n` (see [`add_container`]), has it send its first packet (one ping to the
/// gateway: the host learns its neighbour entry) and returns it with the time from that
/// packet until the daemon counts one more fast-path endpoint (status polled every ms).
pub fn time_to_fast_path(host: &Host, n: u8) -> Result<(Endpoint, Duration)> {
    let before = fast_path_endpoints(host)?;
    let ctr = add_container(host, n)?;
    let gateway = host.gateway_ip().to_string();
    let start = Instant::now();
    netns::exec_ok(
        &ctr.ns,
        "ping",
        &["-n", "-q", "-c", "1", "-W", "2", &gateway],
    )
    .with_context(|| format!("container {} pinging its gateway", ctr.ip))?;
    loop {
        if fast_path_endpoints(host)? > before {
            return Ok((ctr, start.elapsed()));
        }
        if start.elapsed() > Duration::from_secs(10) {
            let neighbours = ip(&["-n", host.netns(), "neigh", "show", "dev", OUTSIDE_BRIDGE]);
            let fdb = netns::exec_ok(
                host.netns(),
                "bridge",
                &["fdb", "show", "br", OUTSIDE_BRIDGE],
            );
            anyhow::bail!(
                "container {} not on {}'s fast path after 10 s (status {}); neighbours:\n{}\nFDB:\n{}",
                ctr.ip,
                host.name(),
                host.status()?["fast_path"],
                neighbours.unwrap_or_else(|e| format!("{e:#}")),
                fdb.unwrap_or_else(|e| format!("{e:#}")),
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// IPv4 datagrams the host namespace's stack forwarded so far (`Ip: ForwDatagrams`): the
/// fast paths deliver without it.
pub fn forwarded_datagrams(host: &Host) -> Result<u64> {
    let snmp = netns::exec_ok(host.netns(), "cat", &["/proc/net/snmp"])?;
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip_lines.next(), ip_lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        anyhow::bail!("no Ip: lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ForwDatagrams")
        .context("no ForwDatagrams in /proc/net/snmp")?
        .1
        .parse()
        .context("ForwDatagrams is not a number")
}
