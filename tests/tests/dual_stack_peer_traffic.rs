//! Per-peer traffic of IPv6 peer subnets (issue 17), on whichever plane
//! `$RUDDER_TEST_DATAPLANE` picks: after IPv6 pings and TCP between two dual-stack hosts'
//! containers, each host's `/status` (`ipv6_peers[].tx_*/rx_*`, the `rudder status` table)
//! and `/metrics` (`rudder_peer_packets_total{subnet="<IPv6 subnet>",...}`) show the other's
//! IPv6 subnet with traffic both ways.

use std::time::Duration;

use anyhow::{Context, Result};
use rudder_tests::dual_stack::{dual_stack_cluster, wait_mesh6};
use rudder_tests::traffic6::tcp_transfer6;
use rudder_tests::util::{output, rudder_bin};
use rudder_tests::{check, e2e, netns, Host};

/// `rudder status` (the table) of `host`, run in its namespace against its status socket.
fn status_table(host: &Host) -> Result<String> {
    let socket = host.subnet_file().with_file_name("rudder.sock");
    let out = output(
        netns::exec(host.netns(), rudder_bin().to_str().context("binary path")?)
            .args(["status", "--status-socket"])
            .arg(&socket),
    )?;
    anyhow::ensure!(out.status.success(), "rudder status failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of `rudder_peer_packets_total` for `subnet` and `direction` on `host`.
fn peer_packets_metric(host: &Host, subnet: &str, direction: &str) -> Result<u64> {
    let (code, body) = host.http_get("/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    let wanted = format!("subnet=\"{subnet}\",direction=\"{direction}\"}}");
    body.lines()
        .find(|l| l.starts_with("rudder_peer_packets_total{") && l.contains(&wanted))
        .with_context(|| {
            format!("no rudder_peer_packets_total for {subnet} {direction} in\n{body}")
        })?
        .rsplit(' ')
        .next()
        .context("metric line without a value")?
        .parse()
        .context("metric value is not a number")
}

#[test]
fn ipv6_peer_subnets_count_their_traffic_in_status_and_metrics() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 2)?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let (a, b) = (&hosts[0], &hosts[1]);
        tcp_transfer6(&a.container6()?, &b.container6()?, 1 << 20)?;
        tcp_transfer6(&b.container6()?, &a.container6()?, 1 << 20)?;
        for (host, other) in [(a, b), (b, a)] {
            let subnet6 = other.ipv6_subnet()?.to_string();
            let status = host.status()?;
            let dataplane = status["dataplane"].clone();
            let entry = status["ipv6_peers"]
                .as_array()
                .and_then(|peers| peers.iter().find(|p| p["ipv6_subnet"] == subnet6))
                .with_context(|| {
                    format!(
                        "{}: no ipv6_peers entry for {subnet6}: {status}",
                        host.name()
                    )
                })?
                .clone();
            println!("{} ({dataplane}): {entry}", host.name());
            for key in ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes"] {
                check!(
                    entry[key].as_u64().is_some_and(|n| n > 0),
                    "{} ({dataplane}): {key} of IPv6 peer {subnet6} is {}",
                    host.name(),
                    entry[key]
                );
            }
            let text = status_table(host)?;
            check!(
                text.lines().any(|l| l.trim_start().starts_with(&subnet6)),
                "{}: no row for {subnet6} in `rudder status`:\n{text}",
                host.name()
            );
            for direction in ["tx", "rx"] {
                let n = peer_packets_metric(host, &subnet6, direction)?;
                check!(
                    n > 0,
                    "{} ({dataplane}): rudder_peer_packets_total {subnet6} {direction} = {n}",
                    host.name()
                );
            }
        }
        Ok(())
    });
}
