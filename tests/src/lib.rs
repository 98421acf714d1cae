//! End-to-end test harness for rudder: hosts are network namespaces on a bridged underlay,
//! etcd runs in the underlay namespace, and every host runs the real `rudder` binary.
//!
//! ```no_run
//! use rudder_tests::{e2e, ping, HostOpts};
//! e2e(|c| {
//!     let a = c.add_host(HostOpts::default())?;
//!     let b = c.add_host(HostOpts::default())?;
//!     ping(&a.container(), b.container_ip())
//! });
//! ```
//!
//! Rules kept here: all traffic stays inside namespaces this harness created (the root
//! namespace's routes, addresses and firewall are never touched); namespace names carry the
//! owner PID and a random suffix; everything is removed on drop, also when a test panics.

pub mod bench6;
pub mod bpf_stats;
pub mod cleanup;
pub mod cluster;
pub mod cni;
mod container;
pub mod containerd;
pub mod cpbench_join;
mod daemon;
pub mod docker;
pub mod dual_stack;
pub mod etcd_json;
pub mod etcd_members;
pub mod extra_etcd;
pub mod flanneld;
pub mod host;
pub mod netns;
pub mod outside_bridge;
pub mod outside_bridge6;
pub mod packet;
pub mod process;
pub mod router;
pub mod soak;
pub mod soak_probe;
mod soak_table;
pub mod tinc;
pub mod traffic;
pub mod traffic6;
pub mod underlay;
pub mod util;

pub use cluster::Cluster;
pub use host::{Host, HostOpts, SubnetEnv};
pub use traffic::{
    ping, ping_series, send_udp, send_udp_from, tcp_echo_via, tcp_transfer, wait_ping, Endpoint,
    Transfer, UdpProbe,
};
pub use util::{wait_until, which};

/// Runs an end-to-end test body with a fresh [`Cluster`] (default config written). On error,
/// prints every daemon's and etcd's log and panics with the error chain; the cluster is torn
/// down either way.
pub fn e2e<F>(body: F)
where
    F: FnOnce(&Cluster) -> anyhow::Result<()>,
{
    let cluster = match Cluster::new() {
        Ok(c) => c,
        Err(e) => panic!("cluster setup failed: {e:#}"),
    };
    if let Err(e) = body(&cluster) {
        cluster.dump_logs();
        panic!("{e:#}");
    }
}

/// Waits until every host lists every other host as a peer in `/status`, then until every
/// container pings every other container (both directions).
pub fn wait_mesh(hosts: &[Host], timeout: std::time::Duration) -> anyhow::Result<()> {
    for a in hosts {
        for b in hosts {
            if a.index() == b.index() {
                continue;
            }
            wait_until(
                &format!(
                    "{} to list {} ({}) as a peer",
                    a.name(),
                    b.name(),
                    b.subnet()
                ),
                timeout,
                || a.sees_peer(b),
            )?;
        }
    }
    for a in hosts {
        for b in hosts {
            if a.index() != b.index() {
                wait_ping(&a.container(), b.container_ip(), timeout)?;
            }
        }
    }
    Ok(())
}

/// Waits for the mesh, then pings and sends `bytes` over TCP (content checked) in both
/// directions of every pair of containers, printing each transfer's rate.
pub fn full_mesh_traffic(hosts: &[Host], bytes: usize) -> anyhow::Result<()> {
    use anyhow::Context as _;
    wait_mesh(hosts, std::time::Duration::from_secs(30))?;
    for a in hosts {
        for b in hosts {
            if a.index() == b.index() {
                continue;
            }
            ping(&a.container(), b.container_ip())?;
            let t = tcp_transfer(&a.container(), &b.container(), bytes)
                .with_context(|| format!("{bytes} bytes {} -> {}", a.name(), b.name()))?;
            eprintln!(
                "{} -> {}: {bytes} bytes in {:?} ({:.0} Mbit/s)",
                a.name(),
                b.name(),
                t.elapsed,
                t.mbit_per_s()
            );
        }
    }
    Ok(())
}

/// Adds `n` hosts with default options, each waited for until ready.
pub fn add_hosts(cluster: &Cluster, n: usize) -> anyhow::Result<Vec<Host>> {
    (0..n)
        .map(|_| cluster.add_host(HostOpts::default()))
        .collect()
}

/// `n` /24s of 10.5.0.0/16 from 10.5.200.0 up that none of `hosts` holds: for leases a test
/// writes after the daemons picked their (random) subnets.
pub fn unleased_subnets(hosts: &[&Host], n: usize) -> Vec<ipnet::Ipv4Net> {
    let held: Vec<ipnet::Ipv4Net> = hosts.iter().map(|h| h.subnet()).collect();
    let free: Vec<ipnet::Ipv4Net> = (200..=255u8)
        .map(|third| ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 5, third, 0), 24).unwrap())
        .filter(|s| !held.contains(s))
        .take(n)
        .collect();
    assert_eq!(free.len(), n, "fewer than {n} /24s free above 10.5.200.0");
    free
}

/// `anyhow::ensure!` with a shorter name for tests.
#[macro_export]
macro_rules! check {
    ($($t:tt)*) => { anyhow::ensure!($($t)*) };
}
