//! The control-plane bench's many-daemon mode (`rudder-cpbench --join 50`): N hosts start
//! their daemons at once against one etcd. Reports the time until every host has every
//! other programmed, and the etcd requests (etcd's `grpc_server_handled_total`, unary calls:
//! a watch or keep-alive stream counts when it ends) per acquisition, by method.

use crate::process::cpu_time_of;
use crate::soak_probe::fetch_metrics;
use crate::underlay::{ETCD_CLIENT_PORT, UNDERLAY_GW};
use crate::{Cluster, Host, HostOpts};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct JoinRow {
    pub hosts: usize,
    pub dataplane: String,
    /// From the first start to every host having all others programmed.
    pub all_programmed_s: f64,
    /// From the first start to the last host's `/readyz` 200.
    pub all_ready_s: f64,
    pub lease_acquisitions: u64,
    /// etcd requests handled from just before the starts until all were programmed.
    pub etcd_requests: f64,
    pub by_method: BTreeMap<String, f64>,
    pub daemon_cpu_s_mean: f64,
}

impl JoinRow {
    pub fn requests_per_acquisition(&self) -> f64 {
        self.etcd_requests / self.lease_acquisitions.max(1) as f64
    }

    /// `Range 1.0, Txn 1.1, ...` per acquisition.
    pub fn by_method_per_acquisition(&self) -> String {
        let n = self.lease_acquisitions.max(1) as f64;
        self.by_method
            .iter()
            .map(|(m, c)| format!("{m} {:.2}", c / n))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// etcd's handled gRPC requests by method (every code summed).
pub fn handled_by_method(metrics: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let method = labels
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("?");
        *out.entry(method.to_string()).or_insert(0.0) += value;
    }
    out
}

fn etcd_handled(cluster: &Cluster) -> Result<BTreeMap<String, f64>> {
    let page = fetch_metrics(cluster.underlay_ns(), UNDERLAY_GW, ETCD_CLIENT_PORT)
        .context("reading etcd's /metrics")?;
    Ok(handled_by_method(&page))
}

/// The `rudder_peers` gauge of a host's `/metrics` (installed peers, both planes).
pub fn peers_gauge(host: &Host) -> Result<usize> {
    let (_, body) = host.http_get("/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix("rudder_peers "))
        .ok_or_else(|| anyhow!("no rudder_peers in /metrics"))?
        .trim()
        .parse::<f64>()
        .map(|v| v as usize)
        .map_err(Into::into)
}

/// Starts `n` daemons at once on a fresh cluster (default network, 10.5.0.0/16 in /24s) and
/// waits until each has the other `n - 1` programmed.
pub fn run_join(n: usize, dataplane: &str) -> Result<JoinRow> {
    println!("--- {n} hosts joining at once, {dataplane} ---");
    let cluster = Cluster::new()?;
    let t = Instant::now();
    let hosts: Vec<Host> = (0..n)
        .map(|_| {
            cluster.add_host_without_daemon(HostOpts {
                dataplane: Some(dataplane.into()),
                wait_ready: false,
                ..HostOpts::default()
            })
        })
        .collect::<Result<_>>()?;
    println!("{n} host namespaces in {:.1} s", t.elapsed().as_secs_f64());

    let before = etcd_handled(&cluster)?;
    let t0 = Instant::now();
    for h in &hosts {
        h.start()?;
    }
    let mut ready: Vec<Option<Duration>> = vec![None; n];
    let mut done: Vec<bool> = vec![false; n];
    let all_programmed = loop {
        if t0.elapsed() > JOIN_TIMEOUT {
            let missing = done.iter().filter(|d| !**d).count();
            bail!("{missing} of {n} hosts lack peers after {JOIN_TIMEOUT:?}");
        }
        for (i, h) in hosts.iter().enumerate() {
            h.check_alive()?;
            if ready[i].is_none() && h.is_ready() {
                ready[i] = Some(t0.elapsed());
            }
            if !done[i] {
                done[i] = peers_gauge(h).unwrap_or(0) >= n - 1;
            }
        }
        if done.iter().all(|d| *d) && ready.iter().all(Option::is_some) {
            break t0.elapsed();
        }
        std::thread::sleep(POLL);
    };
    let after = etcd_handled(&cluster)?;
    println!(
        "every host has all {} others programmed after {:.3} s",
        n - 1,
        all_programmed.as_secs_f64()
    );
    let by_method: BTreeMap<String, f64> = after
        .iter()
        .map(|(m, c)| (m.clone(), c - before.get(m).copied().unwrap_or(0.0)))
        .filter(|(_, c)| *c > 0.0)
        .collect();
    let mut acquisitions = 0;
    let mut cpu = 0.0;
    for h in &hosts {
        let status = h.status()?;
        acquisitions += status["lease_acquisitions"]
            .as_u64()
            .ok_or_else(|| anyhow!("/status has no lease_acquisitions: {status}"))?;
        let pid = h.pid().context("daemon pid")?;
        cpu += cpu_time_of(pid)?.as_secs_f64();
    }
    Ok(JoinRow {
        hosts: n,
        dataplane: dataplane.into(),
        all_programmed_s: all_programmed.as_secs_f64(),
        all_ready_s: ready
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64(),
        lease_acquisitions: acquisitions,
        etcd_requests: by_method.values().sum(),
        by_method,
        daemon_cpu_s_mean: cpu / n as f64,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn handled_requests_are_summed_by_method() {
        let page = "# TYPE grpc_server_handled_total counter\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 12\n\
            grpc_server_handled_total{grpc_code=\"NotFound\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 3\n\
            grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1.5e+01\n\
            grpc_server_started_total{grpc_method=\"Range\"} 99\n";
        let by = super::handled_by_method(page);
        assert_eq!(by.get("Range"), Some(&15.0));
        assert_eq!(by.get("Txn"), Some(&15.0));
        assert_eq!(by.len(), 2);
    }
}
