//! Local endpoints: the containers behind the bridge that get the fast delivery path,
//! found from the bridge's IPv4 neighbours and FDB.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rudder_ebpf::LocalEndpoint;

use super::routes::Routes;

impl Routes {
    /// Containers behind `bridge` with an address in `subnet`; see
    /// `EbpfDataplane::refresh_local_endpoints`.
    pub(super) fn discover_endpoints(
        &self,
        bridge: &str,
        subnet: Ipv4Net,
    ) -> anyhow::Result<Vec<(Ipv4Addr, LocalEndpoint)>> {
        use rtnetlink::packet_route::{
            link::{InfoKind, LinkAttribute, LinkInfo},
            neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
            AddressFamily,
        };
        fn lladdr(entry: &NeighbourMessage) -> Option<[u8; 6]> {
            entry.attributes.iter().find_map(|attr| match attr {
                NeighbourAttribute::LinkLayerAddress(mac) => mac.as_slice().try_into().ok(),
                _ => None,
            })
        }
        self.run(async {
            let bridge_link = self
                .handle
                .link()
                .get()
                .match_name(bridge.to_owned())
                .execute()
                .try_next()
                .await
                .with_context(|| format!("looking up bridge {bridge}"))?
                .with_context(|| format!("bridge {bridge} not found"))?;
            let bridge_index = bridge_link.header.index;
            let gateway_mac: [u8; 6] = bridge_link
                .attributes
                .iter()
                .find_map(|attr| match attr {
                    LinkAttribute::Address(mac) => mac.as_slice().try_into().ok(),
                    _ => None,
                })
                .with_context(|| format!("bridge {bridge} has no MAC address"))?;

            // Bridge FDB: which port each MAC sits behind.
            let fdb: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Bridge)
                .execute()
                .try_collect()
                .await
                .context("dumping the bridge FDB")?;
            let port_of_mac: std::collections::HashMap<[u8; 6], u32> = fdb
                .iter()
                .filter(|entry| {
                    entry.header.ifindex != bridge_index
                        && entry
                            .attributes
                            .contains(&NeighbourAttribute::Controller(bridge_index))
                })
                .filter_map(|entry| Some((lladdr(entry)?, entry.header.ifindex)))
                .collect();

            let neighbours: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Inet)
                .execute()
                .try_collect()
                .await
                .context("dumping IPv4 neighbours")?;
            let mut found = Vec::new();
            for neighbour in neighbours.iter().filter(|n| {
                n.header.ifindex == bridge_index
                    && !matches!(
                        n.header.state,
                        NeighbourState::Incomplete
                            | NeighbourState::Failed
                            | NeighbourState::Noarp
                            | NeighbourState::None
                    )
            }) {
                let Some(ip) = neighbour.attributes.iter().find_map(|attr| match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                }) else {
                    continue;
                };
                let (Some(mac), true) = (lladdr(neighbour), subnet.contains(&ip)) else {
                    continue;
                };
                let Some(&port) = port_of_mac.get(&mac) else {
                    continue;
                };
                // bpf_redirect_peer only works for veth (and netkit) ports.
                let port_link = self
                    .handle
                    .link()
                    .get()
                    .match_index(port)
                    .execute()
                    .try_next()
                    .await
                    .with_context(|| format!("looking up bridge port {port}"))?;
                let is_veth = port_link.is_some_and(|link| {
                    link.attributes.iter().any(|attr| {
                        matches!(attr, LinkAttribute::LinkInfo(infos)
                            if infos.contains(&LinkInfo::Kind(InfoKind::Veth)))
                    })
                });
                if is_veth {
                    found.push((
                        ip,
                        LocalEndpoint {
                            host_ifindex: port,
                            container_mac: mac,
                            gateway_mac,
                        },
                    ));
                }
            }
            Ok(found)
        })
    }
}
