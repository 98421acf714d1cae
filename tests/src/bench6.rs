//! The benchmark's IPv6 modes (issue 17): IPv6 between containers of a dual-stack 2-host
//! cluster over rudder, with IPv6 outer headers (both hosts announce a PublicIPv6) or IPv4
//! ones (`…6in4`: the hosts have no IPv6 underlay address), against plain IPv6 routing
//! between the same namespaces in the same run (`route6`).

use std::time::Duration;

use anyhow::Result;

use crate::dual_stack::{
    add_dual_stack_host, add_ipv4_underlay_host, wait_mesh6, DUAL_STACK_CONFIG,
};
use crate::traffic::iperf3_between;
use crate::traffic6::{wait_ping6, Endpoint6};
use crate::util::ip;
use crate::{netns, Cluster, Host, HostOpts};

pub const MODES6: [&str; 5] = [
    "route6",
    "rudder-ebpf6",
    "rudder-tun6",
    "rudder-ebpf6in4",
    "rudder-tun6in4",
];
pub const METRICS6: [&str; 5] = [
    "tcp1_gbps",
    "tcp1_retransmits",
    "udp64_kpps",
    "udp64_loss_pct",
    "rtt_med_ms",
];

const PORT: u16 = 5202;

/// Sets up a fresh dual-stack pair for `mode`, measures IPv6 container to container.
pub fn run_mode6(mode: &str, secs: u32) -> Result<Vec<f64>> {
    let cluster = Cluster::new()?;
    cluster.put_config(DUAL_STACK_CONFIG)?;
    let plane = if mode.starts_with("rudder-ebpf") {
        "ebpf"
    } else {
        "tun"
    };
    let opts = || HostOpts {
        dataplane: Some(plane.into()),
        ..HostOpts::default()
    };
    let add = if mode.ends_with("6in4") {
        add_ipv4_underlay_host
    } else {
        add_dual_stack_host
    };
    let hosts = vec![add(&cluster, opts())?, add(&cluster, opts())?];
    wait_mesh6(&hosts, Duration::from_secs(30))?;
    let (a, b) = (&hosts[0], &hosts[1]);
    let (from, to) = (a.container6()?, b.container6()?);
    if mode == "route6" {
        plain_ipv6_routes(a, b)?;
    }
    wait_ping6(&from, to.ip, Duration::from_secs(30))?;
    let tcp1 = iperf3_between(&from.ns, &to.ns, to.ip.into(), PORT, secs, &[])?;
    let gbps = tcp1["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    let retransmits = tcp1["end"]["sum_sent"]["retransmits"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let udp = iperf3_between(
        &from.ns,
        &to.ns,
        to.ip.into(),
        PORT,
        secs,
        &["-u", "-l", "64", "-b", "0"],
    )?;
    let s = &udp["end"]["sum"];
    let recv = s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
    let kpps = recv / s["seconds"].as_f64().unwrap_or(1.0) / 1e3;
    let loss = s["lost_percent"].as_f64().unwrap_or(f64::NAN);
    Ok(vec![gbps, retransmits, kpps, loss, rtt6(&from, &to)?])
}

/// The daemons go (SIGKILL: bridges and containers stay) and each host routes the other's
/// container address straight to its IPv6 underlay address (host namespaces only).
fn plain_ipv6_routes(a: &Host, b: &Host) -> Result<()> {
    for h in [a, b] {
        h.kill9()?;
        for family in ["ip", "ip6", "inet"] {
            let _ = crate::util::run(netns::exec(h.netns(), "nft").args([
                "delete",
                "table",
                family,
                "rudder_guard",
            ]));
        }
    }
    for (h, p) in [(a, b), (b, a)] {
        let dst = format!("{}/128", p.container_ip6()?);
        let via = p.underlay_ipv6().to_string();
        ip(&["-n", h.netns(), "-6", "route", "add", &dst, "via", &via])?;
    }
    Ok(())
}

fn rtt6(from: &Endpoint6, to: &Endpoint6) -> Result<f64> {
    Ok(crate::traffic::rtt_percentiles(&from.ns, to.ip.into(), 200)?.0)
}
