//! Starting a data plane: what it needs ([`DataplaneOptions`]) and which one runs
//! ([`create`]: `auto` tries eBPF and falls back to TUN).

use std::sync::Arc;

use anyhow::Context;
use ipnet::Ipv4Net;

use super::{ebpf, tun, Dataplane, DataplaneKind};

/// Everything a data plane needs to start.
#[derive(Debug, Clone)]
pub struct DataplaneOptions {
    pub kind: DataplaneKind,
    pub underlay: crate::underlay::Underlay,
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
    /// bpffs directory for the eBPF plane's pins.
    pub bpf_pin_dir: Option<std::path::PathBuf>,
    /// The overlay's IPv6 side; `None` while the network has IPv6 off.
    pub ipv6: Option<Ipv6Plane>,
}

/// What a data plane needs to carry IPv6 (the network has `EnableIPv6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Plane {
    /// IPv6Network.
    pub network: ipnet::Ipv6Net,
    /// This host's IPv6 subnet (later changes: [`super::Dataplane::set_local_subnet6`]).
    pub local_subnet: ipnet::Ipv6Net,
    /// This host's PublicIPv6: the outer source for peers reached over IPv6. The overlay
    /// MTU is then computed for the IPv6 outer header (48 bytes).
    pub public_ipv6: Option<std::net::Ipv6Addr>,
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
    use crate::capabilities::{has_capability, CAP_BPF, CAP_NET_RAW, CAP_SYS_ADMIN};
    if let Some(why) = opts.underlay.ebpf_unsupported() {
        anyhow::bail!("{why}");
    }
    if !has_capability(CAP_BPF) && !has_capability(CAP_SYS_ADMIN) {
        anyhow::bail!(
            "missing CAP_BPF (or CAP_SYS_ADMIN on kernels before 5.8): loading BPF programs needs it"
        );
    }
    if !has_capability(CAP_NET_RAW) {
        anyhow::bail!(
            "missing CAP_NET_RAW: the eBPF socket path re-injects decapsulated packets through a raw IP socket"
        );
    }
    let ebpf_opts = ebpf::EbpfOptions {
        underlay_ifname: opts.underlay.name.clone(),
        underlay_ifindex: opts.underlay.index,
        local_ip: opts.underlay.local_ip,
        network: opts.network,
        local_subnet: opts.local_subnet,
        udp_port: opts.port,
        overlay_mtu: opts.overlay_mtu,
        bridge: opts.bridge.clone(),
        force_fail: opts.ebpf_force_fail,
        pin_dir: opts.bpf_pin_dir.clone(),
        ipv6: opts.ipv6,
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
    tun_opts.underlay = Some(opts.underlay.name.clone());
    // Bound to the address we own, so datagrams leave from it even when it is not the
    // interface's primary one (peers only accept the address our lease names, or its NAT).
    tun_opts.bind = std::net::SocketAddrV4::new(opts.underlay.local_ip, opts.port);
    tun_opts.ipv6 = opts.ipv6.map(|v6| tun::TunIpv6::from_plane(&v6, opts.port));
    let dp = tun::TunDataplane::start(tun_opts).await?;
    let batching = dp.batching();
    Ok((Arc::new(dp), batching))
}
