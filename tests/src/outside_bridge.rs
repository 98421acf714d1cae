//! Containers rudder did not plug in, for hosts started with `HostOpts::external_bridge`:
//! on bridge `obr0` the harness makes, holding the subnet's gateway address (as docker's
//! `--bip` or CNI's `isGateway` would), or on a veth of their own with a /32 route (CNI ptp
//! or Calico style). Also times how long a new container takes to reach the eBPF fast path.

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
    // A fixed MAC, as docker gives docker0: otherwise the bridge takes its lowest port's,
    // and each change of it flushes the bridge's neighbours (the containers' entries).
    let mac = format!("02:0b:00:00:00:{:02x}", host.index());
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        OUTSIDE_BRIDGE,
        "address",
        &mac,
        "type",
        "bridge",
    ])?;
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

/// The next hop a routed container's default route points at (Calico style): the host
/// veth answers for it by proxy ARP.
const ROUTED_GATEWAY: &str = "169.254.1.1";

/// Container `n` without a bridge (CNI ptp / Calico style): namespace `<host ns>-r<n>`,
/// address subnet .(30+n)/32, host veth `rv<n>` with proxy ARP and the route
/// `<address>/32 dev rv<n>` in the host; default route via 169.254.1.1.
pub fn add_routed_container(host: &Host, n: u8) -> Result<Endpoint> {
    let env = host.subnet_env();
    let ns = host.netns();
    let ctr = format!("{ns}-r{n}");
    host.0.res.add_netns(&ctr);
    netns::create(&ctr)?;
    let veth = format!("rv{n}");
    let mtu = env.mtu.to_string();
    ip(&[
        "-n", ns, "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
        &mtu, "netns", &ctr,
    ])?;
    netns::exec_ok(
        ns,
        "sysctl",
        &[
            "-q",
            "-w",
            &format!("net.ipv4.conf.{veth}.proxy_arp=1"),
            // Answer at once, not after up to 0.8 s.
            &format!("net.ipv4.neigh.{veth}.proxy_delay=0"),
        ],
    )?;
    ip(&["-n", ns, "link", "set", &veth, "up"])?;
    let addr = Ipv4Addr::from(u32::from(env.subnet.network()) + 30 + u32::from(n));
    ip(&[
        "-n",
        &ctr,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ctr, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        &ctr,
        "route",
        "add",
        ROUTED_GATEWAY,
        "dev",
        "eth0",
        "scope",
        "link",
    ])?;
    ip(&[
        "-n",
        &ctr,
        "route",
        "add",
        "default",
        "via",
        ROUTED_GATEWAY,
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        &veth,
        "scope",
        "link",
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
    let took = first_packet_to_fast_path(host, &ctr, before, || {
        netns::exec_ok(
            &ctr.ns,
            "ping",
            &["-n", "-q", "-c", "1", "-W", "2", &gateway],
        )
        .with_context(|| format!("container {} pinging its gateway", ctr.ip))
        .map(|_| ())
    })?;
    Ok((ctr, took))
}

/// Has `ctr` send its first packet (`send`) and returns the time from then until `host`
/// counts more than `before` fast-path endpoints.
pub fn first_packet_to_fast_path(
    host: &Host,
    ctr: &Endpoint,
    before: u64,
    send: impl FnOnce() -> Result<()>,
) -> Result<Duration> {
    let start = Instant::now();
    send()?;
    loop {
        if fast_path_endpoints(host)? > before {
            return Ok(start.elapsed());
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
