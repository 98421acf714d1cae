//! The cluster: an underlay namespace (bridge + etcd) and hosts (namespaces running the real
//! daemon, each with a container namespace behind the daemon's bridge).
//!
//! One room per concern: `underlay` (its namespace, bridge and etcd), `host`, `container`,
//! `daemon` (the host's process), `process` (stopping children, `/proc`). This file ties
//! them together; the constants tests import from here are re-exported.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cleanup::{Resources, NS_PREFIX};
use crate::daemon::READY_TIMEOUT;
use crate::host::HostInner;
use crate::netns;
use crate::process::stop_child;
use crate::underlay::{Underlay, UNDERLAY_BRIDGE};
use crate::util::{ip, rand_suffix, test_dataplane};

pub use crate::host::{Host, HostOpts, SubnetEnv, BRIDGE, HEALTHZ_PORT, TUN, UDP_PORT};
pub use crate::underlay::{
    DEFAULT_CONFIG, DEFAULT_NETWORK, DEFAULT_PREFIX, ETCD_CLIENT_PORT, UNDERLAY_GW,
    UNDERLAY_PREFIX_LEN,
};

/// A test cluster. Dropping it stops every daemon and etcd and deletes every namespace; the
/// logs are printed when the thread is panicking (a failed test).
pub struct Cluster {
    id: String,
    underlay: Underlay,
    dir: tempfile::TempDir,
    hosts: Mutex<Vec<Host>>,
    next_index: AtomicUsize,
    res: Arc<Resources>,
    logs_dumped: AtomicBool,
}

impl Cluster {
    /// Underlay namespace + bridge (192.168.77.1/24) + etcd, healthy, with the default overlay
    /// config (`10.5.0.0/16`, udp) written.
    pub fn new() -> Result<Self> {
        let c = Self::bare()?;
        c.put_config(DEFAULT_CONFIG)?;
        Ok(c)
    }

    /// Like [`Cluster::new`] but writes no overlay config.
    pub fn bare() -> Result<Self> {
        crate::util::require(&["ip", "etcd", "etcdctl", "ping"])?;
        crate::cleanup::remove_stale_namespaces();
        let id = format!("{}-{}", std::process::id(), rand_suffix(6));
        let dir = tempfile::Builder::new()
            .prefix(&format!("rudder-e2e-{id}-"))
            .tempdir()?;
        let res = Resources::new();
        let underlay = Underlay::new(
            format!("{NS_PREFIX}{id}-u"),
            dir.path().to_owned(),
            res.clone(),
        );
        let c = Self {
            underlay,
            id,
            dir,
            hosts: Mutex::new(Vec::new()),
            next_index: AtomicUsize::new(1),
            res,
            logs_dumped: AtomicBool::new(false),
        };
        // From here on `Drop` cleans up whatever part was made.
        c.underlay.init()?;
        Ok(c)
    }

    /// What `Drop` tears down: extensions of the harness register their namespaces and
    /// processes here.
    pub fn resources(&self) -> &Arc<Resources> {
        &self.res
    }

    /// Unique id of this cluster (owner PID + random suffix); part of every namespace name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cluster's scratch directory (logs, etcd data, subnet files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds a host: namespace `<id>-h<i>`, veth `eth0` to the underlay bridge with address
    /// 192.168.77.(10+i)/24 and a default route via 192.168.77.1; starts the daemon in it.
    /// With `opts.wait_ready` (default) waits until the daemon is ready and creates the
    /// container namespace behind the daemon's bridge.
    pub fn add_host(&self, opts: HostOpts) -> Result<Host> {
        crate::util::require_daemon(&[])?;
        let host = self.add_host_without_daemon(opts.clone())?;
        host.start()?;
        if opts.wait_ready {
            host.wait_ready(READY_TIMEOUT)?;
        }
        Ok(host)
    }

    /// The namespace and underlay part of [`Cluster::add_host`] only: no daemon is started
    /// (call [`Host::start`] for that). Used by the harness's own tests.
    pub fn add_host_without_daemon(&self, opts: HostOpts) -> Result<Host> {
        let bin = crate::util::rudder_bin();
        let index = self.next_index.fetch_add(1, Ordering::SeqCst);
        if index > 200 {
            bail!("too many hosts");
        }
        let name = format!("h{index}");
        let ns = format!("{NS_PREFIX}{}-{name}", self.id);
        let ctr_ns = format!("{NS_PREFIX}{}-c{index}", self.id);
        let underlay_ip = Ipv4Addr::new(192, 168, 77, 10 + index as u8);
        let hdir = self.dir().join(&name);
        std::fs::create_dir_all(&hdir)?;

        self.res.add_netns(&ns);
        netns::create(&ns)?;
        let uveth = format!("u{name}");
        ip(&[
            "-n",
            self.underlay_ns(),
            "link",
            "add",
            &uveth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            self.underlay_ns(),
            "link",
            "set",
            &uveth,
            "master",
            UNDERLAY_BRIDGE,
            "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{underlay_ip}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &UNDERLAY_GW.to_string(),
        ])?;
        // Hosts forward between their bridge and the overlay (a per-namespace setting).
        // (/proc/sys/net shows the namespace of the thread that opens it.)
        netns::run_in(&ns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n").context("enabling ip_forward")
        })?;

        let prefix = opts
            .etcd_prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        let subnet_file = hdir.join("subnet.env");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--etcd-endpoints".into(),
            opts.etcd_endpoints
                .clone()
                .unwrap_or_else(|| self.etcd_endpoint()),
            "--etcd-prefix".into(),
            prefix.clone(),
            "--subnet-file".into(),
            subnet_file.display().to_string(),
            "--status-socket".into(),
            hdir.join("rudder.sock").display().to_string(),
            "--healthz-ip".into(),
            "0.0.0.0".into(),
            "--healthz-port".into(),
            HEALTHZ_PORT.to_string(),
            "--tun-name".into(),
            TUN.into(),
            "--dataplane".into(),
            opts.dataplane.clone().unwrap_or_else(test_dataplane),
        ];
        if !opts.external_bridge {
            args.extend(["--bridge".into(), BRIDGE.into()]);
        }
        if let Some(iface) = &opts.iface {
            args.extend(["--iface".into(), iface.clone()]);
        }
        if opts.ip_masq {
            args.push("--ip-masq".into());
        }
        if opts.release_lease_on_exit {
            args.push("--release-lease-on-exit".into());
        }
        if opts.cleanup_on_exit {
            args.push("--cleanup-on-exit=true".into());
        }
        // A bpffs of the harness's own (`ip netns exec` gives the daemon a private /sys, whose
        // mounts die with it): the eBPF plane's pins survive between two runs of the daemon.
        let pin_dir = hdir.join("bpf");
        std::fs::create_dir_all(&pin_dir)?;
        crate::util::run(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&pin_dir),
        )?;
        self.res.add_mount(&pin_dir);
        args.extend(["--bpf-pin-dir".into(), pin_dir.display().to_string()]);
        args.extend(opts.extra_args.iter().cloned());

        let host = Host(Arc::new(HostInner {
            index,
            name,
            ns,
            ctr_ns,
            underlay_ip,
            etcd_prefix: prefix,
            log: hdir.join("rudder.log"),
            subnet_file,
            bin,
            args,
            command_prefix: opts.command_prefix.clone(),
            flanneld_style: AtomicBool::new(false),
            extra_env: Mutex::new(Vec::new()),
            daemon: Mutex::new(None),
            subnet: Mutex::new(None),
            container_made: AtomicBool::new(false),
            external_bridge: opts.external_bridge,
            res: self.res.clone(),
        }));
        self.hosts.lock().unwrap().push(host.clone());
        Ok(host)
    }

    /// All hosts added so far.
    pub fn hosts(&self) -> Vec<Host> {
        self.hosts.lock().unwrap().clone()
    }

    /// Prints etcd's and every daemon's log to stderr (once).
    pub fn dump_logs(&self) {
        if self.logs_dumped.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut err = std::io::stderr().lock();
        for h in self.hosts() {
            let _ = writeln!(
                err,
                "===== rudder log of {} ({}, {}) =====\n{}",
                h.name(),
                h.netns(),
                h.underlay_ip(),
                h.log()
            );
        }
        let _ = writeln!(
            err,
            "===== etcd log =====\n{}\n===== end of logs =====",
            self.read_etcd_log()
        );
    }

    /// Stops everything: daemons (SIGTERM, then SIGKILL after 5 s), etcd, namespaces.
    fn teardown(&self) {
        let hosts = self.hosts();
        let mut children: Vec<Child> = hosts
            .iter()
            .filter_map(|h| h.0.daemon.lock().unwrap().take())
            .collect();
        let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
        crate::cleanup::kill_all(&pids, Duration::from_secs(5));
        for c in &mut children {
            let _ = c.wait();
        }
        if let Some(mut e) = self.underlay.etcd.lock().unwrap().take() {
            let _ = stop_child(&mut e, Duration::from_secs(5));
        }
        self.res.teardown(Duration::from_secs(2));
    }
}

/// The underlay's etcd helpers (`etcd_put`, `stop_etcd`, ...) are called on the cluster.
impl std::ops::Deref for Cluster {
    type Target = Underlay;

    fn deref(&self) -> &Underlay {
        &self.underlay
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("RUDDER_TEST_SHOW_LOGS").is_some() {
            self.dump_logs();
        }
        self.teardown();
    }
}
