//! The eBPF data plane's socket path, for the overlay datagrams BPF cannot take.
//!
//! A peer on the TUN data plane sends runs of datagrams with one `UDP_SEGMENT` send. A
//! physical NIC cuts them apart on the wire, but a virtual link (veth, as between
//! containers or in kind-style clusters) hands the receiver the whole train as one
//! buffer, and no BPF helper can split it. The ingress program passes such trains up the
//! stack (counted `to_daemon`) to a plain UDP socket on the overlay port, where the kernel
//! splits them; here each datagram gets the same checks as on the TUN path
//! ([`decide_inbound`](crate::dataplane::forwarding::decide_inbound) or
//! [`decide_inbound6`](crate::dataplane::forwarding6::decide_inbound6), by the inner
//! version) and its inner packet re-enters the stack through a raw IP socket of its family,
//! which routes it to the container. Slower than the BPF path, but nothing is lost.
//!
//! Both outer families: one socket on our IPv4 address and, on a host with a PublicIPv6,
//! a second IPv6-only one on it (as the TUN plane's sockets). Either carries either inner
//! family. The receive loop is `socket_path_receive.rs`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use ipnet::{Ipv4Net, Ipv6Net};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::dataplane::counters::{CounterSnapshot, Counters, PeerTraffic};
use crate::dataplane::forwarding::{default_device_icmp_source, ForwardingTable, IcmpSources};
use crate::dataplane::tun::{bind_overlay_socket6, overlay6, OverlaySocket, PeerTable6};
use crate::dataplane::Ipv6Plane;
use crate::subnet::gateway;

#[path = "socket_path_receive.rs"]
mod receive;

/// Where the socket path listens and what it forwards for.
#[derive(Clone, Copy, Debug)]
pub struct SocketPathConfig {
    /// Our underlay IPv4 address and the overlay port.
    pub local: SocketAddrV4,
    pub local_subnet: Ipv4Net,
    pub network: Ipv4Net,
    /// The overlay's IPv6 side, when the network has it on.
    pub ipv6: Option<Ipv6Plane>,
    /// The underlay interface: the scope of a link-local PublicIPv6.
    pub underlay_index: u32,
}

/// What the socket path shares with the data plane handle.
pub struct SocketPath {
    table: Mutex<ForwardingTable>,
    /// `None` while the network has IPv6 off: IPv6 inner packets are then dropped.
    table6: Mutex<Option<PeerTable6>>,
    counters: Counters,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The raw sockets decapsulated packets re-enter the stack through (the header included:
/// `IPPROTO_RAW` sets `IP_HDRINCL`, and on AF_INET6 the kernel's `hdrincl` as well).
pub(super) struct Reinjection {
    v4: OwnedFd,
    v6: Option<OwnedFd>,
}

fn raw_socket(family: AddressFamily) -> anyhow::Result<OwnedFd> {
    socket(
        family,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::Raw,
    )
    .with_context(|| {
        format!("opening a raw {family:?} socket (to re-inject decapsulated packets) failed")
    })
}

impl SocketPath {
    /// Binds the overlay port (per outer family) and starts a receive task per socket with
    /// `peers` installed. Must run inside tokio.
    pub async fn start(
        config: SocketPathConfig,
        peers: &BTreeMap<Ipv4Net, Ipv4Addr>,
    ) -> anyhow::Result<Arc<Self>> {
        let local = config.local;
        // Our own address, as the TUN path: what it sends (ICMP errors) leaves from it.
        let udp = UdpSocket::bind(local).await.with_context(|| {
            format!("binding the overlay UDP socket to {local} failed; is another flanneld/rudder using the port?")
        })?;
        let udp6 = match config.ipv6.and_then(|plane| plane.public_ipv6) {
            Some(ip) => Some(bind_overlay_socket6(
                SocketAddrV6::new(ip, local.port(), 0, 0),
                config.underlay_index,
            )?),
            None => None,
        };
        let reinjection = Arc::new(Reinjection {
            v4: raw_socket(AddressFamily::Inet)?,
            v6: match config.ipv6 {
                Some(_) => Some(raw_socket(AddressFamily::Inet6)?),
                None => None,
            },
        });
        let path = Arc::new(SocketPath {
            table: Mutex::new(ForwardingTable::new(
                config.local_subnet,
                config.network,
                icmp_sources(config.local_subnet, config.network),
                peers,
            )),
            table6: Mutex::new(
                config
                    .ipv6
                    .map(|plane| PeerTable6::new(overlay6(plane.network, plane.local_subnet))),
            ),
            counters: Counters::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        for udp in std::iter::once(udp).chain(udp6) {
            // quinn-udp's receive reports the outer ECN field (IP_RECVTOS/IPV6_RECVTCLASS);
            // no GRO here: the kernel splits trains for this socket.
            let udp = OverlaySocket::new(udp, false)
                .context("setting up an overlay UDP socket of the socket path failed")?;
            tasks.push(tokio::spawn(receive::receive(
                udp,
                local.port(),
                reinjection.clone(),
                path.clone(),
            )));
        }
        *path.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        Ok(path)
    }

    /// An IPv4 subnet at `public_ip` (either family: an IPv4 subnet may be reached over
    /// IPv6), replacing the entry that had it at `previous`.
    pub fn upsert_peer(&self, subnet: Ipv4Net, public_ip: IpAddr, previous: Option<IpAddr>) {
        if previous != Some(public_ip) {
            self.table()
                .upsert(subnet, public_ip, previous, Arc::default());
        }
    }

    pub fn remove_peer(&self, subnet: Ipv4Net, public_ip: IpAddr) {
        self.table().remove(subnet, public_ip);
    }

    /// Rebuilds the table around a new own subnet (rare).
    pub fn set_local_subnet(
        &self,
        local_subnet: Ipv4Net,
        network: Ipv4Net,
        peers: &BTreeMap<Ipv4Net, Ipv4Addr>,
        peers_over6: impl IntoIterator<Item = (Ipv4Net, IpAddr)>,
    ) {
        let mut table = ForwardingTable::new(
            local_subnet,
            network,
            icmp_sources(local_subnet, network),
            peers,
        );
        for (subnet, underlay) in peers_over6 {
            table.upsert(subnet, underlay, None::<IpAddr>, Arc::default());
        }
        *self.table() = table;
    }

    /// An IPv6 subnet at `underlay` (either family), replacing the entry at `previous`.
    pub fn upsert_peer6(&self, subnet: Ipv6Net, underlay: IpAddr, previous: Option<IpAddr>) {
        if previous == Some(underlay) {
            return;
        }
        if let Some(table) = self.table6().as_mut() {
            // (What this path decapsulates for IPv6 peers is not in their per-peer traffic.)
            table.upsert(subnet, underlay, previous, Arc::default());
        }
    }

    pub fn remove_peer6(&self, subnet: Ipv6Net, underlay: IpAddr) {
        if let Some(table) = self.table6().as_mut() {
            table.remove(subnet, underlay);
        }
    }

    /// Rebuilds the IPv6 table around a new own IPv6 subnet (rare: our own subnet's
    /// exclusion from the routes moves).
    pub fn set_local_subnet6(
        &self,
        plane: Ipv6Plane,
        peers6: impl IntoIterator<Item = (Ipv6Net, IpAddr)>,
    ) {
        let mut table = PeerTable6::new(overlay6(plane.network, plane.local_subnet));
        for (subnet, underlay) in peers6 {
            table.upsert(subnet, underlay, None, Arc::default());
        }
        *self.table6() = Some(table);
    }

    /// Traffic received from `subnet` on this path.
    pub fn traffic(&self, subnet: Ipv4Net) -> PeerTraffic {
        let table = self.table();
        table
            .slot_of(subnet.network())
            .map(|slot| table.traffic(slot).snapshot())
            .unwrap_or_default()
    }

    pub fn packets(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    pub fn bytes(&self) -> CounterSnapshot {
        self.counters.bytes_snapshot()
    }

    pub fn stop(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    fn table(&self) -> MutexGuard<'_, ForwardingTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn table6(&self) -> MutexGuard<'_, Option<PeerTable6>> {
        self.table6.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        self.stop();
    }
}

fn icmp_sources(local_subnet: Ipv4Net, network: Ipv4Net) -> IcmpSources {
    IcmpSources {
        to_peers: gateway(local_subnet),
        into_device: default_device_icmp_source(network, local_subnet),
    }
}

#[cfg(test)]
#[path = "socket_path_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "socket_path_tests6.rs"]
mod tests6;
