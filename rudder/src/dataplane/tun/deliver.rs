//! Writing delivered inner packets (either family) into the TUN device, batched: ordinary
//! packets are queued and written with tun-rs's `send_multiple`, which coalesces the
//! segments of a TCP/UDP flow into one GSO packet when offload is on. A sender's whole TSO
//! packet (delivered unsegmented by a veth or virtio underlay, checksum partial) goes in
//! with a virtio GSO header for the kernel to segment, or is cut here without offloads.

use std::sync::Arc;

use rudder_ebpf::Counter;
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

use super::forward::{Shared, MAX_PACKET_LEN};
use super::log_limit::TaskLogs;
use crate::packet::{complete_partial_checksum, parse_ipv4, tcp_super_packet};
use crate::packet6::{complete_partial_checksum6, parse_ipv6, tcp_super_packet6};
use crate::packet_segment::{segment_tcp, segment_tcp6};

/// Headroom in front of packets written to the device: tun-rs puts the virtio header there.
const WRITE_OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// Packets handed to one `send_multiple`: one GRO train fits. Each buffer can grow to a
/// whole coalesced 64 KB packet in place (tun-rs never reallocates: a buffer without the
/// capacity is written uncoalesced), so this bounds the task's memory to about 4 MB.
const WRITE_BATCH: usize = 64;

/// virtio-net GSO types (`VIRTIO_NET_HDR_GSO_TCPV4/6`).
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// A TSO packet to segment: where its headers end, the segment size, where TCP starts.
struct SuperPacket {
    headers: usize,
    mss: usize,
    tcp_at: usize,
    gso_type: u8,
}

/// The batching writer of one receive loop.
pub(super) struct DeviceWriter {
    device: Arc<AsyncDevice>,
    outgoing: Vec<Vec<u8>>,
    queued: usize,
    gro: GROTable,
    super_buf: Vec<u8>,
    /// A TSO packet cut into MTU-sized segments (device without offloads).
    segments: Vec<Vec<u8>>,
}

impl DeviceWriter {
    pub(super) fn new(device: Arc<AsyncDevice>) -> Self {
        DeviceWriter {
            device,
            outgoing: (0..WRITE_BATCH)
                .map(|_| Vec::with_capacity(WRITE_OFFSET + MAX_PACKET_LEN))
                .collect(),
            queued: 0,
            gro: GROTable::default(),
            super_buf: Vec::with_capacity(WRITE_OFFSET + MAX_PACKET_LEN),
            segments: Vec::new(),
        }
    }

    /// Queues (or writes) one packet the rules delivered; finishes a partial checksum.
    pub(super) async fn deliver(
        &mut self,
        packet: &mut [u8],
        shared: &Shared,
        logs: &mut TaskLogs,
    ) {
        let mtu = shared.mtu();
        let super_packet = match packet.first().map(|b| b >> 4) {
            Some(6) => parse_ipv6(packet).ok().and_then(|view| {
                match tcp_super_packet6(packet, &view, mtu) {
                    Some((headers, mss)) => Some(SuperPacket {
                        headers,
                        mss,
                        tcp_at: view.l4_offset,
                        gso_type: GSO_TCPV6,
                    }),
                    None => {
                        complete_partial_checksum6(packet, &view);
                        None
                    }
                }
            }),
            _ => parse_ipv4(packet).ok().and_then(|view| {
                match tcp_super_packet(packet, &view, mtu) {
                    Some((headers, mss)) => Some(SuperPacket {
                        headers,
                        mss,
                        tcp_at: view.header_len,
                        gso_type: GSO_TCPV4,
                    }),
                    None => {
                        complete_partial_checksum(packet, &view);
                        None
                    }
                }
            }),
        };
        let Some(sp) = super_packet else {
            self.queue(packet, shared, logs).await;
            return;
        };
        if shared.offload {
            // Keep order: what is queued goes first.
            self.flush(shared, logs).await;
            self.write_super_packet(packet, &sp, shared, logs).await;
            return;
        }
        // No virtio header to let the kernel segment it: cut it here.
        let mut segments = std::mem::take(&mut self.segments);
        segments.clear();
        if sp.gso_type == GSO_TCPV6 {
            if let Ok(view) = parse_ipv6(packet) {
                segment_tcp6(packet, &view, sp.headers, sp.mss, &mut segments);
            }
        } else if let Ok(view) = parse_ipv4(packet) {
            segment_tcp(packet, &view, sp.headers, sp.mss, &mut segments);
        }
        for segment in &segments {
            self.queue(segment, shared, logs).await;
        }
        self.segments = segments;
    }

    async fn queue(&mut self, packet: &[u8], shared: &Shared, logs: &mut TaskLogs) {
        if self.queued == WRITE_BATCH {
            self.flush(shared, logs).await;
        }
        let slot = &mut self.outgoing[self.queued];
        slot.clear();
        slot.resize(WRITE_OFFSET, 0);
        slot.extend_from_slice(packet);
        self.queued += 1;
    }

    /// Writes a sender's whole TSO packet with a virtio GSO header: the kernel segments it
    /// to `mss` and finishes each segment's checksum, as the sender's NIC would have.
    async fn write_super_packet(
        &mut self,
        packet: &[u8],
        sp: &SuperPacket,
        shared: &Shared,
        logs: &mut TaskLogs,
    ) {
        const NEEDS_CSUM: u8 = 1;
        const TCP_CHECKSUM_OFFSET: u16 = 16;
        let buf = &mut self.super_buf;
        buf.clear();
        buf.push(NEEDS_CSUM);
        buf.push(sp.gso_type);
        // Host byte order: the device is not set to a fixed virtio endianness.
        for field in [
            sp.headers as u16,
            sp.mss as u16,
            sp.tcp_at as u16,
            TCP_CHECKSUM_OFFSET,
        ] {
            buf.extend_from_slice(&field.to_ne_bytes());
        }
        debug_assert_eq!(buf.len(), VIRTIO_NET_HDR_LEN);
        buf.extend_from_slice(packet);
        match self.device.send(buf).await {
            Ok(_) => shared.counters.add(Counter::Decapsulated, packet.len()),
            Err(error) => {
                shared.counters.add(Counter::DropIoError, packet.len());
                logs.io("writing a TSO packet into the TUN device", &error);
            }
        }
    }

    /// Writes the queued inner packets into the device, coalesced per flow, and counts them.
    pub(super) async fn flush(&mut self, shared: &Shared, logs: &mut TaskLogs) {
        if self.queued == 0 {
            return;
        }
        let packets = &mut self.outgoing[..self.queued];
        self.queued = 0;
        let bytes: usize = packets.iter().map(|p| p.len() - WRITE_OFFSET).sum();
        match self
            .device
            .send_multiple(&mut self.gro, packets, WRITE_OFFSET)
            .await
        {
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
}
