//! A multi-member etcd cluster for fault tests: each member in its own namespace on the
//! underlay bridge (192.168.77.200 + i), stoppable and restartable one by one.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cleanup::NS_PREFIX;
use crate::cluster::Cluster;
use crate::netns;
use crate::process::stop_child;
use crate::underlay::{UNDERLAY_BRIDGE, UNDERLAY_PREFIX_LEN};
use crate::util::{ip, run, wait_until};

pub struct EtcdMember {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    child: Mutex<Option<Child>>,
}

pub struct EtcdMembers<'c> {
    cluster: &'c Cluster,
    pub members: Vec<EtcdMember>,
}

impl<'c> EtcdMembers<'c> {
    /// Starts `n` members forming one etcd cluster and waits until it is healthy.
    pub fn start(cluster: &'c Cluster, n: usize) -> Result<Self> {
        let mut members = Vec::new();
        for i in 1..=n {
            let name = format!("e{i}");
            let ns = format!("{NS_PREFIX}{}-{name}", cluster.id());
            cluster.resources().add_netns(&ns);
            netns::create(&ns)?;
            let veth = format!("u{name}");
            let u = cluster.underlay_ns();
            ip(&[
                "-n", u, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&[
                "-n",
                u,
                "link",
                "set",
                &veth,
                "master",
                UNDERLAY_BRIDGE,
                "up",
            ])?;
            let member_ip = Ipv4Addr::new(192, 168, 77, 200 + i as u8);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{member_ip}/{UNDERLAY_PREFIX_LEN}"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            members.push(EtcdMember {
                name,
                ns,
                ip: member_ip,
                child: Mutex::new(None),
            });
        }
        let all = Self { cluster, members };
        for i in 0..n {
            all.spawn(i, "new")?;
        }
        all.wait_healthy(n)?;
        Ok(all)
    }

    /// The client URLs, comma-separated, for `--etcd-endpoints`.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{}:2379", m.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, i: usize, state: &str) -> Result<()> {
        let m = &self.members[i];
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:2380", m.name, m.ip))
            .collect();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.cluster.dir().join(format!("{}.log", m.name)))?;
        let child = netns::exec(&m.ns, "etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.cluster.dir().join(format!("{}-data", m.name)))
            .args([
                "--listen-client-urls",
                &format!("http://{}:2379", m.ip),
                "--advertise-client-urls",
                &format!("http://{}:2379", m.ip),
                "--listen-peer-urls",
                &format!("http://{}:2380", m.ip),
                "--initial-advertise-peer-urls",
                &format!("http://{}:2380", m.ip),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                state,
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting etcd member {}", m.name))?;
        self.cluster.resources().add_pid(child.id());
        *m.child.lock().unwrap() = Some(child);
        Ok(())
    }

    /// Runs etcdctl (API v3) from the underlay against every member.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        run(netns::exec(self.cluster.underlay_ns(), "etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints()))
            .arg("--command-timeout=3s")
            .args(args))
    }

    /// Waits until at least `healthy` members answer.
    pub fn wait_healthy(&self, healthy: usize) -> Result<()> {
        wait_until(
            "etcd members to be healthy",
            Duration::from_secs(30),
            || {
                let out = netns::exec(self.cluster.underlay_ns(), "etcdctl")
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={}", self.endpoints()))
                    .args(["endpoint", "health"])
                    .output()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                Ok(text.matches("is healthy").count() >= healthy)
            },
        )
    }

    /// Stops member `i` (SIGTERM, waits); its data stays for [`EtcdMembers::restart`].
    pub fn stop(&self, i: usize) -> Result<()> {
        let m = &self.members[i];
        let mut child = m
            .child
            .lock()
            .unwrap()
            .take()
            .with_context(|| format!("member {} is not running", m.name))?;
        stop_child(&mut child, Duration::from_secs(10))?;
        self.cluster.resources().remove_pid(child.id());
        Ok(())
    }

    /// Starts a stopped member again with its data.
    pub fn restart(&self, i: usize) -> Result<()> {
        if self.members[i].child.lock().unwrap().is_some() {
            bail!("member {} is running", self.members[i].name);
        }
        self.spawn(i, "existing")
    }
}

impl Drop for EtcdMembers<'_> {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(mut child) = m.child.lock().unwrap().take() {
                let _ = stop_child(&mut child, Duration::from_secs(5));
            }
        }
    }
}
