//! What the soak measures while it runs: timestamped ping series (loss and gaps between
//! replies), etcd's request counter read from its `/metrics`, and a daemon's RSS and open
//! file descriptors.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};

use crate::netns;
use crate::traffic::Endpoint;
use crate::util::output;

/// Seconds since the epoch (the clock `ping -D` stamps replies with).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The outcome of one `ping -D` series.
#[derive(Debug, Clone, Default)]
pub struct PingRecord {
    pub transmitted: u32,
    /// Reply time (epoch seconds) per sequence number; duplicates counted once.
    pub replies: BTreeMap<u32, f64>,
    pub started: f64,
    pub ended: f64,
}

impl PingRecord {
    /// Requests sent that never got a reply.
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.replies.len() as u32)
    }

    /// The longest time without a reply that overlaps `[from, to]` (epoch seconds); the
    /// series' start and end count as replies, so a target down until the end shows.
    pub fn longest_gap_within(&self, from: f64, to: f64) -> f64 {
        let mut times: Vec<f64> = self.replies.values().copied().collect();
        times.sort_by(f64::total_cmp);
        let mut edges = vec![self.started];
        edges.extend(times);
        edges.push(self.ended);
        edges
            .windows(2)
            .filter(|w| w[1] >= from && w[0] <= to)
            .map(|w| w[1] - w[0])
            .fold(0.0, f64::max)
    }
}

/// Parses `ping -n -D` output: `[1764590000.123456] 64 bytes from ...: icmp_seq=7 ...` lines
/// and the `N packets transmitted, M received` summary.
pub fn parse_ping_d(text: &str) -> Result<(u32, BTreeMap<u32, f64>)> {
    let mut replies = BTreeMap::new();
    let mut transmitted = None;
    for line in text.lines() {
        if line.contains("packets transmitted") {
            transmitted = line.split_whitespace().next().and_then(|n| n.parse().ok());
            continue;
        }
        if !line.contains(" bytes from ") {
            continue;
        }
        let stamp = line
            .strip_prefix('[')
            .and_then(|l| l.split_once(']'))
            .and_then(|(t, _)| t.parse::<f64>().ok());
        let seq = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("icmp_seq="))
            .and_then(|s| s.parse::<u32>().ok());
        if let (Some(t), Some(seq)) = (stamp, seq) {
            replies.entry(seq).or_insert(t);
        }
    }
    let transmitted = transmitted.ok_or_else(|| anyhow!("no ping summary in {text:?}"))?;
    Ok((transmitted, replies))
}

/// Starts `count` echo requests from `from` to `to`, one every `interval`, on a thread.
pub fn spawn_ping_record(
    from: &Endpoint,
    to: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> JoinHandle<Result<PingRecord>> {
    let ns = from.ns.clone();
    std::thread::spawn(move || {
        let started = unix_now();
        let out = output(netns::exec(&ns, "ping").args([
            "-n",
            "-D",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{:.3}", interval.as_secs_f64()),
            "-W",
            "2",
            &to.to_string(),
        ]))?;
        let (transmitted, replies) = parse_ping_d(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("ping {to} from {ns}"))?;
        Ok(PingRecord {
            transmitted,
            replies,
            started,
            ended: unix_now(),
        })
    })
}

/// The sum of every `grpc_server_handled_total` series in a Prometheus text page.
pub fn grpc_handled_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `GET http://<ip>:<port>/metrics` from inside namespace `ns`.
pub fn fetch_metrics(ns: &str, ip: Ipv4Addr, port: u16) -> Result<String> {
    netns::run_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
}

/// Counts the requests etcd members handle, by polling their `/metrics` from the underlay.
/// A member's counter that went down was restarted: its new value counts from zero.
/// Requests a member served between its last poll and its stop are missed (a lower bound).
pub struct EtcdRequestCounter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<f64>>,
}

impl EtcdRequestCounter {
    pub fn start(ns: &str, members: Vec<Ipv4Addr>, port: u16, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, flag) = (ns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut last: Vec<Option<f64>> = vec![None; members.len()];
            let mut total = 0.0;
            loop {
                for (i, ip) in members.iter().enumerate() {
                    let Ok(page) = fetch_metrics(&ns, *ip, port) else {
                        continue; // a member that is down is read once it is back
                    };
                    let now = grpc_handled_total(&page);
                    total += match last[i] {
                        Some(prev) if now >= prev => now - prev,
                        Some(_) => now,
                        None => 0.0,
                    };
                    last[i] = Some(now);
                }
                if flag.load(Ordering::SeqCst) {
                    return total;
                }
                std::thread::sleep(every);
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops polling (after one last read) and returns the requests counted.
    pub fn finish(mut self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for EtcdRequestCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A process's resident set (`VmRSS`, KiB) and number of open file descriptors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcUsage {
    pub rss_kib: u64,
    pub fds: usize,
}

pub fn proc_usage(pid: u32) -> Result<ProcUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(ProcUsage { rss_kib, fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_gives_replies_and_gaps() {
        let text = "PING 10.5.1.2 (10.5.1.2) 56(84) bytes of data.\n\
            [100.0] 64 bytes from 10.5.1.2: icmp_seq=1 ttl=62 time=0.5 ms\n\
            [100.2] 64 bytes from 10.5.1.2: icmp_seq=2 ttl=62 time=0.5 ms\n\
            [101.4] 64 bytes from 10.5.1.2: icmp_seq=8 ttl=62 time=0.5 ms\n\
            [101.4] 64 bytes from 10.5.1.2: icmp_seq=8 ttl=62 time=0.5 ms (DUP!)\n\
            \n--- 10.5.1.2 ping statistics ---\n\
            9 packets transmitted, 3 received, +1 duplicates, 66% packet loss, time 1600ms\n";
        let (tx, replies) = parse_ping_d(text).unwrap();
        let r = PingRecord {
            transmitted: tx,
            replies,
            started: 99.9,
            ended: 101.7,
        };
        assert_eq!(r.lost(), 6);
        assert!((r.longest_gap_within(100.5, 100.6) - 1.2).abs() < 1e-9);
        assert!((r.longest_gap_within(99.0, 100.1) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn metrics_sum_every_handled_series() {
        let page = "# TYPE grpc_server_handled_total counter\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\"} 12\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\"} 1.5e+01\n\
            grpc_server_started_total{grpc_method=\"Range\"} 99\n";
        assert_eq!(grpc_handled_total(page), 27.0);
    }
}
