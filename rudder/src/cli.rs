//! Command line: flannel's flag names, each also read from `RUDDER_<FLAG>`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::dataplane::DataplaneKind;

#[derive(Debug, Parser)]
#[command(
    name = "rudder",
    version,
    about = "IP-in-UDP overlay network for containers, leased through etcd (flannel-compatible)",
    long_about = "rudder gives every host a subnet of one cluster network, leased through etcd, and \
                  carries container traffic between hosts as IP-in-UDP (flannel's udp wire format), \
                  encapsulated in the kernel by eBPF or, where BPF is unavailable, by a TUN device."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: lease a subnet, program the data plane, follow the other hosts.
    Run(Box<RunArgs>),
    /// Show the running daemon's subnet, lease, data plane and peers.
    Status(StatusArgs),
    /// Read or write the network config in etcd (replaces hand-written JSON with etcdctl).
    #[command(subcommand)]
    Network(NetworkCommand),
    /// List the subnet leases in etcd with their remaining time to live.
    Leases(LeasesArgs),
    /// Write docker's options from the subnet file, as flannel's mk-docker-opts.sh does.
    DockerOpts(DockerOptsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The daemon's status socket (its --status-socket).
    #[arg(long, env = "RUDDER_STATUS_SOCKET", default_value = DEFAULT_STATUS_SOCKET)]
    pub status_socket: PathBuf,

    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Validate a network config and write it to `<prefix>/config`.
    Init(Box<NetworkInitArgs>),
    /// Print the network config with every default filled in.
    Show(EtcdOnlyArgs),
}

#[derive(Debug, Clone, Args)]
pub struct EtcdOnlyArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, Args)]
pub struct NetworkInitArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// The overlay network, e.g. 10.5.0.0/16.
    #[arg(long)]
    pub network: String,

    /// Length of each host's subnet (default: 24, or the network's length + 2 above /22).
    #[arg(long)]
    pub subnet_len: Option<u8>,

    /// First subnet handed out (default: the second subnet of the network).
    #[arg(long)]
    pub subnet_min: Option<String>,

    /// Last subnet handed out (default: the last subnet of the network).
    #[arg(long)]
    pub subnet_max: Option<String>,

    /// UDP port of the overlay.
    #[arg(long, default_value_t = rudder_ebpf::DEFAULT_UDP_PORT)]
    pub port: u16,

    /// Replace an existing config (leases made under the old one are not moved).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct LeasesArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DockerOptsArgs {
    /// The subnet file the daemon writes.
    #[arg(long, env = "RUDDER_SUBNET_FILE", default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,

    /// Where to write docker's options.
    #[arg(long, default_value = "/run/docker_opts.env")]
    pub output: PathBuf,

    /// Name of the variable holding all options together.
    #[arg(long, default_value = "DOCKER_OPTS")]
    pub combined_key: String,
}

pub const DEFAULT_STATUS_SOCKET: &str = "/run/rudder/rudder.sock";
pub const DEFAULT_SUBNET_FILE: &str = "/run/rudder/subnet.env";

/// How to reach etcd; shared by every command that talks to it.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "RUDDER_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd key prefix holding `config` and `subnets/` (flannel's default).
    #[arg(
        long,
        env = "RUDDER_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// Client private key (PEM) for etcd TLS; needs --etcd-certfile.
    #[arg(long, env = "RUDDER_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// Client certificate (PEM) for etcd TLS; needs --etcd-keyfile.
    #[arg(long, env = "RUDDER_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// CA certificate (PEM) to verify etcd's server certificate.
    #[arg(long, env = "RUDDER_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// etcd user name (with --etcd-password).
    #[arg(long, env = "RUDDER_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd password.
    #[arg(long, env = "RUDDER_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Underlay interface (default: the interface of the default route).
    #[arg(long, env = "RUDDER_IFACE")]
    pub iface: Option<String>,

    /// Address other hosts reach us at (default: the first IPv4 address of --iface).
    #[arg(long, env = "RUDDER_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// Masquerade traffic from the overlay to destinations outside it (nftables).
    #[arg(long, env = "RUDDER_IP_MASQ")]
    pub ip_masq: bool,

    /// flannel's forward rules, in iptables: accept overlay traffic in FORWARD (docker sets its
    /// policy to DROP) and keep overlay-to-overlay traffic out of docker's masquerade. Chains
    /// RUDDER-FWD and RUDDER-POSTRTG; removed on stop.
    #[arg(long, env = "RUDDER_IPTABLES_FORWARD_RULES", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub iptables_forward_rules: bool,

    /// Seconds between checks that the iptables rules are still in place (a docker restart
    /// rewrites its chains); missing rules are re-added and logged.
    #[arg(
        long,
        env = "RUDDER_IPTABLES_RESYNC",
        default_value_t = 5,
        value_name = "SECONDS"
    )]
    pub iptables_resync: u64,

    /// Where to write the subnet file docker and the flannel CNI plugin read.
    #[arg(
        long,
        env = "RUDDER_SUBNET_FILE",
        default_value = "/run/rudder/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Unix socket serving /status for `rudder status` (mode 0660).
    #[arg(long, env = "RUDDER_STATUS_SOCKET", default_value = DEFAULT_STATUS_SOCKET)]
    pub status_socket: PathBuf,

    /// Lifetime of the subnet lease in etcd (e.g. 24h, 90s).
    #[arg(long, env = "RUDDER_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,

    /// Renew the lease this many minutes before it expires.
    #[arg(long, env = "RUDDER_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=1439))]
    pub subnet_lease_renew_margin: u64,

    /// Address of the health/metrics HTTP server.
    #[arg(long, env = "RUDDER_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: Ipv4Addr,

    /// Port of the health/metrics HTTP server (0 = off). Serves /healthz, /readyz, /status, /metrics.
    #[arg(long, env = "RUDDER_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Name of the TUN device (TUN data plane).
    #[arg(long, env = "RUDDER_TUN_NAME", default_value = "rudder0")]
    pub tun_name: String,

    /// TUN data plane: batch with the kernel's offloads (TSO/USO on the device, UDP GSO/GRO
    /// on the socket). `false` moves one packet per system call; the wire format is the same.
    #[arg(long, env = "RUDDER_TUN_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub tun_offload: bool,

    /// Create this bridge with our subnet's first address (what docker0 or cni0 would be).
    #[arg(long, env = "RUDDER_BRIDGE")]
    pub bridge: Option<String>,

    /// Delete our lease from etcd on a clean exit (default: keep it, so a restart gets the same subnet).
    #[arg(long, env = "RUDDER_RELEASE_LEASE_ON_EXIT")]
    pub release_lease_on_exit: bool,

    /// Data plane: auto (eBPF, falling back to TUN), ebpf, or tun.
    #[arg(long, env = "RUDDER_DATAPLANE", value_enum, default_value = "auto")]
    pub dataplane: DataplaneKind,

    /// Test hook: make the eBPF load fail, to exercise `--dataplane auto`'s fall-back.
    #[arg(long, env = "RUDDER_EBPF_FORCE_FAIL", hide = true)]
    pub ebpf_force_fail: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 24h, 90s)"))?;
    if d < Duration::from_secs(5) {
        return Err(format!("{s:?} is too short: a lease must live at least 5s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut full = vec!["rudder", "run"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).map(|c| match c.command {
            Command::Run(r) => *r,
            other => panic!("parsed as {other:?}"),
        })
    }

    #[test]
    fn defaults_match_flannel() {
        let r = run(&[]).unwrap();
        assert_eq!(r.etcd.etcd_endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(r.etcd.etcd_prefix, "/coreos.com/network");
        assert_eq!(r.subnet_lease_ttl, Duration::from_secs(86400));
        assert_eq!(r.subnet_lease_renew_margin, 60);
        assert_eq!(r.healthz_port, 0);
        assert_eq!(r.dataplane, DataplaneKind::Auto);
    }

    #[test]
    fn endpoints_split_on_commas_and_bad_values_are_rejected() {
        let r = run(&["--etcd-endpoints", "http://a:2379,http://b:2379"]).unwrap();
        assert_eq!(r.etcd.etcd_endpoints.len(), 2);
        assert!(run(&["--subnet-lease-renew-margin", "0"]).is_err());
        assert!(run(&["--subnet-lease-ttl", "1s"]).is_err());
        assert!(run(&["--public-ip", "300.1.1.1"]).is_err());
        assert!(run(&["--dataplane", "vxlan"]).is_err());
    }
}
