//! The IPv6 peer routes: `<IPv6 subnet> via inet <next hop> dev <underlay> onlink mtu
//! <overlay MTU> proto 211` (an IPv6 route with an IPv4 gateway, `RTA_VIA`): the kernel
//! resolves the IPv4 next hop's MAC with ARP and hands the IPv6 packet to `rudder_egress`
//! with a usable Ethernet header. Plus the IPv6 network's unreachable route.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::Ipv6Net;
use rtnetlink::{
    packet_route::route::{
        RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType, RouteVia,
    },
    RouteMessageBuilder,
};

use super::routes::{is_no_such_route, Routes, RTPROT_RUDDER};

impl Routes {
    /// Installs (or replaces) the route of one IPv6 peer subnet reached at `peer_ip`.
    pub(super) fn add_peer6(
        &self,
        subnet: Ipv6Net,
        peer_ip: Ipv4Addr,
        overlay_mtu: u16,
    ) -> anyhow::Result<()> {
        let next_hop = self.next_hop(peer_ip);
        let mut message = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix_len())
            .output_interface(self.underlay_ifindex)
            .protocol(RouteProtocol::Other(RTPROT_RUDDER))
            .onlink()
            .build();
        message
            .attributes
            .push(RouteAttribute::Via(RouteVia::Inet(next_hop)));
        message
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(u32::from(
                overlay_mtu,
            ))]));
        self.run(self.handle.route().add(message).replace().execute())
            .with_context(|| {
                format!(
                    "adding route {subnet} via inet {next_hop} (peer {peer_ip}) dev ifindex {} mtu {overlay_mtu}",
                    self.underlay_ifindex
                )
            })
    }

    pub(super) fn remove_peer6(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        let message = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix_len())
            .protocol(RouteProtocol::Other(RTPROT_RUDDER))
            .build();
        match self.run(self.handle.route().del(message).execute()) {
            Ok(()) => Ok(()),
            Err(e) if is_no_such_route(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing route {subnet}")),
        }
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

    /// Every IPv6 route with our protocol number.
    fn ours6(&self) -> anyhow::Result<Vec<RouteMessage>> {
        let dump = RouteMessageBuilder::<Ipv6Addr>::new().build();
        Ok(self
            .run(
                self.handle
                    .route()
                    .get(dump)
                    .execute()
                    .try_collect::<Vec<_>>(),
            )
            .context("listing IPv6 routes")?
            .into_iter()
            .filter(|route| route.header.protocol == RouteProtocol::Other(RTPROT_RUDDER))
            .collect())
    }

    /// Deletes every IPv6 route with our protocol number; returns how many.
    pub(super) fn remove_stale6(&self) -> anyhow::Result<usize> {
        let ours = self.ours6()?;
        let count = ours.len();
        for route in ours {
            match self.run(self.handle.route().del(route.clone()).execute()) {
                Ok(()) => {}
                Err(e) if is_no_such_route(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("removing stale route {route:?}")),
            }
        }
        Ok(count)
    }
}
