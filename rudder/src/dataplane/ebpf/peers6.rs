//! The IPv6 half of the eBPF data plane's peers: the IPv6 peer trie, the IPv6 sender map
//! (underlay address → its number of IPv6 subnets) and the IPv6 peer routes, kept in step
//! with `State::peers6`, as `senders.rs` and `mod.rs` do for IPv4.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{bail, Context as _};
use aya::maps::lpm_trie::Key;
use ipnet::{Ipv4Net, Ipv6Net};
use rudder_ebpf::{ipv6_mask, DataplaneConfig6, PeerValue6, Senders6, UnderlayAddr};

use super::kernel::ignore_missing;
use super::{EbpfDataplane, State};
use crate::dataplane::Ipv6Plane;

/// The 16-byte form the BPF maps key underlay addresses by (IPv4-mapped for IPv4).
pub(super) fn underlay_key(addr: IpAddr) -> UnderlayAddr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn key6(subnet: Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

pub(super) fn config6_of(plane: Option<&Ipv6Plane>) -> DataplaneConfig6 {
    match plane {
        Some(plane) => DataplaneConfig6 {
            local_ip: plane.public_ipv6.map_or([0; 16], |ip| ip.octets()),
            local_subnet: plane.local_subnet.network().octets(),
            local_mask: ipv6_mask(u32::from(plane.local_subnet.prefix_len())),
            network: plane.network.network().octets(),
            network_mask: ipv6_mask(u32::from(plane.network.prefix_len())),
            enabled: 1,
        },
        None => DataplaneConfig6 {
            local_ip: [0; 16],
            local_subnet: [0; 16],
            local_mask: [0; 16],
            network: [0; 16],
            network_mask: [0; 16],
            enabled: 0,
        },
    }
}

impl State {
    /// The IPv6 peer subnets and their underlay addresses (for the socket path's table).
    pub(super) fn peers6_underlays(&self) -> Vec<(Ipv6Net, IpAddr)> {
        self.peers6.iter().map(|(s, (ip, _))| (*s, *ip)).collect()
    }

    /// The IPv4 peer subnets reached over IPv6 and their PublicIPv6.
    pub(super) fn peers_over6_underlays(&self) -> Vec<(Ipv4Net, IpAddr)> {
        let over6 = self.peers_over6.iter();
        over6.map(|(s, (ip, _, _))| (*s, IpAddr::V6(*ip))).collect()
    }

    fn ipv6_plane(&self) -> anyhow::Result<Ipv6Plane> {
        self.opts
            .ipv6
            .context("the network has no IPv6 (EnableIPv6 is off): no IPv6 peers")
    }

    /// Keeps the IPv6 sender map in step with `peers6` for one underlay address.
    pub(super) fn sync_sender6(&mut self, underlay: IpAddr) -> anyhow::Result<()> {
        let ipv6_subnets = self
            .peers6
            .values()
            .filter(|(ip, _)| *ip == underlay)
            .count() as u32;
        let ipv4_subnets = self
            .peers_over6
            .values()
            .filter(|(ip, _, _)| IpAddr::V6(*ip) == underlay)
            .count() as u32;
        let key = underlay_key(underlay);
        let kernel = self.kernel_mut()?;
        if ipv6_subnets + ipv4_subnets == 0 {
            ignore_missing(kernel.senders6.remove(&key))
        } else {
            kernel.senders6.insert(
                key,
                Senders6 {
                    ipv6_subnets,
                    ipv4_subnets,
                },
                0,
            )
        }
        .with_context(|| format!("updating the IPv6 sender map for {underlay}"))
    }

    /// Reinstalls every IPv6 peer route (a new overlay MTU).
    pub(super) fn reinstall_routes6(&self) -> anyhow::Result<()> {
        let routes = self.routes()?;
        for (subnet, (underlay, _)) in &self.peers6 {
            routes.add_peer6(*subnet, *underlay, self.opts.overlay_mtu)?;
        }
        for subnet in self.peers_over6.keys() {
            routes.add_peer_over6(*subnet, self.opts.overlay_mtu, self.pref_source())?;
        }
        Ok(())
    }
}

impl EbpfDataplane {
    /// Puts back what a link flap or a hand removed: the placeholder gateway's neighbour
    /// entry, the IPv6 network's unreachable route, and the IPv6 and over-IPv6 peer routes
    /// (the IPv4 ones are `route_loss.rs`'s). Returns how many routes came back.
    pub(super) fn restore_lost_routes6(&self) -> anyhow::Result<usize> {
        let state = self.lock();
        let Some(plane) = state.opts.ipv6 else {
            return Ok(0);
        };
        let routes = state.routes()?;
        let mtu = state.opts.overlay_mtu;
        let present6 = routes.installed_destinations6()?;
        let mut restored = 0;
        if !present6.contains(&plane.network) {
            routes.add_unreachable6(plane.network)?;
            restored += 1;
        }
        if state.peers6.is_empty() && state.peers_over6.is_empty() {
            return Ok(restored);
        }
        // Replacing a permanent entry is idempotent; a flushed one would blackhole them all.
        routes.ensure_next_hop6()?;
        for (subnet, (underlay, _)) in &state.peers6 {
            if !present6.contains(subnet) {
                routes.add_peer6(*subnet, *underlay, mtu)?;
                restored += 1;
            }
        }
        if !state.peers_over6.is_empty() {
            let present4 = routes.installed_destinations()?;
            for subnet in state.peers_over6.keys() {
                if !present4.contains(subnet) {
                    routes.add_peer_over6(*subnet, mtu, state.pref_source())?;
                    restored += 1;
                }
            }
        }
        if restored > 0 {
            tracing::warn!(restored, "IPv6-related peer routes were missing: put back");
        }
        Ok(restored)
    }

    pub(super) fn set_local_subnet6_impl(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        let mut state = self.lock();
        let mut plane = state.ipv6_plane()?;
        if !plane.network.contains(&subnet) {
            bail!(
                "IPv6 subnet {subnet} is not inside the IPv6 network {}",
                plane.network
            );
        }
        plane.local_subnet = subnet.trunc();
        state.opts.ipv6 = Some(plane);
        let config = config6_of(Some(&plane));
        state.kernel_mut()?.set_config6(&config)?;
        if let Some(path) = self.socket_path() {
            path.set_local_subnet6(plane, state.peers6_underlays());
        }
        Ok(())
    }

    pub(super) fn upsert_peer6_impl(
        &self,
        subnet: Ipv6Net,
        underlay: IpAddr,
    ) -> anyhow::Result<()> {
        let mut state = self.lock();
        let plane = state.ipv6_plane()?;
        if underlay.is_ipv6() && plane.public_ipv6.is_none() {
            bail!("IPv6 peer {subnet} at {underlay}: this host has no PublicIPv6 to send from");
        }
        let subnet = subnet.trunc();
        let local = plane.local_subnet;
        if subnet.contains(&local.network()) || local.contains(&subnet.network()) {
            bail!("IPv6 peer subnet {subnet} overlaps our own subnet {local}; not installing it");
        }
        let existing = state.peers6.get(&subnet).copied();
        let traffic_id = match existing {
            Some((old, id)) if old == underlay => id,
            _ => {
                let id = state.next_traffic_id;
                state.next_traffic_id = id.wrapping_add(1).max(1);
                id
            }
        };
        let value = PeerValue6 {
            underlay: underlay_key(underlay),
            traffic_id,
        };
        let kernel = state.kernel_mut()?;
        kernel
            .peers6
            .insert(&key6(subnet), value, 0)
            .with_context(|| {
                format!("adding IPv6 peer {subnet} -> {underlay} to the BPF LPM trie")
            })?;
        if let Some((_, stale)) = existing.filter(|(_, id)| *id != traffic_id) {
            let _ = kernel.peer_traffic.remove(&stale);
        }
        state.peers6.insert(subnet, (underlay, traffic_id));
        if let Some(path) = self.socket_path() {
            path.upsert_peer6(subnet, underlay, existing.map(|(old, _)| old));
        }
        if existing.is_none_or(|(_, id)| id != traffic_id) {
            state
                .peer6_changed
                .insert(subnet, std::time::SystemTime::now());
        }
        state.sync_sender6(underlay)?;
        if let Some((old, _)) = existing.filter(|(old, _)| *old != underlay) {
            state.sync_sender6(old)?;
        }
        let mtu = state.opts.overlay_mtu;
        state.routes()?.add_peer6(subnet, underlay, mtu)
    }

    pub(super) fn remove_peer6_impl(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        let mut state = self.lock();
        let subnet = subnet.trunc();
        state.routes()?.remove_peer6(subnet)?;
        ignore_missing(state.kernel_mut()?.peers6.remove(&key6(subnet)))
            .with_context(|| format!("removing IPv6 peer {subnet} from the BPF LPM trie"))?;
        state.peer6_changed.remove(&subnet);
        if let Some((underlay, traffic_id)) = state.peers6.remove(&subnet) {
            if let Some(path) = self.socket_path() {
                path.remove_peer6(subnet, underlay);
            }
            let _ = state.kernel_mut()?.peer_traffic.remove(&traffic_id);
            state.sync_sender6(underlay)?;
        }
        Ok(())
    }

    /// An IPv4 peer subnet whose host is reached at its PublicIPv6 (the IPv4 trie keeps the
    /// peers reached over IPv4: a subnet is in one of them, never both).
    pub(super) fn upsert_peer_over6(
        &self,
        subnet: Ipv4Net,
        underlay: Ipv6Addr,
    ) -> anyhow::Result<()> {
        let subnet = subnet.trunc();
        if self.lock().peers.contains_key(&subnet) {
            self.remove_peer_over4(subnet)?;
        }
        let mut state = self.lock();
        let plane = state.ipv6_plane()?;
        if plane.public_ipv6.is_none() {
            bail!("peer {subnet} at {underlay}: this host has no PublicIPv6 to send from");
        }
        let local = state.opts.local_subnet;
        if subnet.contains(&local.network()) || local.contains(&subnet.network()) {
            bail!("peer subnet {subnet} overlaps our own subnet {local}; not installing it");
        }
        let existing = state.peers_over6.get(&subnet).copied();
        let (traffic_id, changed) = match existing {
            Some((old, id, changed)) if old == underlay => (id, changed),
            _ => {
                let id = state.next_traffic_id;
                state.next_traffic_id = id.wrapping_add(1).max(1);
                (id, std::time::SystemTime::now())
            }
        };
        let value = PeerValue6 {
            underlay: underlay.octets(),
            traffic_id,
        };
        let key = Key::new(u32::from(subnet.prefix_len()), subnet.network().octets());
        let kernel = state.kernel_mut()?;
        kernel
            .peers46
            .insert(&key, value, 0)
            .with_context(|| format!("adding peer {subnet} -> {underlay} to the BPF LPM trie"))?;
        if let Some((_, stale, _)) = existing.filter(|(_, id, _)| *id != traffic_id) {
            let _ = kernel.peer_traffic.remove(&stale);
        }
        state
            .peers_over6
            .insert(subnet, (underlay, traffic_id, changed));
        if let Some(path) = self.socket_path() {
            let previous = existing.map(|(old, _, _)| IpAddr::V6(old));
            path.upsert_peer(subnet, IpAddr::V6(underlay), previous);
        }
        state.sync_sender6(IpAddr::V6(underlay))?;
        if let Some((old, _, _)) = existing.filter(|(old, _, _)| *old != underlay) {
            state.sync_sender6(IpAddr::V6(old))?;
        }
        let (mtu, src) = (state.opts.overlay_mtu, state.pref_source());
        state.routes()?.add_peer_over6(subnet, mtu, src)
    }

    /// Forgets an IPv4 peer subnet reached over IPv6 (absent: nothing to do).
    pub(super) fn remove_peer_over6(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        let mut state = self.lock();
        let subnet = subnet.trunc();
        let Some((underlay, traffic_id, _)) = state.peers_over6.remove(&subnet) else {
            return Ok(());
        };
        state.routes()?.remove_peer(subnet)?;
        let key = Key::new(u32::from(subnet.prefix_len()), subnet.network().octets());
        let kernel = state.kernel_mut()?;
        ignore_missing(kernel.peers46.remove(&key))
            .with_context(|| format!("removing peer {subnet} from the BPF LPM trie"))?;
        let _ = kernel.peer_traffic.remove(&traffic_id);
        if let Some(path) = self.socket_path() {
            path.remove_peer(subnet, IpAddr::V6(underlay));
        }
        state.sync_sender6(IpAddr::V6(underlay))
    }
}
