//! The churn soak: 6 hosts on a 3-member etcd. h1-h3 stay up and keep a full mesh of pings
//! (5/s each way) and content-checked TCP transfers between their containers, while h4
//! restarts (SIGTERM and SIGKILL), h5 (a docker host) has its lease deleted by an operator and
//! its containers churn, a sixth host leaves (lease released) and a new one joins, and etcd
//! members restart one at a time. Stayed-up hosts must lose no packet; RSS and open fds of
//! the daemons that ran throughout may grow by at most a stated bound; the rest is printed
//! ([`SoakReport::table`]).

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::cluster::{DEFAULT_CONFIG, DEFAULT_PREFIX, ETCD_CLIENT_PORT};
use crate::docker::{docker_host, DockerHost};
use crate::etcd_members::EtcdMembers;
use crate::soak_probe::{
    proc_usage, spawn_ping_record, unix_now, EtcdRequestCounter, PingRecord, ProcUsage,
};
use crate::{check, tcp_transfer, wait_mesh, wait_ping, wait_until, Cluster, Host, HostOpts};

/// Growth allowed over a run for a daemon that ran throughout.
pub const RSS_GROWTH_BOUND_KIB: u64 = 20 * 1024;
pub const FD_GROWTH_BOUND: usize = 16;
const PING_INTERVAL: Duration = Duration::from_millis(200);
pub(crate) const TCP_BYTES: usize = 256 << 10;
/// No churn in the last stretch, so every series ends on a settled overlay.
const SETTLE: Duration = Duration::from_secs(15);
const RECOVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct SoakOpts {
    pub duration: Duration,
    /// `--dataplane` of every host; `None`: `$RUDDER_TEST_DATAPLANE` or `tun`.
    pub dataplane: Option<String>,
    /// Quiet time between two churn events.
    pub pause: Duration,
}

impl SoakOpts {
    pub fn minutes(minutes: f64) -> Self {
        Self {
            duration: Duration::from_secs_f64(minutes * 60.0),
            dataplane: None,
            pause: Duration::from_secs(5),
        }
    }
}

/// The churn events, in the order they repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Churn {
    RestartGraceful,
    RestartKill9,
    LeaseDeleted,
    /// The sixth host leaves (SIGTERM, lease released) if it is up, else a new one joins.
    LeaveOrJoin,
    ContainerChurn,
    EtcdMemberRestart,
}

const SCHEDULE: [Churn; 8] = [
    Churn::RestartGraceful,
    Churn::ContainerChurn,
    Churn::LeaseDeleted,
    Churn::LeaveOrJoin,
    Churn::EtcdMemberRestart,
    Churn::RestartKill9,
    Churn::ContainerChurn,
    Churn::LeaveOrJoin,
];

#[derive(Clone, Debug)]
pub struct ChurnEvent {
    /// What happened (e.g. "h6 left", "h7 joined").
    pub what: String,
    pub kind: Churn,
    /// Epoch seconds when it began.
    pub started: f64,
    /// Until the event's own check passed (ready again, reachable, dropped by all...).
    pub recovered_in: Duration,
}

#[derive(Debug, Default)]
pub struct SoakReport {
    pub dataplane: String,
    pub duration: Duration,
    /// (from, to, series) for every ordered pair of stayed-up hosts.
    pub stable_pings: Vec<(String, String, PingRecord)>,
    /// h1's container to h4's container and to h5's long-running docker container.
    pub restarted_pings: PingRecord,
    pub lease_deleted_pings: PingRecord,
    pub tcp_ok: usize,
    pub tcp_failures: Vec<String>,
    pub events: Vec<ChurnEvent>,
    /// (host, at start, at end) for the daemons that ran throughout.
    pub usage: Vec<(String, ProcUsage, ProcUsage)>,
    pub etcd_requests: f64,
}

/// Runs the soak in `c` (a fresh cluster; its own etcd is not used).
pub fn run_soak(c: &Cluster, opts: &SoakOpts) -> Result<SoakReport> {
    let etcd = EtcdMembers::start(c, 3)?;
    etcd.etcdctl(&["put", &format!("{DEFAULT_PREFIX}/config"), DEFAULT_CONFIG])?;
    let base = HostOpts {
        etcd_endpoints: Some(etcd.endpoints()),
        dataplane: opts.dataplane.clone(),
        ..HostOpts::default()
    };
    let joiner_opts = HostOpts {
        release_lease_on_exit: true,
        ..base.clone()
    };
    let stable = (0..3)
        .map(|_| c.add_host(base.clone()))
        .collect::<Result<Vec<_>>>()?;
    let restarter = c.add_host(base.clone())?;
    let docker = docker_host(c, base.clone())?;
    docker.dockerd.run_server("web", &[])?;
    let web_ip = docker.dockerd.container_ip("web")?;
    let mut joiner = Some(c.add_host(joiner_opts.clone())?);

    let mut mesh = stable.clone();
    mesh.extend([restarter.clone(), joiner.clone().unwrap()]);
    wait_mesh(&mesh, RECOVERY)?;
    for h in &stable {
        wait_until("the docker host's peers", RECOVERY, || {
            h.sees_peer(&docker.host)
        })?;
        wait_ping(&h.container(), web_ip, RECOVERY)?;
    }

    let runs_throughout: Vec<&Host> = stable.iter().chain([&docker.host]).collect();
    let usage_start = usage_of(&runs_throughout)?;
    let member_ips = etcd.members.iter().map(|m| m.ip).collect();
    let requests = EtcdRequestCounter::start(
        c.underlay_ns(),
        member_ips,
        ETCD_CLIENT_PORT,
        Duration::from_secs(5),
    );
    let count = (opts.duration.as_secs_f64() / PING_INTERVAL.as_secs_f64()) as u32;
    let mut stable_pingers = Vec::new();
    for a in &stable {
        for b in &stable {
            if a.index() != b.index() {
                let p = spawn_ping_record(&a.container(), b.container_ip(), count, PING_INTERVAL);
                stable_pingers.push((a.name().to_string(), b.name().to_string(), p));
            }
        }
    }
    let watcher = stable[0].container();
    let restarted_pinger =
        spawn_ping_record(&watcher, restarter.container_ip(), count, PING_INTERVAL);
    let lease_pinger = spawn_ping_record(&watcher, web_ip, count, PING_INTERVAL);
    let deadline = Instant::now() + opts.duration;
    let tcp_streams = tcp_mesh(&stable, deadline);

    let mut events = Vec::new();
    let mut churn = Churner {
        c,
        etcd: &etcd,
        stable: &stable,
        restarter: &restarter,
        docker: &docker,
        joiner_opts,
        containers: 0,
        member_restarts: 0,
    };
    for kind in SCHEDULE.iter().cycle() {
        // An event and its recovery take well under 30 s when things are healthy.
        if Instant::now() + SETTLE + Duration::from_secs(30) > deadline {
            break;
        }
        let (started, clock) = (unix_now(), Instant::now());
        let what = churn
            .run(*kind, &mut joiner, web_ip)
            .with_context(|| format!("churn event {kind:?}"))?;
        eprintln!("soak: {what} ({:.1} s)", clock.elapsed().as_secs_f64());
        events.push(ChurnEvent {
            what,
            kind: *kind,
            started,
            recovered_in: clock.elapsed(),
        });
        std::thread::sleep(opts.pause);
    }

    let mut report = SoakReport {
        dataplane: stable[0].status()?["dataplane"]
            .as_str()
            .unwrap_or("?")
            .to_string(),
        duration: opts.duration,
        events,
        ..SoakReport::default()
    };
    for (a, b, p) in stable_pingers {
        let rec = p.join().map_err(|_| anyhow!("pinger panicked"))??;
        report.stable_pings.push((a, b, rec));
    }
    report.restarted_pings = restarted_pinger
        .join()
        .map_err(|_| anyhow!("pinger panicked"))??;
    report.lease_deleted_pings = lease_pinger
        .join()
        .map_err(|_| anyhow!("pinger panicked"))??;
    for t in tcp_streams {
        let (ok, failures) = t.join().map_err(|_| anyhow!("TCP stream panicked"))?;
        report.tcp_ok += ok;
        report.tcp_failures.extend(failures);
    }
    report.etcd_requests = requests.finish();
    for h in &runs_throughout {
        h.check_alive()?;
    }
    let usage_end = usage_of(&runs_throughout)?;
    report.usage = runs_throughout
        .iter()
        .zip(usage_start.into_iter().zip(usage_end))
        .map(|(h, (s, e))| (h.name().to_string(), s, e))
        .collect();
    Ok(report)
}

fn usage_of(hosts: &[&Host]) -> Result<Vec<ProcUsage>> {
    hosts
        .iter()
        .map(|h| {
            let pid = h
                .pid()
                .with_context(|| format!("{} has no daemon", h.name()))?;
            proc_usage(pid)
        })
        .collect()
}

type TcpStream = std::thread::JoinHandle<(usize, Vec<String>)>;

/// One thread per ordered pair: content-checked transfers, one a second, until `deadline`.
fn tcp_mesh(hosts: &[Host], deadline: Instant) -> Vec<TcpStream> {
    let mut threads = Vec::new();
    for a in hosts {
        for b in hosts {
            if a.index() == b.index() {
                continue;
            }
            let (from, to) = (a.container(), b.container());
            let label = format!("{} -> {}", a.name(), b.name());
            threads.push(std::thread::spawn(move || {
                let (mut ok, mut failures) = (0, Vec::new());
                while Instant::now() < deadline {
                    match tcp_transfer(&from, &to, TCP_BYTES) {
                        Ok(_) => ok += 1,
                        Err(e) => failures.push(format!("TCP {label}: {e:#}")),
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                (ok, failures)
            }));
        }
    }
    threads
}

struct Churner<'a> {
    c: &'a Cluster,
    etcd: &'a EtcdMembers<'a>,
    stable: &'a [Host],
    restarter: &'a Host,
    docker: &'a DockerHost,
    joiner_opts: HostOpts,
    containers: usize,
    member_restarts: usize,
}

impl Churner<'_> {
    /// Does one event and waits until the overlay has taken it in; says what it did.
    fn run(
        &mut self,
        kind: Churn,
        joiner: &mut Option<Host>,
        web_ip: std::net::Ipv4Addr,
    ) -> Result<String> {
        let watcher = self.stable[0].container();
        match kind {
            Churn::RestartGraceful | Churn::RestartKill9 => {
                let h = self.restarter;
                let subnet = h.subnet();
                if kind == Churn::RestartGraceful {
                    let st = h.stop()?;
                    check!(st.success(), "{} exited with {st} on SIGTERM", h.name());
                } else {
                    h.kill9()?;
                }
                h.start()?;
                h.wait_ready(RECOVERY)?;
                check!(
                    h.subnet() == subnet,
                    "{} moved from {subnet} to {}",
                    h.name(),
                    h.subnet()
                );
                wait_ping(&watcher, h.container_ip(), RECOVERY)?;
                let how = if kind == Churn::RestartGraceful {
                    "SIGTERM"
                } else {
                    "SIGKILL"
                };
                Ok(format!("{} restarted ({how})", h.name()))
            }
            Churn::LeaseDeleted => {
                let h = &self.docker.host;
                let key = h.lease_key();
                let deleted = self.etcd.etcdctl(&["del", &key])?;
                check!(
                    deleted.trim() == "1",
                    "lease {key} was not there: {deleted}"
                );
                wait_until(&format!("lease {key} to come back"), RECOVERY, || {
                    let v = self.etcd.etcdctl(&["get", &key, "--print-value-only"])?;
                    Ok(v.contains(&h.underlay_ip().to_string()))
                })?;
                wait_ping(&watcher, web_ip, RECOVERY)?;
                Ok(format!("{}'s lease deleted and re-acquired", h.name()))
            }
            Churn::LeaveOrJoin => match joiner.take() {
                Some(h) => {
                    let st = h.stop()?;
                    check!(st.success(), "{} exited with {st} on SIGTERM", h.name());
                    let key = h.lease_key();
                    wait_until(
                        &format!("every host to drop {}", h.name()),
                        RECOVERY,
                        || {
                            for s in self.stable {
                                if s.sees_peer(&h)? {
                                    return Ok(false);
                                }
                            }
                            Ok(self
                                .etcd
                                .etcdctl(&["get", &key, "--keys-only"])?
                                .trim()
                                .is_empty())
                        },
                    )?;
                    Ok(format!("{} left (lease released)", h.name()))
                }
                None => {
                    let h = self.c.add_host(self.joiner_opts.clone())?;
                    let mut mesh = self.stable.to_vec();
                    mesh.push(h.clone());
                    wait_mesh(&mesh, RECOVERY)?;
                    let what = format!("{} joined", h.name());
                    *joiner = Some(h);
                    Ok(what)
                }
            },
            Churn::ContainerChurn => {
                self.containers += 1;
                let name = format!("churn-{}", self.containers);
                let d = &self.docker.dockerd;
                d.run_server(&name, &[])?;
                let ip = d.container_ip(&name)?;
                wait_ping(&watcher, ip, RECOVERY)
                    .with_context(|| format!("new container {name} ({ip})"))?;
                d.docker(&["rm", "-f", &name])?;
                Ok(format!(
                    "container {name} ({ip}) on {} started, reached, removed",
                    self.docker.host.name()
                ))
            }
            Churn::EtcdMemberRestart => {
                let i = self.member_restarts % self.etcd.members.len();
                self.member_restarts += 1;
                self.etcd.stop(i)?;
                std::thread::sleep(Duration::from_secs(2));
                self.etcd.restart(i)?;
                self.etcd.wait_healthy(self.etcd.members.len())?;
                Ok(format!(
                    "etcd member {} restarted",
                    self.etcd.members[i].name
                ))
            }
        }
    }
}

impl SoakReport {
    /// Stayed-up hosts lost no packet, no TCP transfer between them failed, and no daemon
    /// that ran throughout grew beyond the bounds.
    pub fn check(&self) -> Result<()> {
        let lost: Vec<String> = self
            .stable_pings
            .iter()
            .filter(|(_, _, r)| r.lost() > 0)
            .map(|(a, b, r)| format!("{a} -> {b}: {} of {}", r.lost(), r.transmitted))
            .collect();
        check!(
            lost.is_empty(),
            "pings lost between stayed-up hosts: {}",
            lost.join(", ")
        );
        check!(
            self.tcp_failures.is_empty(),
            "TCP transfers between stayed-up hosts failed:\n{}",
            self.tcp_failures.join("\n")
        );
        for (host, start, end) in &self.usage {
            check!(
                end.rss_kib <= start.rss_kib + RSS_GROWTH_BOUND_KIB,
                "{host}: RSS grew from {} to {} KiB (bound +{RSS_GROWTH_BOUND_KIB} KiB)",
                start.rss_kib,
                end.rss_kib
            );
            check!(
                end.fds <= start.fds + FD_GROWTH_BOUND,
                "{host}: open fds grew from {} to {} (bound +{FD_GROWTH_BOUND})",
                start.fds,
                end.fds
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> SoakReport {
        let mut pings = PingRecord {
            transmitted: 3,
            ..PingRecord::default()
        };
        pings.replies.extend([(1, 1.0), (2, 1.2), (3, 1.4)]);
        let usage = ProcUsage {
            rss_kib: 10_000,
            fds: 20,
        };
        SoakReport {
            stable_pings: vec![("h1".into(), "h2".into(), pings)],
            usage: vec![("h1".into(), usage, usage)],
            duration: Duration::from_secs(60),
            ..SoakReport::default()
        }
    }

    #[test]
    fn check_passes_a_clean_run_and_fails_loss_failed_tcp_and_growth() {
        assert!(healthy().check().is_ok());
        let mut lost = healthy();
        lost.stable_pings[0].2.replies.remove(&2);
        assert!(lost
            .check()
            .unwrap_err()
            .to_string()
            .contains("h1 -> h2: 1 of 3"));
        let mut tcp = healthy();
        tcp.tcp_failures.push("TCP h1 -> h2: reset".into());
        assert!(tcp.check().is_err());
        let mut rss = healthy();
        rss.usage[0].2.rss_kib += RSS_GROWTH_BOUND_KIB + 1;
        assert!(rss.check().unwrap_err().to_string().contains("RSS grew"));
        let mut fds = healthy();
        fds.usage[0].2.fds += FD_GROWTH_BOUND + 1;
        assert!(fds
            .check()
            .unwrap_err()
            .to_string()
            .contains("open fds grew"));
        assert!(healthy().table().contains(
            "| pings lost between stayed-up hosts (1 ordered pairs, 5/s each) | 0 of 3 |"
        ));
    }
}
