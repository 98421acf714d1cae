//! The eBPF data plane's socket path, for the overlay datagrams BPF cannot take.
//!
//! A peer on the TUN data plane sends runs of datagrams with one `UDP_SEGMENT` send. A
//! physical NIC cuts them apart on the wire, but a virtual link (veth, as between
//! containers or in kind-style clusters) hands the receiver the whole train as one
//! buffer, and no BPF helper can split it. The ingress program passes such trains up the
//! stack (counted `to_daemon`) to a plain UDP socket on the overlay port, where the kernel
//! splits them; here each datagram gets the same checks as on the TUN path
//! ([`decide_inbound`]) and its inner packet re-enters the stack through a raw IP socket,
//! which routes it to the container. Slower than the BPF path, but nothing is lost.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use ipnet::Ipv4Net;
use nix::sys::socket::{
    sendmmsg, socket, AddressFamily, MsgFlags, MultiHeaders, SockFlag, SockProtocol, SockType,
    SockaddrIn,
};
use rudder_ebpf::Counter;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::dataplane::counters::{CounterSnapshot, Counters, PeerTraffic};
use crate::dataplane::forwarding::{
    decide_inbound, default_device_icmp_source, ForwardingTable, IcmpRateLimit, IcmpSources,
    Inbound, ReceiverHop,
};
use crate::dataplane::tun::{OverlaySocket, UDP_BATCH};
use crate::packet::ICMP_ERROR_MAX_LEN;
use crate::subnet::gateway;

/// What the socket path shares with the data plane handle.
pub struct SocketPath {
    table: Mutex<ForwardingTable>,
    counters: Counters,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SocketPath {
    /// Binds the overlay port and starts the receive task with `peers` installed. Must
    /// run inside tokio.
    pub async fn start(
        local: SocketAddrV4,
        local_subnet: Ipv4Net,
        network: Ipv4Net,
        peers: &BTreeMap<Ipv4Net, Ipv4Addr>,
    ) -> anyhow::Result<Arc<Self>> {
        // Our own address, as the TUN path: what it sends (ICMP errors) leaves from it.
        let udp = UdpSocket::bind(local).await.with_context(|| {
            format!("binding the overlay UDP socket to {local} failed; is another flanneld/rudder using the port?")
        })?;
        let raw = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::Raw,
        )
        .context("opening a raw IP socket (to re-inject decapsulated packets) failed")?;
        let path = Arc::new(SocketPath {
            table: Mutex::new(ForwardingTable::new(
                local_subnet,
                network,
                icmp_sources(local_subnet, network),
                peers,
            )),
            counters: Counters::default(),
            task: Mutex::new(None),
        });
        // quinn-udp's receive reports the outer ECN field (IP_RECVTOS); no GRO here: the
        // kernel splits trains for this socket.
        let udp = OverlaySocket::new(udp, false)
            .context("setting up the overlay UDP socket of the socket path failed")?;
        let task = tokio::spawn(receive(udp, local.port(), raw, path.clone()));
        *path.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(path)
    }

    pub fn upsert_peer(&self, subnet: Ipv4Net, public_ip: Ipv4Addr, previous: Option<Ipv4Addr>) {
        if previous != Some(public_ip) {
            self.table()
                .upsert(subnet, public_ip, previous, Arc::default());
        }
    }

    pub fn remove_peer(&self, subnet: Ipv4Net, public_ip: Ipv4Addr) {
        self.table().remove(subnet, public_ip);
    }

    /// Rebuilds the table around a new own subnet (rare).
    pub fn set_local_subnet(
        &self,
        local_subnet: Ipv4Net,
        network: Ipv4Net,
        peers: &BTreeMap<Ipv4Net, Ipv4Addr>,
    ) {
        *self.table() = ForwardingTable::new(
            local_subnet,
            network,
            icmp_sources(local_subnet, network),
            peers,
        );
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
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ForwardingTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
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

async fn receive(socket: OverlaySocket, peer_port: u16, raw: OwnedFd, path: Arc<SocketPath>) {
    // Up to UDP_BATCH datagrams per `recvmmsg`, their inner packets re-injected with one
    // `sendmmsg`: a TUN peer's trains arrive here split, one datagram per packet.
    let mut buffers = vec![vec![0u8; 65_535]; UDP_BATCH];
    let mut metas = [quinn_udp::RecvMeta::default(); UDP_BATCH];
    let mut icmp = [0u8; ICMP_ERROR_MAX_LEN];
    let mut icmp_limit = IcmpRateLimit::new(Instant::now());
    loop {
        let messages = match socket.recv(&mut buffers, &mut metas).await {
            Ok(messages) => messages,
            Err(error) => {
                path.counters.add(Counter::DropIoError, 0);
                tracing::debug!("overlay socket receive failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        // (buffer index, inner packet length) of each packet to re-inject, in order.
        let mut deliver = [(0usize, 0usize); UDP_BATCH];
        let mut delivering = 0;
        for (index, (buf, meta)) in buffers.iter_mut().zip(&metas).take(messages).enumerate() {
            let (n, from) = (meta.len, meta.addr);
            let outer_tos = meta.ecn.map_or(0, |ecn| ecn as u8);
            let IpAddr::V4(sender) = from.ip() else {
                path.counters.add(Counter::DropUnknownSender, n);
                continue;
            };
            let verdict = {
                let table = path.table();
                // The raw socket's output is not forwarded, so the rules make this host's hop.
                let hop = ReceiverHop::Rules;
                let verdict =
                    decide_inbound(&mut buf[..n], sender, outer_tos, &table, hop, &mut icmp);
                if let Inbound::Deliver {
                    len,
                    from: Some(slot),
                } = verdict
                {
                    table.traffic(slot).add_rx(1, len);
                }
                verdict
            };
            match verdict {
                Inbound::Deliver { len, .. } => {
                    // Re-injected through a raw socket: the kernel will not finish a checksum
                    // the sender's kernel left partial.
                    if let Ok(view) = crate::packet::parse_ipv4(&buf[..len]) {
                        crate::packet::complete_partial_checksum(&mut buf[..len], &view);
                    }
                    deliver[delivering] = (index, len);
                    delivering += 1;
                }
                Inbound::Drop { reason, icmp_len } => {
                    path.counters.add(reason, n);
                    let Some(len) = icmp_len else { continue };
                    if !icmp_limit.allow(Instant::now()) {
                        path.counters.add(Counter::IcmpRateLimited, len);
                        continue;
                    }
                    // To the peer's overlay port: an eBPF peer sends from a flow-hash port.
                    let to = SocketAddrV4::new(sender, peer_port);
                    if let Err(error) = socket.socket.send_to(&icmp[..len], to).await {
                        tracing::debug!(%to, "sending an ICMP error to a peer failed: {error}");
                    }
                }
            }
        }
        let packets = deliver[..delivering]
            .iter()
            .map(|&(index, len)| &buffers[index][..len]);
        reinject(&raw, packets, &path.counters);
    }
}

/// Sends decapsulated IPv4 packets into the stack through the raw socket, all in one
/// `sendmmsg`; each is counted `decapsulated`, or `io_error` when the kernel refused it.
fn reinject<'a>(raw: &OwnedFd, packets: impl Iterator<Item = &'a [u8]>, counters: &Counters) {
    // Not kept across batches: it holds raw pointers, and the receive task must be `Send`.
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(UDP_BATCH, None);
    let mut slices = Vec::with_capacity(UDP_BATCH);
    let mut destinations = Vec::with_capacity(UDP_BATCH);
    for packet in packets {
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        destinations.push(Some(SockaddrIn::from(SocketAddrV4::new(dst, 0))));
        slices.push([IoSlice::new(packet)]);
    }
    if slices.is_empty() {
        return;
    }
    let sent = match sendmmsg(
        raw.as_raw_fd(),
        &mut headers,
        &slices,
        &destinations,
        [],
        MsgFlags::empty(),
    ) {
        Ok(results) => results.count(),
        Err(error) => {
            tracing::debug!("re-injecting decapsulated packets failed: {error}");
            0
        }
    };
    for (index, [slice]) in slices.iter().enumerate() {
        let len = slice.len();
        if index < sent {
            counters.add(Counter::Decapsulated, len);
        } else {
            counters.add(Counter::DropIoError, len);
        }
    }
}

#[cfg(test)]
#[path = "socket_path_tests.rs"]
mod tests;
