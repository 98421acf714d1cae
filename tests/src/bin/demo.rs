//! rudder demo: three docker hosts (network namespaces) on one underlay, etcd, the real daemon
//! on each and a real dockerd started with `rudder docker-opts`, one container each; prints the
//! subnets, a ping reachability matrix between the containers, and iperf3 TCP throughput over
//! rudder vs. plain routing between the same containers. `--bare` uses plain container
//! namespaces behind a bridge rudder makes instead of docker.
//!
//! Run as root: `cargo xtask demo [--dataplane auto|ebpf|tun] [--bare]` (default `auto`: eBPF
//! where it loads). Everything is removed on exit and on Ctrl-C.

use anyhow::{anyhow, bail, Context, Result};
use rudder_tests::cleanup::install_signal_cleanup;
use rudder_tests::docker::{docker_host, DockerHost};
use rudder_tests::util::{ip, require_daemon, rudder_bin};
use rudder_tests::{wait_mesh, wait_ping, Cluster, Endpoint, Host, HostOpts};
use std::time::Duration;

const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: u32 = 5;

fn main() {
    if let Err(e) = real_main() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

/// `--dataplane X` (default `auto`) and `--bare` from the command line.
fn parse_args() -> Result<(String, bool)> {
    let mut dataplane = "auto".to_string();
    let mut bare = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bare" => bare = true,
            "--dataplane" => dataplane = args.next().context("--dataplane needs a value")?,
            other if other.starts_with("--dataplane=") => {
                dataplane = other["--dataplane=".len()..].into()
            }
            other => bail!("usage: demo [--dataplane auto|ebpf|tun] [--bare], got {other:?}"),
        }
    }
    Ok((dataplane, bare))
}

/// One demo host: the rudder host and the container the matrix and iperf3 use.
struct DemoHost {
    host: Host,
    container: Endpoint,
    /// Keeps dockerd (and its container) alive for the demo.
    _docker: Option<DockerHost>,
}

fn real_main() -> Result<()> {
    install_signal_cleanup()?;
    require_daemon(&["ip", "etcd", "etcdctl", "ping", "iperf3", "ss"])?;
    let (dataplane, bare) = parse_args()?;
    println!(
        "rudder demo (daemon {}, --dataplane {dataplane}, {})",
        rudder_bin().display(),
        if bare {
            "bare container namespaces"
        } else {
            "docker hosts"
        }
    );

    println!("[1/5] underlay namespace with a bridge (192.168.77.1/24) and etcd");
    let cluster = Cluster::new()?;
    println!(
        "      etcd at {} in {}",
        cluster.etcd_endpoint(),
        cluster.underlay_ns()
    );

    let mut hosts = Vec::new();
    if bare {
        println!("[2/5] three hosts, each running rudder, each with one container namespace");
    } else {
        println!(
            "[2/5] three docker hosts: dockerd (docker's firewall, FORWARD policy DROP), rudder, \
             dockerd restarted with `rudder docker-opts`, one container each"
        );
    }
    for i in 0..3 {
        let opts = HostOpts {
            dataplane: Some(dataplane.clone()),
            ..HostOpts::default()
        };
        let h = if bare {
            let host = cluster.add_host(opts)?;
            DemoHost {
                container: host.container(),
                host,
                _docker: None,
            }
        } else {
            let d = docker_host(&cluster, opts)?;
            let name = format!("web{i}");
            d.dockerd
                .run_server(&name, &["--restart", "always"])
                .with_context(|| format!("docker run on {}", d.host.name()))?;
            let container = d
                .dockerd
                .endpoint(&name, &format!("{}-{name}", d.host.netns()))?;
            DemoHost {
                host: d.host.clone(),
                container,
                _docker: Some(d),
            }
        };
        println!(
            "      {}: underlay {:<14} subnet {:<14} container {:<12} data plane {}",
            h.host.name(),
            h.host.underlay_ip(),
            h.host.subnet().to_string(),
            h.container.ip,
            host_dataplane(&h.host)
        );
        hosts.push(h);
    }
    let rudder_hosts: Vec<Host> = hosts.iter().map(|h| h.host.clone()).collect();
    wait_mesh_or_peers(&rudder_hosts, bare)?;

    println!("[3/5] reachability matrix (ping container -> container)");
    let (reachable, pairs) = print_matrix(&hosts);

    let (a, b) = (&hosts[0], &hosts[1]);
    println!(
        "[4/5] iperf3 {} s, {} container -> {} container, over rudder",
        IPERF_SECONDS,
        a.host.name(),
        b.host.name()
    );
    let overlay = iperf(&a.container, &b.container)?;
    println!("      over rudder:    {:>8.1} Mbit/s", overlay / 1e6);

    println!("[5/5] the same with plain routing (host-gw routes via the underlay, no rudder)");
    let plain = {
        let _routes = PlainRoutes::add(a, b)?;
        wait_ping(&a.container, b.container.ip, Duration::from_secs(10))?;
        iperf(&a.container, &b.container)?
        // routes removed here
    };
    println!("      plain routing:  {:>8.1} Mbit/s", plain / 1e6);
    println!(
        "      ratio rudder / plain = {:.2} ({:.0}% of plain routing)",
        overlay / plain,
        100.0 * overlay / plain
    );
    // Back on the overlay after removing the plain routes.
    wait_ping(&a.container, b.container.ip, Duration::from_secs(10))?;

    println!();
    println!("summary");
    println!(
        "  {:<4} {:<16} {:<16} {:<10}",
        "host", "underlay", "subnet", "data plane"
    );
    for h in &rudder_hosts {
        println!(
            "  {:<4} {:<16} {:<16} {:<10}",
            h.name(),
            h.underlay_ip().to_string(),
            h.subnet().to_string(),
            host_dataplane(h)
        );
    }
    println!("  reachability: {reachable}/{pairs} container pairs answer ping");
    println!(
        "  TCP {} -> {}: rudder {:.2} Gbit/s, plain routing {:.2} Gbit/s, ratio {:.2}",
        a.host.name(),
        b.host.name(),
        overlay / 1e9,
        plain / 1e9,
        overlay / plain
    );
    if reachable != pairs {
        bail!(
            "{} container pairs cannot reach each other",
            pairs - reachable
        );
    }
    Ok(())
}

/// Every host lists every other as a peer (and, for bare hosts, their containers ping).
fn wait_mesh_or_peers(hosts: &[Host], bare: bool) -> Result<()> {
    if bare {
        return wait_mesh(hosts, Duration::from_secs(30)).context("hosts did not find each other");
    }
    rudder_tests::wait_until(
        "every host to list every other",
        Duration::from_secs(30),
        || {
            for a in hosts {
                for b in hosts {
                    if a.index() != b.index() && !a.sees_peer(b)? {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
    )
}

/// The data plane the host's daemon reports, with the reason when `auto` fell back.
fn host_dataplane(h: &Host) -> String {
    match h.status() {
        Ok(st) => st["dataplane"].as_str().unwrap_or("?").to_string(),
        Err(e) => format!("? ({e})"),
    }
}

/// Prints the matrix; returns (pairs that answered, pairs).
fn print_matrix(hosts: &[DemoHost]) -> (usize, usize) {
    let (mut reachable, mut pairs) = (0, 0);
    print!("      {:>10}", "from \\ to");
    for h in hosts {
        print!(" {:>12}", h.container.ip);
    }
    println!();
    for a in hosts {
        print!("      {:>10}", a.container.ip);
        for b in hosts {
            let cell = if a.host.index() == b.host.index() {
                "-"
            } else {
                pairs += 1;
                if wait_ping(&a.container, b.container.ip, Duration::from_secs(5)).is_ok() {
                    reachable += 1;
                    "ok"
                } else {
                    "FAIL"
                }
            };
            print!(" {cell:>12}");
        }
        println!();
    }
    (reachable, pairs)
}

/// Host-gw style routes for the two hosts' subnets via each other's underlay address (more
/// specific than rudder's route for the whole network), inside the host namespaces only.
/// Removed on drop.
struct PlainRoutes {
    added: Vec<(String, String)>,
}

impl PlainRoutes {
    fn add(a: &DemoHost, b: &DemoHost) -> Result<Self> {
        let mut r = Self { added: Vec::new() };
        for (here, there) in [(a, b), (b, a)] {
            let gw = there.host.underlay_ip().to_string();
            let mut dst = there.host.subnet().to_string();
            if let Err(e) = ip(&["-n", here.host.netns(), "route", "add", &dst, "via", &gw]) {
                // The data plane may already route this subnet itself; a host route for the
                // container is more specific still, and removing it touches nothing else.
                let host_route = format!("{}/32", there.container.ip);
                println!(
                    "      ({dst} is already routed in {}: {e:#}; using {host_route})",
                    here.host.name()
                );
                dst = host_route;
                ip(&["-n", here.host.netns(), "route", "add", &dst, "via", &gw])?;
            }
            r.added.push((here.host.netns().to_string(), dst));
        }
        let via = ip(&[
            "-n",
            a.host.netns(),
            "route",
            "get",
            &b.container.ip.to_string(),
        ])?;
        println!(
            "      {} now routes: {}",
            a.host.name(),
            via.lines().next().unwrap_or("").trim()
        );
        Ok(r)
    }
}

impl Drop for PlainRoutes {
    fn drop(&mut self) {
        for (ns, dst) in &self.added {
            if let Err(e) = ip(&["-n", ns, "route", "del", dst]) {
                eprintln!("removing plain route: {e:#}");
            }
        }
    }
}

/// iperf3 from `from` to `to`; returns received bits per second.
fn iperf(from: &Endpoint, to: &Endpoint) -> Result<f64> {
    rudder_tests::traffic::iperf3(from, to, IPERF_PORT, IPERF_SECONDS, &[])?["end"]["sum_received"]
        ["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no throughput in iperf3 output"))
}
