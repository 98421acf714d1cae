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

use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use rudder_ebpf::Counter;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

use super::log_limit::TaskLogs;
use crate::dataplane::counters::{Counters, PeerCounters};
use crate::dataplane::forwarding::{
    decide_inbound, decide_outbound, IcmpRateLimit, Inbound, Outbound, PublishedTable, ReceiverHop,
};
use crate::packet::{ECN_MASK, ICMP_ERROR_MAX_LEN};

/// Largest IPv4 packet: the receive buffers hold any datagram the kernel can hand us.
const MAX_PACKET_LEN: usize = 65_535;

/// Pause after a failed device/socket receive, so a persistent error cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Segments one device read can yield: a 64 KB GSO packet at the smallest MSS the
/// kernel allows, with room to spare.
const SEGMENTS_PER_READ: usize = 128;

/// Device reads gathered before the batch is sent: bounds the delay a packet can wait
/// for later ones (each read is non-blocking after the first).
const READS_PER_FLUSH: usize = 32;

/// Messages per `recvmmsg`; each up to 64 KB (a GRO train).
pub const UDP_BATCH: usize = 8;

/// Receive and send buffer of the overlay socket, bytes.
const SOCKET_BUFFER: usize = 4 << 20;

/// Largest UDP payload of one `UDP_SEGMENT` send: the IPv4 length limit minus headers.
const MAX_GSO_PAYLOAD: usize = 65_535 - 20 - 8;

/// The kernel's cap on segments per GSO send (`UDP_MAX_SEGMENTS` is 64 on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;

/// Headroom in front of packets written to the device: tun-rs puts the virtio header there.
const WRITE_OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// Packets handed to one `send_multiple`: one GRO train fits. Each buffer can grow to a
/// whole coalesced 64 KB packet in place (tun-rs never reallocates: a buffer without the
/// capacity is written uncoalesced), so this bounds the task's memory to about 4 MB.
const WRITE_BATCH: usize = 64;

/// State shared between the data plane handle and its tasks.
pub(super) struct Shared {
    pub(super) counters: Counters,
    pub(super) table: PublishedTable,
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

/// The UDP socket with the state quinn-udp keeps about it (GSO/GRO support).
pub struct OverlaySocket {
    pub socket: UdpSocket,
    state: UdpSocketState,
    /// Segments per send: 1 without UDP GSO.
    gso_segments: usize,
}

impl OverlaySocket {
    /// Wraps a bound socket. `offload` off keeps it plain: no GSO on send, and GRO turned
    /// off again on receive (what a peer without offload support does).
    pub fn new(socket: UdpSocket, offload: bool) -> std::io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        // Room for bursts while the forwarding task is busy: the default (~200 KB) holds
        // only a few GRO trains. Forced past rmem_max/wmem_max (we have CAP_NET_ADMIN);
        // without the privilege the default stays, which only costs drops under load.
        use nix::sys::socket::{setsockopt, sockopt};
        let _ = setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER);
        let _ = setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER);
        if !offload {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::UdpGroSegment, &false)
                .map_err(std::io::Error::from)?;
        }
        let gso_segments = if offload {
            state.max_gso_segments().min(MAX_GSO_SEGMENTS)
        } else {
            1
        };
        Ok(OverlaySocket {
            socket,
            state,
            gso_segments,
        })
    }

    /// Whether sends are batched with `UDP_SEGMENT`.
    pub fn gso(&self) -> bool {
        self.gso_segments > 1
    }

    async fn send(&self, transmit: &Transmit<'_>) -> std::io::Result<()> {
        self.socket
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), transmit)
            })
            .await
    }

    pub(crate) async fn recv(
        &self,
        buffers: &mut [Vec<u8>],
        metas: &mut [RecvMeta],
    ) -> std::io::Result<usize> {
        let count = buffers.len().min(UDP_BATCH);
        self.socket
            .async_io(Interest::READABLE, || {
                let mut slices: [IoSliceMut<'_>; UDP_BATCH] =
                    std::array::from_fn(|_| IoSliceMut::new(&mut []));
                for (slice, buffer) in slices.iter_mut().zip(buffers.iter_mut()) {
                    *slice = IoSliceMut::new(buffer);
                }
                self.state
                    .recv((&self.socket).into(), &mut slices[..count], metas)
            })
            .await
    }
}

/// Inner packets waiting to leave for one peer in one `UDP_SEGMENT` send.
struct GsoBatch {
    buffer: Vec<u8>,
    /// The peer and the traffic counters of its subnet.
    peer: Option<(Ipv4Addr, Arc<PeerCounters>)>,
    /// ECN field of every queued packet, copied to the outer header (RFC 6040).
    ecn: u8,
    segment_len: usize,
    segments: usize,
    /// A shorter segment ends a batch: only the last one may be short.
    closed: bool,
}

impl GsoBatch {
    fn new() -> Self {
        GsoBatch {
            buffer: Vec::with_capacity(MAX_GSO_PAYLOAD),
            peer: None,
            ecn: 0,
            segment_len: 0,
            segments: 0,
            closed: false,
        }
    }

    fn accepts(
        &self,
        peer: Ipv4Addr,
        traffic: &Arc<PeerCounters>,
        ecn: u8,
        len: usize,
        max_segments: usize,
    ) -> bool {
        match &self.peer {
            None => true,
            Some((current, current_traffic)) => {
                *current == peer
                    && Arc::ptr_eq(current_traffic, traffic)
                    && self.ecn == ecn
                    && !self.closed
                    && len <= self.segment_len
                    && self.segments < max_segments
                    && self.buffer.len() + len <= MAX_GSO_PAYLOAD
            }
        }
    }

    fn push(&mut self, peer: Ipv4Addr, traffic: &Arc<PeerCounters>, packet: &[u8]) {
        if self.peer.is_none() {
            self.peer = Some((peer, traffic.clone()));
            self.ecn = packet[1] & ECN_MASK;
            self.segment_len = packet.len();
        } else if packet.len() < self.segment_len {
            self.closed = true;
        }
        self.buffer.extend_from_slice(packet);
        self.segments += 1;
    }

    /// Sends what is queued, counts it, and empties the batch.
    async fn flush(&mut self, socket: &OverlaySocket, shared: &Shared, logs: &mut TaskLogs) {
        let Some((peer, traffic)) = self.peer.take() else {
            return;
        };
        let transmit = Transmit {
            destination: SocketAddr::V4(SocketAddrV4::new(peer, shared.peer_port)),
            ecn: EcnCodepoint::from_bits(self.ecn),
            contents: &self.buffer,
            segment_size: (self.segments > 1).then_some(self.segment_len),
            src_ip: None,
        };
        let bytes = self.buffer.len();
        match socket.send(&transmit).await {
            Ok(()) => {
                shared
                    .counters
                    .add_many(Counter::Encapsulated, self.segments, bytes);
                traffic.add_tx(self.segments, bytes);
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

/// TUN → UDP forwarding loop.
pub async fn tun_to_udp(device: Arc<AsyncDevice>, socket: Arc<OverlaySocket>, shared: Arc<Shared>) {
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
    let mut scratch = Vec::with_capacity(VIRTIO_NET_HDR_LEN + ICMP_ERROR_MAX_LEN);
    let mut batch = GsoBatch::new();
    let mut reader = shared.table.reader();
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
                match decide_outbound(&mut packet[..size], table, shared.mtu(), &mut icmp) {
                    Outbound::Encapsulate { len, peer, slot } => {
                        let traffic = table.traffic(slot);
                        let ecn = packet[1] & ECN_MASK;
                        if !batch.accepts(peer, traffic, ecn, len, socket.gso_segments) {
                            batch.flush(&socket, &shared, &mut logs).await;
                        }
                        batch.push(peer, traffic, &packet[..len]);
                    }
                    Outbound::Drop { reason, icmp_len } => {
                        shared.counters.add(reason, size);
                        logs.dropped(
                            "tun->udp",
                            reason,
                            format_args!("{size} bytes from the TUN device"),
                        );
                        if let Some(len) = icmp_len {
                            if !icmp_limit.allow(Instant::now()) {
                                shared.counters.add(Counter::IcmpRateLimited, len);
                                continue;
                            }
                            let icmp = &icmp[..len];
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
        batch.flush(&socket, &shared, &mut logs).await;
    }
}

/// UDP → TUN forwarding loop.
pub async fn udp_to_tun(device: Arc<AsyncDevice>, socket: Arc<OverlaySocket>, shared: Arc<Shared>) {
    let mut received = vec![vec![0u8; MAX_PACKET_LEN]; UDP_BATCH];
    let mut metas = [RecvMeta::default(); UDP_BATCH];
    let mut outgoing: Vec<Vec<u8>> = (0..WRITE_BATCH)
        .map(|_| Vec::with_capacity(WRITE_OFFSET + MAX_PACKET_LEN))
        .collect();
    let mut gro = GROTable::default();
    let mut icmp = [0u8; ICMP_ERROR_MAX_LEN];
    let mut super_buf = Vec::with_capacity(WRITE_OFFSET + MAX_PACKET_LEN);
    // A TSO packet cut into MTU-sized segments (device without offloads).
    let mut segments: Vec<Vec<u8>> = Vec::new();
    let mut reader = shared.table.reader();
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
        let mut queued = 0;
        for (buffer, meta) in received.iter_mut().zip(&metas).take(messages) {
            let from = meta.addr;
            // The socket is IPv4: the overlay has no IPv6 underlay.
            let IpAddr::V4(sender) = from.ip() else {
                shared.counters.add(Counter::DropUnknownSender, meta.len);
                continue;
            };
            let stride = meta.stride.max(1);
            let outer_tos = meta.ecn.map_or(0, |ecn| ecn as u8);
            for datagram in buffer[..meta.len].chunks_mut(stride) {
                let size = datagram.len();
                // The kernel's forwarding from the device makes this host's router hop.
                let hop = ReceiverHop::Kernel;
                match decide_inbound(datagram, sender, outer_tos, table, hop, &mut icmp) {
                    Inbound::Deliver { len, from: slot } => {
                        let packet = &mut datagram[..len];
                        let view = match crate::packet::parse_ipv4(packet) {
                            Ok(view) => view,
                            Err(_) => continue, // decide_inbound parsed it already
                        };
                        let super_packet =
                            crate::packet::tcp_super_packet(packet, &view, shared.mtu());
                        if let (false, Some((headers, mss))) = (shared.offload, super_packet) {
                            // No virtio header to let the kernel segment it: cut it here.
                            segments.clear();
                            crate::packet_segment::segment_tcp(
                                packet,
                                &view,
                                headers,
                                mss,
                                &mut segments,
                            );
                            for segment in &segments {
                                if queued == WRITE_BATCH {
                                    write_batch(
                                        &device,
                                        &mut gro,
                                        &mut outgoing,
                                        &shared,
                                        &mut logs,
                                    )
                                    .await;
                                    queued = 0;
                                }
                                queue_for_device(&mut outgoing[queued], segment);
                                queued += 1;
                            }
                            if let Some(slot) = slot {
                                table.traffic(slot).add_rx(1, len);
                            }
                            continue;
                        }
                        if shared.offload {
                            if let Some((headers, mss)) = super_packet {
                                // Keep order: what is queued goes first.
                                write_batch(
                                    &device,
                                    &mut gro,
                                    &mut outgoing[..queued],
                                    &shared,
                                    &mut logs,
                                )
                                .await;
                                queued = 0;
                                write_super_packet(
                                    &device,
                                    packet,
                                    headers,
                                    mss,
                                    &mut super_buf,
                                    &shared,
                                    &mut logs,
                                )
                                .await;
                                if let Some(slot) = slot {
                                    table.traffic(slot).add_rx(1, len);
                                }
                                continue;
                            }
                        }
                        crate::packet::complete_partial_checksum(packet, &view);
                        if queued == WRITE_BATCH {
                            write_batch(&device, &mut gro, &mut outgoing, &shared, &mut logs).await;
                            queued = 0;
                        }
                        queue_for_device(&mut outgoing[queued], &datagram[..len]);
                        queued += 1;
                        if let Some(slot) = slot {
                            table.traffic(slot).add_rx(1, len);
                        }
                    }
                    Inbound::Drop { reason, .. } => {
                        // ReceiverHop::Kernel: the rules build no ICMP error here.
                        shared.counters.add(reason, size);
                        logs.dropped("udp->tun", reason, format_args!("{size} bytes from {from}"));
                    }
                }
            }
        }
        write_batch(
            &device,
            &mut gro,
            &mut outgoing[..queued],
            &shared,
            &mut logs,
        )
        .await;
    }
}

/// Fills a write-batch slot with `packet` after the room tun-rs needs in front of it.
fn queue_for_device(slot: &mut Vec<u8>, packet: &[u8]) {
    slot.clear();
    slot.resize(WRITE_OFFSET, 0);
    slot.extend_from_slice(packet);
}

/// Writes a sender's whole TSO packet (delivered unsegmented by a veth or virtio underlay,
/// its checksum partial) with a virtio GSO header: the kernel segments it to `mss` and
/// finishes each segment's checksum, as the sender's NIC would have.
async fn write_super_packet(
    device: &AsyncDevice,
    packet: &[u8],
    headers: usize,
    mss: usize,
    buf: &mut Vec<u8>,
    shared: &Shared,
    logs: &mut TaskLogs,
) {
    const NEEDS_CSUM: u8 = 1;
    const GSO_TCPV4: u8 = 1;
    const TCP_CHECKSUM_OFFSET: u16 = 16;
    let ip_header_len = usize::from(packet[0] & 0x0f) * 4;
    buf.clear();
    buf.push(NEEDS_CSUM);
    buf.push(GSO_TCPV4);
    // Host byte order: the device is not set to a fixed virtio endianness.
    for field in [
        headers as u16,
        mss as u16,
        ip_header_len as u16,
        TCP_CHECKSUM_OFFSET,
    ] {
        buf.extend_from_slice(&field.to_ne_bytes());
    }
    debug_assert_eq!(buf.len(), VIRTIO_NET_HDR_LEN);
    buf.extend_from_slice(packet);
    match device.send(buf).await {
        Ok(_) => shared.counters.add(Counter::Decapsulated, packet.len()),
        Err(error) => {
            shared.counters.add(Counter::DropIoError, packet.len());
            logs.io("writing a TSO packet into the TUN device", &error);
        }
    }
}

/// Writes the queued inner packets into the device, coalesced per flow, and counts them.
async fn write_batch(
    device: &AsyncDevice,
    gro: &mut GROTable,
    packets: &mut [Vec<u8>],
    shared: &Shared,
    logs: &mut TaskLogs,
) {
    if packets.is_empty() {
        return;
    }
    let bytes: usize = packets.iter().map(|p| p.len() - WRITE_OFFSET).sum();
    match device.send_multiple(gro, packets, WRITE_OFFSET).await {
        Ok(_) => shared
            .counters
            .add_many(Counter::Decapsulated, packets.len(), bytes),
        Err(error) => {
            shared
                .counters
                .add_many(Counter::DropIoError, packets.len(), bytes);
            logs.io("writing into the TUN device", &error);
        }
    }
}
