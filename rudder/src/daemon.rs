//! `rudder run`: wires config, lease, peers, reconciler and data plane together.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::cli::RunArgs;
use crate::config::NetworkConfig;
use crate::dataplane::{self, Dataplane, DataplaneOptions};
use crate::etcd::{self, Backoff, Etcd};
use crate::firewall;
use crate::host::Netlink;
use crate::lease::LeaseManager;
use crate::lease_keeper::{acquire_until_done, LeaseKeeper};
use crate::local_setup::{keep_blackhole_route, LocalSetup};
use crate::peers::PeerRegistry;
use crate::reconcile::Reconciler;
use crate::status::State;
use crate::subnet_file;
use crate::underlay_watch::{self, UnderlayFollower};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Flags rudder accepts but cannot honour, and partial TLS/auth flags, fail first, before
    // anything is touched.
    // Empty is flanneld's default (FLANNELD_PUBLIC_IPV6="").
    let public_ipv6_flag: Option<Ipv6Addr> = match args.public_ipv6.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(text.parse().map_err(|_| {
            anyhow::anyhow!("--public-ipv6 {text:?} is not an IPv6 address (e.g. fd00:77::11)")
        })?),
    };
    if args.klog_v.is_some() || args.klog_vmodule.is_some() {
        tracing::info!(
            "flanneld's -v/-vmodule have no effect: set RUST_LOG=debug for more logging"
        );
    }
    etcd::connect_options(&args.etcd)?;
    crate::capabilities::require_capability(
        crate::capabilities::CAP_NET_ADMIN,
        "CAP_NET_ADMIN",
        "rudder creates devices, routes and nftables rules",
    )?;
    let state = State::default();
    let netlink = Netlink::new()?;
    let underlay = netlink
        .underlay(&crate::underlay::UnderlaySelection {
            ifaces: args.iface.clone(),
            regexes: args.iface_regex.clone(),
            can_reach: args.iface_can_reach,
            public_ip: args.public_ip,
        })
        .await?;
    let overlay_mtu = crate::underlay::overlay_mtu(underlay.mtu);
    tracing::info!(
        iface = %underlay.name, public_ip = %underlay.public_ip, mtu = underlay.mtu,
        overlay_mtu, "underlay"
    );
    if underlay.behind_nat() {
        tracing::info!(
            "--public-ip {} is not an address of this host: datagrams leave from {} and peers are expected to reach this host through a 1:1 NAT",
            underlay.public_ip,
            underlay.local_ip
        );
    }
    state.update(|s| {
        s.public_ip = Some(underlay.public_ip);
        s.local_ip = Some(underlay.local_ip);
        s.iface = Some(underlay.name.clone());
        s.mtu = Some(overlay_mtu);
    });

    // Removed on every way out of `run` (only if still ours).
    let _status_socket = crate::http::serve_unix(&args.status_socket, state.clone()).await?;
    if args.healthz_port != 0 {
        crate::http::serve(
            SocketAddr::from((args.healthz_ip, args.healthz_port)),
            state.clone(),
        )
        .await?;
    }

    let state_path = crate::state_file::path_beside(&args.subnet_file);
    let saved = crate::state_file::load(&state_path);
    let mut shutdown = Shutdown::new()?;
    // From the state file: our subnet and the last known peers carry traffic before etcd
    // answers (a start during an etcd outage does not cut this host off).
    let mut early = None;
    if let Some(saved) = &saved {
        let (public_ipv6, overlay_mtu) =
            crate::underlay_ipv6::ipv6_side(&netlink, &underlay, public_ipv6_flag, &saved.config)
                .await?;
        let up = BringUp {
            args: &args,
            underlay: &underlay,
            overlay_mtu,
            public_ipv6,
            netlink: &netlink,
            state: &state,
        };
        let (local, dp) = up
            .run(&saved.config, saved.subnet, saved.ipv6_subnet)
            .await?;
        let own = crate::reconcile6::Own {
            subnet: saved.subnet,
            public_ip: underlay.public_ip,
            public_ipv6,
        };
        let programmed =
            crate::reconcile_saved::SavedPeers::program(&*dp, own, &saved.peers, &saved.ipv6_peers);
        state.update(|s| {
            s.network = Some(saved.config.network);
            s.subnet = Some(saved.subnet);
            s.ipv6_subnet = saved.ipv6_subnet;
        });
        let (peers, ipv6_peers) = programmed.counts();
        tracing::info!(
            subnet = %saved.subnet, peers, ipv6_peers,
            "brought up from {} before etcd answered", state_path.display()
        );
        let refresh = follow_host_state(&dp, underlay.index, &saved.config);
        early = Some(Early {
            local,
            dp,
            refresh,
            programmed,
        });
    }
    let stop_early = |early: Option<Early>| async move {
        if let Some(Early {
            local, dp, refresh, ..
        }) = early
        {
            refresh.abort();
            stop_dataplane(&*dp, &local, args.cleanup_on_exit).await;
        }
    };
    let client = tokio::select! {
        client = Etcd::connect(&args.etcd) => client?,
        _ = shutdown.wait() => { stop_early(early).await; return Ok(()) },
    };
    let prefix = args.etcd.etcd_prefix.trim_end_matches('/').to_string();
    let config = tokio::select! {
        config = load_config(client.clone(), &prefix, &state, early.is_none()) => config,
        _ = shutdown.wait() => { stop_early(early).await; return Ok(()) },
    };
    state.update(|s| s.network = Some(config.network));
    if let Some(saved) = saved.as_ref().filter(|saved| saved.config != config) {
        tracing::warn!(
            "the network config changed while rudder was stopped ({} -> {}): rebuilding \
             the data plane from etcd's",
            describe(&saved.config),
            describe(&config)
        );
        if let Some(Early {
            local, dp, refresh, ..
        }) = early.take()
        {
            refresh.abort();
            stop_dataplane(&*dp, &local, true).await;
            *state.dataplane.write().expect("dataplane lock poisoned") = None;
        }
    }

    let (public_ipv6, overlay_mtu) =
        crate::underlay_ipv6::ipv6_side(&netlink, &underlay, public_ipv6_flag, &config).await?;
    match &config.ipv6 {
        Some(v6) => {
            tracing::info!(
                "IPv6 is on (IPv6Network {}): PublicIPv6 {}, overlay MTU {overlay_mtu} ({} outer headers)",
                v6.network,
                public_ipv6.map_or("null".to_string(), |ip| ip.to_string()),
                if public_ipv6.is_some() { "IPv6 outer to peers with a PublicIPv6, else IPv4" } else { "IPv4" }
            );
            state.update(|s| {
                s.ipv6_network = Some(v6.network);
                s.public_ipv6 = public_ipv6;
                s.mtu = Some(overlay_mtu);
            });
        }
        None => {
            if let Some(ip) = public_ipv6_flag {
                tracing::info!(
                    "--public-ipv6 {ip} is unused: the network config has no EnableIPv6"
                );
            }
        }
    }
    let mut leases = LeaseManager::new(
        client.clone(),
        &prefix,
        config.clone(),
        underlay.public_ip,
        public_ipv6,
        args.subnet_lease_ttl,
    );
    let (hint, hint6) = match (&early, &saved) {
        (Some(_), Some(saved)) => (Some(saved.subnet), saved.ipv6_subnet),
        _ => (
            subnet_file::previous_subnet(&args.subnet_file),
            subnet_file::previous_ipv6_subnet(&args.subnet_file),
        ),
    };
    let lease = tokio::select! {
        lease = acquire_until_done(&mut leases, hint, hint6, &state) => lease,
        _ = shutdown.wait() => { stop_early(early).await; return Ok(()) },
    };

    let (local, dp, programmed) = match early {
        Some(Early {
            local,
            dp,
            refresh,
            programmed,
        }) => {
            refresh.abort();
            if hint != Some(lease.subnet) {
                tracing::error!(
                    old = ?hint, new = %lease.subnet,
                    "our saved subnet was taken while rudder was stopped; moved to a new \
                     subnet: containers must be re-addressed"
                );
                local.apply(lease.subnet, lease.ipv6_subnet).await?;
                dp.set_local_subnet(lease.subnet)?;
            }
            if hint6 != lease.ipv6_subnet {
                tracing::warn!(old = ?hint6, new = ?lease.ipv6_subnet, "our IPv6 subnet changed while rudder was stopped");
                local.apply(lease.subnet, lease.ipv6_subnet).await?;
                if let Some(subnet6) = lease.ipv6_subnet {
                    dp.set_local_subnet6(subnet6)?;
                }
            }
            (local, dp, Some(programmed))
        }
        None => {
            let up = BringUp {
                args: &args,
                underlay: &underlay,
                overlay_mtu,
                public_ipv6,
                netlink: &netlink,
                state: &state,
            };
            let (local, dp) = up.run(&config, lease.subnet, lease.ipv6_subnet).await?;
            (local, dp, None)
        }
    };

    let (subnet_tx, subnet_rx) = watch::channel(lease.subnet);
    // (No IPv4 subnet to blackhole on an IPv6-only network.)
    let blackhole_task = (args.ip_blackhole_route && config.enable_ipv4).then(|| {
        let period = Duration::from_secs(args.iptables_resync.max(1));
        tokio::spawn(keep_blackhole_route(
            netlink.clone(),
            subnet_rx.clone(),
            period,
        ))
    });
    let lease_check = Arc::new(Notify::new());
    let (peer_tx, peer_rx) = mpsc::channel(1024);
    let registry = PeerRegistry::new(
        client.clone(),
        leases.subnets_prefix(),
        config.network,
        config.ipv6.map(|c| c.network),
        peer_tx,
        state.clone(),
    );
    let reconciler = Reconciler::new(
        dp.clone(),
        state.clone(),
        underlay.public_ip,
        subnet_rx,
        lease_check.clone(),
    )
    .with_public_ipv6(public_ipv6);
    // What the state file's peers programmed, or else the peers a previous run left in the
    // kernel (eBPF pins), count as installed: etcd's first snapshot is applied as a diff.
    // (Pinned ones reached over IPv6 name no PublicIP: etcd's snapshot programs them again.)
    let pinned: crate::peers::PeerMap = dp
        .peer_stats()
        .iter()
        .filter_map(|p| match (p.subnet, p.public_ip) {
            (ipnet::IpNet::V4(subnet), std::net::IpAddr::V4(ip)) => Some((subnet, ip)),
            _ => None,
        })
        .collect();
    let reconciler = match programmed {
        Some(programmed) => reconciler.with_saved(programmed.with_pinned(pinned)),
        None => reconciler.with_installed(pinned),
    };
    let follower = UnderlayFollower {
        name: underlay.name.clone(),
        mtu: underlay.mtu,
        outer: crate::underlay_ipv6::outer_family(public_ipv6),
        carries_ipv6: config.ipv6.is_some(),
        dataplane: dp.clone(),
        state: state.clone(),
    };
    let underlay_task = tokio::spawn(follower.run(
        underlay_watch::watch(underlay.index, underlay.mtu),
        local.clone(),
    ));
    let keeper = LeaseKeeper {
        leases,
        lease,
        renew_margin: Duration::from_secs(args.subnet_lease_renew_margin * 60),
        check: lease_check,
        subnet_tx,
        local,
        dataplane: dp.clone(),
        state: state.clone(),
    };

    let refresh_task = follow_host_state(&dp, underlay.index, &config);
    let state_file_task = tokio::spawn(crate::state_file::keep_written(
        state_path.clone(),
        config.clone(),
        state.clone(),
    ));
    let firewall_task = keeper.local.forward_rules().map(|rules| {
        let period = Duration::from_secs(args.iptables_resync.max(1));
        tokio::spawn(firewall::keep_forward_rules(rules, period))
    });
    let config_task = tokio::spawn(crate::config_watch::watch_config(
        client.clone(),
        prefix.clone(),
        config.clone(),
    ));
    let registry_task = tokio::spawn(registry.run());
    let reconcile_task = tokio::spawn(reconciler.run(peer_rx));
    let (stop_tx, stop_rx) = oneshot::channel();
    let keeper_task = tokio::spawn(keeper.run(stop_rx));
    tracing::info!("rudder is running");

    shutdown.wait().await;
    tracing::info!("shutting down");
    config_task.abort();
    refresh_task.abort();
    state_file_task.abort();
    underlay_task.abort();
    if let Some(task) = firewall_task {
        task.abort();
    }
    registry_task.abort();
    reconcile_task.abort();
    let _ = stop_tx.send(());
    let keeper = keeper_task.await.context("the lease keeper panicked")?;
    let last_subnet = *keeper.subnet_tx.borrow();
    keeper
        .finish(args.release_lease_on_exit, args.cleanup_on_exit)
        .await;
    if args.cleanup_on_exit {
        if let Err(e) = std::fs::remove_file(&state_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", state_path.display());
            }
        }
    }
    if let Some(task) = blackhole_task {
        task.abort();
        if !args.cleanup_on_exit {
            return Ok(());
        }
        if let Err(e) = netlink.remove_blackhole(last_subnet).await {
            tracing::warn!("removing the blackhole route {last_subnet}: {e:#}");
        }
    }
    Ok(())
}

/// `cleanup`: remove the data plane and the local setup (uninstall); otherwise leave what
/// keeps forwarding in the kernel for the next start to adopt.
pub(crate) async fn stop_dataplane(dp: &dyn Dataplane, local: &LocalSetup, cleanup: bool) {
    if cleanup {
        if let Err(e) = dp.shutdown() {
            tracing::warn!("stopping the data plane: {e:#}");
        }
        local.undo().await;
    } else if let Err(e) = dp.stop_keeping_state() {
        tracing::warn!("stopping the data plane: {e:#}");
    }
}

/// Sets up this host for `subnet`: local setup (bridge, rules, subnet file), then the data
/// plane, published in the status.
struct BringUp<'a> {
    args: &'a RunArgs,
    underlay: &'a crate::underlay::Underlay,
    overlay_mtu: u16,
    public_ipv6: Option<Ipv6Addr>,
    netlink: &'a Netlink,
    state: &'a State,
}

impl BringUp<'_> {
    async fn run(
        &self,
        config: &NetworkConfig,
        subnet: Ipv4Net,
        ipv6_subnet: Option<Ipv6Net>,
    ) -> anyhow::Result<(LocalSetup, Arc<dyn Dataplane>)> {
        let args = self.args;
        let local = LocalSetup::new(
            args.clone(),
            config.network,
            config.ipv6.map(|c| c.network),
            self.overlay_mtu,
            self.netlink.clone(),
        );
        local.apply(subnet, ipv6_subnet).await?;
        let opts = DataplaneOptions {
            kind: args.dataplane,
            underlay: self.underlay.clone(),
            network: config.network,
            local_subnet: subnet,
            port: config.port,
            overlay_mtu: self.overlay_mtu,
            tun_name: args.tun_name.clone(),
            tun_offload: args.tun_offload,
            bridge: args.bridge.clone(),
            ebpf_force_fail: args.ebpf_force_fail,
            bpf_pin_dir: Some(args.bpf_pin_dir.clone()),
            ipv6: config
                .ipv6
                .zip(ipv6_subnet)
                .map(|(v6, local_subnet)| dataplane::Ipv6Plane {
                    network: v6.network,
                    local_subnet,
                    public_ipv6: self.public_ipv6,
                }),
        };
        let (dp, reason) = match dataplane::create(&opts).await {
            Ok(created) => created,
            Err(e) => {
                local.undo().await;
                return Err(e);
            }
        };
        tracing::info!(dataplane = dp.kind().as_str(), "{reason}");
        self.state.update(|s| {
            s.dataplane = Some(dp.kind().as_str().to_string());
            s.dataplane_reason = Some(reason);
        });
        *self
            .state
            .dataplane
            .write()
            .expect("dataplane lock poisoned") = Some(dp.clone());
        Ok((local, dp))
    }
}

/// The config's networks, for a log line.
fn describe(c: &NetworkConfig) -> String {
    let v4 = if c.enable_ipv4 {
        format!("Network {} /{}", c.network, c.subnet_len)
    } else {
        "IPv4 off".to_string()
    };
    match &c.ipv6 {
        Some(v6) => format!("{v4}, IPv6Network {} /{}", v6.network, v6.subnet_len),
        None => format!("{v4}, IPv6 off"),
    }
}

/// A data plane brought up from the state file before etcd answered.
struct Early {
    local: LocalSetup,
    dp: Arc<dyn Dataplane>,
    refresh: tokio::task::JoinHandle<()>,
    programmed: crate::reconcile_saved::SavedPeers,
}

/// Keeps the data plane's host state current: from netlink events where it has fast paths
/// (`endpoint_watch`), and by a periodic resync.
fn follow_host_state(
    dp: &Arc<dyn Dataplane>,
    underlay: u32,
    config: &crate::config::NetworkConfig,
) -> tokio::task::JoinHandle<()> {
    let networks = crate::endpoint_watch::Networks {
        v4: config.network,
        v6: config.ipv6.as_ref().map(|v6| v6.network),
    };
    let events = dp
        .fast_path()
        .is_some()
        .then(|| crate::endpoint_watch::watch(underlay, networks));
    tokio::spawn(crate::endpoint_watch::follow_host_state(dp.clone(), events))
}

/// Reads `<prefix>/config` until it exists and is valid; every failure is logged and kept in
/// the status so `/readyz` says why, except an unreachable etcd when `!unreachable_is_error`
/// (running from the state file: traffic flows, this host is ready).
async fn load_config(
    etcd: Etcd,
    prefix: &str,
    state: &State,
    unreachable_is_error: bool,
) -> NetworkConfig {
    let key = format!("{prefix}/config");
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let problem = match etcd.client().get(key.as_str(), None).await {
            Ok(resp) => match resp.kvs().first() {
                Some(kv) => match NetworkConfig::parse(kv.value()) {
                    Ok(config) => {
                        tracing::info!(
                            network = %config.network, subnet_len = config.subnet_len,
                            subnet_min = %config.subnet_min, subnet_max = %config.subnet_max,
                            port = config.port, ipv4 = config.enable_ipv4,
                            ipv6_network = ?config.ipv6.map(|c| c.network),
                            ipv6_subnet_len = ?config.ipv6.map(|c| c.subnet_len), "network config"
                        );
                        state.update(|s| s.config_error = None);
                        return config;
                    }
                    Err(e) => format!("invalid network config at {key}: {e}"),
                },
                None => format!(
                    "no network config at {key}: write one, e.g. etcdctl put {key} '{{\"Network\":\"10.5.0.0/16\"}}'"
                ),
            },
            Err(e) => {
                etcd.failed().await;
                let problem = crate::etcd::diagnose::describe(etcd.endpoints(), &e).await;
                let problem = format!("reading {key}: {problem}");
                if !unreachable_is_error {
                    let wait = backoff.next_delay();
                    tracing::warn!("{problem}; running from the state file, retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                problem
            }
        };
        let wait = backoff.next_delay();
        tracing::error!("{problem}; retrying in {wait:?}");
        state.update(|s| s.config_error = Some(problem));
        tokio::time::sleep(wait).await;
    }
}

/// SIGTERM or SIGINT.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn new() -> anyhow::Result<Self> {
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
