//! The underlay: a namespace whose bridge joins every host's `eth0` (192.168.77.0/24),
//! with etcd on its .1 address, and the etcd helpers the tests use.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::cleanup::Resources;
use crate::netns;
use crate::process::stop_child;
use crate::util::{ip, run, wait_until};

/// Underlay network: the underlay namespace has .1 (and etcd), host `i` (1-based) has .(10+i).
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// The underlay namespace's IPv6 address (etcd listens there too, for hosts without IPv4).
pub const UNDERLAY_GW6: &str = "fd00:77::1";
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// Default overlay configuration written by [`Cluster::new`](crate::Cluster::new).
pub const DEFAULT_NETWORK: &str = "10.5.0.0/16";
pub const DEFAULT_CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
pub(crate) const UNDERLAY_BRIDGE: &str = "ubr0";

/// The underlay namespace and its etcd. A [`Cluster`](crate::Cluster) derefs to it, so the
/// etcd helpers are called on the cluster.
pub struct Underlay {
    /// Name of the underlay namespace.
    ns: String,
    /// The cluster's scratch directory: etcd's data and log.
    dir: PathBuf,
    pub(crate) etcd: Mutex<Option<Child>>,
    res: Arc<Resources>,
}

impl Underlay {
    /// Nothing is created yet: see `init`.
    pub(crate) fn new(ns: String, dir: PathBuf, res: Arc<Resources>) -> Self {
        Underlay {
            ns,
            dir,
            etcd: Mutex::new(None),
            res,
        }
    }

    /// Creates the namespace and its bridge, then starts etcd.
    pub(crate) fn init(&self) -> Result<()> {
        let u = self.ns.as_str();
        self.res.add_netns(u);
        netns::create(u)?;
        // A fixed MAC: otherwise the bridge takes the lowest MAC of its ports, so it changes
        // when a host joins and the other hosts' ARP entries for .1 (etcd) go stale.
        ip(&[
            "-n",
            u,
            "link",
            "add",
            UNDERLAY_BRIDGE,
            "address",
            "02:00:c0:a8:4d:01",
            "type",
            "bridge",
        ])?;
        ip(&[
            "-n",
            u,
            "addr",
            "add",
            &format!("{UNDERLAY_GW}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            UNDERLAY_BRIDGE,
        ])?;
        ip(&[
            "-n",
            u,
            "-6",
            "addr",
            "add",
            &format!("{UNDERLAY_GW6}/64"),
            "dev",
            UNDERLAY_BRIDGE,
            "nodad",
        ])?;
        ip(&["-n", u, "link", "set", UNDERLAY_BRIDGE, "up"])?;
        self.start_etcd()
    }

    /// Name of the underlay namespace.
    pub fn underlay_ns(&self) -> &str {
        &self.ns
    }

    /// `http://192.168.77.1:2379`.
    pub fn etcd_endpoint(&self) -> String {
        format!("http://{UNDERLAY_GW}:{ETCD_CLIENT_PORT}")
    }

    /// `http://[fd00:77::1]:2379`: etcd for a host without an IPv4 address.
    pub fn etcd_endpoint6(&self) -> String {
        format!("http://[{UNDERLAY_GW6}]:{ETCD_CLIENT_PORT}")
    }

    fn etcd_log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// Starts etcd in the underlay namespace (same data dir every time) and waits until it
    /// answers.
    pub fn start_etcd(&self) -> Result<()> {
        let mut guard = self.etcd.lock().unwrap();
        if guard.is_some() {
            bail!("etcd is already running");
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.etcd_log())?;
        let client = format!("{},{}", self.etcd_endpoint(), self.etcd_endpoint6());
        let data = self.dir.join("etcd-data");
        let child = netns::exec(&self.ns, "etcd")
            .args(["--name", "e2e", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "e2e=http://127.0.0.1:2380",
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.res.add_pid(child.id());
        *guard = Some(child);
        drop(guard);
        wait_until("etcd to become healthy", Duration::from_secs(30), || {
            if let Some(st) = self.etcd.lock().unwrap().as_mut().unwrap().try_wait()? {
                bail!("etcd exited: {st}; log:\n{}", self.read_etcd_log());
            }
            Ok(self.etcdctl(&["endpoint", "health"]).is_ok())
        })
    }

    /// Stops etcd (SIGTERM, waits for it to exit). The data dir is kept for `start_etcd`.
    pub fn stop_etcd(&self) -> Result<()> {
        let mut child = self
            .etcd
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| anyhow!("etcd is not running"))?;
        stop_child(&mut child, Duration::from_secs(10))?;
        self.res.remove_pid(child.id());
        Ok(())
    }

    pub(crate) fn read_etcd_log(&self) -> String {
        std::fs::read_to_string(self.etcd_log()).unwrap_or_default()
    }

    /// Runs `etcdctl` (API v3) against the cluster's etcd, inside the underlay namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        run(netns::exec(&self.ns, "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.etcd_endpoint(), "--command-timeout=5s"])
            .args(args))
    }

    pub fn etcd_put(&self, key: &str, value: &str) -> Result<()> {
        self.etcdctl(&["put", key, "--", value]).map(|_| ())
    }

    /// The value at `key`, or `None` when there is no such key.
    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        let out = self.etcdctl(&["get", key])?;
        if out.is_empty() {
            return Ok(None);
        }
        let (_k, v) = out
            .split_once('\n')
            .ok_or_else(|| anyhow!("unexpected etcdctl output {out:?}"))?;
        Ok(Some(v.strip_suffix('\n').unwrap_or(v).to_string()))
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub fn etcd_delete(&self, key: &str) -> Result<u64> {
        let out = self.etcdctl(&["del", key])?;
        Ok(out.trim().parse().unwrap_or(0))
    }

    /// All keys under `prefix` with their values (values must be single-line).
    pub fn etcd_get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let out = self.etcdctl(&["get", "--prefix", prefix])?;
        let lines: Vec<&str> = out.lines().collect();
        Ok(lines
            .chunks(2)
            .map(|c| (c[0].to_string(), c.get(1).unwrap_or(&"").to_string()))
            .collect())
    }

    /// Writes `<default prefix>/config`.
    pub fn put_config(&self, json: &str) -> Result<()> {
        self.etcd_put(&format!("{DEFAULT_PREFIX}/config"), json)
    }

    /// Lease keys under `<prefix>/subnets/` (default prefix when `None`).
    pub fn lease_keys(&self, prefix: Option<&str>) -> Result<Vec<String>> {
        let p = format!("{}/subnets/", prefix.unwrap_or(DEFAULT_PREFIX));
        let out = self.etcdctl(&["get", "--prefix", "--keys-only", &p])?;
        Ok(out
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}
