//! The socket path's receive loop (one per overlay socket): each datagram through the rules
//! of its inner family, the delivered packets re-injected in one `sendmmsg` per family.

use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use nix::sys::socket::{sendmmsg, MsgFlags, MultiHeaders, SockaddrIn, SockaddrIn6, SockaddrLike};
use rudder_ebpf::Counter;

use super::{Reinjection, SocketPath};
use crate::dataplane::counters::Counters;
use crate::dataplane::forwarding::{decide_inbound, IcmpRateLimit, Inbound, ReceiverHop};
use crate::dataplane::forwarding6::{decide_inbound6, Inbound6};
use crate::dataplane::tun::{OverlaySocket, UDP_BATCH};
use crate::packet::ICMP_ERROR_MAX_LEN;
use crate::packet6_icmp::ICMP6_ERROR_MAX_LEN;

/// What the rules made of one datagram.
enum Verdict {
    Deliver {
        len: usize,
    },
    Drop {
        reason: Counter,
        icmp_len: Option<usize>,
    },
}

/// The ICMP error scratch buffers, one per inner family.
struct IcmpBuffers {
    v4: [u8; ICMP_ERROR_MAX_LEN],
    v6: [u8; ICMP6_ERROR_MAX_LEN],
}

impl SocketPath {
    /// `decide_inbound` (IPv4 inner) with this path's table; counts the peer's traffic.
    fn decide4(
        &self,
        packet: &mut [u8],
        sender: IpAddr,
        outer_tos: u8,
        icmp: &mut IcmpBuffers,
    ) -> Verdict {
        let table = self.table();
        // The raw socket's output is not forwarded, so the rules make this host's hop.
        let hop = ReceiverHop::Rules;
        match decide_inbound(packet, sender, outer_tos, &table, hop, &mut icmp.v4) {
            Inbound::Deliver { len, from } => {
                if let Some(slot) = from {
                    table.traffic(slot).add_rx(1, len);
                }
                Verdict::Deliver { len }
            }
            Inbound::Drop { reason, icmp_len } => Verdict::Drop { reason, icmp_len },
        }
    }

    /// `decide_inbound6` (IPv6 inner); `None` while the network has IPv6 off.
    fn decide6(
        &self,
        packet: &mut [u8],
        sender: IpAddr,
        outer_tos: u8,
        icmp: &mut IcmpBuffers,
    ) -> Option<Verdict> {
        let table6 = self.table6();
        let table6 = table6.as_ref()?;
        let hop = ReceiverHop::Rules;
        let overlay = &table6.overlay;
        Some(
            match decide_inbound6(
                packet,
                sender,
                outer_tos,
                overlay,
                table6,
                hop,
                &mut icmp.v6,
            ) {
                Inbound6::Deliver { len, .. } => Verdict::Deliver { len },
                Inbound6::Drop { reason, icmp_len } => Verdict::Drop { reason, icmp_len },
            },
        )
    }
}

pub(super) async fn receive(
    socket: OverlaySocket,
    peer_port: u16,
    raw: Arc<Reinjection>,
    path: Arc<SocketPath>,
) {
    // Up to UDP_BATCH datagrams per `recvmmsg`, their inner packets re-injected with one
    // `sendmmsg` per family: a TUN peer's trains arrive here split, one datagram per packet.
    let mut buffers = vec![vec![0u8; 65_535]; UDP_BATCH];
    let mut metas = [quinn_udp::RecvMeta::default(); UDP_BATCH];
    let mut icmp = IcmpBuffers {
        v4: [0; ICMP_ERROR_MAX_LEN],
        v6: [0; ICMP6_ERROR_MAX_LEN],
    };
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
        let mut deliver4 = Vec::with_capacity(UDP_BATCH);
        let mut deliver6 = Vec::with_capacity(UDP_BATCH);
        for (index, (buf, meta)) in buffers.iter_mut().zip(&metas).take(messages).enumerate() {
            let (n, from) = (meta.len, meta.addr);
            let sender = from.ip().to_canonical();
            let outer_tos = meta.ecn.map_or(0, |ecn| ecn as u8);
            let datagram = &mut buf[..n];
            let inner6 = datagram.first().is_some_and(|b| b >> 4 == 6);
            let decided6 = match inner6 {
                true => path.decide6(datagram, sender, outer_tos, &mut icmp),
                false => None,
            };
            // (Without IPv6 on, the IPv4 rules refuse an IPv6 packet as not IPv4.)
            let inner6 = decided6.is_some();
            let verdict =
                decided6.unwrap_or_else(|| path.decide4(datagram, sender, outer_tos, &mut icmp));
            match verdict {
                Verdict::Deliver { len } => {
                    // Re-injected through a raw socket: the kernel will not finish a checksum
                    // the sender's kernel left partial.
                    let packet = &mut buf[..len];
                    if inner6 {
                        if let Ok(view) = crate::packet6::parse_ipv6(packet) {
                            crate::packet6::complete_partial_checksum6(packet, &view);
                        }
                        deliver6.push((index, len));
                    } else {
                        if let Ok(view) = crate::packet::parse_ipv4(packet) {
                            crate::packet::complete_partial_checksum(packet, &view);
                        }
                        deliver4.push((index, len));
                    }
                }
                Verdict::Drop { reason, icmp_len } => {
                    path.counters.add(reason, n);
                    let Some(len) = icmp_len else { continue };
                    if !icmp_limit.allow(Instant::now()) {
                        path.counters.add(Counter::IcmpRateLimited, len);
                        continue;
                    }
                    let error = if inner6 {
                        &icmp.v6[..len]
                    } else {
                        &icmp.v4[..len]
                    };
                    // To the peer's overlay port: an eBPF peer sends from a flow-hash port.
                    let mut to = from;
                    to.set_port(peer_port);
                    if let Err(error) = socket.socket.send_to(error, to).await {
                        tracing::debug!(%to, "sending an ICMP error to a peer failed: {error}");
                    }
                }
            }
        }
        let packets = |deliver: &[(usize, usize)]| {
            deliver
                .iter()
                .map(|&(index, len)| &buffers[index][..len])
                .collect::<Vec<_>>()
        };
        reinject(&raw.v4, &packets(&deliver4), destination4, &path.counters);
        if let Some(raw6) = &raw.v6 {
            reinject(raw6, &packets(&deliver6), destination6, &path.counters);
        }
    }
}

fn destination4(packet: &[u8]) -> SockaddrIn {
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    SockaddrIn::from(SocketAddrV4::new(dst, 0))
}

fn destination6(packet: &[u8]) -> SockaddrIn6 {
    let dst: [u8; 16] = packet[24..40]
        .try_into()
        .expect("an IPv6 header is 40 bytes");
    // Port 0: the protocol is the raw socket's own (IPPROTO_RAW, header included).
    SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::from(dst), 0, 0, 0))
}

/// Sends decapsulated packets of one family into the stack through its raw socket, all in
/// one `sendmmsg`; each is counted `decapsulated`, or `io_error` when the kernel refused it.
fn reinject<S: SockaddrLike + Copy>(
    raw: &OwnedFd,
    packets: &[&[u8]],
    destination: fn(&[u8]) -> S,
    counters: &Counters,
) {
    if packets.is_empty() {
        return;
    }
    // Not kept across batches: it holds raw pointers, and the receive task must be `Send`.
    let mut headers = MultiHeaders::<S>::preallocate(packets.len(), None);
    let destinations: Vec<Option<S>> = packets.iter().map(|p| Some(destination(p))).collect();
    let slices: Vec<[IoSlice<'_>; 1]> = packets.iter().map(|p| [IoSlice::new(p)]).collect();
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
    for (index, packet) in packets.iter().enumerate() {
        if index < sent {
            counters.add(Counter::Decapsulated, packet.len());
        } else {
            counters.add(Counter::DropIoError, packet.len());
        }
    }
}
