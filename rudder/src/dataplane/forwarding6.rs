//! The per-packet decisions for inner IPv6 packets: [`decide_outbound6`] and
//! [`decide_inbound6`], the counterparts of [`super::forwarding`]'s IPv4 rules.
//!
//! They are generic over the peer table ([`PeerRoutes6`]), so that wiring them to the
//! control plane's IPv6 peers is one `impl`, and pure: tested without a device.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::Ipv6Net;
use rudder_ebpf::Counter;

use super::forwarding::ReceiverHop;
use crate::packet6::{self, Ipv6View};
use crate::packet6_icmp::{build_icmp6_error, Icmp6Error, ICMP6_ERROR_MAX_LEN};

/// The IPv6 side of a peer table.
pub trait PeerRoutes6 {
    /// What a route leads to (the peer's underlay address, a table slot...).
    type Peer: Copy;
    /// The peer whose IPv6 subnet holds `dst` (longest prefix wins).
    fn route(&self, dst: Ipv6Addr) -> Option<Self::Peer>;
    /// The IPv6 subnets leased by the host at underlay address `sender` (either family:
    /// IPv6 inner packets may travel over an IPv4 underlay).
    fn subnets_of(&self, sender: IpAddr) -> &[Ipv6Net];
}

/// This host's place in the IPv6 overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay6 {
    pub local_subnet: Ipv6Net,
    pub network: Ipv6Net,
    /// Source of the ICMPv6 errors sent to peers: inside our subnet.
    pub icmp_to_peers: Ipv6Addr,
    /// Source of the ICMPv6 errors written into the device: not a local address.
    pub icmp_into_device: Ipv6Addr,
}

/// What to do with an IPv6 packet read from the TUN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound6<P> {
    /// Send `packet[..len]` (unchanged) to `peer`.
    Encapsulate { len: usize, peer: P },
    /// Drop it; when `icmp_len` is set, write the ICMPv6 error built in the scratch buffer
    /// back into the TUN device.
    Drop {
        reason: Counter,
        icmp_len: Option<usize>,
    },
}

/// What to do with an IPv6 datagram payload received from the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound6<P> {
    /// Deliver `packet[..len]` (hop limit decremented for [`ReceiverHop::Rules`], ECN CE
    /// copied from the outer header); `from` is the sending subnet's peer.
    Deliver { len: usize, from: Option<P> },
    /// Drop it; when `icmp_len` is set, send the ICMPv6 error built in the scratch buffer
    /// back to the sending peer, encapsulated.
    Drop {
        reason: Counter,
        icmp_len: Option<usize>,
    },
}

const fn dropped<P>(reason: Counter) -> Outbound6<P> {
    Outbound6::Drop {
        reason,
        icmp_len: None,
    }
}

const fn refused<P>(reason: Counter) -> Inbound6<P> {
    Inbound6::Drop {
        reason,
        icmp_len: None,
    }
}

/// Decides the fate of an IPv6 packet the kernel routed into the overlay, whose MTU is
/// `mtu`. Never changes the packet's bytes; may build an ICMPv6 error into `icmp`.
pub fn decide_outbound6<R: PeerRoutes6>(
    packet: &[u8],
    overlay: &Overlay6,
    peers: &R,
    mtu: usize,
    icmp: &mut [u8; ICMP6_ERROR_MAX_LEN],
) -> Outbound6<R::Peer> {
    let view = match packet6::parse_ipv6(packet) {
        Ok(view) => view,
        Err(reason) => return dropped(reason),
    };
    let packet = &packet[..view.total_len];
    if let Err(reason) = packet6::check_overlay_scope(packet, &view) {
        return dropped(reason);
    }
    let source = overlay.icmp_into_device;
    if view.total_len > mtu {
        // IPv6 routers never fragment: the sender learns the overlay MTU (RFC 8201).
        let kind = Icmp6Error::PacketTooBig { mtu: mtu as u32 };
        let icmp_len = build_icmp6_error(kind, packet, &view, source, icmp);
        return Outbound6::Drop {
            reason: Counter::DropTooBig,
            icmp_len,
        };
    }
    // No hop-limit rule here: the kernel's forwarding into the device made this host's hop.
    match peers.route(view.dst) {
        Some(peer) => Outbound6::Encapsulate {
            len: view.total_len,
            peer,
        },
        None => {
            // Outside the overlay network the kernel misrouted: nothing to tell the sender.
            let icmp_len = overlay
                .network
                .contains(&view.dst)
                .then(|| build_icmp6_error(Icmp6Error::NoRoute, packet, &view, source, icmp))
                .flatten();
            Outbound6::Drop {
                reason: Counter::DropNoRoute,
                icmp_len,
            }
        }
    }
}

/// Decides the fate of an IPv6 datagram payload from underlay address `sender`, in a
/// datagram whose outer TOS/traffic class was `outer_ecn_byte`. May change the hop limit
/// and ECN field in place; may build an ICMPv6 error into `icmp`.
pub fn decide_inbound6<R: PeerRoutes6>(
    packet: &mut [u8],
    sender: IpAddr,
    outer_ecn_byte: u8,
    overlay: &Overlay6,
    peers: &R,
    hop: ReceiverHop,
    icmp: &mut [u8; ICMP6_ERROR_MAX_LEN],
) -> Inbound6<R::Peer> {
    let view: Ipv6View = match packet6::parse_ipv6(packet) {
        Ok(view) => view,
        Err(reason) => return refused(reason),
    };
    let packet = &mut packet[..view.total_len];
    let sender_subnets = peers.subnets_of(sender);
    if let Err(reason) = packet6::check_received6(&view, overlay.local_subnet, sender_subnets) {
        return refused(reason);
    }
    if let Err(reason) = packet6::check_overlay_scope(packet, &view) {
        return refused(reason);
    }
    if let Err(reason) = packet6::decapsulate_ecn6(packet, outer_ecn_byte) {
        return refused(reason);
    }
    if hop == ReceiverHop::Rules {
        if let Err(reason) = packet6::decrement_hop_limit(packet) {
            // The source is in the sender's subnet (checked above): the error goes back there.
            let source = overlay.icmp_to_peers;
            let kind = Icmp6Error::HopLimitExceeded;
            let icmp_len = build_icmp6_error(kind, packet, &view, source, icmp);
            return Inbound6::Drop { reason, icmp_len };
        }
    }
    Inbound6::Deliver {
        len: view.total_len,
        from: peers.route(view.src),
    }
}

#[cfg(test)]
#[path = "forwarding6_tests.rs"]
mod tests;
