//! The cluster: an underlay namespace (bridge + etcd) and hosts (namespaces running the real
//! daemon, each with a container namespace behind the daemon's bridge).

use crate::cleanup::{Resources, NS_PREFIX};
use crate::netns;
use crate::traffic::Endpoint;
use crate::util::{ip, rand_suffix, run, test_dataplane, wait_until};
use anyhow::{anyhow, bail, Context, Result};
use ipnet::Ipv4Net;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Underlay network: the underlay namespace has .1 (and etcd), host `i` (1-based) has .(10+i).
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// Default overlay configuration written by [`Cluster::new`].
pub const DEFAULT_NETWORK: &str = "10.5.0.0/16";
pub const DEFAULT_CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#;
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// Port of the daemon's HTTP endpoints inside each host namespace.
pub const HEALTHZ_PORT: u16 = 8471;
/// Names of the daemon's devices inside each host namespace.
pub const BRIDGE: &str = "rbr0";
pub const TUN: &str = "rudder0";
/// UDP port of the overlay.
pub const UDP_PORT: u16 = 8285;

pub(crate) const UNDERLAY_BRIDGE: &str = "ubr0";
/// Host side of the container's veth, inside the host namespace.
const CONTAINER_VETH_HOST: &str = "vc0";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options for one host.
#[derive(Clone, Debug)]
pub struct HostOpts {
    /// `--etcd-prefix`; default `/coreos.com/network`.
    pub etcd_prefix: Option<String>,
    /// `--release-lease-on-exit`.
    pub release_lease_on_exit: bool,
    /// `--ip-masq`.
    pub ip_masq: bool,
    /// `--iface`; default: none (the daemon detects the default-route interface).
    pub iface: Option<String>,
    /// `--dataplane`; default `$RUDDER_TEST_DATAPLANE` or `tun`.
    pub dataplane: Option<String>,
    /// Wait (in `add_host`) for the subnet file, `/readyz` 200 and then create the container.
    /// When false, call [`Host::wait_ready`] later.
    pub wait_ready: bool,
    /// More daemon arguments, appended last.
    pub extra_args: Vec<String>,
    /// Program and arguments to run the daemon through (e.g. `setpriv --bounding-set -bpf`).
    pub command_prefix: Vec<String>,
    /// `--etcd-endpoints` (default: the cluster's own etcd), e.g. an [`crate::etcd_members::EtcdMembers`] list.
    pub etcd_endpoints: Option<String>,
}

impl Default for HostOpts {
    fn default() -> Self {
        Self {
            etcd_prefix: None,
            release_lease_on_exit: false,
            ip_masq: false,
            iface: None,
            dataplane: None,
            wait_ready: true,
            extra_args: Vec::new(),
            etcd_endpoints: None,
            command_prefix: Vec::new(),
        }
    }
}

/// The subnet file as written by the daemon.
#[derive(Clone, Debug, PartialEq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    /// `FLANNEL_SUBNET`: the first address with the subnet's length, e.g. 10.5.7.1/24.
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    pub fn parse(text: &str) -> Result<Self> {
        let get = |k: &str| -> Result<&str> {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(k)?.strip_prefix('='))
                .map(str::trim)
                .ok_or_else(|| anyhow!("subnet file has no {k}: {text:?}"))
        };
        Ok(Self {
            network: get("FLANNEL_NETWORK")?.parse()?,
            subnet: get("FLANNEL_SUBNET")?.parse()?,
            mtu: get("FLANNEL_MTU")?.parse()?,
            ipmasq: get("FLANNEL_IPMASQ")?.parse()?,
        })
    }
}

/// A test cluster. Dropping it stops every daemon and etcd and deletes every namespace; the
/// logs are printed when the thread is panicking (a failed test).
pub struct Cluster {
    id: String,
    underlay: String,
    dir: tempfile::TempDir,
    etcd: Mutex<Option<Child>>,
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
        let c = Self {
            underlay: format!("{NS_PREFIX}{id}-u"),
            id,
            dir,
            etcd: Mutex::new(None),
            hosts: Mutex::new(Vec::new()),
            next_index: AtomicUsize::new(1),
            res: Resources::new(),
            logs_dumped: AtomicBool::new(false),
        };
        // From here on `Drop` cleans up whatever part was made.
        c.init()?;
        Ok(c)
    }

    fn init(&self) -> Result<()> {
        let u = self.underlay.as_str();
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
        ip(&["-n", u, "link", "set", UNDERLAY_BRIDGE, "up"])?;
        self.start_etcd()
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

    /// Name of the underlay namespace.
    pub fn underlay_ns(&self) -> &str {
        &self.underlay
    }

    /// `http://192.168.77.1:2379`.
    pub fn etcd_endpoint(&self) -> String {
        format!("http://{UNDERLAY_GW}:{ETCD_CLIENT_PORT}")
    }

    /// The cluster's scratch directory (logs, etcd data, subnet files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn etcd_log(&self) -> PathBuf {
        self.dir().join("etcd.log")
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
        let client = self.etcd_endpoint();
        let data = self.dir().join("etcd-data");
        let child = netns::exec(&self.underlay, "etcd")
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

    fn read_etcd_log(&self) -> String {
        std::fs::read_to_string(self.etcd_log()).unwrap_or_default()
    }

    /// Runs `etcdctl` (API v3) against the cluster's etcd, inside the underlay namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        run(netns::exec(&self.underlay, "etcdctl")
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
            &self.underlay,
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
            &self.underlay,
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
            "--bridge".into(),
            BRIDGE.into(),
            "--dataplane".into(),
            opts.dataplane.clone().unwrap_or_else(test_dataplane),
        ];
        if let Some(iface) = &opts.iface {
            args.extend(["--iface".into(), iface.clone()]);
        }
        if opts.ip_masq {
            args.push("--ip-masq".into());
        }
        if opts.release_lease_on_exit {
            args.push("--release-lease-on-exit".into());
        }
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
            daemon: Mutex::new(None),
            subnet: Mutex::new(None),
            container_made: AtomicBool::new(false),
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
        if let Some(mut e) = self.etcd.lock().unwrap().take() {
            let _ = stop_child(&mut e, Duration::from_secs(5));
        }
        self.res.teardown(Duration::from_secs(2));
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

/// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if let Some(st) = child.try_wait()? {
        return Ok(st);
    }
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let st = child.wait()?;
    bail!("process {pid} did not exit within {grace:?} of SIGTERM; killed ({st})")
}

struct HostInner {
    index: usize,
    name: String,
    ns: String,
    ctr_ns: String,
    underlay_ip: Ipv4Addr,
    etcd_prefix: String,
    log: PathBuf,
    subnet_file: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    command_prefix: Vec<String>,
    daemon: Mutex<Option<Child>>,
    subnet: Mutex<Option<SubnetEnv>>,
    container_made: AtomicBool,
    res: Arc<Resources>,
}

/// One host: a namespace running the daemon, plus a container namespace behind its bridge.
/// Cheap to clone; the cluster tears it down.
#[derive(Clone)]
pub struct Host(Arc<HostInner>);

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Host({}, {})", self.0.name, self.0.underlay_ip)
    }
}

impl Host {
    /// `h1`, `h2`, ...
    pub fn name(&self) -> &str {
        &self.0.name
    }
    /// 1-based index in the cluster.
    pub fn index(&self) -> usize {
        self.0.index
    }
    /// Makes the host's underlay device finish checksums and segmentation itself, as a
    /// physical NIC's wire would. Between namespaces a veth hands the peer unfinished
    /// offload state (partial checksums, 64 KB tunnel super-packets): the kernel's own
    /// receivers (the eBPF decap) take it as is, but a userspace UDP receiver (the TUN
    /// data plane, flannel's udp backend) would get unsegmented, unchecksummed datagrams.
    pub fn model_wire(&self) -> Result<()> {
        crate::util::require(&["ethtool"])?;
        crate::netns::exec_ok(&self.0.ns, "ethtool", &["-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    /// The host's network namespace.
    pub fn netns(&self) -> &str {
        &self.0.ns
    }
    /// The container's network namespace (exists once the host was ready).
    pub fn container_netns(&self) -> &str {
        &self.0.ctr_ns
    }
    /// The host's address on the underlay, 192.168.77.(10+i).
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.0.underlay_ip
    }
    pub fn etcd_prefix(&self) -> &str {
        &self.0.etcd_prefix
    }
    pub fn subnet_file(&self) -> &Path {
        &self.0.subnet_file
    }
    pub fn log_path(&self) -> &Path {
        &self.0.log
    }
    /// The daemon's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read(&self.0.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
    /// The daemon command line (after the binary).
    pub fn args(&self) -> &[String] {
        &self.0.args
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.0.daemon.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// Whether the daemon process is still running (reaps it if it exited).
    pub fn is_running(&self) -> bool {
        match self.0.daemon.lock().unwrap().as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the daemon (`ip netns exec <ns> rudder run ...`), logging to [`Host::log_path`].
    /// Does not wait; see [`Host::wait_ready`].
    pub fn start(&self) -> Result<()> {
        let mut guard = self.0.daemon.lock().unwrap();
        if let Some(c) = guard.as_mut() {
            if c.try_wait()?.is_none() {
                bail!("daemon of {} is already running", self.0.name);
            }
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.0.log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0.ns])
            .args(&self.0.command_prefix)
            .arg(&self.0.bin)
            .args(&self.0.args)
            .env_remove("RUDDER_BIN")
            .env_remove("RUDDER_TEST_DATAPLANE")
            .env_remove("RUDDER_TEST_SHOW_LOGS")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting rudder in {}", self.0.ns))?;
        self.0.res.add_pid(child.id());
        *guard = Some(child);
        Ok(())
    }

    /// Waits for the subnet file and `/readyz` 200, then makes sure the container namespace
    /// exists and is attached to the daemon's bridge.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        wait_until(
            &format!("{} to write its subnet file and be ready", self.0.name),
            timeout,
            || {
                self.check_alive()?;
                let Some(env) = self.read_subnet_file()? else {
                    return Ok(false);
                };
                let (code, body) = self.http_get("/readyz")?;
                if code != 200 {
                    bail!("/readyz answered {code}: {}", body.trim());
                }
                *self.0.subnet.lock().unwrap() = Some(env);
                Ok(true)
            },
        )
        .map_err(|e| anyhow!("{e:#}\nlog of {}:\n{}", self.0.name, self.log()))?;
        self.ensure_container()
    }

    /// Fails if the daemon has exited (with its exit status).
    /// The error is an [`Abort`](crate::util::Abort), so a [`wait_until`] using this stops.
    pub fn check_alive(&self) -> Result<()> {
        use crate::util::Abort;
        match self.0.daemon.lock().unwrap().as_mut() {
            None => Err(Abort(format!("daemon of {} is not running", self.0.name)).into()),
            Some(c) => match c.try_wait()? {
                None => Ok(()),
                Some(st) => Err(Abort(format!("daemon of {} exited: {st}", self.0.name)).into()),
            },
        }
    }

    /// The subnet file, parsed, if it exists.
    pub fn read_subnet_file(&self) -> Result<Option<SubnetEnv>> {
        match std::fs::read_to_string(&self.0.subnet_file) {
            Ok(t) => SubnetEnv::parse(&t).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The host's subnet (e.g. 10.5.7.0/24), as last seen when it was ready.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet_env().subnet.trunc()
    }

    /// The subnet file's content as last seen when the host was ready.
    pub fn subnet_env(&self) -> SubnetEnv {
        self.0
            .subnet
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| panic!("{} has not been ready yet", self.0.name))
    }

    /// The etcd key of this host's lease: `<prefix>/subnets/10.5.7.0-24`.
    pub fn lease_key(&self) -> String {
        let s = self.subnet();
        format!(
            "{}/subnets/{}-{}",
            self.0.etcd_prefix,
            s.network(),
            s.prefix_len()
        )
    }

    /// The container's address: the subnet's second address (e.g. 10.5.7.2).
    pub fn container_ip(&self) -> Ipv4Addr {
        let n = u32::from(self.subnet().network());
        Ipv4Addr::from(n + 2)
    }

    /// The bridge's (gateway's) address: the subnet's first address.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet().network()) + 1)
    }

    /// The container as a traffic endpoint.
    pub fn container(&self) -> Endpoint {
        Endpoint {
            ns: self.0.ctr_ns.clone(),
            ip: self.container_ip(),
        }
    }

    /// The host namespace itself as a traffic endpoint (its underlay address).
    pub fn host_endpoint(&self) -> Endpoint {
        Endpoint {
            ns: self.0.ns.clone(),
            ip: self.0.underlay_ip,
        }
    }

    /// Creates the container namespace (first time) or re-attaches its veth to the bridge
    /// (after a restart). Container: `eth0` = subnet .2, MTU from the subnet file, default
    /// route via subnet .1.
    pub fn ensure_container(&self) -> Result<()> {
        let env = self.subnet_env();
        let ns = self.0.ns.as_str();
        wait_until(
            &format!("bridge {BRIDGE} in {}", self.0.name),
            Duration::from_secs(10),
            || Ok(ip(&["-n", ns, "link", "show", BRIDGE]).is_ok()),
        )?;
        let mtu = env.mtu.to_string();
        if !self.0.container_made.load(Ordering::SeqCst) {
            let c = self.0.ctr_ns.as_str();
            self.0.res.add_netns(c);
            netns::create(c)?;
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                CONTAINER_VETH_HOST,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "mtu",
                &mtu,
                "netns",
                c,
            ])?;
            let cidr = format!("{}/{}", self.container_ip(), env.subnet.prefix_len());
            ip(&["-n", c, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", c, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &self.gateway_ip().to_string(),
            ])?;
            self.0.container_made.store(true, Ordering::SeqCst);
        }
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            CONTAINER_VETH_HOST,
            "master",
            BRIDGE,
            "up",
        ])?;
        Ok(())
    }

    /// An HTTP/1.0 GET to the daemon's healthz port from inside the host namespace. Returns
    /// the status code and the body.
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        netns::run_in(&self.0.ns, move || {
            let addr = (Ipv4Addr::LOCALHOST, HEALTHZ_PORT).into();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_write_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            let text = String::from_utf8_lossy(&buf).into_owned();
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow!("malformed HTTP response {text:?}"))?;
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| anyhow!("no status code in {head:?}"))?;
            Ok((code, body.to_string()))
        })
    }

    /// Whether `/readyz` answers 200 right now.
    pub fn is_ready(&self) -> bool {
        matches!(self.http_get("/readyz"), Ok((200, _)))
    }

    /// `GET /status`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = self.http_get("/status")?;
        if code != 200 {
            bail!("/status answered {code}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("/status is not JSON: {body}"))
    }

    /// One counter of `/status`.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let st = self.status()?;
        st["counters"][name]
            .as_u64()
            .ok_or_else(|| anyhow!("/status has no counter {name:?}: {st}"))
    }

    /// The peers in `/status`: (subnet, public IP).
    pub fn peers(&self) -> Result<Vec<(Ipv4Net, Ipv4Addr)>> {
        let st = self.status()?;
        let peers = st["peers"]
            .as_array()
            .ok_or_else(|| anyhow!("/status has no peers array: {st}"))?;
        peers
            .iter()
            .map(|p| {
                let subnet = p["subnet"]
                    .as_str()
                    .ok_or_else(|| anyhow!("peer without subnet: {p}"))?
                    .parse()?;
                let ip = p["public_ip"]
                    .as_str()
                    .ok_or_else(|| anyhow!("peer without public_ip: {p}"))?
                    .parse()?;
                Ok((subnet, ip))
            })
            .collect()
    }

    /// Whether `/status` lists `other` (its subnet and underlay IP) as a peer.
    pub fn sees_peer(&self, other: &Host) -> Result<bool> {
        Ok(self
            .peers()?
            .contains(&(other.subnet(), other.underlay_ip())))
    }

    /// Stops the daemon with SIGTERM and waits (up to 10 s) for it to exit.
    pub fn stop(&self) -> Result<ExitStatus> {
        let mut child = self
            .0
            .daemon
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| anyhow!("daemon of {} is not running", self.0.name))?;
        let r = stop_child(&mut child, Duration::from_secs(10));
        self.0.res.remove_pid(child.id());
        r
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill9(&self) -> Result<()> {
        let mut child = self
            .0
            .daemon
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| anyhow!("daemon of {} is not running", self.0.name))?;
        child.kill()?;
        child.wait()?;
        self.0.res.remove_pid(child.id());
        Ok(())
    }

    /// Starts the daemon again (stopping it first with SIGTERM if it runs) with the same
    /// arguments and subnet file, and waits until it is ready.
    pub fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        self.start()?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// CPU time (user + system) the daemon has used so far, from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("daemon of {} is not running", self.0.name))?;
        cpu_time_of(pid)
    }
}

/// CPU time (user + system) of a process, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat: {stat}"))?
        .1;
    // After the command: field 3 (state) is index 0, so utime (14) is index 11, stime 12.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    clock_ticks(ticks)
}

/// A count of clock ticks (the unit of `/proc/<pid>/stat` and `/proc/stat`) as a duration.
pub fn clock_ticks(ticks: u64) -> Result<Duration> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// Peak resident set size (`VmHWM`) of a process in KiB, from `/proc/<pid>/status`.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))
}
