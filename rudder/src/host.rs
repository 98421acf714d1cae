//! Host plumbing over netlink: the underlay interface, the bridge, forwarding. Data planes add
//! their own devices and routes through [`Netlink`]; firewall rules are in `firewall.rs`.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, Context};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

/// Metric of the `--ip-blackhole-route` route: last, behind any route to the same subnet.
pub const BLACKHOLE_METRIC: u32 = u32::MAX;

fn blackhole_route(subnet: Ipv4Net) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(subnet.network(), subnet.prefix_len())
        .kind(RouteType::BlackHole)
        .priority(BLACKHOLE_METRIC)
        .build()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub link_layer: LinkLayerType,
}

#[derive(Clone)]
pub struct Netlink {
    pub(crate) handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace.
    pub fn new() -> anyhow::Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    // Netlink dumps are always read to the end: a dropped half-read stream makes the
    // connection task log a warning for every unread message.

    pub async fn link_by_name(&self, name: &str) -> anyhow::Result<Option<LinkInfo>> {
        let links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect::<Vec<_>>()
            .await;
        match links {
            Ok(links) => Ok(links.into_iter().next().map(link_info)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
            Err(e) => Err(anyhow!("looking up interface {name}: {e}")),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> anyhow::Result<LinkInfo> {
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("looking up interface #{index}"))?;
        links
            .into_iter()
            .next()
            .map(link_info)
            .ok_or_else(|| anyhow!("no interface #{index}"))
    }

    /// Every IPv4 route (all tables), one dump.
    async fn ipv4_routes(&self) -> anyhow::Result<Vec<RouteMessage>> {
        self.handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .context("listing routes")
    }

    /// The output interface of the IPv4 default route in the main table.
    pub async fn default_route_iface(&self) -> anyhow::Result<Option<u32>> {
        Ok(main_default_route_iface(&self.ipv4_routes().await?))
    }

    /// The output interface of the IPv6 default route in the main table (an IPv6-only host).
    pub async fn default_route_iface6(&self) -> anyhow::Result<Option<u32>> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .context("listing IPv6 routes")?;
        Ok(main_default_route_iface(&routes))
    }

    /// The interface's IPv4 addresses with the messages that carry them (to delete one).
    async fn ipv4_address_messages(
        &self,
        index: u32,
    ) -> anyhow::Result<Vec<(Ipv4Net, AddressMessage)>> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        let mut found = Vec::new();
        for msg in messages {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = ip {
                found.push((Ipv4Net::new(ip, msg.header.prefix_len)?, msg));
            }
        }
        Ok(found)
    }

    pub async fn ipv4_addresses(&self, index: u32) -> anyhow::Result<Vec<Ipv4Net>> {
        Ok(self
            .ipv4_address_messages(index)
            .await?
            .into_iter()
            .map(|(net, _)| net)
            .collect())
    }

    /// Every interface with its IPv4 addresses, in index order (Go's `net.Interfaces`).
    pub(crate) async fn links_with_addresses(
        &self,
    ) -> anyhow::Result<Vec<(LinkInfo, Vec<Ipv4Addr>)>> {
        let mut links: Vec<LinkInfo> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .context("listing interfaces")?
            .into_iter()
            .map(link_info)
            .collect();
        links.sort_by_key(|l| l.index);
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        Ok(links
            .into_iter()
            .map(|link| {
                let addrs = messages
                    .iter()
                    .filter(|m| m.header.index == link.index)
                    .filter_map(|m| {
                        m.attributes.iter().find_map(|a| match a {
                            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                            _ => None,
                        })
                    })
                    .collect();
                (link, addrs)
            })
            .collect())
    }

    /// The output interface and preferred source of the route to `dest` (`ip route get`).
    pub async fn route_get(&self, dest: Ipv4Addr) -> anyhow::Result<(u32, Option<Ipv4Addr>)> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(dest, 32)
                    .build(),
            )
            .execute()
            .try_collect()
            .await
            .with_context(|| format!("looking up the route to {dest}"))?;
        let route = routes
            .first()
            .ok_or_else(|| anyhow!("no route to {dest}"))?;
        let oif = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
            .ok_or_else(|| anyhow!("the route to {dest} has no output interface"))?;
        let src = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        Ok((oif, src))
    }

    /// Adds a blackhole route for `subnet` (at [`BLACKHOLE_METRIC`], so a bridge's connected
    /// route to the same subnet keeps precedence) unless one exists. Returns whether it added.
    pub async fn ensure_blackhole(&self, subnet: Ipv4Net) -> anyhow::Result<bool> {
        if !self.blackholes(subnet).await?.is_empty() {
            return Ok(false);
        }
        self.handle
            .route()
            .add(blackhole_route(subnet))
            .execute()
            .await
            .with_context(|| format!("adding blackhole route {subnet}"))?;
        Ok(true)
    }

    /// Removes the blackhole route [`Self::ensure_blackhole`] adds (not one of another metric).
    pub async fn remove_blackhole(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        for route in self.blackholes(subnet).await? {
            let ours = route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Priority(p) if *p == BLACKHOLE_METRIC));
            if ours {
                self.delete_route(route).await?;
            }
        }
        Ok(())
    }

    async fn blackholes(&self, subnet: Ipv4Net) -> anyhow::Result<Vec<RouteMessage>> {
        let routes = self.ipv4_routes().await?;
        Ok(routes
            .into_iter()
            .filter(|r| {
                r.header.kind == RouteType::BlackHole
                    && r.header.destination_prefix_length == subnet.prefix_len()
                    && r.attributes.iter().any(|a| {
                        matches!(a, RouteAttribute::Destination(RouteAddress::Inet(ip))
                            if *ip == subnet.network())
                    })
            })
            .collect())
    }

    /// Creates (or adopts) a bridge holding exactly `address`, with `mtu`, and brings it up.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        address: Option<Ipv4Net>,
        mtu: u32,
    ) -> anyhow::Result<u32> {
        if self.link_by_name(name).await?.is_none() {
            self.handle
                .link()
                .add(LinkBridge::new(name).mtu(mtu).build())
                .execute()
                .await
                .with_context(|| format!("creating bridge {name}"))?;
        }
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| anyhow!("bridge {name} vanished right after creation"))?;
        // No IPv4 address on an IPv6-only network.
        if let Some(address) = address {
            self.set_only_address(link.index, address).await?;
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).mtu(mtu).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing bridge {name} up"))?;
        Ok(link.index)
    }

    /// Makes `address` the only IPv4 address of the interface.
    pub async fn set_only_address(&self, index: u32, address: Ipv4Net) -> anyhow::Result<()> {
        let mut present = false;
        for (net, msg) in self.ipv4_address_messages(index).await? {
            if net == address {
                present = true;
            } else {
                self.handle.address().del(msg).execute().await.ok();
            }
        }
        if !present {
            self.handle
                .address()
                .add(index, IpAddr::V4(address.addr()), address.prefix_len())
                .execute()
                .await
                .with_context(|| format!("adding address {address}"))?;
        }
        Ok(())
    }

    /// Adds or replaces a route to `dest` out of interface `oif`.
    pub async fn replace_route(
        &self,
        dest: Ipv4Net,
        oif: u32,
        gateway: Option<Ipv4Addr>,
    ) -> anyhow::Result<()> {
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dest.network(), dest.prefix_len())
            .output_interface(oif);
        if let Some(gw) = gateway {
            route = route.gateway(gw);
        }
        self.handle
            .route()
            .add(route.build())
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding route {dest} via interface #{oif}"))
    }

    pub async fn delete_route(&self, route: RouteMessage) -> anyhow::Result<()> {
        self.handle.route().del(route).execute().await?;
        Ok(())
    }

    /// Deletes an interface by name; absent is fine.
    pub async fn delete_link(&self, name: &str) -> anyhow::Result<()> {
        if let Some(link) = self.link_by_name(name).await? {
            self.handle
                .link()
                .del(link.index)
                .execute()
                .await
                .with_context(|| format!("deleting interface {name}"))?;
        }
        Ok(())
    }
}

/// The kernel's main routing table (`RT_TABLE_MAIN`).
const MAIN_TABLE: u32 = 254;

/// The table a route is in: the attribute when present (tables above 255), else the header.
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// The output interface of the main table's default route with the lowest metric. Other
/// tables are skipped: a VPN's policy table may hold a "better" default that the underlay's
/// traffic never takes.
fn main_default_route_iface(routes: &[RouteMessage]) -> Option<u32> {
    routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0 && r.header.kind == RouteType::Unicast)
        .filter(|r| route_table(r) == MAIN_TABLE)
        .filter_map(|r| {
            let metric = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Priority(p) => Some(*p),
                    _ => None,
                })
                .unwrap_or(0);
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })?;
            Some((metric, oif))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, oif)| oif)
}

fn link_info(msg: rtnetlink::packet_route::link::LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 1500,
        link_layer: msg.header.link_layer_type,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::Mtu(m) => info.mtu = m,
            _ => {}
        }
    }
    info
}

const fn libc_enodev() -> i32 {
    19
}

/// Routing between the bridge and the overlay needs forwarding on.
pub fn enable_ip_forwarding() -> anyhow::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("enabling net.ipv4.ip_forward (needs CAP_NET_ADMIN)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_route(table: u32, metric: u32, oif: u32) -> RouteMessage {
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(Ipv4Addr::new(192, 168, 1, 1))
            .output_interface(oif)
            .priority(metric)
            .table_id(table)
            .build();
        route.header.kind = RouteType::Unicast;
        route
    }

    #[test]
    fn default_route_comes_from_the_main_table_only() {
        // A VPN's table 100 with a better metric must not win over the main table.
        let routes = [
            default_route(100, 0, 7),
            default_route(MAIN_TABLE, 600, 3),
            default_route(MAIN_TABLE, 100, 2),
        ];
        assert_eq!(main_default_route_iface(&routes), Some(2));
        assert_eq!(main_default_route_iface(&routes[..1]), None);
        let mut blackhole = default_route(MAIN_TABLE, 0, 9);
        blackhole.header.kind = RouteType::BlackHole;
        assert_eq!(main_default_route_iface(&[blackhole]), None);
    }
}
