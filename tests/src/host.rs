//! A host: a network namespace on the underlay that runs the daemon; its subnet file and
//! its HTTP endpoints (`/readyz`, `/status`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::Ipv4Net;

use crate::cleanup::Resources;
use crate::netns;

/// Port of the daemon's HTTP endpoints inside each host namespace.
pub const HEALTHZ_PORT: u16 = 8471;
/// Names of the daemon's devices inside each host namespace.
pub const BRIDGE: &str = "rbr0";
pub const TUN: &str = "rudder0";
/// UDP port of the overlay.
pub const UDP_PORT: u16 = 8285;

/// Options for one host.
#[derive(Clone, Debug)]
pub struct HostOpts {
    /// `--etcd-prefix`; default `/coreos.com/network`.
    pub etcd_prefix: Option<String>,
    /// `--release-lease-on-exit`.
    pub release_lease_on_exit: bool,
    /// `--cleanup-on-exit`: a stop removes what rudder put in the kernel. On by default, so
    /// tests that stop a host see it leave nothing; off to test restarts without loss.
    pub cleanup_on_exit: bool,
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
    /// Containers live on a bridge someone else makes (docker0, cni0): the daemon gets no
    /// `--bridge` and the harness makes no container namespace of its own.
    pub external_bridge: bool,
}

impl Default for HostOpts {
    fn default() -> Self {
        Self {
            etcd_prefix: None,
            release_lease_on_exit: false,
            cleanup_on_exit: true,
            ip_masq: false,
            iface: None,
            dataplane: None,
            wait_ready: true,
            external_bridge: false,
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

pub(crate) struct HostInner {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) ns: String,
    pub(crate) ctr_ns: String,
    pub(crate) underlay_ip: Ipv4Addr,
    pub(crate) etcd_prefix: String,
    pub(crate) log: PathBuf,
    pub(crate) subnet_file: PathBuf,
    pub(crate) bin: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) command_prefix: Vec<String>,
    /// Start the daemon as a flanneld unit would ([`Host::set_flanneld_style`]).
    pub(crate) flanneld_style: AtomicBool,
    /// Environment added to the daemon's (on top of what the flanneld style sets).
    pub(crate) extra_env: Mutex<Vec<(String, String)>>,
    pub(crate) daemon: Mutex<Option<Child>>,
    pub(crate) subnet: Mutex<Option<SubnetEnv>>,
    pub(crate) container_made: AtomicBool,
    pub(crate) external_bridge: bool,
    pub(crate) res: Arc<Resources>,
}

/// One host: a namespace running the daemon, plus a container namespace behind its bridge.
/// Cheap to clone; the cluster tears it down.
#[derive(Clone)]
pub struct Host(pub(crate) Arc<HostInner>);

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

    /// The peers in `/status`: (subnet, public IP). Fails for a peer reached over IPv6
    /// (dual stack): see [`Host::peer_underlays`].
    pub fn peers(&self) -> Result<Vec<(Ipv4Net, Ipv4Addr)>> {
        self.peer_underlays()?
            .into_iter()
            .map(|(subnet, ip)| match ip {
                IpAddr::V4(ip) => Ok((subnet, ip)),
                IpAddr::V6(_) => Err(anyhow!("peer {subnet} is reached over IPv6 ({ip})")),
            })
            .collect()
    }

    /// The peers in `/status`: (subnet, underlay address: PublicIP, or PublicIPv6 when
    /// both ends announce one).
    pub fn peer_underlays(&self) -> Result<Vec<(Ipv4Net, IpAddr)>> {
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

    /// Whether `/status` lists `other` (its subnet and underlay IP, or the IPv6 underlay
    /// address a dual-stack host is reached at: the harness's, or a link-local one) as a peer.
    pub fn sees_peer(&self, other: &Host) -> Result<bool> {
        let subnet = other.subnet();
        Ok(self.peer_underlays()?.iter().any(|(s, ip)| {
            *s == subnet
                && match ip {
                    IpAddr::V4(ip) => *ip == other.underlay_ip(),
                    // The harness's IPv6 underlay address, or eth0's link-local one.
                    IpAddr::V6(ip) => {
                        *ip == other.underlay_ipv6() || ip.segments()[0] & 0xffc0 == 0xfe80
                    }
                }
        }))
    }
}
