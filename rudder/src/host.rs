//! Host plumbing over netlink: the underlay interface, the bridge, forwarding. Data planes add
//! their own devices and routes through [`Netlink`]; firewall rules are in `firewall.rs`.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, bail, Context};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

/// The interface other hosts reach us through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// The address peers send to (the lease's PublicIP): `--public-ip`, else `local_ip`.
    pub public_ip: Ipv4Addr,
    /// The address this host owns on the underlay: the outer source of what it sends and the
    /// outer destination of what it receives. Differs from `public_ip` only behind a 1:1 NAT
    /// (a cloud's elastic IP), where the provider translates between the two.
    pub local_ip: Ipv4Addr,
}

impl Underlay {
    /// Whether peers reach us through an address translation (`--public-ip` is not ours).
    pub fn behind_nat(&self) -> bool {
        self.public_ip != self.local_ip
    }
}

/// How to pick the underlay: flanneld's `--iface` (repeatable), `--iface-regex`
/// (repeatable), `--iface-can-reach` and `--public-ip`.
#[derive(Debug, Clone, Default)]
pub struct UnderlaySelection {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

/// Metric of the `--ip-blackhole-route` route: last, behind any route to the same subnet.
pub const BLACKHOLE_METRIC: u32 = u32::MAX;

fn blackhole_route(subnet: Ipv4Net) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(subnet.network(), subnet.prefix_len())
        .kind(RouteType::BlackHole)
        .priority(BLACKHOLE_METRIC)
        .build()
}

/// The interface holding address `ip`, with it.
fn holding(
    links: &[(LinkInfo, Vec<Ipv4Addr>)],
    ip: Ipv4Addr,
) -> Option<(LinkInfo, Option<Ipv4Addr>)> {
    links
        .iter()
        .find(|(_, addrs)| addrs.contains(&ip))
        .map(|(l, _)| (l.clone(), Some(ip)))
}

/// `--iface`: an IPv4 address names the interface holding it; anything else is a name.
fn by_name_or_address(
    links: &[(LinkInfo, Vec<Ipv4Addr>)],
    want: &str,
) -> Option<(LinkInfo, Option<Ipv4Addr>)> {
    match want.parse::<Ipv4Addr>() {
        Ok(ip) => holding(links, ip),
        Err(_) => links
            .iter()
            .find(|(l, _)| l.name == want)
            .map(|(l, _)| (l.clone(), None)),
    }
}

/// `--iface-regex`: the first interface with a matching IPv4 address (that address), else
/// the first interface with a matching name.
fn match_regex(
    re: &regex::Regex,
    links: &[(LinkInfo, Vec<Ipv4Addr>)],
) -> Option<(LinkInfo, Option<Ipv4Addr>)> {
    links
        .iter()
        .find_map(|(l, addrs)| {
            addrs
                .iter()
                .find(|ip| re.is_match(&ip.to_string()))
                .map(|ip| (l.clone(), Some(*ip)))
        })
        .or_else(|| {
            links
                .iter()
                .find(|(l, _)| re.is_match(&l.name))
                .map(|(l, _)| (l.clone(), None))
        })
}

fn describe(links: &[(LinkInfo, Vec<Ipv4Addr>)]) -> String {
    links
        .iter()
        .map(|(l, a)| format!("{}:{a:?}", l.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
        let routes = self.ipv4_routes().await?;
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

    /// Every interface with its IPv4 addresses, in index order (Go's `net.Interfaces`).
    async fn links_with_addresses(&self) -> anyhow::Result<Vec<(LinkInfo, Vec<Ipv4Addr>)>> {
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

    /// Picks the underlay as flanneld's `LookupExtIface` does: with none of `--iface`,
    /// `--iface-regex`, `--iface-can-reach`, the interface holding `--public-ip` (else the
    /// default route's); otherwise each `--iface` (name or address) in order, then each
    /// regex, then the route to `--iface-can-reach`, the first that resolves winning.
    /// `--public-ip` overrides the address found.
    pub async fn underlay(&self, sel: &UnderlaySelection) -> anyhow::Result<Underlay> {
        let links = self.links_with_addresses().await?;
        let (link, found_ip) = if sel.ifaces.is_empty()
            && sel.regexes.is_empty()
            && sel.can_reach.is_none()
        {
            let holder = sel.public_ip.and_then(|ip| holding(&links, ip));
            match holder {
                Some(found) => found,
                None => {
                    let index = self.default_route_iface().await?.ok_or_else(|| {
                        anyhow!(
                            "no IPv4 default route to pick the underlay interface from: pass --iface"
                        )
                    })?;
                    (self.link_by_index(index).await?, None)
                }
            }
        } else {
            let mut found = None;
            for want in &sel.ifaces {
                found = by_name_or_address(&links, want);
                match &found {
                    Some(_) => break,
                    None => tracing::info!("--iface {want}: no interface has that name or address"),
                }
            }
            if found.is_none() {
                for pattern in &sel.regexes {
                    let re = regex::Regex::new(pattern)
                        .with_context(|| format!("--iface-regex {pattern}"))?;
                    found = match_regex(&re, &links);
                    match &found {
                        Some(_) => break,
                        None => tracing::info!(
                            "--iface-regex {pattern}: matches no interface address or name"
                        ),
                    }
                }
            }
            if found.is_none() {
                if let Some(dest) = sel.can_reach {
                    match self.route_get(dest).await {
                        Ok((oif, src)) => {
                            found = links
                                .iter()
                                .find(|(l, _)| l.index == oif)
                                .map(|(l, _)| (l.clone(), src));
                        }
                        Err(e) => tracing::info!("--iface-can-reach {dest}: {e:#}"),
                    }
                }
            }
            found.ok_or_else(|| {
                anyhow!(
                    "no interface matches --iface/--iface-regex/--iface-can-reach (interfaces: {})",
                    describe(&links)
                )
            })?
        };
        let addresses = links
            .iter()
            .find(|(l, _)| l.index == link.index)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        // `--public-ip` held by this host (any interface) is also the source; one it does not
        // hold is a NAT's address: send from the underlay's own address.
        let public_ip_is_local = sel
            .public_ip
            .is_some_and(|ip| holding(&links, ip).is_some());
        let own = if public_ip_is_local {
            sel.public_ip
        } else {
            found_ip.or(addresses.first().copied())
        };
        // An interface without an IPv4 address of its own: the kernel picks the source.
        let Some(local_ip) = own.or(sel.public_ip) else {
            bail!(
                "interface {} has no IPv4 address: give it one or pass --public-ip",
                link.name
            );
        };
        Ok(Underlay {
            name: link.name,
            index: link.index,
            mtu: link.mtu,
            public_ip: sel.public_ip.unwrap_or(local_ip),
            local_ip,
        })
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

/// Routing between the bridge and the overlay needs forwarding on.
pub fn enable_ip_forwarding() -> anyhow::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .context("enabling net.ipv4.ip_forward (needs CAP_NET_ADMIN)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Vec<(LinkInfo, Vec<Ipv4Addr>)> {
        let link = |index, name: &str| LinkInfo {
            index,
            name: name.into(),
            mtu: 1500,
        };
        vec![
            (link(1, "lo"), vec![Ipv4Addr::LOCALHOST]),
            (link(2, "eth0"), vec![Ipv4Addr::new(192, 168, 1, 5)]),
            (
                link(3, "ens4"),
                vec![Ipv4Addr::new(10, 1, 0, 7), Ipv4Addr::new(10, 2, 0, 7)],
            ),
            (link(4, "docker0"), vec![]),
        ]
    }

    #[test]
    fn iface_is_a_name_or_an_address() {
        let l = links();
        let (link, ip) = by_name_or_address(&l, "ens4").unwrap();
        assert_eq!((link.name.as_str(), ip), ("ens4", None));
        let (link, ip) = by_name_or_address(&l, "10.2.0.7").unwrap();
        assert_eq!(
            (link.name.as_str(), ip),
            ("ens4", Some(Ipv4Addr::new(10, 2, 0, 7)))
        );
        assert!(by_name_or_address(&l, "eth9").is_none());
        assert!(by_name_or_address(&l, "10.9.9.9").is_none());
    }

    #[test]
    fn iface_regex_matches_addresses_before_names() {
        let l = links();
        let re = |s| regex::Regex::new(s).unwrap();
        let (link, ip) = match_regex(&re(r"^10\.2\."), &l).unwrap();
        assert_eq!(
            (link.name.as_str(), ip),
            ("ens4", Some(Ipv4Addr::new(10, 2, 0, 7)))
        );
        // "e" is in eth0's name, but 192.168.1.5 holds no "e": names are tried after every address.
        let (link, ip) = match_regex(&re("^(e|192)"), &l).unwrap();
        assert_eq!(
            (link.name.as_str(), ip),
            ("eth0", Some(Ipv4Addr::new(192, 168, 1, 5)))
        );
        let (link, ip) = match_regex(&re("^dock"), &l).unwrap();
        assert_eq!((link.name.as_str(), ip), ("docker0", None));
        assert!(match_regex(&re("^wlan"), &l).is_none());
    }
}
