//! The overlay's UDP sockets: the IPv4 one (flannel's udp backend's, bound to our underlay
//! address) and, on a dual-stack host with a PublicIPv6, a second IPv6-only one for peers
//! reached over IPv6. Two sockets rather than one dual-stack `[::]` socket: the IPv4 one
//! stays bound to the address we own exactly as on an IPv4-only host.

use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use anyhow::Context;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Messages per `recvmmsg`; each up to 64 KB (a GRO train).
pub const UDP_BATCH: usize = 8;

/// Receive and send buffer of the overlay socket, bytes.
const SOCKET_BUFFER: usize = 4 << 20;

/// The kernel's cap on segments per GSO send (`UDP_MAX_SEGMENTS` is 64 on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;

/// Hop limit of the outer IPv6 header (the wire rule of issue 17).
const OUTER_HOP_LIMIT: i32 = crate::packet6::OUTER_HOP_LIMIT as i32;

/// The UDP socket with the state quinn-udp keeps about it (GSO/GRO support).
pub struct OverlaySocket {
    pub socket: UdpSocket,
    state: UdpSocketState,
    /// Segments per send: 1 without UDP GSO.
    pub(super) gso_segments: usize,
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

    /// Sends `contents` to an IPv6 peer with the outer traffic class `traffic_class` and
    /// the flow label `destination.flowinfo()` (the socket has `IPV6_FLOWINFO_SEND`; see
    /// `outer6.rs`), as a train of `segment_size` datagrams when set.
    pub(super) async fn send6(
        &self,
        contents: &[u8],
        destination: SocketAddrV6,
        traffic_class: u8,
        segment_size: Option<usize>,
    ) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn6};
        let to = SockaddrIn6::from(destination);
        let class = libc::c_int::from(traffic_class);
        // `segment_size` is at most an MTU (a u16).
        let segment = segment_size.map_or(0, |size| size as u16);
        self.socket
            .async_io(Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(contents)];
                let with_gso = [
                    ControlMessage::Ipv6TClass(&class),
                    ControlMessage::UdpGsoSegments(&segment),
                ];
                let cmsgs = if segment_size.is_some() {
                    &with_gso[..]
                } else {
                    &with_gso[..1]
                };
                let fd = self.socket.as_raw_fd();
                sendmsg(fd, &iov, cmsgs, MsgFlags::empty(), Some(&to))
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            })
            .await
    }

    pub(super) async fn send(&self, transmit: &Transmit<'_>) -> std::io::Result<()> {
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

/// The overlay sockets of the TUN plane: one per outer family in use.
pub(super) struct OverlaySockets {
    pub(super) v4: Arc<OverlaySocket>,
    pub(super) v6: Option<Arc<OverlaySocket>>,
}

impl OverlaySockets {
    /// The socket that reaches `peer`, if this host has one of its family.
    pub(super) fn for_peer(&self, peer: IpAddr) -> Option<&OverlaySocket> {
        match peer {
            IpAddr::V4(_) => Some(&self.v4),
            IpAddr::V6(_) => self.v6.as_deref(),
        }
    }
}

/// Binds the IPv6-only overlay socket to `bind` (our PublicIPv6; a link-local one scoped to
/// the underlay interface `scope_id`). When that address cannot be bound here (a PublicIPv6
/// behind NAT or `--public-ipv6` not on this host), binds `[::]` on the same port instead:
/// the kernel then picks the source. It accepts a zero UDP checksum (RFC 6935/6936
/// tunnel rule: eBPF peers send zero), and its outer hop limit is 64.
pub fn bind_overlay_socket6(bind: SocketAddrV6, scope_id: u32) -> anyhow::Result<UdpSocket> {
    let bind = if crate::packet6::is_link_local(*bind.ip()) {
        SocketAddrV6::new(*bind.ip(), bind.port(), 0, scope_id)
    } else {
        bind
    };
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn6};
    let open = |address: SocketAddrV6| -> nix::Result<std::net::UdpSocket> {
        let fd = socket::socket(
            AddressFamily::Inet6,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // Only IPv6 here: the IPv4 socket holds the port for IPv4.
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(address))?;
        Ok(std::net::UdpSocket::from(fd))
    };
    let socket = match open(bind) {
        Ok(socket) => socket,
        Err(nix::errno::Errno::EADDRNOTAVAIL | nix::errno::Errno::EINVAL) => {
            let any = SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, bind.port(), 0, 0);
            tracing::warn!(public_ipv6 = %bind.ip(), "the PublicIPv6 cannot be bound on this host; the IPv6 overlay socket binds [::] (the kernel picks the source)");
            open(any).with_context(|| format!("binding the IPv6 overlay UDP socket to {any} failed"))?
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("binding the IPv6 overlay UDP socket to {bind} failed; is another rudder using the port?")
            })
        }
    };
    // The outer flow label is ours (per inner flow) from each send's sin6_flowinfo.
    set_int_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_FLOWINFO_SEND, 1)
        .context("setting IPV6_FLOWINFO_SEND on the IPv6 overlay socket")?;
    set_int_option(&socket, libc::SOL_UDP, libc::UDP_NO_CHECK6_RX, 1)
        .context("setting UDP_NO_CHECK6_RX on the IPv6 overlay socket")?;
    set_int_option(
        &socket,
        libc::IPPROTO_IPV6,
        libc::IPV6_UNICAST_HOPS,
        OUTER_HOP_LIMIT,
    )
    .context("setting the outer hop limit on the IPv6 overlay socket")?;
    UdpSocket::from_std(socket).context("registering the IPv6 overlay socket with tokio")
}

fn set_int_option(
    socket: &std::net::UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid descriptor and a c_int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
