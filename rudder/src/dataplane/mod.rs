//! The data plane: moves overlay packets between this host and its peers.
//!
//! Two implementations sit behind one trait: `tun` (portable: a TUN device and a UDP
//! socket in the daemon) and `ebpf` (in-kernel encapsulation). The reconciler only ever
//! tells a data plane which peers exist; it never waits on etcd, so installed state stays
//! as it is while etcd is unreachable.
//!
//! Shared rooms, below both planes: `counters` (snapshots, per-peer traffic) and
//! `forwarding` (the userspace forwarding table and rules).

pub mod counters;
pub mod ebpf;
pub mod forwarding;
pub mod tun;

use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::Context;
use ipnet::Ipv4Net;

pub use counters::{CounterSnapshot, PeerTraffic};

/// Which implementation carries the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneKind {
    /// Try eBPF, fall back to TUN on any failure.
    Auto,
    /// eBPF only: fail when it cannot load.
    Ebpf,
    /// TUN device and UDP socket in the daemon.
    Tun,
}

impl DataplaneKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneKind::Auto => "auto",
            DataplaneKind::Ebpf => "ebpf",
            DataplaneKind::Tun => "tun",
        }
    }
}

/// One installed peer as the data plane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStats {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// When the entry was installed or last pointed at another public IP; `traffic`
    /// counts from then.
    pub changed: std::time::SystemTime,
    pub traffic: PeerTraffic,
}

/// What every data plane does. Methods are idempotent: applying the same peer twice, or
/// removing an absent one, is not an error.
pub trait Dataplane: Send + Sync {
    /// `ebpf` or `tun`.
    fn kind(&self) -> DataplaneKind;

    /// Our own subnet changed (first acquisition, or a re-acquire that got another one).
    fn set_local_subnet(&self, subnet: Ipv4Net) -> anyhow::Result<()>;

    /// Add or update the host owning `subnet`.
    fn upsert_peer(&self, subnet: Ipv4Net, public_ip: Ipv4Addr) -> anyhow::Result<()>;

    /// Forget the host that owned `subnet`.
    fn remove_peer(&self, subnet: Ipv4Net) -> anyhow::Result<()>;

    /// Current packet counters.
    fn counters(&self) -> CounterSnapshot;

    /// Current byte counters, by the same [`Counter`](rudder_ebpf::Counter) index.
    fn byte_counters(&self) -> CounterSnapshot;

    /// Every installed peer with its traffic, ordered by subnet.
    fn peer_stats(&self) -> Vec<PeerStats>;

    /// Stop forwarding and remove what this data plane created in the kernel.
    fn shutdown(&self) -> anyhow::Result<()>;

    /// Re-reads what the data plane learns from the host rather than from etcd (the eBPF
    /// path's local containers); called every few seconds. Nothing by default.
    fn refresh_host_state(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Everything a data plane needs to start.
#[derive(Debug, Clone)]
pub struct DataplaneOptions {
    pub kind: DataplaneKind,
    pub underlay: crate::host::Underlay,
    pub network: Ipv4Net,
    pub local_subnet: Ipv4Net,
    /// Overlay UDP port (from the network config's Backend.Port).
    pub port: u16,
    /// Underlay MTU minus the encapsulation overhead.
    pub overlay_mtu: u16,
    pub tun_name: String,
    /// TUN data plane: use TSO/USO and UDP GSO/GRO.
    pub tun_offload: bool,
    pub bridge: Option<String>,
    /// Test hook: make the eBPF load fail (exercises the `auto` fall-back).
    pub ebpf_force_fail: bool,
}

/// Starts the requested data plane; returns it with a line saying why it was chosen.
/// `auto` tries eBPF and falls back to TUN on any failure, logging the reason once.
pub async fn create(opts: &DataplaneOptions) -> anyhow::Result<(Arc<dyn Dataplane>, String)> {
    match opts.kind {
        DataplaneKind::Tun => {
            let (dp, batching) = start_tun(opts).await?;
            Ok((dp, format!("--dataplane tun; {batching}")))
        }
        DataplaneKind::Ebpf => {
            let dp = load_ebpf(opts)
                .await
                .context("--dataplane ebpf: the eBPF data plane could not start (use --dataplane auto to fall back to TUN)")?;
            Ok((dp, "--dataplane ebpf".into()))
        }
        DataplaneKind::Auto => match load_ebpf(opts).await {
            Ok(dp) => Ok((dp, "auto: eBPF loaded".into())),
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(
                    "eBPF data plane unavailable ({why}); falling back to the TUN data plane"
                );
                let (dp, batching) = start_tun(opts).await?;
                Ok((dp, format!("auto: eBPF unavailable: {why}; {batching}")))
            }
        },
    }
}

async fn load_ebpf(opts: &DataplaneOptions) -> anyhow::Result<Arc<dyn Dataplane>> {
    use crate::host::{has_capability, CAP_BPF, CAP_SYS_ADMIN};
    if !has_capability(CAP_BPF) && !has_capability(CAP_SYS_ADMIN) {
        anyhow::bail!(
            "missing CAP_BPF (or CAP_SYS_ADMIN on kernels before 5.8): loading BPF programs needs it"
        );
    }
    let ebpf_opts = ebpf::EbpfOptions {
        underlay_ifname: opts.underlay.name.clone(),
        underlay_ifindex: opts.underlay.index,
        public_ip: opts.underlay.public_ip,
        network: opts.network,
        local_subnet: opts.local_subnet,
        udp_port: opts.port,
        overlay_mtu: opts.overlay_mtu,
        bridge: opts.bridge.clone(),
        force_fail: opts.ebpf_force_fail,
    };
    // Loading talks to the kernel synchronously (verifier, netlink): keep it off the runtime.
    let dp = tokio::task::spawn_blocking(move || ebpf::EbpfDataplane::load(ebpf_opts))
        .await
        .context("the eBPF loader panicked")??;
    dp.start_socket_path().await?;
    Ok(Arc::new(dp))
}

/// Starts the TUN data plane; returns it with a line saying how it batches.
async fn start_tun(opts: &DataplaneOptions) -> anyhow::Result<(Arc<dyn Dataplane>, String)> {
    let mut tun_opts = tun::TunOptions::new(opts.local_subnet, opts.network, 0);
    tun_opts.mtu = opts.overlay_mtu;
    tun_opts.device_name = opts.tun_name.clone();
    tun_opts.offload = opts.tun_offload;
    tun_opts.bind = std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, opts.port);
    let dp = tun::TunDataplane::start(tun_opts).await?;
    let batching = dp.batching();
    Ok((Arc::new(dp), batching))
}
