//! The portable data plane: a TUN device and a UDP socket in the daemon.
//!
//! Two tasks move packets, one per direction:
//! - TUN → UDP: the kernel routes the whole overlay Network into the TUN device; each
//!   packet is validated, its destination looked up among the peer
//!   subnets (longest prefix), and sent as the payload of a UDP datagram to the peer's
//!   public address (flannel's udp backend wire format).
//! - UDP → TUN: each datagram's payload is validated, checked against the sender's lease
//!   (anti-spoofing) and our subnet, the ECN rule applied, and written into the TUN device.
//!
//! The TTL is left alone: the kernel's forwarding into the device (sender) and out of it
//! (receiver) makes both router hops of an overlay hop, and answers a TTL that runs out.
//!
//! Dual stack (issue 17): with `EnableIPv6` the device also carries the IPv6 network and
//! each packet goes by its version nibble to the IPv4 rules or to the IPv6 ones
//! ([`crate::dataplane::forwarding6`], over [`table6::PeerTable6`]). Peers that announce a
//! PublicIPv6, when we do too, are reached over a second, IPv6-only UDP socket (outer
//! IPv6, either inner family); the rest over the IPv4 socket as before. IPv4-only hosts
//! (and flannel's udp hosts) see exactly what they saw before.
//!
//! Rooms: `options` (the set-up), `device` (opening the device, netlink), `socket` (the
//! UDP sockets), `forward` (the two tasks), `deliver` (writes into the device), `table6`
//! (the IPv6 peers), `log_limit`; the per-packet decisions are the overlay's userspace
//! forwarding rules in [`crate::dataplane::forwarding`] and `forwarding6`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

mod deliver;
mod device;
mod forward;
mod log_limit;
mod options;
mod outer6;
mod socket;
mod table6;

pub use options::{TunIpv6, TunOptions, DEFAULT_DEVICE_NAME};
pub use socket::bind_overlay_socket6;
pub(crate) use socket::{OverlaySocket, UDP_BATCH};

use super::counters::{Counters, PeerCounters};
use super::forwarding::{default_device_icmp_source, ForwardingTable, IcmpSources, PublishedTable};
use super::stack_rules::UnderlayGuard;
use super::{CounterSnapshot, Dataplane, DataplaneKind, PeerStats};
use crate::subnet::gateway;
use device::{
    add_device_address, delete_link, link_index, remove_device_address, run_netlink_blocking,
    set_device_mtu,
};
use forward::Shared;
use rudder_ebpf::Counter;
use socket::OverlaySockets;
pub(crate) use table6::{overlay6, PeerTable6};

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// One installed peer: where it is, since when, and its traffic since then.
struct PeerEntry {
    public_ip: IpAddr,
    changed: std::time::SystemTime,
    traffic: Arc<PeerCounters>,
}

/// The control plane's copy of the peers and the master forwarding table.
struct PeerState {
    local_subnet: Ipv4Net,
    icmp_sources: IcmpSources,
    peers: BTreeMap<Ipv4Net, PeerEntry>,
    /// The master copy of the forwarding table, updated in place; readers get clones.
    table: ForwardingTable,
    /// The IPv6 peers (subnet → underlay address and traffic) and their table, with IPv6 on.
    peers6: BTreeMap<Ipv6Net, PeerEntry>,
    table6: Option<PeerTable6>,
    /// In a peer batch: publish once at its end (a clone per change would be O(n^2)).
    batching: bool,
}

/// The TUN data plane. See the module documentation.
pub struct TunDataplane {
    options: TunOptions,
    shared: Arc<Shared>,
    state: Mutex<PeerState>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut_down: AtomicBool,
    /// Sends are batched with `UDP_SEGMENT`.
    udp_gso: bool,
    /// Peers can be reached over IPv6 (we have the IPv6 socket).
    ipv6_underlay: bool,
    guard: Option<UnderlayGuard>,
}

/// How old the guard's counter reading may be in a status or metrics answer.
const GUARD_READING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl TunDataplane {
    /// Creates and configures the device, binds the UDP socket and starts forwarding.
    /// Must be called inside a tokio runtime (the forwarding tasks run on it).
    pub async fn start(options: TunOptions) -> anyhow::Result<Self> {
        options.validate()?;
        // Bound first: a busy port should fail the start before any device is touched.
        let socket = UdpSocket::bind(options.bind).await.with_context(|| {
            format!(
                "binding the overlay UDP socket to {} failed; is another flanneld/rudder using the port?",
                options.bind
            )
        })?;
        let socket = OverlaySocket::new(socket, options.offload)
            .context("configuring the overlay UDP socket (GSO/GRO) failed")?;
        // Link-local underlay addresses are scoped to the underlay interface.
        let underlay_index = options
            .underlay
            .as_deref()
            .and_then(|name| nix::net::if_::if_nametoindex(name).ok())
            .unwrap_or(0);
        let socket6 = match options.ipv6.as_ref().and_then(|v6| v6.bind) {
            Some(bind) => Some(
                OverlaySocket::new(
                    socket::bind_overlay_socket6(bind, underlay_index)?,
                    options.offload,
                )
                .context("configuring the IPv6 overlay UDP socket (GSO/GRO) failed")?,
            ),
            None => None,
        };

        let guard = options
            .underlay
            .as_deref()
            .filter(|_| options.carries_ipv4())
            .map(|underlay| UnderlayGuard::new(underlay, options.network));
        if let Some(guard) = &guard {
            guard.install()?;
        }
        let (device, offload) = match device::open(&options).await {
            Ok(opened) => opened,
            Err(e) => {
                if let Some(guard) = &guard {
                    let _ = guard.remove();
                }
                return Err(e);
            }
        };

        let icmp_sources = IcmpSources {
            to_peers: options.gateway,
            into_device: options.device_icmp_source,
        };
        let table = ForwardingTable::new(
            options.local_subnet,
            options.network,
            icmp_sources,
            &BTreeMap::new(),
        );
        let table6 = options
            .ipv6
            .as_ref()
            .map(|v6| PeerTable6::new(overlay6(v6.network, v6.local_subnet)));
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            table: PublishedTable::new(table.clone()),
            table6: table6.clone().map(PublishedTable::new),
            underlay_index,
            peer_port: options.bind.port(),
            mtu: usize::from(options.mtu).into(),
            offload,
        });
        let socket_gso = socket.gso();
        let sockets = Arc::new(OverlaySockets {
            v4: Arc::new(socket),
            v6: socket6.map(Arc::new),
        });
        let ipv6_underlay = sockets.v6.is_some();
        let mut tasks = vec![
            tokio::spawn(forward::tun_to_udp(
                device.clone(),
                sockets.clone(),
                shared.clone(),
            )),
            tokio::spawn(forward::udp_to_tun(
                device.clone(),
                sockets.v4.clone(),
                shared.clone(),
            )),
        ];
        if let Some(v6) = &sockets.v6 {
            tasks.push(tokio::spawn(forward::udp_to_tun(
                device,
                v6.clone(),
                shared.clone(),
            )));
        }
        tracing::info!(
            device = %options.device_name,
            subnet = %options.local_subnet,
            network = %options.network,
            mtu = options.mtu,
            bind = %options.bind,
            device_offload = offload,
            udp_gso = socket_gso,
            ipv6_subnet = ?options.ipv6.as_ref().map(|v6| v6.local_subnet),
            ipv6_underlay = ?options.ipv6.as_ref().and_then(|v6| v6.bind),
            "TUN data plane started"
        );
        Ok(TunDataplane {
            state: Mutex::new(PeerState {
                local_subnet: options.local_subnet,
                icmp_sources,
                peers: BTreeMap::new(),
                table,
                peers6: BTreeMap::new(),
                table6,
                batching: false,
            }),
            options,
            shared,
            tasks: Mutex::new(tasks),
            shut_down: AtomicBool::new(false),
            udp_gso: socket_gso,
            ipv6_underlay,
            guard,
        })
    }

    /// How the forwarding loops batch, for the status line.
    pub fn batching(&self) -> String {
        format!(
            "device offloads (TSO/USO) {}, UDP GSO {}, UDP GRO {}",
            on_off(self.shared.offload),
            on_off(self.udp_gso),
            on_off(self.options.offload)
        )
    }

    /// The options the data plane was started with (`local_subnet` and `mtu` as at start).
    pub fn options(&self) -> &TunOptions {
        &self.options
    }

    /// Adds or moves an IPv4 peer subnet, reached at `public_ip` (IPv4, or IPv6 when both
    /// ends announce a PublicIPv6).
    pub fn upsert_peer_at(&self, subnet: Ipv4Net, public_ip: IpAddr) -> anyhow::Result<()> {
        self.check_underlay(public_ip)?;
        self.update(|state| {
            let subnet = subnet.trunc();
            let previous = state.peers.get(&subnet).map(|peer| peer.public_ip);
            if previous == Some(public_ip) {
                return;
            }
            // A new place is a new peer: its counters start from zero.
            let entry = PeerEntry {
                public_ip,
                changed: std::time::SystemTime::now(),
                traffic: Arc::default(),
            };
            state
                .table
                .upsert(subnet, public_ip, previous, entry.traffic.clone());
            state.peers.insert(subnet, entry);
        });
        Ok(())
    }

    /// An IPv6 underlay address needs our IPv6 socket.
    fn check_underlay(&self, underlay: IpAddr) -> anyhow::Result<()> {
        if underlay.is_ipv6() && !self.ipv6_underlay {
            bail!("peer underlay address {underlay} is IPv6, but this host has no PublicIPv6 (no IPv6 overlay socket)");
        }
        Ok(())
    }

    /// Applies `change` to the peer state and publishes the new snapshot.
    fn update(&self, change: impl FnOnce(&mut PeerState)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut state);
        if !state.batching {
            // A clone is a few memcpys: O(n) per change, no sorting or map walks.
            self.shared.table.publish(state.table.clone());
            if let (Some(published), Some(table6)) = (&self.shared.table6, &state.table6) {
                published.publish(table6.clone());
            }
        }
    }
}

impl Dataplane for TunDataplane {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Tun
    }

    /// Moves the device address to the new subnet's network address and re-targets the
    /// receive checks. ICMP errors to peers then come from the new subnet's first host
    /// address.
    fn set_local_subnet(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        if !self.options.network.contains(&subnet) {
            bail!(
                "new local subnet {subnet} is not inside the overlay network {}; refusing to use it",
                self.options.network
            );
        }
        let old = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .local_subnet;
        if old == subnet {
            return Ok(());
        }
        let name = self.options.device_name.clone();
        run_netlink_blocking(move |handle| async move {
            let index = link_index(&handle, &name)
                .await?
                .with_context(|| format!("TUN device {name:?} disappeared"))?;
            add_device_address(&handle, index, subnet.network()).await?;
            remove_device_address(&handle, index, old.network()).await
        })?;
        self.update(|state| {
            state.local_subnet = subnet;
            state.icmp_sources.to_peers = gateway(subnet);
            if subnet.contains(&state.icmp_sources.into_device) {
                state.icmp_sources.into_device =
                    default_device_icmp_source(self.options.network, subnet);
            }
            // Rare: rebuild, since our own subnet's exclusion from forwarding moves.
            let mut table = ForwardingTable::new(
                subnet,
                self.options.network,
                state.icmp_sources,
                &BTreeMap::new(),
            );
            for (subnet, peer) in &state.peers {
                table.upsert(
                    *subnet,
                    peer.public_ip,
                    None::<IpAddr>,
                    peer.traffic.clone(),
                );
            }
            state.table = table;
        });
        Ok(())
    }

    /// The device MTU (its route has none of its own) and the forwarding checks.
    fn set_overlay_mtu(&self, overlay_mtu: u16) -> anyhow::Result<()> {
        let name = self.options.device_name.clone();
        run_netlink_blocking(move |handle| async move {
            let index = link_index(&handle, &name)
                .await?
                .with_context(|| format!("TUN device {name:?} disappeared"))?;
            set_device_mtu(&handle, index, &name, overlay_mtu).await
        })?;
        self.shared.set_mtu(usize::from(overlay_mtu));
        Ok(())
    }

    fn upsert_peer(&self, subnet: Ipv4Net, underlay: IpAddr) -> anyhow::Result<()> {
        self.upsert_peer_at(subnet, underlay)
    }

    fn begin_peer_batch(&self) {
        self.update(|state| state.batching = true);
    }

    fn end_peer_batch(&self) {
        self.update(|state| state.batching = false);
    }

    fn remove_peer(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        self.update(|state| {
            let subnet = subnet.trunc();
            if let Some(previous) = state.peers.remove(&subnet) {
                state.table.remove(subnet, previous.public_ip);
            }
        });
        Ok(())
    }

    /// Moves the device's IPv6 address to the new IPv6 subnet's network address and
    /// re-targets the IPv6 receive checks.
    fn set_local_subnet6(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        let Some(v6) = &self.options.ipv6 else {
            bail!("this TUN data plane was started without IPv6; restart it with the IPv6 network");
        };
        let network = v6.network;
        if !network.contains(&subnet) {
            bail!("new local IPv6 subnet {subnet} is not inside the IPv6 network {network}; refusing to use it");
        }
        let old = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.table6.as_ref().map(|t| t.overlay.local_subnet)
        };
        if old == Some(subnet) {
            return Ok(());
        }
        let name = self.options.device_name.clone();
        run_netlink_blocking(move |handle| async move {
            let index = link_index(&handle, &name)
                .await?
                .with_context(|| format!("TUN device {name:?} disappeared"))?;
            crate::host_ipv6::add_ipv6_address(&handle, index, subnet.network(), 128).await?;
            match old {
                Some(old) => {
                    crate::host_ipv6::remove_ipv6_address(&handle, index, old.network()).await
                }
                None => Ok(()),
            }
        })?;
        self.update(|state| {
            // Rare: rebuild, since our own subnet's exclusion from forwarding moves.
            let mut table = PeerTable6::new(overlay6(network, subnet));
            for (peer_subnet, peer) in &state.peers6 {
                table.upsert(*peer_subnet, peer.public_ip, None, peer.traffic.clone());
            }
            state.table6 = Some(table);
        });
        Ok(())
    }

    /// Adds or moves the IPv6 subnet of a peer reached at `underlay`.
    fn upsert_peer6(&self, subnet: Ipv6Net, underlay: IpAddr) -> anyhow::Result<()> {
        if self.options.ipv6.is_none() {
            bail!("this TUN data plane was started without IPv6; an IPv6 peer cannot be added");
        }
        self.check_underlay(underlay)?;
        self.update(|state| {
            let subnet = subnet.trunc();
            let previous = state.peers6.get(&subnet).map(|peer| peer.public_ip);
            if previous == Some(underlay) {
                return;
            }
            // A new place is a new peer: its counters start from zero (as for IPv4).
            let entry = PeerEntry {
                public_ip: underlay,
                changed: std::time::SystemTime::now(),
                traffic: Arc::default(),
            };
            if let Some(table) = &mut state.table6 {
                table.upsert(subnet, underlay, previous, entry.traffic.clone());
            }
            state.peers6.insert(subnet, entry);
        });
        Ok(())
    }

    /// Removes a peer's IPv6 subnet.
    fn remove_peer6(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        self.update(|state| {
            let subnet = subnet.trunc();
            if let Some(previous) = state.peers6.remove(&subnet) {
                if let Some(table) = &mut state.table6 {
                    table.remove(subnet, previous.public_ip);
                }
            }
        });
        Ok(())
    }

    fn counters(&self) -> CounterSnapshot {
        let mut snapshot = self.shared.counters.snapshot();
        if let Some(guard) = &self.guard {
            snapshot[Counter::DropUnencapsulated.index()] += guard.counts(GUARD_READING_MAX_AGE).0;
        }
        snapshot
    }

    fn byte_counters(&self) -> CounterSnapshot {
        let mut snapshot = self.shared.counters.bytes_snapshot();
        if let Some(guard) = &self.guard {
            snapshot[Counter::DropUnencapsulated.index()] += guard.counts(GUARD_READING_MAX_AGE).1;
        }
        snapshot
    }

    /// Re-installs the unencapsulated-packet drop if someone flushed it (checked every 5 s).
    fn refresh_host_state(&self) -> anyhow::Result<()> {
        if let Some(guard) = &self.guard {
            guard.counts(std::time::Duration::from_secs(5));
        }
        Ok(())
    }

    fn peer_stats(&self) -> Vec<PeerStats> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let stats = |subnet: IpNet, peer: &PeerEntry| PeerStats {
            subnet,
            public_ip: peer.public_ip,
            changed: peer.changed,
            traffic: peer.traffic.snapshot(),
        };
        let ipv4 = state.peers.iter().map(|(s, p)| stats((*s).into(), p));
        let ipv6 = state.peers6.iter().map(|(s, p)| stats((*s).into(), p));
        ipv4.chain(ipv6).collect()
    }

    /// Stops both tasks and deletes the device, which takes its address and route with
    /// it. Blocks briefly on a netlink request in a helper thread (the trait is sync).
    fn shutdown(&self) -> anyhow::Result<()> {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        // The aborted tasks drop their device handles asynchronously; deleting the link
        // now makes the removal immediate and certain.
        let name = self.options.device_name.clone();
        run_netlink_blocking(move |handle| async move {
            if let Some(index) = link_index(&handle, &name).await? {
                delete_link(&handle, index, &name).await?;
            }
            Ok(())
        })?;
        if let Some(guard) = &self.guard {
            guard
                .remove()
                .context("removing the unencapsulated-packet drop")?;
        }
        tracing::info!(device = %self.options.device_name, "TUN data plane stopped");
        Ok(())
    }
}

impl Drop for TunDataplane {
    fn drop(&mut self) {
        // Without an explicit shutdown, at least stop the tasks: closing the last device
        // descriptor then removes the (non-persistent) device.
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

#[cfg(test)]
mod device6_tests;
#[cfg(test)]
pub(crate) mod device_tests;
#[cfg(test)]
mod outer6_tests;
