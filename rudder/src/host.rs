//! Host plumbing over netlink: the underlay interface, the bridge, forwarding. Data planes add
//! their own devices and routes through [`Netlink`]; firewall rules are in `firewall.rs`.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, bail, Context};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

/// The interface other hosts reach us through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub public_ip: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
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

    /// The output interface of the IPv4 default route in the main table.
    pub async fn default_route_iface(&self) -> anyhow::Result<Option<u32>> {
        let routes: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .context("listing routes")?;
        Ok(routes
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0)
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
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

    /// Resolves `--iface`/`--public-ip`, defaulting to the default route's interface and
    /// its first IPv4 address.
    pub async fn underlay(
        &self,
        iface: Option<&str>,
        public_ip: Option<Ipv4Addr>,
    ) -> anyhow::Result<Underlay> {
        let link = match iface {
            Some(name) => self.link_by_name(name).await?.ok_or_else(|| {
                anyhow!("--iface {name}: no such interface; list them with `ip link`")
            })?,
            None => {
                let index = self.default_route_iface().await?.ok_or_else(|| {
                    anyhow!(
                        "no IPv4 default route to pick the underlay interface from: pass --iface"
                    )
                })?;
                self.link_by_index(index).await?
            }
        };
        let public_ip = match public_ip {
            Some(ip) => ip,
            None => self
                .ipv4_addresses(link.index)
                .await?
                .first()
                .map(|n| n.addr())
                .ok_or_else(|| {
                    anyhow!(
                        "interface {} has no IPv4 address: give it one or pass --public-ip",
                        link.name
                    )
                })?,
        };
        Ok(Underlay {
            name: link.name,
            index: link.index,
            mtu: link.mtu,
            public_ip,
        })
    }

    /// Creates (or adopts) a bridge holding exactly `address`, with `mtu`, and brings it up.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        address: Ipv4Net,
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
        self.set_only_address(link.index, address).await?;
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

fn link_info(msg: rtnetlink::packet_route::link::LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 1500,
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

/// Linux capability numbers rudder checks for (`linux/capability.h`).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    effective_capabilities().is_some_and(|set| set & (1u64 << cap) != 0)
}

/// The effective capability set from `/proc/self/status` (`CapEff`).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Fails with the capability's name and what needs it, when it is missing.
pub fn require_capability(cap: u32, name: &str, why: &str) -> anyhow::Result<()> {
    if !has_capability(cap) {
        bail!(
            "missing {name}: {why}; run as root or grant it (systemd: AmbientCapabilities={name})"
        );
    }
    Ok(())
}

/// Routing between the bridge and the overlay needs forwarding on.
pub fn enable_ip_forwarding() -> anyhow::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("enabling net.ipv4.ip_forward (needs CAP_NET_ADMIN)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_are_read_from_proc_status() {
        let status = "Name:\trudder\nCapInh:\t0000000000000000\nCapEff:\t0000000000001000\n";
        let set = parse_cap_eff(status).unwrap();
        assert_ne!(set & (1 << CAP_NET_ADMIN), 0);
        assert_eq!(set & (1 << CAP_BPF), 0);
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
