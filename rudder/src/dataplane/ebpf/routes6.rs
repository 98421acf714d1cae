//! The IPv6 peer routes: `<IPv6 subnet> via fe80::7275:6464:6572 dev <underlay> onlink mtu
//! <overlay MTU> proto 211`. The kernel refuses IPv6 routes with an IPv4 gateway (`via inet`,
//! RTA_VIA: "IPv6 does not support RTA_VIA attribute"), so every IPv6 peer route points at
//! one placeholder link-local gateway with a permanent neighbour entry: the kernel hands the
//! packet to `rudder_egress`, which encapsulates it and `bpf_redirect_neigh`s it, taking
//! the real MACs from the IPv4 route and ARP entry of the outer destination. Plus the IPv6
//! network's unreachable route.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::{
    packet_route::route::{
        RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType,
    },
    RouteMessageBuilder,
};

use super::routes::{Routes, RTPROT_RUDDER};

/// The IPv6 peer routes' gateway ("rudder" in its last 48 bits): never a real neighbour.
pub(super) const NEXT_HOP6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0x7275, 0x6464, 0x6572);
/// Its MAC, locally administered; replaced by `bpf_redirect_neigh` before the frame leaves.
const NEXT_HOP6_MAC: [u8; 6] = [0x02, 0x72, 0x75, 0x64, 0x64, 0x72];

impl Routes {
    /// Installs (or replaces) the route of one IPv6 peer subnet reached at `peer_ip`.
    pub(super) fn add_peer6(
        &self,
        subnet: Ipv6Net,
        peer_ip: IpAddr,
        overlay_mtu: u16,
    ) -> anyhow::Result<()> {
        self.ensure_next_hop6()?;
        let mut message = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix_len())
            .gateway(NEXT_HOP6)
            .output_interface(self.underlay_ifindex)
            .protocol(RouteProtocol::Other(RTPROT_RUDDER))
            .onlink()
            .build();
        message
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(u32::from(
                overlay_mtu,
            ))]));
        self.run(self.handle.route().add(message).replace().execute())
            .with_context(|| {
                format!(
                    "adding route {subnet} via {NEXT_HOP6} (peer {peer_ip}) dev ifindex {} mtu {overlay_mtu}",
                    self.underlay_ifindex
                )
            })
    }

    /// Installs (or replaces) the route of an IPv4 peer subnet reached over IPv6: `<subnet>
    /// via inet6 <placeholder> dev <underlay> onlink mtu <overlay MTU> proto 211` (an IPv4
    /// route may have an IPv6 gateway, RFC 5549).
    pub(super) fn add_peer_over6(
        &self,
        subnet: Ipv4Net,
        overlay_mtu: u16,
        pref_source: Option<Ipv4Addr>,
    ) -> anyhow::Result<()> {
        self.ensure_next_hop6()?;
        let build = |src: Option<Ipv4Addr>| {
            let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(subnet.network(), subnet.prefix_len())
                .via(NEXT_HOP6)
                .output_interface(self.underlay_ifindex)
                .protocol(RouteProtocol::Other(RTPROT_RUDDER))
                .onlink();
            if let Some(src) = src {
                builder = builder.pref_source(src);
            }
            let mut message = builder.build();
            message
                .attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(u32::from(
                    overlay_mtu,
                ))]));
            message
        };
        let result = self.run(
            self.handle
                .route()
                .add(build(pref_source))
                .replace()
                .execute(),
        );
        let result = match result {
            // The gateway address is not on the bridge (yet): route without it.
            Err(_) if pref_source.is_some() => {
                self.run(self.handle.route().add(build(None)).replace().execute())
            }
            other => other,
        };
        result.with_context(|| {
            format!(
                "adding route {subnet} via inet6 {NEXT_HOP6} dev ifindex {} mtu {overlay_mtu}",
                self.underlay_ifindex
            )
        })
    }

    /// The placeholder gateway's permanent neighbour entry (re-added if something flushed it).
    pub(super) fn ensure_next_hop6(&self) -> anyhow::Result<()> {
        let request = self
            .handle
            .neighbours()
            .add(self.underlay_ifindex, IpAddr::V6(NEXT_HOP6))
            .link_layer_address(&NEXT_HOP6_MAC)
            .replace();
        self.run(request.execute()).with_context(|| {
            format!(
                "adding the neighbour {NEXT_HOP6} lladdr 02:72:75:64:64:72 (the IPv6 peer routes' gateway) on ifindex {}",
                self.underlay_ifindex
            )
        })
    }

    pub(super) fn remove_peer6(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        let message = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix_len())
            .protocol(RouteProtocol::Other(RTPROT_RUDDER))
            .build();
        self.delete_route(message)
            .with_context(|| format!("removing route {subnet}"))
    }

    /// `unreachable <network> proto 211`: the kernel answers "destination unreachable" for
    /// overlay addresses no peer holds instead of sending them out unencapsulated.
    pub(super) fn add_unreachable6(&self, network: Ipv6Net) -> anyhow::Result<()> {
        let mut message = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(network.network(), network.prefix_len())
            .protocol(RouteProtocol::Other(RTPROT_RUDDER))
            .kind(RouteType::Unreachable)
            .build();
        message.header.scope = RouteScope::Universe;
        self.run(self.handle.route().add(message).replace().execute())
            .with_context(|| format!("adding the route `unreachable {network}`"))
    }

    /// Destinations of our IPv6 routes present now.
    pub(super) fn installed_destinations6(
        &self,
    ) -> anyhow::Result<std::collections::BTreeSet<Ipv6Net>> {
        use rtnetlink::packet_route::route::RouteAddress;
        Ok(self
            .ours6()?
            .iter()
            .filter_map(|route| {
                route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet6(addr)) => {
                        Ipv6Net::new(*addr, route.header.destination_prefix_length).ok()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Every IPv6 route with our protocol number, the others dropped as the dump streams in
    /// (as [`Routes`]' IPv4 check: the whole table collected first is tens of MB at 65,536).
    fn ours6(&self) -> anyhow::Result<Vec<RouteMessage>> {
        let dump = RouteMessageBuilder::<Ipv6Addr>::new().build();
        self.run(async {
            let mut stream = self.handle.route().get(dump).execute();
            let mut ours = Vec::new();
            while let Some(route) = stream.try_next().await? {
                if route.header.protocol == RouteProtocol::Other(RTPROT_RUDDER) {
                    ours.push(route);
                }
            }
            Ok::<_, rtnetlink::Error>(ours)
        })
        .context("listing IPv6 routes")
    }

    /// Deletes every IPv6 route with our protocol number, and the placeholder gateway's
    /// neighbour entry; returns how many routes.
    pub(super) fn remove_stale6(&self) -> anyhow::Result<usize> {
        let ours = self.ours6()?;
        let count = ours.len();
        let mut neighbour = rtnetlink::packet_route::neighbour::NeighbourMessage::default();
        neighbour.header.family = rtnetlink::packet_route::AddressFamily::Inet6;
        neighbour.header.ifindex = self.underlay_ifindex;
        neighbour.attributes.push(
            rtnetlink::packet_route::neighbour::NeighbourAttribute::Destination(
                rtnetlink::packet_route::neighbour::NeighbourAddress::Inet6(NEXT_HOP6),
            ),
        );
        // Absent unless IPv6 peers were installed: nothing to report then.
        let _ = self.run(self.handle.neighbours().del(neighbour).execute());
        for route in ours {
            self.delete_route(route.clone())
                .with_context(|| format!("removing stale route {route:?}"))?;
        }
        Ok(count)
    }
}
