//! rudder data-plane benchmark: 2 hosts on the harness's underlay (MTU 1500), one container
//! behind each; modes `route` (host-gw routes), `vxlan` (kernel vxlan, VNI 1, port 8472),
//! `rudder-ebpf`, `rudder-tun`, `rudder-ebpf-docker` (real dockerd on both hosts, docker0
//! adopted by rudder, the containers docker's), the mixed clusters `mixed-ebpf-to-tun` /
//! `mixed-tun-to-ebpf` (sender's plane first; default offloads),
//! `rudder-ebpf-outside-bridge` (no `--bridge`: the harness makes the bridge, holding the
//! gateway address as docker's `--bip` would, and the containers; also times a new
//! container's way onto the fast path) and `tinc` (tinc 1.0 in router mode, no cipher, no
//! digest: a userspace UDP overlay like the TUN path), alternated over rounds; medians and
//! ratios to `route`, and rudder-tun's to `tinc`.
//!
//! Run as root: `cargo xtask bench [--rounds N] [--seconds S] [--json FILE]`.

use anyhow::{anyhow, bail, Result};
use rudder_tests::bench6::{run_mode6, METRICS6, MODES6};
use rudder_tests::bpf_stats;
use rudder_tests::cleanup::install_signal_cleanup;
use rudder_tests::docker::docker_host;
use rudder_tests::outside_bridge;
use rudder_tests::tinc::{start_tinc_mesh_carrying, TINC_DEVICE};
use rudder_tests::util::{ip, machine, percentile, require_daemon};
use rudder_tests::{netns, wait_mesh, wait_ping, Cluster, Endpoint, Host, HostOpts};
use std::time::Duration;

const PORT: u16 = 5201;
const MODES: [&str; 9] = [
    "route",
    "vxlan",
    "rudder-ebpf",
    "rudder-tun",
    "rudder-ebpf-docker",
    "mixed-ebpf-to-tun",
    "mixed-tun-to-ebpf",
    "rudder-ebpf-outside-bridge",
    "tinc",
];
/// Containers timed onto the fast path per `rudder-ebpf-outside-bridge` round.
const FAST_PATH_SAMPLES: u8 = 5;
/// tinc0's MTU: a 1500-byte underlay packet holds IPv4 20 + UDP 8 + tinc's sequence
/// number 4 + the Ethernet header tinc keeps even in router mode 14 + this.
const TINC_MTU: u32 = 1454;
const METRICS: [&str; 15] = [
    "tcp1_gbps",
    // TCP segments the single stream's sender retransmitted (iperf3's count).
    "tcp1_retransmits",
    "tcp4_gbps",
    "udp64_kpps",
    "udp64_loss_pct",
    "rtt_med_ms",
    "rtt_p99_ms",
    // CPU seconds (all CPUs, everything: iperf3, kernel, daemons) per Gbit moved by the
    // single TCP stream, and the part the two rudder daemons used themselves.
    "cpu_s_per_gbit",
    "daemon_cpu_s_per_gbit",
    // Nanoseconds per run of each eBPF program (kernel BPF stats, both hosts) during the
    // single stream (one run per GSO packet) and the UDP 64 B flood (one run per packet).
    "egress_ns_tcp1",
    "br_in_ns_tcp1",
    "ingress_ns_tcp1",
    "egress_ns_udp64",
    "br_in_ns_udp64",
    "ingress_ns_udp64",
];
/// The main table's columns; the rest (eBPF program cost) is a table of its own.
const MAIN_METRICS: usize = 9;
const PROGRAMS: [&str; 3] = ["rudder_egress", "rudder_br_in", "rudder_ingress"];

struct Args {
    rounds: usize,
    seconds: u32,
    json: Option<String>,
    modes: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        rounds: 3,
        seconds: 5,
        json: None,
        modes: MODES
            .iter()
            .chain(MODES6.iter())
            .map(|m| m.to_string())
            .collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow!("{x} needs a value"));
        match x.as_str() {
            "--rounds" => a.rounds = val()?.parse()?,
            "--seconds" => a.seconds = val()?.parse()?,
            "--json" => a.json = Some(val()?),
            "--modes" => {
                a.modes = val()?.split(',').map(str::to_string).collect();
                let known = |m: &str| MODES.contains(&m) || MODES6.contains(&m);
                if let Some(bad) = a.modes.iter().find(|m| !known(m)) {
                    bail!(
                        "unknown mode {bad}; modes are {},{}",
                        MODES.join(","),
                        MODES6.join(",")
                    );
                }
            }
            _ => bail!("unknown argument {x}"),
        }
    }
    Ok(a)
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    install_signal_cleanup()?;
    require_daemon(&["ip", "etcd", "etcdctl", "ping", "iperf3", "ss"])?;
    println!("machine: {}", machine());
    println!("rounds {}, {} s per iperf3 run", args.rounds, args.seconds);
    let _stats_on = bpf_stats::enable()?;
    // results[mode][metric] = values over rounds
    let mut results = vec![vec![Vec::<f64>::new(); METRICS.len()]; MODES.len()];
    let mut fast_path_ms = Vec::new();
    for round in 0..args.rounds {
        for (mi, mode) in MODES.iter().enumerate() {
            if !args.modes.iter().any(|m| m == mode) {
                continue;
            }
            match run_mode(mode, args.seconds, &mut fast_path_ms) {
                Ok(v) => {
                    println!("round {} {mode:<12} {v:.3?}", round + 1);
                    for (k, x) in v.into_iter().enumerate() {
                        results[mi][k].push(x);
                    }
                }
                Err(e) => eprintln!("round {} {mode}: FAILED: {e:#}", round + 1),
            }
        }
    }
    let mut results6 = vec![vec![Vec::<f64>::new(); METRICS6.len()]; MODES6.len()];
    for round in 0..args.rounds {
        for (mi, mode) in MODES6.iter().enumerate() {
            if !args.modes.iter().any(|m| m == mode) {
                continue;
            }
            match run_mode6(mode, args.seconds) {
                Ok(v) => {
                    println!("round {} {mode:<12} {v:.3?}", round + 1);
                    for (k, x) in v.into_iter().enumerate() {
                        results6[mi][k].push(x);
                    }
                }
                Err(e) => eprintln!("round {} {mode}: FAILED: {e:#}", round + 1),
            }
        }
    }
    let med: Vec<Vec<f64>> = results
        .iter()
        .map(|m| m.iter().map(|v| median(v)).collect())
        .collect();
    print_table(&med, 0..MAIN_METRICS, |_| true);
    let index = |name: &str| MODES.iter().position(|m| *m == name).expect("a mode");
    let (tun, tinc) = (index("rudder-tun"), index("tinc"));
    if !results[tun][0].is_empty() && !results[tinc][0].is_empty() {
        let cells: Vec<String> = (0..MAIN_METRICS)
            .map(|k| format!("{:.2}x", med[tun][k] / med[tinc][k]))
            .collect();
        println!("| rudder-tun / tinc | {} |", cells.join(" | "));
    }
    println!("\neBPF program cost, ns per run (kernel BPF stats, both hosts):");
    print_table(&med, MAIN_METRICS..METRICS.len(), |mi| {
        med[mi][MAIN_METRICS..].iter().any(|x| x.is_finite())
    });
    if results6.iter().any(|m| !m[0].is_empty()) {
        println!(
            "\nIPv6 between containers (IPv6 outer headers; `…6in4`: IPv4 ones), ratio to route6:"
        );
        let med6: Vec<Vec<f64>> = results6
            .iter()
            .map(|m| m.iter().map(|v| median(v)).collect())
            .collect();
        println!("\n| mode | {} |", METRICS6.join(" | "));
        println!("|---|{}", "---|".repeat(METRICS6.len()));
        for (mi, mode) in MODES6.iter().enumerate() {
            if results6[mi][0].is_empty() {
                continue;
            }
            let cells: Vec<String> = (0..METRICS6.len())
                .map(|k| format!("{:.3} ({:.2}x)", med6[mi][k], med6[mi][k] / med6[0][k]))
                .collect();
            println!("| {mode} | {} |", cells.join(" | "));
        }
    }
    if !fast_path_ms.is_empty() {
        println!(
            "\ncontainer on the fast path after {:.1} ms (median of {}; min {:.1}, max {:.1})",
            median(&fast_path_ms),
            fast_path_ms.len(),
            fast_path_ms.iter().copied().fold(f64::INFINITY, f64::min),
            fast_path_ms.iter().copied().fold(0.0, f64::max),
        );
    }
    if let Some(f) = args.json {
        let mut obj = serde_json::Map::new();
        obj.insert("machine".into(), machine().into());
        for (mi, mode) in MODES.iter().enumerate() {
            let mut m = serde_json::Map::new();
            for (k, name) in METRICS.iter().enumerate() {
                m.insert(name.to_string(), serde_json::json!({"median": med[mi][k], "ratio_to_route": med[mi][k] / med[0][k], "rounds": results[mi][k]}));
            }
            obj.insert(mode.to_string(), m.into());
        }
        obj.insert(
            "fast_path_ms".into(),
            serde_json::json!({"median": median(&fast_path_ms), "samples": fast_path_ms}),
        );
        std::fs::write(&f, serde_json::to_string_pretty(&obj)?)?;
    }
    Ok(())
}

/// Markdown table of the medians in `columns`, with ratios to `route`, for the modes `show`s.
fn print_table(med: &[Vec<f64>], columns: std::ops::Range<usize>, show: impl Fn(usize) -> bool) {
    println!("\n| mode | {} |", METRICS[columns.clone()].join(" | "));
    println!("|---|{}", "---|".repeat(columns.len()));
    for (mi, mode) in MODES.iter().enumerate() {
        if !show(mi) {
            continue;
        }
        let cells: Vec<String> = columns
            .clone()
            .map(|k| {
                let ratio = med[mi][k] / med[0][k];
                if ratio.is_finite() {
                    format!("{:.3} ({ratio:.2}x)", med[mi][k])
                } else {
                    format!("{:.3}", med[mi][k])
                }
            })
            .collect();
        println!("| {mode} | {} |", cells.join(" | "));
    }
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50)
}

/// Sets up a fresh 2-host cluster for `mode`, measures, tears down (Drop). Times to the
/// fast path (ms) go to `fast_path_ms`.
fn run_mode(mode: &str, secs: u32, fast_path_ms: &mut Vec<f64>) -> Result<Vec<f64>> {
    let cluster = Cluster::new()?;
    // The sender's (host 0) and the receiver's data plane.
    let planes = match mode {
        m if m.starts_with("rudder-ebpf") => ["ebpf", "ebpf"],
        "mixed-ebpf-to-tun" => ["ebpf", "tun"],
        "mixed-tun-to-ebpf" => ["tun", "ebpf"],
        _ => ["tun", "tun"],
    };
    let opts_for = |i: usize| HostOpts {
        dataplane: Some(planes[i].into()),
        external_bridge: mode == "rudder-ebpf-outside-bridge",
        ..HostOpts::default()
    };
    let opts = || opts_for(0);
    // Docker hosts as users run them (docker0 adopted by rudder), or the harness's own.
    let mut docker = Vec::new();
    let (hosts, from, to) = if mode == "rudder-ebpf-docker" {
        for i in 0..2 {
            let d = docker_host(&cluster, opts())?;
            let name = format!("bench{i}");
            d.dockerd.run_container(&name, &[], &["sleep", "100000"])?;
            docker.push((d, name));
        }
        let mut endpoints = Vec::new();
        for (d, name) in &docker {
            endpoints.push(
                d.dockerd
                    .endpoint(name, &format!("{}-{name}", d.host.netns()))?,
            );
        }
        let hosts: Vec<Host> = docker.iter().map(|(d, _)| d.host.clone()).collect();
        let to = endpoints.pop().expect("two endpoints");
        let from = endpoints.pop().expect("two endpoints");
        (hosts, from, to)
    } else if mode == "rudder-ebpf-outside-bridge" {
        let hosts = vec![
            cluster.add_host(opts_for(0))?,
            cluster.add_host(opts_for(1))?,
        ];
        let (a, b) = (&hosts[0], &hosts[1]);
        rudder_tests::wait_until(
            "the hosts to see each other",
            Duration::from_secs(30),
            || Ok(a.sees_peer(b)? && b.sees_peer(a)?),
        )?;
        for h in &hosts {
            outside_bridge::make_bridge(h)?;
            outside_bridge::wait_adopted(h)?;
        }
        let from = outside_bridge::add_container(a, 1)?;
        // The receiver's first container is the one measured; more for the median.
        let mut to = None;
        for n in 1..=FAST_PATH_SAMPLES {
            let (ctr, took) = outside_bridge::time_to_fast_path(b, n)?;
            println!("container {} on the fast path after {took:.1?}", ctr.ip);
            fast_path_ms.push(took.as_secs_f64() * 1e3);
            to.get_or_insert(ctr);
        }
        (hosts, from, to.expect("at least one container"))
    } else {
        let hosts = vec![
            cluster.add_host(opts_for(0))?,
            cluster.add_host(opts_for(1))?,
        ];
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let (from, to) = (hosts[0].container(), hosts[1].container());
        (hosts, from, to)
    };
    let (a, b) = (&hosts[0], &hosts[1]);
    // tinc's daemons stand in for rudder's in the CPU figures.
    let mut tinc_pids = Vec::new();
    match mode {
        // More specific /32 routes than the daemon's, inside the host namespaces only. The
        // daemons go first (SIGKILL: their bridges and containers stay): plain overlay packets
        // on the underlay are what rudder's guard drops (`unencapsulated`).
        "route" => {
            for h in [a, b] {
                h.kill9()?;
                let _ = run_cmd(h.netns(), "nft", &["delete", "table", "ip", "rudder_guard"]);
            }
            for (h, p) in [(a, b), (b, a)] {
                let dst = format!("{}/32", p.container_ip());
                ip(&[
                    "-n",
                    h.netns(),
                    "route",
                    "add",
                    &dst,
                    "via",
                    &p.underlay_ip().to_string(),
                ])?;
            }
        }
        "vxlan" => {
            for (i, (h, p)) in [(a, b), (b, a)].into_iter().enumerate() {
                let ns = h.netns();
                let mac = format!("02:00:00:00:01:0{}", i + 1);
                let peer_mac = format!("02:00:00:00:01:0{}", 2 - i);
                ip(&[
                    "-n",
                    ns,
                    "link",
                    "add",
                    "bvx",
                    "address",
                    &mac,
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "dstport",
                    "8472",
                    "local",
                    &h.underlay_ip().to_string(),
                    "dev",
                    "eth0",
                    "nolearning",
                ])?;
                ip(&["-n", ns, "link", "set", "bvx", "mtu", "1450", "up"])?;
                let vtep = format!("10.255.0.{}", i + 1);
                let peer_vtep = format!("10.255.0.{}", 2 - i);
                ip(&["-n", ns, "addr", "add", &format!("{vtep}/32"), "dev", "bvx"])?;
                ip(&[
                    "-n", ns, "neigh", "add", &peer_vtep, "lladdr", &peer_mac, "dev", "bvx",
                ])?;
                run_cmd(
                    ns,
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        &peer_mac,
                        "dev",
                        "bvx",
                        "dst",
                        &p.underlay_ip().to_string(),
                    ],
                )?;
                let dst = format!("{}/32", p.container_ip());
                ip(&[
                    "-n", ns, "route", "add", &dst, "via", &peer_vtep, "dev", "bvx", "onlink",
                ])?;
            }
        }
        "tinc" => {
            for h in [a, b] {
                h.kill9()?;
                let _ = run_cmd(h.netns(), "nft", &["delete", "table", "ip", "rudder_guard"]);
            }
            let subnets = [vec![a.subnet()], vec![b.subnet()]];
            tinc_pids = start_tinc_mesh_carrying(&cluster, &[a, b], TINC_MTU, &subnets)?;
            for (h, p) in [(a, b), (b, a)] {
                let dst = format!("{}/32", p.container_ip());
                ip(&["-n", h.netns(), "route", "add", &dst, "dev", TINC_DEVICE])?;
            }
        }
        _ => {}
    }
    wait_ping(&from, to.ip, Duration::from_secs(30))?;
    // No daemon runs in `route` mode: nothing to count.
    let cpu = |h: &Host| {
        if h.is_running() {
            h.cpu_time()
        } else {
            Ok(Duration::ZERO)
        }
    };
    let daemons_cpu = || -> Result<Duration> {
        let tincd: Duration = tinc_pids
            .iter()
            .map(|pid| rudder_tests::process::cpu_time_of(*pid))
            .sum::<Result<_>>()?;
        Ok(cpu(a)? + cpu(b)? + tincd)
    };
    let (busy_before, daemons_before) = (machine_busy()?, daemons_cpu()?);
    let pids: Vec<u32> = [a, b].iter().filter_map(|h| h.pid()).collect();
    let bpf_stats = || bpf_stats::snapshot(&pids);
    let bpf_before = bpf_stats()?;
    let tcp1_run = iperf(&from, &to, secs, &[])?;
    let bpf_tcp1 = bpf_stats()?;
    let (busy, daemons) = (
        machine_busy()? - busy_before,
        daemons_cpu()? - daemons_before,
    );
    let tcp1 = tcp1_run["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    let gbit_moved = tcp1_run["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or(0.0)
        * 8.0
        / 1e9;
    let retransmits = tcp1_run["end"]["sum_sent"]["retransmits"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let cpu_per_gbit = busy.as_secs_f64() / gbit_moved;
    let daemon_cpu_per_gbit = daemons.as_secs_f64() / gbit_moved;
    let tcp4 = iperf(&from, &to, secs, &["-P", "4"])?["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    let bpf_before_udp = bpf_stats()?;
    let udp = iperf(&from, &to, secs, &["-u", "-l", "64", "-b", "0"])?;
    let bpf_udp = bpf_stats()?;
    let s = &udp["end"]["sum"];
    let recv = s["packets"].as_f64().unwrap_or(0.0) - s["lost_packets"].as_f64().unwrap_or(0.0);
    let kpps = recv / s["seconds"].as_f64().unwrap_or(1.0) / 1e3;
    let loss_pct = s["lost_percent"].as_f64().unwrap_or(f64::NAN);
    let (med, p99) = rtt(&from, &to)?;
    drop(docker);
    let _ = &cluster;
    let mut figures = vec![
        tcp1,
        retransmits,
        tcp4,
        kpps,
        loss_pct,
        med,
        p99,
        cpu_per_gbit,
        daemon_cpu_per_gbit,
    ];
    for (after, before) in [(&bpf_tcp1, &bpf_before), (&bpf_udp, &bpf_before_udp)] {
        figures.extend(PROGRAMS.map(|p| after.ns_per_run_since(before, p)));
    }
    Ok(figures)
}

/// Busy time of all CPUs together (everything but idle and iowait), from `/proc/stat`.
fn machine_busy() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    rudder_tests::process::clock_ticks(f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
}

fn run_cmd(ns: &str, prog: &str, args: &[&str]) -> Result<String> {
    rudder_tests::util::run(netns::exec(ns, prog).args(args))
}

fn rtt(from: &Endpoint, to: &Endpoint) -> Result<(f64, f64)> {
    rudder_tests::traffic::rtt_percentiles(&from.ns, to.ip.into(), 200)
}

fn iperf(from: &Endpoint, to: &Endpoint, secs: u32, extra: &[&str]) -> Result<serde_json::Value> {
    rudder_tests::traffic::iperf3(from, to, PORT, secs, extra)
}
