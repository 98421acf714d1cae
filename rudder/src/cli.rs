//! Command line: flannel's flag names, each also read from `RUDDER_<FLAG>` (and, through
//! `flanneld_compat`, from flanneld's `FLANNELD_<FLAG>` and in flanneld's Go syntax).

use std::net::{IpAddr, Ipv4Addr};
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
                  encapsulated in the kernel by eBPF or, where BPF is unavailable, by a TUN device.",
    after_help = FLANNELD_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `--help` says about flanneld's command line and environment.
pub const FLANNELD_HELP: &str = "\
flanneld compatibility: `rudder` given flags and no subcommand, or run under the name `flanneld` \
(a symlink), runs the daemon as `rudder run` does, with flanneld's Go flag syntax \
(-flag=value, -flag value, --ip-masq=true). Every flag is also read from RUDDER_<FLAG> and from \
flanneld's FLANNELD_<FLAG> (e.g. FLANNELD_ETCD_ENDPOINTS); the command line wins over both, and \
RUDDER_<FLAG> wins over FLANNELD_<FLAG> when both are set.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: lease a subnet, program the data plane, follow the other hosts.
    #[command(after_help = FLANNELD_HELP)]
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

    /// Underlay interface, by name or by one of its IPv4 addresses; repeat it to try several
    /// in order (default: the interface holding --public-ip, else the default route's).
    #[arg(long, env = "RUDDER_IFACE", action = clap::ArgAction::Append, value_name = "NAME|IP")]
    pub iface: Vec<String>,

    /// Regex matched against each interface's IPv4 addresses, then its name; the first match
    /// is the underlay. Repeatable, tried in order after every --iface.
    #[arg(long, env = "RUDDER_IFACE_REGEX", action = clap::ArgAction::Append,
          value_name = "REGEX", value_parser = parse_regex)]
    pub iface_regex: Vec<String>,

    /// Use the interface (and its source address) of the route to this address, as
    /// `ip route get <IP>` shows; tried after --iface and --iface-regex.
    #[arg(long, env = "RUDDER_IFACE_CAN_REACH", value_name = "IP", value_parser = parse_ipv4_only)]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// Address other hosts reach us at (default: the address --iface found, else the first
    /// IPv4 address of the interface). Datagrams leave from it when this host holds it; an
    /// address it does not hold is taken as a 1:1 NAT's (a cloud's elastic IP): they then
    /// leave from the interface's own address and the NAT translates.
    #[arg(long, env = "RUDDER_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// The IPv6 address other hosts reach us at, written as PublicIPv6 in the lease when the
    /// network config has EnableIPv6 (default: the interface's global IPv6 address, as
    /// flanneld picks it). Unused otherwise.
    #[arg(long, env = "RUDDER_PUBLIC_IPV6", value_name = "IPV6")]
    pub public_ipv6: Option<String>,

    /// Masquerade traffic from the overlay to destinations outside it (nftables).
    #[arg(long, env = "RUDDER_IP_MASQ", action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_value = "false", default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub ip_masq: bool,

    /// With --ip-masq: masquerade without nftables' `fully-random` port mapping.
    #[arg(long, env = "RUDDER_IP_MASQ_FULLY_RANDOM_DISABLE", action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub ip_masq_fully_random_disable: bool,

    /// Add a blackhole route for our own subnet, so traffic to its unused addresses is dropped
    /// here instead of leaving by the default route; re-checked every --iptables-resync
    /// seconds, removed on stop.
    #[arg(long, env = "RUDDER_IP_BLACKHOLE_ROUTE", action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub ip_blackhole_route: bool,

    /// flanneld's forward rules, in iptables: accept overlay traffic in FORWARD (docker sets its
    /// policy to DROP) and keep overlay-to-overlay traffic out of docker's masquerade. Chains
    /// RUDDER-FWD and RUDDER-POSTRTG; removed on stop.
    #[arg(long, env = "RUDDER_IPTABLES_FORWARD_RULES", action = clap::ArgAction::Set,
          num_args = 0..=1, default_value = "true", default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub iptables_forward_rules: bool,

    /// Seconds between checks that the iptables rules (and the --ip-blackhole-route route) are
    /// still in place (a docker restart rewrites its chains); missing ones are re-added and logged.
    #[arg(
        long,
        env = "RUDDER_IPTABLES_RESYNC",
        default_value_t = 5,
        value_name = "SECONDS"
    )]
    pub iptables_resync: u64,

    /// flanneld's log verbosity (klog): accepted and ignored; set RUST_LOG=debug for more.
    #[arg(long = "v", env = "RUDDER_V", value_name = "LEVEL")]
    pub klog_v: Option<String>,

    /// flanneld's klog per-module verbosity: accepted and ignored (see RUST_LOG).
    #[arg(long = "vmodule", env = "RUDDER_VMODULE", hide = true)]
    pub klog_vmodule: Option<String>,

    /// flanneld's klog backtrace location: accepted and ignored.
    #[arg(
        long = "log_backtrace_at",
        env = "RUDDER_LOG_BACKTRACE_AT",
        hide = true
    )]
    pub klog_backtrace_at: Option<String>,

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
    #[arg(long, env = "RUDDER_TUN_OFFLOAD", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value = "true", default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub tun_offload: bool,

    /// Create this bridge with our subnet's first address (what docker0 or cni0 would be).
    #[arg(long, env = "RUDDER_BRIDGE")]
    pub bridge: Option<String>,

    /// Delete our lease from etcd on a clean exit (default: keep it, so a restart gets the same subnet).
    #[arg(long, env = "RUDDER_RELEASE_LEASE_ON_EXIT", action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub release_lease_on_exit: bool,

    /// On a clean exit, remove what rudder put in the kernel (BPF programs, maps and pins,
    /// routes, bridge, nftables rules) as for an uninstall. Default: leave it all in place,
    /// so traffic keeps flowing and the next start adopts it.
    #[arg(long, env = "RUDDER_CLEANUP_ON_EXIT", action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub cleanup_on_exit: bool,

    /// bpffs directory where the eBPF data plane pins its maps and TCX links (one
    /// subdirectory per underlay interface), so they outlive a restart. Mounted if it is
    /// /sys/fs/bpf and nothing is mounted there.
    #[arg(long, env = "RUDDER_BPF_PIN_DIR", default_value = "/sys/fs/bpf/rudder")]
    pub bpf_pin_dir: std::path::PathBuf,

    /// Data plane: auto (eBPF, falling back to TUN), ebpf, or tun.
    #[arg(long, env = "RUDDER_DATAPLANE", value_enum, default_value = "auto")]
    pub dataplane: DataplaneKind,

    /// Test hook: make the eBPF load fail, to exercise `--dataplane auto`'s fall-back.
    #[arg(long, env = "RUDDER_EBPF_FORCE_FAIL", hide = true)]
    pub ebpf_force_fail: bool,
}

fn parse_regex(s: &str) -> Result<String, String> {
    regex::Regex::new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a regex: {e}"))
}

fn parse_ipv4_only(s: &str) -> Result<Ipv4Addr, String> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => Ok(ip),
        Ok(IpAddr::V6(_)) => Err("IPv6 is not supported yet; give an IPv4 address".into()),
        Err(e) => Err(format!("{e}")),
    }
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

    #[test]
    fn booleans_take_go_syntax() {
        let r = run(&[]).unwrap();
        assert!(!r.ip_masq && r.iptables_forward_rules && r.tun_offload);
        assert!(!r.ip_masq_fully_random_disable && !r.ip_blackhole_route);
        assert!(run(&["--ip-masq"]).unwrap().ip_masq);
        assert!(run(&["--ip-masq=true"]).unwrap().ip_masq);
        assert!(run(&["--ip-masq=1"]).unwrap().ip_masq);
        assert!(!run(&["--ip-masq=false"]).unwrap().ip_masq);
        assert!(
            !run(&["--iptables-forward-rules=false"])
                .unwrap()
                .iptables_forward_rules
        );
        assert!(
            !run(&["--iptables-forward-rules", "false"])
                .unwrap()
                .iptables_forward_rules
        );
        assert!(
            run(&["--iptables-forward-rules"])
                .unwrap()
                .iptables_forward_rules
        );
        assert!(!run(&["--tun-offload", "false"]).unwrap().tun_offload);
        let r = run(&[
            "--ip-masq",
            "--ip-masq-fully-random-disable",
            "--ip-blackhole-route",
        ])
        .unwrap();
        assert!(r.ip_masq && r.ip_masq_fully_random_disable && r.ip_blackhole_route);
        assert!(run(&["--ip-masq=maybe"]).is_err());
    }

    #[test]
    fn interface_selection_flags() {
        let r = run(&[
            "--iface",
            "eth9",
            "--iface=192.168.1.2",
            "--iface-regex",
            "^10\\.",
            "--iface-can-reach",
            "8.8.8.8",
        ])
        .unwrap();
        assert_eq!(r.iface, ["eth9", "192.168.1.2"]);
        assert_eq!(r.iface_regex, ["^10\\."]);
        assert_eq!(r.iface_can_reach, Some(Ipv4Addr::new(8, 8, 8, 8)));
        assert!(run(&["--iface-regex", "(unclosed"]).is_err());
        let e = run(&["--iface-can-reach", "2001:db8::1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("IPv6 is not supported yet"), "{e}");
        // klog's flags are accepted.
        assert!(run(&["--v=2", "--vmodule=x=1", "--log_backtrace_at=a.go:1"]).is_ok());
    }
}
