//! Local containers without a bridge (CNI ptp or Calico style): a host-side veth with a /32
//! (IPv6: /128) route `<container IP> dev vethX` and the container's neighbour on it. The fast
//! delivery path redirects into vethX's peer with the veth's own MAC as the source, and
//! `rudder_br_in` sits on vethX's ingress as it does on a bridge's (container → peer).
//! Without the latter the container's packets would pass the host's forwarding, which makes
//! `rudder_egress` send their replies up the stack too (`stack_flows`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use rtnetlink::RouteMessageBuilder;
use rudder_ebpf::LocalEndpoint;

use super::endpoints::LocalSubnets;
use super::kernel::{Kernel, SchedClassifierLinkId};
use super::routes::{Routes, RTPROT_RUDDER};

/// The bridgeless veths `rudder_br_in` is attached to: ifindex → link (`None`: attaching
/// failed, logged once; that container's traffic to peers takes the host's path).
#[derive(Default)]
pub(super) struct RoutedVeths(BTreeMap<u32, Option<SchedClassifierLinkId>>);

impl RoutedVeths {
    /// Attaches to the veths in `now` (ifindex → name) not yet served, detaches from those
    /// no longer there (a deleted veth took its link with it).
    pub(super) fn follow(&mut self, kernel: &mut Kernel, now: BTreeMap<u32, String>) {
        let gone: Vec<u32> = self
            .0
            .keys()
            .filter(|i| !now.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            if let Some(Some(link)) = self.0.remove(&ifindex) {
                kernel.detach_bridge(link);
            }
        }
        for (ifindex, name) in now {
            self.0.entry(ifindex).or_insert_with(|| match kernel.attach_bridge(&name) {
                Ok(link) => {
                    tracing::info!(veth = %name, ifindex, "routed container veth: container to peer fast path attached");
                    Some(link)
                }
                Err(e) => {
                    tracing::warn!(veth = %name, "{e:#}; this container's traffic to peers takes the host's forwarding path");
                    None
                }
            });
        }
    }
}

/// The container and veth of a host route of the main table into `subnets` (not ours, not
/// through a next hop): /32 of link scope, or /128 (IPv6 routes have no link scope).
fn routed_container(r: &RouteMessage, subnets: &LocalSubnets) -> Option<(IpAddr, u32)> {
    let host_route = match r.header.destination_prefix_length {
        32 => r.header.scope == RouteScope::Link,
        128 => true,
        _ => false,
    };
    if !host_route
        || r.header.table != RouteHeader::RT_TABLE_MAIN
        || r.header.kind != RouteType::Unicast
        || r.header.protocol == RouteProtocol::Other(RTPROT_RUDDER)
    {
        return None;
    }
    let mut destination = None;
    let mut oif = None;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip))
                if r.header.destination_prefix_length == 32 =>
            {
                destination = Some(IpAddr::V4(*ip))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(ip))
                if r.header.destination_prefix_length == 128 =>
            {
                destination = Some(IpAddr::V6(*ip))
            }
            RouteAttribute::Oif(index) => oif = Some(*index),
            // Through a next hop: not a directly attached container.
            RouteAttribute::Gateway(_) => return None,
            _ => {}
        }
    }
    Some((destination.filter(|ip| subnets.contains(*ip))?, oif?))
}

impl Routes {
    /// Containers inside `subnets` reached by a host route of the main table over a veth
    /// whose neighbour entry for them is usable (see the module documentation), with the
    /// veth's name.
    pub(super) fn discover_routed_endpoints(
        &self,
        subnets: &LocalSubnets,
    ) -> anyhow::Result<Vec<(IpAddr, LocalEndpoint, String)>> {
        self.run(async {
            // Filtered as the dump streams in: with 65,536 peer routes, collecting the whole
            // dump first was tens of MB every resync.
            let mut stream = self
                .handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            let mut routed: Vec<(IpAddr, u32)> = Vec::new();
            while let Some(r) = stream.try_next().await.context("listing IPv4 routes")? {
                routed.extend(routed_container(&r, subnets));
            }
            if subnets.v6.is_some() {
                let mut stream = self
                    .handle
                    .route()
                    .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                    .execute();
                while let Some(r) = stream.try_next().await.context("listing IPv6 routes")? {
                    routed.extend(routed_container(&r, subnets));
                }
            }
            if routed.is_empty() {
                return Ok(Vec::new());
            }
            let neighbours: Vec<_> = self.neighbours(subnets.v6.is_some()).await?;
            let mut found = Vec::new();
            for (ip, oif) in routed {
                let destination = match ip {
                    IpAddr::V4(ip) => NeighbourAddress::Inet(ip),
                    IpAddr::V6(ip) => NeighbourAddress::Inet6(ip),
                };
                let destination = NeighbourAttribute::Destination(destination);
                let container_mac = neighbours.iter().find_map(|n| {
                    let on_route = n.header.ifindex == oif
                        && usable(n.header.state)
                        && n.attributes.contains(&destination);
                    on_route.then(|| lladdr(&n.attributes)).flatten()
                });
                let Some(container_mac) = container_mac else {
                    continue;
                };
                let Some(link) = self
                    .handle
                    .link()
                    .get()
                    .match_index(oif)
                    .execute()
                    .try_next()
                    .await
                    .with_context(|| format!("looking up interface {oif}"))?
                else {
                    continue;
                };
                // bpf_redirect_peer only works for veth (and netkit) devices.
                let is_veth = link.attributes.iter().any(|attr| {
                    matches!(attr, LinkAttribute::LinkInfo(infos)
                        if infos.contains(&LinkInfo::Kind(InfoKind::Veth)))
                });
                let gateway_mac = link.attributes.iter().find_map(|attr| match attr {
                    LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                    _ => None,
                });
                let name = link.attributes.iter().find_map(|attr| match attr {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                });
                if let (true, Some(gateway_mac), Some(name)) = (is_veth, gateway_mac, name) {
                    let endpoint = LocalEndpoint {
                        host_ifindex: oif,
                        container_mac,
                        gateway_mac,
                    };
                    found.push((ip, endpoint, name));
                }
            }
            Ok(found)
        })
    }
}

/// Whether a neighbour entry in this state names a container the fast path can serve.
pub(crate) fn usable(state: NeighbourState) -> bool {
    !matches!(
        state,
        NeighbourState::Incomplete
            | NeighbourState::Failed
            | NeighbourState::Noarp
            | NeighbourState::None
    )
}

/// The link-layer address of a neighbour or FDB entry, if it is a MAC.
pub(super) fn lladdr(attributes: &[NeighbourAttribute]) -> Option<[u8; 6]> {
    attributes.iter().find_map(|attr| match attr {
        NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
        _ => None,
    })
}
