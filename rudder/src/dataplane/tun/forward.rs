//! The TUN data plane's two forwarding loops, batched at both ends.
//!
//! - TUN → UDP: one read returns what the kernel handed the device. With offload on
//!   (`IFF_VNET_HDR` + TSO/USO) that is a whole 64 KB GSO packet, which tun-rs cuts into
//!   MTU-sized IP packets with their checksums completed. Each goes through
//!   [`decide_outbound`]; consecutive packets for the same peer and of the same size (the
//!   last may be shorter) are copied into one buffer and sent with a single `sendmsg` and
//!   `UDP_SEGMENT`, so the kernel cuts them into ordinary datagrams, one per inner packet.
//! - UDP → TUN: one `recvmmsg` returns up to [`UDP_BATCH`] messages; with `UDP_GRO` on,
//!   each may hold up to 64 datagrams of equal size back to back. Each datagram goes
//!   through [`decide_inbound`]; the delivered packets are written with tun-rs's
//!   `send_multiple`, which coalesces the segments of a TCP/UDP flow into one GSO packet
//!   (one write, one trip through the stack) when offload is on.
//!
//! The wire format does not change: what leaves the host is one IP-in-UDP datagram per
//! inner packet, so a peer without offload (or an eBPF peer) reads it as before.
//! Buffers are allocated once per task; nothing is allocated per packet.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::{EcnCodepoint, RecvMeta, Transmit};
use rudder_ebpf::Counter;
use tun_rs::{AsyncDevice, VIRTIO_NET_HDR_LEN};

use super::deliver::DeviceWriter;
use super::log_limit::TaskLogs;
use super::outer6::OuterFlow6;
use super::socket::{OverlaySocket, OverlaySockets, UDP_BATCH};
use super::table6::PeerTable6;
use crate::dataplane::counters::{Counters, PeerCounters};
use crate::dataplane::forwarding::{
    decide_inbound, decide_outbound, IcmpRateLimit, Inbound, Outbound, PublishedTable, ReceiverHop,
};
use crate::dataplane::forwarding6::{decide_inbound6, decide_outbound6, Inbound6, Outbound6};
use crate::packet::{ECN_MASK, ICMP_ERROR_MAX_LEN};
use crate::packet6::inner_traffic_class;
use crate::packet6_icmp::ICMP6_ERROR_MAX_LEN;

/// Largest IP packet: the receive buffers hold any datagram the kernel can hand us.
pub(super) const MAX_PACKET_LEN: usize = 65_535;

/// Pause after a failed device/socket receive, so a persistent error cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Segments one device read can yield: a 64 KB GSO packet at the smallest MSS the
/// kernel allows, with room to spare.
const SEGMENTS_PER_READ: usize = 128;

/// Device reads gathered before the batch is sent: bounds the delay a packet can wait
/// for later ones (each read is non-blocking after the first).
const READS_PER_FLUSH: usize = 32;

/// Largest UDP payload of one `UDP_SEGMENT` send: the IPv4 length limit minus headers.
const MAX_GSO_PAYLOAD: usize = 65_535 - 20 - 8;

/// State shared between the data plane handle and its tasks.
pub(super) struct Shared {
    pub(super) counters: Counters,
    pub(super) table: PublishedTable,
    /// The IPv6 peers, when the network has IPv6 on.
    pub(super) table6: Option<PublishedTable<PeerTable6>>,
    /// The underlay interface's index: the scope of link-local peer addresses.
    pub(super) underlay_index: u32,
    /// Port every peer listens on (ours too).
    pub(super) peer_port: u16,
    /// The device's MTU; follows the underlay's ([`Shared::set_mtu`]).
    pub(super) mtu: AtomicUsize,
    /// The device was opened with `IFF_VNET_HDR` and offloads.
    pub(super) offload: bool,
}

impl Shared {
    pub(super) fn mtu(&self) -> usize {
        self.mtu.load(Ordering::Relaxed)
    }

    pub(super) fn set_mtu(&self, mtu: usize) {
        self.mtu.store(mtu, Ordering::Relaxed);
    }
}

/// Inner packets waiting to leave for one peer in one `UDP_SEGMENT` send.
struct GsoBatch {
    buffer: Vec<u8>,
    /// The peer and the traffic counters of its subnet.
    peer: Option<(IpAddr, Option<Arc<PeerCounters>>)>,
    /// ECN field of every queued packet, copied to the outer header (RFC 6040).
    ecn: u8,
    /// To an IPv6 peer: the outer traffic class and flow label of every queued packet.
    outer6: Option<OuterFlow6>,
    segment_len: usize,
    segments: usize,
    /// A shorter segment ends a batch: only the last one may be short.
    closed: bool,
}

fn same_counters(a: &Option<Arc<PeerCounters>>, b: Option<&Arc<PeerCounters>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// The ECN field of an inner packet of either family.
fn inner_ecn(packet: &[u8]) -> u8 {
    inner_traffic_class(packet).unwrap_or(0) & ECN_MASK
}

impl GsoBatch {
    fn new() -> Self {
        GsoBatch {
            buffer: Vec::with_capacity(MAX_GSO_PAYLOAD),
            peer: None,
            ecn: 0,
            outer6: None,
            segment_len: 0,
            segments: 0,
            closed: false,
        }
    }

    fn accepts(
        &self,
        peer: IpAddr,
        traffic: Option<&Arc<PeerCounters>>,
        ecn: u8,
        outer6: Option<OuterFlow6>,
        len: usize,
        max_segments: usize,
    ) -> bool {
        match &self.peer {
            None => true,
            Some((current, current_traffic)) => {
                *current == peer
                    && same_counters(current_traffic, traffic)
                    && self.ecn == ecn
                    && self.outer6 == outer6
                    && !self.closed
                    && len <= self.segment_len
                    && self.segments < max_segments
                    && self.buffer.len() + len <= MAX_GSO_PAYLOAD
            }
        }
    }

    fn push(
        &mut self,
        peer: IpAddr,
        traffic: Option<&Arc<PeerCounters>>,
        outer6: Option<OuterFlow6>,
        packet: &[u8],
    ) {
        if self.peer.is_none() {
            self.peer = Some((peer, traffic.cloned()));
            self.ecn = inner_ecn(packet);
            self.outer6 = outer6;
            self.segment_len = packet.len();
        } else if packet.len() < self.segment_len {
            self.closed = true;
        }
        self.buffer.extend_from_slice(packet);
        self.segments += 1;
    }

    /// Sends what is queued, counts it, and empties the batch.
    async fn flush(&mut self, sockets: &OverlaySockets, shared: &Shared, logs: &mut TaskLogs) {
        let Some((peer, traffic)) = self.peer.take() else {
            return;
        };
        let segment_size = (self.segments > 1).then_some(self.segment_len);
        let bytes = self.buffer.len();
        let sent = match (sockets.for_peer(peer), peer_address(peer, shared)) {
            (Some(socket), SocketAddr::V6(mut to)) => {
                let outer = self.outer6.unwrap_or_else(|| OuterFlow6::of(&self.buffer));
                to.set_flowinfo(outer.flow_label);
                let class = outer.traffic_class;
                socket.send6(&self.buffer, to, class, segment_size).await
            }
            (Some(socket), destination) => {
                let transmit = Transmit {
                    destination,
                    ecn: EcnCodepoint::from_bits(self.ecn),
                    contents: &self.buffer,
                    segment_size,
                    src_ip: None,
                };
                socket.send(&transmit).await
            }
            // upsert_peer refuses an IPv6 peer without an IPv6 socket: never here.
            (None, _) => Err(std::io::ErrorKind::AddrNotAvailable.into()),
        };
        match sent {
            Ok(()) => {
                shared
                    .counters
                    .add_many(Counter::Encapsulated, self.segments, bytes);
                if let Some(traffic) = traffic {
                    traffic.add_tx(self.segments, bytes);
                }
            }
            Err(error) => {
                shared
                    .counters
                    .add_many(Counter::DropIoError, self.segments, bytes);
                logs.io("sending to a peer", &error);
            }
        }
        self.buffer.clear();
        self.segments = 0;
        self.closed = false;
    }
}

/// Where a peer's datagrams go: its overlay port, a link-local address on the underlay.
fn peer_address(peer: IpAddr, shared: &Shared) -> SocketAddr {
    match peer {
        IpAddr::V6(ip) if crate::packet6::is_link_local(ip) => SocketAddr::V6(SocketAddrV6::new(
            ip,
            shared.peer_port,
            0,
            shared.underlay_index,
        )),
        _ => SocketAddr::new(peer, shared.peer_port),
    }
}

/// Writes one packet we originated (an ICMP error) into the device.
async fn write_single(
    device: &AsyncDevice,
    vnet_header: bool,
    packet: &[u8],
    scratch: &mut Vec<u8>,
) -> std::io::Result<usize> {
    scratch.clear();
    if vnet_header {
        // All zero: no GSO, no checksum to complete.
        scratch.resize(VIRTIO_NET_HDR_LEN, 0);
    }
    scratch.extend_from_slice(packet);
    device.send(scratch).await
}

/// What the rules made of one packet read from the device.
enum Verdict<'a> {
    Send {
        len: usize,
        peer: IpAddr,
        traffic: Option<&'a Arc<PeerCounters>>,
    },
    Drop {
        reason: Counter,
        /// An ICMP (v4 or v6) error to write back into the device.
        icmp: Option<&'a [u8]>,
    },
}

/// TUN → UDP forwarding loop.
pub async fn tun_to_udp(
    device: Arc<AsyncDevice>,
    sockets: Arc<OverlaySockets>,
    shared: Arc<Shared>,
) {
    let vnet_header = shared.offload;
    let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET_LEN];
    // Without offload a read returns one packet of at most the MTU, straight into slot 0.
    let slot_len = if vnet_header {
        shared.mtu()
    } else {
        MAX_PACKET_LEN
    };
    let slots = if vnet_header { SEGMENTS_PER_READ } else { 1 };
    let mut packets = vec![vec![0u8; slot_len]; slots];
    let mut sizes = vec![0usize; slots];
    let mut icmp = [0u8; ICMP_ERROR_MAX_LEN];
    let mut icmp6 = [0u8; ICMP6_ERROR_MAX_LEN];
    let mut scratch = Vec::with_capacity(VIRTIO_NET_HDR_LEN + ICMP6_ERROR_MAX_LEN);
    let mut batch = GsoBatch::new();
    let mut reader = shared.table.reader();
    let mut reader6 = shared.table6.as_ref().map(PublishedTable::reader);
    let mut logs = TaskLogs::new();
    let mut icmp_limit = IcmpRateLimit::new(Instant::now());
    loop {
        // A larger underlay MTU at run time: segments of the new size must fit.
        if vnet_header && packets[0].len() < shared.mtu() {
            let mtu = shared.mtu();
            packets.iter_mut().for_each(|p| p.resize(mtu, 0));
        }
        let mut count = match device
            .recv_multiple(&mut raw, &mut packets, &mut sizes, 0)
            .await
        {
            Ok(count) => count,
            Err(error) => {
                shared.counters.add(Counter::DropIoError, 0);
                logs.io("reading from the TUN device", &error);
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        // Keep reading what is already queued before sending, so that small packets
        // (ACKs, a UDP flood) also leave in batches; a few reads, then flush.
        for read in 0..READS_PER_FLUSH {
            for (packet, &size) in packets.iter_mut().zip(&sizes).take(count) {
                let table = reader.current(&shared.table);
                let table6 = match (&mut reader6, &shared.table6) {
                    (Some(reader6), Some(published)) => Some(reader6.current(published)),
                    _ => None,
                };
                let packet = &mut packet[..size];
                let verdict = match (packet.first().map(|b| b >> 4), table6) {
                    (Some(6), Some(table6)) => {
                        let overlay = &table6.overlay;
                        match decide_outbound6(packet, overlay, table6, shared.mtu(), &mut icmp6) {
                            Outbound6::Encapsulate { len, peer } => Verdict::Send {
                                len,
                                peer: peer.underlay,
                                traffic: Some(table6.traffic(peer)),
                            },
                            Outbound6::Drop { reason, icmp_len } => Verdict::Drop {
                                reason,
                                icmp: icmp_len.map(|len| &icmp6[..len]),
                            },
                        }
                    }
                    _ => match decide_outbound(packet, table, shared.mtu(), &mut icmp) {
                        Outbound::Encapsulate { len, peer, slot } => Verdict::Send {
                            len,
                            peer,
                            traffic: Some(table.traffic(slot)),
                        },
                        Outbound::Drop { reason, icmp_len } => Verdict::Drop {
                            reason,
                            icmp: icmp_len.map(|len| &icmp[..len]),
                        },
                    },
                };
                match verdict {
                    Verdict::Send { len, peer, traffic } => {
                        let packet = &packet[..len];
                        let ecn = inner_ecn(packet);
                        // Either family, inner and outer: an eBPF peer hands a train it
                        // cannot split to its socket path, which takes all four.
                        let max_segments = sockets.for_peer(peer).map_or(1, |s| s.gso_segments);
                        // A train leaves with one outer header: one flow label, one class.
                        let outer6 = peer.is_ipv6().then(|| OuterFlow6::of(packet));
                        if !batch.accepts(peer, traffic, ecn, outer6, len, max_segments) {
                            batch.flush(&sockets, &shared, &mut logs).await;
                        }
                        batch.push(peer, traffic, outer6, packet);
                    }
                    Verdict::Drop { reason, icmp } => {
                        shared.counters.add(reason, size);
                        logs.dropped(
                            "tun->udp",
                            reason,
                            format_args!("{size} bytes from the TUN device"),
                        );
                        if let Some(icmp) = icmp {
                            if !icmp_limit.allow(Instant::now()) {
                                shared.counters.add(Counter::IcmpRateLimited, icmp.len());
                                continue;
                            }
                            if let Err(error) =
                                write_single(&device, vnet_header, icmp, &mut scratch).await
                            {
                                logs.io("writing an ICMP error into the TUN device", &error);
                            }
                        }
                    }
                }
            }
            if read + 1 == READS_PER_FLUSH {
                break;
            }
            count = match device.try_recv_multiple(&mut raw, &mut packets, &mut sizes, 0) {
                Ok(count) => count,
                // Nothing queued (WouldBlock) or an error the next blocking read reports.
                Err(_) => break,
            };
        }
        batch.flush(&sockets, &shared, &mut logs).await;
    }
}

/// UDP → TUN forwarding loop for one overlay socket (one runs per outer family).
pub async fn udp_to_tun(device: Arc<AsyncDevice>, socket: Arc<OverlaySocket>, shared: Arc<Shared>) {
    let mut received = vec![vec![0u8; MAX_PACKET_LEN]; UDP_BATCH];
    let mut metas = [RecvMeta::default(); UDP_BATCH];
    let mut writer = DeviceWriter::new(device);
    let mut icmp = [0u8; ICMP_ERROR_MAX_LEN];
    let mut icmp6 = [0u8; ICMP6_ERROR_MAX_LEN];
    let mut reader = shared.table.reader();
    let mut reader6 = shared.table6.as_ref().map(PublishedTable::reader);
    let mut logs = TaskLogs::new();
    loop {
        let messages = match socket.recv(&mut received, &mut metas).await {
            Ok(messages) => messages,
            Err(error) => {
                shared.counters.add(Counter::DropIoError, 0);
                logs.io("receiving from the overlay UDP socket", &error);
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        let table = reader.current(&shared.table);
        let table6 = match (&mut reader6, &shared.table6) {
            (Some(reader6), Some(published)) => Some(reader6.current(published)),
            _ => None,
        };
        for (buffer, meta) in received.iter_mut().zip(&metas).take(messages) {
            let from = meta.addr;
            let sender = from.ip().to_canonical();
            let stride = meta.stride.max(1);
            let outer_tos = meta.ecn.map_or(0, |ecn| ecn as u8);
            for datagram in buffer[..meta.len].chunks_mut(stride) {
                let size = datagram.len();
                // The kernel's forwarding from the device makes this host's router hop,
                // so the rules build no ICMP error here.
                let hop = ReceiverHop::Kernel;
                let delivered = match (datagram.first().map(|b| b >> 4), table6) {
                    (Some(6), Some(table6)) => {
                        let overlay = &table6.overlay;
                        match decide_inbound6(
                            datagram, sender, outer_tos, overlay, table6, hop, &mut icmp6,
                        ) {
                            Inbound6::Deliver { len, from } => {
                                if let Some(from) = from {
                                    table6.traffic(from).add_rx(1, len);
                                }
                                Ok((len, None))
                            }
                            Inbound6::Drop { reason, .. } => Err(reason),
                        }
                    }
                    _ => match decide_inbound(datagram, sender, outer_tos, table, hop, &mut icmp) {
                        Inbound::Deliver { len, from } => Ok((len, from)),
                        Inbound::Drop { reason, .. } => Err(reason),
                    },
                };
                match delivered {
                    Ok((len, slot)) => {
                        writer
                            .deliver(&mut datagram[..len], &shared, &mut logs)
                            .await;
                        if let Some(slot) = slot {
                            table.traffic(slot).add_rx(1, len);
                        }
                    }
                    Err(reason) => {
                        shared.counters.add(reason, size);
                        logs.dropped("udp->tun", reason, format_args!("{size} bytes from {from}"));
                    }
                }
            }
        }
        writer.flush(&shared, &mut logs).await;
    }
}
