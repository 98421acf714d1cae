//! Local containers without a bridge (CNI ptp or Calico style): a host-side veth with a /32
//! route `<container IP> dev vethX` and the container's IPv4 neighbour on it. The fast
//! delivery path redirects into vethX's peer with the veth's own MAC as the source.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteProtocol, RouteScope, RouteType},
    AddressFamily,
};
use rtnetlink::RouteMessageBuilder;
use rudder_ebpf::LocalEndpoint;

use super::routes::{Routes, RTPROT_RUDDER};

impl Routes {
    /// Containers inside `subnet` reached by a /32 link route of the main table over a veth
    /// whose neighbour entry for them is usable (see the module documentation).
    pub(super) fn discover_routed_endpoints(
        &self,
        subnet: Ipv4Net,
    ) -> anyhow::Result<Vec<(Ipv4Addr, LocalEndpoint)>> {
        self.run(async {
            let routes: Vec<_> = self
                .handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .context("listing IPv4 routes")?;
            let routed: Vec<(Ipv4Addr, u32)> = routes
                .iter()
                .filter(|r| {
                    r.header.destination_prefix_length == 32
                        && r.header.table == RouteHeader::RT_TABLE_MAIN
                        && r.header.kind == RouteType::Unicast
                        && r.header.scope == RouteScope::Link
                        && r.header.protocol != RouteProtocol::Other(RTPROT_RUDDER)
                })
                .filter_map(|r| {
                    let mut destination = None;
                    let mut oif = None;
                    for attr in &r.attributes {
                        match attr {
                            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                                destination = Some(*ip)
                            }
                            RouteAttribute::Oif(index) => oif = Some(*index),
                            // Through a next hop: not a directly attached container.
                            RouteAttribute::Gateway(_) => return None,
                            _ => {}
                        }
                    }
                    Some((destination.filter(|ip| subnet.contains(ip))?, oif?))
                })
                .collect();
            if routed.is_empty() {
                return Ok(Vec::new());
            }
            let neighbours: Vec<_> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Inet)
                .execute()
                .try_collect()
                .await
                .context("dumping IPv4 neighbours")?;
            let mut found = Vec::new();
            for (ip, oif) in routed {
                let container_mac = neighbours.iter().find_map(|n| {
                    let on_route = n.header.ifindex == oif
                        && usable(n.header.state)
                        && n.attributes
                            .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
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
                if let (true, Some(gateway_mac)) = (is_veth, gateway_mac) {
                    found.push((
                        ip,
                        LocalEndpoint {
                            host_ifindex: oif,
                            container_mac,
                            gateway_mac,
                        },
                    ));
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
