//! rudder control-plane benchmark: N synthetic leases in etcd, one daemon; time until all N
//! peers are programmed, delay from a lease change in etcd to its entry (p50/p99), and the
//! daemon's peak RSS (VmHWM). Targets: 10k peers in < 2 s, 65,536 in < 3 s, change -> entry
//! p99 < 10 ms, VmHWM < 30 MB at 1k peers and < 100 MB at 65,536 (reported, never asserted).
//!
//! Run as root: `cargo xtask bench --only control-plane [--peers 1000,10000,65536]
//! [--dataplanes ebpf,tun] [--changes 200] [--join 50] [--json FILE]`. `--join N` (alone, or
//! with `--peers`) starts N daemons at once instead ([`rudder_tests::cpbench_join`]).
//!
//! Network 10.0.0.0/8 in /24s while the case fits (65,535 acquirable subnets, SubnetMin
//! 10.0.1.0); a larger case (65,536 peers plus our own subnet and the added ones) uses
//! 10.0.0.0/7. When the added leases would overflow the data plane's peer table
//! ([`rudder_ebpf::MAX_PEERS`]), the changes alternate delete and add (1:1) instead of 3:1.
//!
//! "Programmed": eBPF, the peer's route (proto 211) is in the host namespace (the daemon
//! adds it after the LPM map entry); TUN, the peer is in the published forwarding table.
//! "All programmed" polls the `rudder_peers` gauge (set after the last entry, on both
//! planes), then checks the eBPF routes once; the per-change delay: eBPF, the route's
//! netlink event; TUN, the daemon's "peer programmed" log line, timestamped after the swap.

use anyhow::{anyhow, bail, Context, Result};
use rudder::subnet::{subnet_to_key, LeaseValue};
use rudder_tests::cleanup::install_signal_cleanup;
use rudder_tests::cluster::DEFAULT_PREFIX;
use rudder_tests::cpbench_join::run_join;
use rudder_tests::process::{cpu_time_of, peak_rss_kib};
use rudder_tests::util::{machine, percentile, require_daemon, rudder_bin};
use rudder_tests::{etcd_json, Cluster, Host, HostOpts};
use std::io::{BufRead, BufReader, Read, Seek};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CONFIG_8: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"udp"}}"#;
const CONFIG_7: &str = r#"{"Network":"10.0.0.0/7","SubnetLen":24,"Backend":{"Type":"udp"}}"#;
/// Leases [`lease`] numbers inside 10.0.0.0/8 (10.1.0.0/24 to 10.255.255.0/24).
const LEASES_IN_8: usize = 255 * 256;
/// Largest case: every /24 of a /7 but ours and the added ones.
const MAX_CASE: usize = 131_071 - 1000;
const RTPROT_RUDDER: &str = "211";
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(300);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval of the "all programmed" count.
const POLL: Duration = Duration::from_millis(20);

struct Args {
    peers: Vec<usize>,
    dataplanes: Vec<String>,
    changes: usize,
    join: Vec<usize>,
    peers_given: bool,
    json: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        peers: vec![1000, 10000],
        dataplanes: vec!["ebpf".into(), "tun".into()],
        changes: 200,
        join: Vec::new(),
        peers_given: false,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow!("{x} needs a value"));
        match x.as_str() {
            "--peers" => {
                a.peers = list(&val()?)?;
                a.peers_given = true;
            }
            "--join" => a.join = list(&val()?)?,
            "--dataplanes" => a.dataplanes = val()?.split(',').map(|s| s.trim().into()).collect(),
            "--changes" => a.changes = val()?.parse()?,
            "--json" => a.json = Some(val()?),
            _ => bail!("unknown argument {x}"),
        }
    }
    if let Some(dp) = a
        .dataplanes
        .iter()
        .find(|d| !["ebpf", "tun"].contains(&d.as_str()))
    {
        bail!("unknown data plane {dp:?} (ebpf or tun)");
    }
    if a.peers.iter().any(|&n| n + a.changes > MAX_CASE) {
        bail!("at most {MAX_CASE} peers plus changes fit in 10.0.0.0/7 with /24 leases");
    }
    if a.join.iter().any(|&n| !(2..=200).contains(&n)) {
        bail!("--join takes 2 to 200 hosts (the underlay is one /24)");
    }
    if a.changes == 0 {
        bail!("--changes must be at least 1");
    }
    Ok(a)
}

fn list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|n| n.trim().parse::<usize>().map_err(Into::into))
        .collect()
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("cpbench failed: {e:#}");
        std::process::exit(1);
    }
}

#[derive(Debug)]
struct Row {
    peers: usize,
    dataplane: String,
    ready_s: f64,
    all_programmed_s: f64,
    delay_p50_ms: f64,
    delay_p99_ms: f64,
    delay_max_ms: f64,
    /// p99 of the same delay counted from when the put was sent (etcd's commit included).
    sent_p99_ms: f64,
    put_p50_ms: f64,
    /// eBPF: the same delay to the daemon's "peer programmed" log line (NaN for TUN).
    log_p50_ms: f64,
    log_p99_ms: f64,
    changes: usize,
    vm_hwm_mb: f64,
    cpu_s: f64,
    delay_source: &'static str,
}

impl Row {
    /// Each target that applies to this row: (name, met).
    fn targets(&self) -> Vec<(&'static str, bool)> {
        let mut t = Vec::new();
        if self.peers >= 65536 {
            t.push(("all<3s", self.all_programmed_s < 3.0));
        } else if self.peers >= 10000 {
            t.push(("all<2s", self.all_programmed_s < 2.0));
        }
        t.push(("p99<10ms", self.delay_p99_ms < 10.0));
        if self.peers <= 1000 {
            t.push(("RSS<30MB", self.vm_hwm_mb < 30.0));
        } else if self.peers >= 65536 {
            t.push(("RSS<100MB", self.vm_hwm_mb < 100.0));
        }
        t
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    install_signal_cleanup()?;
    require_daemon(&["ip", "etcd", "etcdctl"])?;
    println!("machine: {}", machine());
    println!(
        "peers {:?}, data planes {:?}, {} changes per case (3 adds : 1 delete)",
        args.peers, args.dataplanes, args.changes
    );
    let mut joins = Vec::new();
    for &n in &args.join {
        for dp in &args.dataplanes {
            match run_join(n, dp) {
                Ok(row) => {
                    println!("{row:?}");
                    joins.push(row);
                }
                Err(e) => eprintln!("{n} hosts joining, {dp}: FAILED: {e:#}"),
            }
        }
    }
    let peer_cases = if args.join.is_empty() || args.peers_given {
        args.peers.clone()
    } else {
        Vec::new()
    };
    let mut rows = Vec::new();
    for &n in &peer_cases {
        for dp in &args.dataplanes {
            match run_case(n, dp, args.changes) {
                Ok(row) => {
                    println!("{row:?}");
                    rows.push(row);
                }
                Err(e) => eprintln!("{n} peers, {dp}: FAILED: {e:#}"),
            }
        }
    }
    println!("\n| peers | data plane | ready s | all programmed s | change->entry p50 ms | p99 ms | max ms | p99 from put sent ms | etcd put p50 ms | VmHWM MB | daemon CPU s | targets |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let targets: Vec<String> = r
            .targets()
            .iter()
            .map(|(name, met)| format!("{name} {}", if *met { "met" } else { "MISSED" }))
            .collect();
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {} |",
            r.peers,
            r.dataplane,
            r.ready_s,
            r.all_programmed_s,
            r.delay_p50_ms,
            r.delay_p99_ms,
            r.delay_max_ms,
            r.sent_p99_ms,
            r.put_p50_ms,
            r.vm_hwm_mb,
            r.cpu_s,
            targets.join(", ")
        );
    }
    if !joins.is_empty() {
        println!("\n| hosts joining | data plane | all ready s | all programmed s | acquisitions | etcd requests per acquisition | by method per acquisition | daemon CPU s (mean) |");
        println!("|---|---|---|---|---|---|---|---|");
        for j in &joins {
            println!(
                "| {} | {} | {:.3} | {:.3} | {} | {:.2} | {} | {:.2} |",
                j.hosts,
                j.dataplane,
                j.all_ready_s,
                j.all_programmed_s,
                j.lease_acquisitions,
                j.requests_per_acquisition(),
                j.by_method_per_acquisition(),
                j.daemon_cpu_s_mean
            );
        }
        println!("etcd requests: grpc_server_handled_total (unary calls; a watch or keep-alive stream counts when it ends) from just before the starts until every host had all others programmed, over the daemons' lease_acquisitions.");
    }
    println!("change->entry: from the acknowledged etcd put/delete to the entry (0 when the entry came first); eBPF: route netlink event (ip monitor), TUN: timestamp of the daemon's log line after the table swap. All programmed: polled every {POLL:?} from the daemon's start.");
    if let Some(f) = args.json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "peers": r.peers, "dataplane": r.dataplane, "ready_s": r.ready_s,
                    "all_programmed_s": r.all_programmed_s, "delay_p50_ms": r.delay_p50_ms,
                    "delay_p99_ms": r.delay_p99_ms, "delay_max_ms": r.delay_max_ms, "sent_p99_ms": r.sent_p99_ms,
                    "put_p50_ms": r.put_p50_ms, "log_p50_ms": r.log_p50_ms, "log_p99_ms": r.log_p99_ms, "changes": r.changes, "vm_hwm_mb": r.vm_hwm_mb,
                    "daemon_cpu_s": r.cpu_s, "delay_source": r.delay_source,
                    "targets": r.targets().into_iter().map(|(k, v)| (k.to_string(), v.into())).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        let joins: Vec<serde_json::Value> = joins
            .iter()
            .map(|j| {
                serde_json::json!({
                    "hosts": j.hosts, "dataplane": j.dataplane, "all_ready_s": j.all_ready_s,
                    "all_programmed_s": j.all_programmed_s, "lease_acquisitions": j.lease_acquisitions,
                    "etcd_requests": j.etcd_requests, "etcd_requests_per_acquisition": j.requests_per_acquisition(),
                    "etcd_requests_by_method": j.by_method, "daemon_cpu_s_mean": j.daemon_cpu_s_mean,
                })
            })
            .collect();
        let obj = serde_json::json!({"machine": machine(), "cases": rows, "joins": joins});
        std::fs::write(&f, serde_json::to_string_pretty(&obj)?)?;
    }
    Ok(())
}

/// Lease `i`: subnet 10.(1 + i/256).(i%256).0/24 at public IP 172.16.0.0 + i + 1 (one
/// address per peer, off the underlay: the daemon routes it via the underlay gateway).
fn lease(i: usize) -> (ipnet::Ipv4Net, String, String) {
    let i = u32::try_from(i).expect("small index");
    let subnet = ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a01_0000 + (i << 8)), 24).unwrap();
    let ip = Ipv4Addr::from(0xac10_0000 + i + 1);
    let key = format!("{DEFAULT_PREFIX}/subnets/{}", subnet_to_key(subnet));
    (subnet, key, LeaseValue::udp(ip).encode())
}

fn run_case(n: usize, dp: &str, changes: usize) -> Result<Row> {
    println!("--- {n} peers, {dp} ---");
    let adds = changes - changes / 4;
    // Room for the added leases and our own subnet?
    // Our own subnet needs one more.
    let config = if n + adds < LEASES_IN_8 {
        CONFIG_8
    } else {
        CONFIG_7
    };
    // Adds beyond the peer table's capacity would fail: then each add follows a delete.
    let balanced = n + adds > rudder_ebpf::MAX_PEERS as usize;
    println!(
        "network {}, changes {}",
        if config == CONFIG_8 {
            "10.0.0.0/8"
        } else {
            "10.0.0.0/7"
        },
        if balanced {
            "1 delete : 1 add"
        } else {
            "3 adds : 1 delete"
        }
    );
    let cluster = Cluster::new()?;
    cluster.put_config(config)?;
    let kvs: Vec<(String, String)> = (0..n)
        .map(|i| {
            let (_, k, v) = lease(i);
            (k, v)
        })
        .collect();
    let t = Instant::now();
    etcd_json::put_many(&cluster, &kvs)?;
    println!("wrote {n} leases in {:.3} s", t.elapsed().as_secs_f64());

    let host = cluster.add_host_without_daemon(HostOpts {
        dataplane: Some(dp.into()),
        wait_ready: false,
        ..HostOpts::default()
    })?;
    let ebpf = dp == "ebpf";
    let mut observer = if ebpf {
        Observer::routes(&cluster, &host)?
    } else {
        Observer::log(&host)
    };
    // eBPF: the log line too, to tell the daemon's own delay from the route event's.
    let mut log_observer = ebpf.then(|| Observer::log(&host));

    let t0 = Instant::now();
    host.start()?;
    let (mut ready, mut all) = (None, None);
    while ready.is_none() || all.is_none() {
        host.check_alive()?;
        if t0.elapsed() > PROGRAM_TIMEOUT {
            let log = host.log();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "not all {n} peers programmed after {PROGRAM_TIMEOUT:?} ({} are); log ends: {tail:?}",
                programmed(&host, ebpf).unwrap_or(0)
            );
        }
        if ready.is_none() && host.is_ready() {
            ready = Some(t0.elapsed());
        }
        // The `rudder_peers` gauge on both planes: it is set once the last entry (eBPF: its
        // route) is in; polling 65k routes with `ip` every 20 ms took a core from the daemon.
        if all.is_none() && programmed(&host, false).unwrap_or(0) >= n {
            all = Some(t0.elapsed());
            let routes = programmed(&host, ebpf)?;
            if routes < n {
                bail!("rudder_peers says {n} but only {routes} peer routes are in");
            }
        }
        std::thread::sleep(POLL);
    }
    let (ready, all) = (ready.unwrap(), all.unwrap());
    println!(
        "ready after {:.3} s, {n} peers programmed after {:.3} s",
        ready.as_secs_f64(),
        all.as_secs_f64()
    );
    let pid = host.pid().context("daemon pid")?;
    // `ip netns exec` execs the daemon in place, so the child's pid is the daemon's.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    if exe != std::fs::canonicalize(rudder_bin()).ok() {
        bail!("pid {pid} runs {exe:?}, not the daemon: VmHWM would be wrong");
    }

    // New leases skip the subnet the daemon took for itself.
    let own = host
        .read_subnet_file()?
        .context("the daemon is ready but wrote no subnet file")?
        .subnet
        .trunc();
    let mut fresh = (n..).filter(|&i| lease(i).0 != own);
    // Changes, one at a time: 3 new leases, then a delete of an original one (balanced: a
    // delete of an original one, then a new lease).
    let mut delays = Vec::with_capacity(changes);
    let mut puts = Vec::with_capacity(changes);
    let mut log_delays = Vec::new();
    let mut from_sent = Vec::with_capacity(changes);
    for k in 0..changes {
        let (delete, original) = if balanced {
            (k % 2 == 0, k / 2)
        } else {
            (k % 4 == 3, k / 4)
        };
        let (subnet, key, value) = if delete {
            lease(original)
        } else {
            lease(fresh.next().expect("unbounded"))
        };
        observer.drain();
        if let Some(o) = &mut log_observer {
            o.drain();
        }
        let sent = Instant::now();
        let sent_at = SystemTime::now();
        if delete {
            etcd_json::delete(&cluster, &key)?;
        } else {
            etcd_json::put(&cluster, &key, &value)?;
        }
        let acked = SystemTime::now();
        puts.push(sent.elapsed().as_secs_f64() * 1e3);
        let seen = observer
            .wait(&subnet.to_string(), delete, CHANGE_TIMEOUT)
            .with_context(|| {
                format!(
                    "change {k} ({} {subnet})",
                    if delete { "delete" } else { "add" }
                )
            })?;
        delays.push(seen.duration_since(acked).unwrap_or_default().as_secs_f64() * 1e3);
        from_sent.push(
            seen.duration_since(sent_at)
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
        );
        if let Some(o) = &mut log_observer {
            let logged = o.wait(&subnet.to_string(), delete, CHANGE_TIMEOUT)?;
            log_delays.push(
                logged
                    .duration_since(acked)
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1e3,
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // When the slow ones came: right after the start, or spread out.
    let mut slowest: Vec<(usize, f64)> = delays.iter().copied().enumerate().collect();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    let slowest: Vec<String> = slowest
        .iter()
        .take(5)
        .map(|(k, ms)| format!("#{k} {ms:.1} ms"))
        .collect();
    println!("slowest changes (of {changes}): {}", slowest.join(", "));
    let deletes = if balanced {
        changes.div_ceil(2)
    } else {
        changes / 4
    };
    let expect = n + changes - 2 * deletes;
    let now = programmed(&host, ebpf)?;
    if now != expect {
        bail!("{now} peers programmed after the changes, expected {expect}");
    }
    let hwm = peak_rss_kib(pid)? as f64 / 1024.0;
    let cpu = cpu_time_of(pid)?.as_secs_f64();
    observer.stop();
    if let Some(o) = log_observer {
        o.stop();
    }
    Ok(Row {
        peers: n,
        dataplane: dp.into(),
        ready_s: ready.as_secs_f64(),
        all_programmed_s: all.as_secs_f64(),
        delay_p50_ms: percentile(&delays, 50),
        delay_p99_ms: percentile(&delays, 99),
        delay_max_ms: percentile(&delays, 100),
        sent_p99_ms: percentile(&from_sent, 99),
        put_p50_ms: percentile(&puts, 50),
        log_p50_ms: percentile(&log_delays, 50),
        log_p99_ms: percentile(&log_delays, 99),
        changes,
        vm_hwm_mb: hwm,
        cpu_s: cpu,
        delay_source: if ebpf {
            "route netlink event"
        } else {
            "daemon log timestamp"
        },
    })
}

/// Peers programmed now: eBPF, our routes in the host namespace but the `unreachable
/// <network>` one; TUN, the `rudder_peers` gauge.
fn programmed(host: &Host, ebpf: bool) -> Result<usize> {
    if ebpf {
        let out = Command::new("ip")
            .args(["-n", host.netns(), "route", "show", "proto", RTPROT_RUDDER])
            .output()?;
        Ok(out
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty() && !l.starts_with(b"unreachable"))
            .count())
    } else {
        let (code, body) = host.http_get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        body.lines()
            .find_map(|l| l.strip_prefix("rudder_peers "))
            .ok_or_else(|| anyhow!("no rudder_peers in /metrics"))?
            .trim()
            .parse()
            .map_err(Into::into)
    }
}

/// Lines telling when an entry appeared or went, each with its time.
struct Observer {
    lines: mpsc::Receiver<(SystemTime, String)>,
    monitor: Option<Child>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Observer {
    /// `ip -n <ns> monitor route` (flushed per message), stamped on arrival.
    fn routes(cluster: &Cluster, host: &Host) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["-n", host.netns(), "monitor", "route"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ip monitor route")?;
        cluster.resources().add_pid(child.id());
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send((SystemTime::now(), line)).is_err() {
                    return;
                }
            }
        });
        Ok(Observer {
            lines: rx,
            monitor: Some(child),
            stop: Default::default(),
        })
    }

    /// The daemon's log, read as it grows; each line's own timestamp.
    fn log(host: &Host) -> Self {
        let path = host.log_path().to_path_buf();
        let (tx, rx) = mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            let mut pos = 0u64;
            let mut partial = String::new();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut f) = std::fs::File::open(&path) {
                    let mut chunk = String::new();
                    if f.seek(std::io::SeekFrom::Start(pos)).is_ok()
                        && f.read_to_string(&mut chunk).is_ok()
                    {
                        pos += chunk.len() as u64;
                        partial.push_str(&chunk);
                        // Lines cut off the front once per read: draining each line from
                        // the front was O(n^2) for the 65k-line burst of a big start.
                        let mut done = 0;
                        while let Some(i) = partial[done..].find('\n') {
                            let line = &partial[done..done + i + 1];
                            done += i + 1;
                            if let Some(t) = log_time(line) {
                                if tx.send((t, line.to_string())).is_err() {
                                    return;
                                }
                            }
                        }
                        partial.drain(..done);
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        Observer {
            lines: rx,
            monitor: None,
            stop,
        }
    }

    fn drain(&mut self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// When the entry of `subnet` appeared (or went, with `removed`).
    fn wait(&mut self, subnet: &str, removed: bool, timeout: Duration) -> Result<SystemTime> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (t, line) = self
                .lines
                .recv_timeout(left)
                .map_err(|_| anyhow!("no entry change for {subnet} within {timeout:?}"))?;
            let hit = if self.monitor.is_some() {
                let route = line.strip_prefix("Deleted ");
                route.is_some() == removed
                    && route.unwrap_or(&line).starts_with(&format!("{subnet} "))
                    && line.contains(" proto 211")
            } else {
                let what = if removed {
                    "peer removed"
                } else {
                    "peer programmed"
                };
                line.contains(what)
                    && line
                        .split_whitespace()
                        .any(|w| w == format!("subnet={subnet}"))
            };
            if hit {
                return Ok(t);
            }
        }
    }

    fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(mut c) = self.monitor.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The time at the start of a daemon log line (`2026-11-28T08:17:03.123456Z ...`, UTC).
fn log_time(line: &str) -> Option<SystemTime> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = u64::try_from(days * 86400 + hh * 3600 + mm * 60 + ss).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_time_parses_tracing_timestamps() {
        let t = log_time("2026-11-28T08:17:03.123456Z  INFO rudder::reconcile: peer programmed")
            .unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        // date -u -d 2026-11-28T08:17:03Z +%s
        assert_eq!(d.as_secs(), 1_795_853_823);
        assert_eq!(d.subsec_micros(), 123_456);
        assert_eq!(log_time("garbage"), None);
    }

    #[test]
    fn leases_are_distinct_and_parse_as_peers() {
        let net: ipnet::Ipv4Net = "10.0.0.0/8".parse().unwrap();
        let prefix = format!("{DEFAULT_PREFIX}/subnets/");
        for i in [0, 255, 256, 59_999] {
            let (subnet, key, value) = lease(i);
            let peer =
                rudder::peers::parse_peer(&prefix, net, key.as_bytes(), value.as_bytes()).unwrap();
            assert_eq!(peer.0, subnet);
        }
        assert_ne!(lease(0).0, lease(256).0);
    }
}
