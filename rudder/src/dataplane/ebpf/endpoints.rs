//! Local endpoints: the bridge the containers sit behind (rudder's own with `--bridge`, else
//! whichever interface holds the subnet's gateway address: docker0, cni0, a hand-made one),
//! and the containers behind it that get the fast delivery path, found from the bridge's IPv4
//! (and IPv6) neighbours and FDB; plus bridgeless veths with a /32 (/128) route
//! (`routed_endpoints`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::{Ipv4Net, Ipv6Net};
use rudder_ebpf::LocalEndpoint;

use super::kernel::ignore_missing;
use super::routed_endpoints::{lladdr, usable};
use super::routes::Routes;
use super::{EbpfDataplane, State};

impl EbpfDataplane {
    /// Registers a container on this host for the fast delivery path: decapsulated packets
    /// for `ip` go straight into the namespace of `host_veth_ifindex`'s peer, with Ethernet
    /// destination `container_mac` and source `gateway_mac` (the bridge's MAC).
    pub fn upsert_local_endpoint(
        &self,
        ip: Ipv4Addr,
        host_veth_ifindex: u32,
        container_mac: [u8; 6],
        gateway_mac: [u8; 6],
    ) -> anyhow::Result<()> {
        let mut state = self.lock();
        let kernel = state.kernel_mut()?;
        let endpoint = LocalEndpoint {
            host_ifindex: host_veth_ifindex,
            container_mac,
            gateway_mac,
        };
        kernel
            .endpoints
            .insert(ip.octets(), endpoint, 0)
            .with_context(|| {
                format!("adding local endpoint {ip} (ifindex {host_veth_ifindex}) to the BPF map")
            })
    }

    /// Finds the local containers and installs them as local endpoints (IPv4 and, on a
    /// dual-stack network, IPv6), removing those that vanished since the last call; returns
    /// how many IPv4 ones there are. A container is a neighbour inside a local subnet either
    /// of the adopted bridge, whose MAC the bridge's FDB places on a veth port, or of a veth
    /// a /32 (/128) route points at. Call it on netlink events (`endpoint_watch`) and
    /// periodically; endpoints added with [`Self::upsert_local_endpoint`] for the same IP
    /// are overwritten.
    pub fn refresh_local_endpoints(&self) -> anyhow::Result<usize> {
        // Read without the lock (the route dump is long at 65,536 peers); a change meanwhile
        // brings its own event and another refresh.
        let (routes, subnets, bridge) = {
            let state = self.lock();
            let subnets = LocalSubnets {
                v4: state.opts.local_subnet,
                v6: state.opts.ipv6.as_ref().map(|plane| plane.local_subnet),
            };
            let bridge = state.bridge.as_ref().map(|b| b.name.clone());
            (state.routes_for_check()?.1, subnets, bridge)
        };
        let mut found: BTreeMap<IpAddr, LocalEndpoint> = match &bridge {
            Some(bridge) => routes
                .discover_endpoints(bridge, &subnets)?
                .into_iter()
                .collect(),
            None => BTreeMap::new(),
        };
        let routed = routes.discover_routed_endpoints(&subnets)?;
        let veths = routed
            .iter()
            .map(|(_, endpoint, name)| (endpoint.host_ifindex, name.clone()))
            .collect();
        for (ip, endpoint, _) in routed {
            found.entry(ip).or_insert(endpoint);
        }
        let (mut found4, mut found6) = (BTreeMap::new(), BTreeMap::new());
        for (ip, endpoint) in found {
            match ip {
                IpAddr::V4(ip) => found4.insert(ip, endpoint),
                IpAddr::V6(ip) => found6.insert(ip, endpoint),
            };
        }
        let mut state = self.lock();
        let State {
            kernel,
            discovered,
            discovered6,
            routed_veths,
            ..
        } = &mut *state;
        let kernel = kernel.as_mut().context("eBPF data plane is shut down")?;
        routed_veths.follow(kernel, veths);
        sync_endpoints(&mut kernel.endpoints, discovered, found4, Ipv4Addr::octets)?;
        sync_endpoints(&mut kernel.endpoints6, discovered6, found6, |ip| {
            ip.octets()
        })?;
        Ok(discovered.len())
    }

    /// Forgets a local container; absent ones are not an error.
    pub fn remove_local_endpoint(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        let mut state = self.lock();
        let kernel = state.kernel_mut()?;
        ignore_missing(kernel.endpoints.remove(&ip.octets()))
            .with_context(|| format!("removing local endpoint {ip} from the BPF map"))
    }
}

/// The local subnets containers are looked for in.
pub(super) struct LocalSubnets {
    pub(super) v4: Ipv4Net,
    /// `None` while the network has no IPv6.
    pub(super) v6: Option<Ipv6Net>,
}

impl LocalSubnets {
    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.v4.contains(&ip),
            IpAddr::V6(ip) => self.v6.is_some_and(|subnet| subnet.contains(&ip)),
        }
    }
}

/// Makes `map` hold `found`, writing only what changed since `installed` (then `found`).
fn sync_endpoints<A: Ord + Copy + std::fmt::Display, K: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, LocalEndpoint>,
    installed: &mut BTreeMap<A, LocalEndpoint>,
    found: BTreeMap<A, LocalEndpoint>,
    key: impl Fn(&A) -> K,
) -> anyhow::Result<()> {
    for (ip, endpoint) in &found {
        if installed.get(ip) != Some(endpoint) {
            map.insert(key(ip), *endpoint, 0)
                .with_context(|| format!("adding local endpoint {ip} to the BPF map"))?;
        }
    }
    for ip in installed.keys().filter(|ip| !found.contains_key(ip)) {
        ignore_missing(map.remove(&key(ip)))
            .with_context(|| format!("removing vanished local endpoint {ip}"))?;
    }
    *installed = found;
    Ok(())
}

impl Routes {
    /// The interface holding `address` (name, ifindex): docker's `--bip` and CNI's
    /// `isGateway` put the subnet's gateway address on their bridge.
    pub(super) fn interface_holding(
        &self,
        address: Ipv4Addr,
    ) -> anyhow::Result<Option<(String, u32)>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let index = self
            .run(async {
                let mut dump = self.handle.address().get().execute();
                while let Some(msg) = dump.try_next().await? {
                    let holds = msg.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Local(std::net::IpAddr::V4(ip)) if *ip == address)
                });
                    if holds {
                        return Ok::<_, rtnetlink::Error>(Some(msg.header.index));
                    }
                }
                Ok(None)
            })
            .context("dumping the host's addresses")?;
        match index {
            Some(index) => Ok(self.link_name(index)?.map(|name| (name, index))),
            None => Ok(None),
        }
    }

    /// Every IPv4 neighbour entry of the host, and with `ipv6` every IPv6 one (both
    /// endpoint discoveries read them).
    pub(super) async fn neighbours(
        &self,
        ipv6: bool,
    ) -> anyhow::Result<Vec<rtnetlink::packet_route::neighbour::NeighbourMessage>> {
        use rtnetlink::packet_route::AddressFamily;
        let mut all: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .context("dumping IPv4 neighbours")?;
        if ipv6 {
            let v6: Vec<_> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(AddressFamily::Inet6)
                .execute()
                .try_collect()
                .await
                .context("dumping IPv6 neighbours")?;
            all.extend(v6);
        }
        Ok(all)
    }

    /// The ifindex of interface `name`, if it exists.
    pub(super) fn link_index(&self, name: &str) -> anyhow::Result<Option<u32>> {
        self.run(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute();
            match links.try_next().await {
                Ok(link) => Ok(link.map(|l| l.header.index)),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
                Err(e) => Err(e),
            }
        })
        .with_context(|| format!("looking up interface {name}"))
    }

    fn link_name(&self, index: u32) -> anyhow::Result<Option<String>> {
        use rtnetlink::packet_route::link::LinkAttribute;
        self.run(async {
            let mut links = self.handle.link().get().match_index(index).execute();
            match links.try_next().await {
                Ok(link) => Ok(link.and_then(|l| {
                    l.attributes.into_iter().find_map(|a| match a {
                        LinkAttribute::IfName(name) => Some(name),
                        _ => None,
                    })
                })),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
                Err(e) => Err(e),
            }
        })
        .with_context(|| format!("looking up interface {index}"))
    }

    /// Containers behind `bridge` with an address in `subnets`; see
    /// `EbpfDataplane::refresh_local_endpoints`.
    pub(super) fn discover_endpoints(
        &self,
        bridge: &str,
        subnets: &LocalSubnets,
    ) -> anyhow::Result<Vec<(IpAddr, LocalEndpoint)>> {
        use rtnetlink::packet_route::{
            link::{InfoKind, LinkAttribute, LinkInfo},
            neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
            AddressFamily,
        };
        let lladdr = |entry: &NeighbourMessage| lladdr(&entry.attributes);
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

            let neighbours: Vec<NeighbourMessage> = self.neighbours(subnets.v6.is_some()).await?;
            let mut found = Vec::new();
            for neighbour in neighbours
                .iter()
                .filter(|n| n.header.ifindex == bridge_index && usable(n.header.state))
            {
                let Some(ip) = neighbour.attributes.iter().find_map(|attr| match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        Some(IpAddr::V4(*ip))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        Some(IpAddr::V6(*ip))
                    }
                    _ => None,
                }) else {
                    continue;
                };
                let (Some(mac), true) = (lladdr(neighbour), subnets.contains(ip)) else {
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
