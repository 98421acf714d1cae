//! Dual stack across the two data planes (issue 17): an eBPF host and a TUN host exchange
//! IPv6 and IPv4 (bulk TCP with a content check, both ways) over an IPv6 outer header (both
//! announce a PublicIPv6) and over an IPv4 one (neither has an IPv6 underlay address), with
//! default offloads: the TUN host sends UDP GSO trains of either inner family, which the
//! eBPF host's socket path must take apart (its `to_daemon` counter shows they went there).
//! The planes are fixed here, so `$RUDDER_TEST_DATAPLANE` does not matter.

use std::time::Duration;

use anyhow::{Context, Result};
use rudder_tests::dual_stack::{
    add_dual_stack_host, add_ipv4_underlay_host, wait_mesh6, DUAL_STACK_CONFIG,
};
use rudder_tests::traffic::tcp_transfer;
use rudder_tests::traffic6::{ping6, tcp_transfer6};
use rudder_tests::{check, e2e, wait_mesh, Cluster, Host, HostOpts};

fn on(plane: &str) -> HostOpts {
    HostOpts {
        dataplane: Some(plane.into()),
        ..HostOpts::default()
    }
}

fn host_without_ipv6_underlay(c: &Cluster, plane: &str) -> Result<Host> {
    add_ipv4_underlay_host(c, on(plane))
}

/// TCP/IPv6 from the TUN host (`hosts[1]`) to the eBPF host (`hosts[0]`) after the eBPF
/// host stopped following the TUN host's earlier trains: the TUN host sends the IPv6 data
/// in UDP GSO trains, which the eBPF host can only take through its socket path.
fn ipv6_trains_reach_the_socket_path(hosts: &[Host]) -> Result<()> {
    let (ebpf, tun) = (&hosts[0], &hosts[1]);
    // Longer than the BPF program follows a train sender (1 s).
    std::thread::sleep(Duration::from_millis(1500));
    let before = ebpf.counter("to_daemon")?;
    tcp_transfer6(&tun.container6()?, &ebpf.container6()?, 8 << 20)
        .context("TCP/IPv6 from the TUN host to the eBPF host")?;
    let taken = ebpf.counter("to_daemon")? - before;
    eprintln!("{taken} buffers (IPv6 trains, datagrams behind them) went to the eBPF socket path");
    check!(
        taken > 0,
        "the TUN host sent no IPv6 train the eBPF host passed to its socket path"
    );
    Ok(())
}

fn exchange_both_families(hosts: &[Host]) -> Result<()> {
    wait_mesh(hosts, Duration::from_secs(30))?;
    wait_mesh6(hosts, Duration::from_secs(30))?;
    ipv6_trains_reach_the_socket_path(hosts)?;
    for (a, b) in [(&hosts[0], &hosts[1]), (&hosts[1], &hosts[0])] {
        let (a6, b6) = (a.container6()?, b.container6()?);
        ping6(&a6.ns, b6.ip)?;
        let t6 = tcp_transfer6(&a6, &b6, 8 << 20)
            .with_context(|| format!("TCP/IPv6 {} -> {}", a.name(), b.name()))?;
        let t4 = tcp_transfer(&a.container(), &b.container(), 8 << 20)
            .with_context(|| format!("TCP/IPv4 {} -> {}", a.name(), b.name()))?;
        eprintln!(
            "{} -> {}: TCP/IPv6 {:.0} Mbit/s, TCP/IPv4 {:.0} Mbit/s",
            a.name(),
            b.name(),
            t6.mbit_per_s(),
            t4.mbit_per_s()
        );
    }
    Ok(())
}

#[test]
fn ebpf_and_tun_hosts_carry_both_families_over_an_ipv6_underlay() {
    e2e(|c| {
        c.put_config(DUAL_STACK_CONFIG)?;
        let hosts = vec![
            add_dual_stack_host(c, on("ebpf"))?,
            add_dual_stack_host(c, on("tun"))?,
        ];
        let status = hosts[0].status()?;
        let peers = status["peers"].as_array().cloned().unwrap_or_default();
        check!(
            peers.iter().all(|p| p["public_ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("fd00:77::"))),
            "peers not reached over IPv6: {peers:?}"
        );
        exchange_both_families(&hosts)
    });
}

#[test]
fn ebpf_and_tun_hosts_carry_ipv6_over_an_ipv4_underlay() {
    e2e(|c| {
        c.put_config(DUAL_STACK_CONFIG)?;
        let hosts = vec![
            host_without_ipv6_underlay(c, "ebpf")?,
            host_without_ipv6_underlay(c, "tun")?,
        ];
        exchange_both_families(&hosts)
    });
}
