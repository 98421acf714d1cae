//! The data plane: moves overlay packets between this host and its peers.
//!
//! Two implementations sit behind one trait: `tun` (portable: a TUN device and a UDP
//! socket in the daemon) and `ebpf` (in-kernel encapsulation). The reconciler only ever
//! tells a data plane which peers exist; it never waits on etcd, so installed state stays
//! as it is while etcd is unreachable.

pub mod tun;

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use rudder_ebpf::Counter;

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

/// Packet counters indexed by [`Counter`], summed over CPUs/queues.
pub type CounterSnapshot = [u64; Counter::COUNT];

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

    /// Stop forwarding and remove what this data plane created in the kernel.
    fn shutdown(&self) -> anyhow::Result<()>;
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
    pub bridge: Option<String>,
}

/// Starts the requested data plane; returns it with a line saying why it was chosen.
pub async fn create(opts: &DataplaneOptions) -> anyhow::Result<(Arc<dyn Dataplane>, String)> {
    match opts.kind {
        DataplaneKind::Tun => Ok((
            start_tun(opts).await?,
            "tun data plane (--dataplane tun)".into(),
        )),
        DataplaneKind::Ebpf | DataplaneKind::Auto => {
            let why = "the eBPF data plane is not built into this rudder";
            if opts.kind == DataplaneKind::Ebpf {
                anyhow::bail!("--dataplane ebpf: {why}");
            }
            tracing::warn!(
                "eBPF data plane unavailable ({why}); falling back to the TUN data plane"
            );
            Ok((
                start_tun(opts).await?,
                format!("tun data plane (auto: eBPF unavailable: {why})"),
            ))
        }
    }
}

async fn start_tun(opts: &DataplaneOptions) -> anyhow::Result<Arc<dyn Dataplane>> {
    let mut tun_opts = tun::TunOptions::new(opts.local_subnet, opts.network, 0);
    tun_opts.mtu = opts.overlay_mtu;
    tun_opts.device_name = opts.tun_name.clone();
    tun_opts.bind = std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, opts.port);
    Ok(Arc::new(tun::TunDataplane::start(tun_opts).await?))
}
