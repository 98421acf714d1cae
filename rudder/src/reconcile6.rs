//! The IPv6 half of reconciliation: the peers' IPv6 subnets, and which peers are reached
//! over an IPv6 outer header (both ends announce a PublicIPv6), for either inner family.
//!
//! Fed by the registry's IPv6 events through [`crate::reconcile::Reconciler`]; applies the
//! same rules as the IPv4 half: our own lease is never a peer, a resync snapshot is a diff,
//! and a peer missing from one stays for [`RESYNC_GRACE`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::time::Instant;

use crate::dataplane::Dataplane;
use crate::peers::{Ipv6Peer, Ipv6PeerMap, PeerEvent};
use crate::reconcile::RESYNC_GRACE;

/// Which lease is ours: never routed to.
#[derive(Clone, Copy, Debug)]
pub struct Own {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
}

impl Own {
    fn is(&self, peer: &Ipv6Peer) -> bool {
        peer.ipv4_subnet == Some(self.subnet)
            || (!peer.public_ip.is_unspecified() && peer.public_ip == self.public_ip)
            || (peer.public_ipv6.is_some() && peer.public_ipv6 == self.public_ipv6)
    }
}

#[derive(Default)]
pub struct Ipv6Reconciler {
    /// Every IPv6 half etcd holds, ours included.
    desired: Ipv6PeerMap,
    /// What the data plane has been given: IPv6 subnet → underlay address.
    installed: BTreeMap<Ipv6Net, IpAddr>,
    /// IPv6 halves a resync no longer listed, kept for [`RESYNC_GRACE`].
    missing_since: BTreeMap<Ipv6Net, (Ipv6Peer, Instant)>,
    /// IPv4 subnet → PublicIPv6 of its lease (leases announcing one): where an IPv4 peer is
    /// reached when this host has a PublicIPv6 too.
    ipv6_of_ipv4: BTreeMap<Ipv4Net, Ipv6Addr>,
}

/// Where a peer is reached: IPv6 outer when both ends announce a PublicIPv6, else its
/// PublicIP; `None` when neither works (an IPv6-only peer seen from a host without one).
pub fn underlay(
    own_ipv6: Option<Ipv6Addr>,
    peer_ip: Ipv4Addr,
    peer_ipv6: Option<Ipv6Addr>,
) -> Option<IpAddr> {
    match (own_ipv6, peer_ipv6) {
        (Some(_), Some(v6)) => Some(IpAddr::V6(v6)),
        _ if !peer_ip.is_unspecified() => Some(IpAddr::V4(peer_ip)),
        _ => None,
    }
}

impl Ipv6Reconciler {
    /// Where the IPv4 peer `subnet` at `public_ip` is reached.
    pub fn underlay_of_ipv4(&self, own: &Own, subnet: Ipv4Net, public_ip: Ipv4Addr) -> IpAddr {
        underlay(
            own.public_ipv6,
            public_ip,
            self.ipv6_of_ipv4.get(&subnet).copied(),
        )
        .unwrap_or(IpAddr::V4(public_ip))
    }

    /// Takes one IPv6 event; returns the IPv4 subnets whose underlay may have changed (the
    /// caller re-applies them).
    pub fn handle(&mut self, event: PeerEvent, dp: &dyn Dataplane, own: &Own) -> Vec<Ipv4Net> {
        match event {
            PeerEvent::Ipv6Snapshot(all) => {
                let now = Instant::now();
                for (subnet, peer) in &self.desired {
                    if !all.contains_key(subnet) {
                        self.missing_since.entry(*subnet).or_insert((*peer, now));
                    }
                }
                self.missing_since
                    .retain(|subnet, _| !all.contains_key(subnet));
                self.desired = all;
                let before = std::mem::take(&mut self.ipv6_of_ipv4);
                self.rebuild_ipv6_of_ipv4();
                self.apply(dp, own);
                changed_keys(&before, &self.ipv6_of_ipv4)
            }
            PeerEvent::Ipv6Upsert(subnet, peer) => {
                self.missing_since.remove(&subnet);
                let old = self.desired.insert(subnet, peer);
                let changed = self.remap(old, Some(peer));
                self.apply_one(subnet, dp, own);
                changed
            }
            PeerEvent::Ipv6Remove(subnet) => {
                self.missing_since.remove(&subnet);
                let old = self.desired.remove(&subnet);
                let changed = self.remap(old, None);
                self.apply_one(subnet, dp, own);
                changed
            }
            _ => Vec::new(),
        }
    }

    /// Moves one lease's entry in `ipv6_of_ipv4` from `old` to `new`; the IPv4 subnets whose
    /// entry changed.
    fn remap(&mut self, old: Option<Ipv6Peer>, new: Option<Ipv6Peer>) -> Vec<Ipv4Net> {
        let entry = |p: Option<Ipv6Peer>| p.and_then(|p| Some((p.ipv4_subnet?, p.public_ipv6)));
        let (old, new) = (entry(old), entry(new));
        if old == new {
            return Vec::new();
        }
        let mut changed = Vec::new();
        if let Some((v4, _)) = old {
            self.ipv6_of_ipv4.remove(&v4);
            changed.push(v4);
        }
        if let Some((v4, v6)) = new {
            if let Some(v6) = v6 {
                self.ipv6_of_ipv4.insert(v4, v6);
            }
            if !changed.contains(&v4) {
                changed.push(v4);
            }
        }
        changed
    }

    fn rebuild_ipv6_of_ipv4(&mut self) {
        let in_grace = self.missing_since.values().map(|(p, _)| p);
        self.ipv6_of_ipv4 = self
            .desired
            .values()
            .chain(in_grace)
            .filter_map(|p| Some((p.ipv4_subnet?, p.public_ipv6?)))
            .collect();
    }

    /// When the earliest grace period runs out.
    pub fn next_grace_expiry(&self) -> Option<Instant> {
        self.missing_since
            .values()
            .map(|(_, since)| *since + RESYNC_GRACE)
            .min()
    }

    fn target_of(&self, subnet: Ipv6Net, own: &Own) -> Option<IpAddr> {
        let peer = self
            .desired
            .get(&subnet)
            .or_else(|| self.missing_since.get(&subnet).map(|(p, _)| p))?;
        if own.is(peer) {
            return None;
        }
        underlay(own.public_ipv6, peer.public_ip, peer.public_ipv6)
    }

    /// The full diff (after a snapshot, a grace expiry, our subnet changing). The caller
    /// brackets it in a peer batch with the IPv4 half.
    pub fn apply(&mut self, dp: &dyn Dataplane, own: &Own) {
        let now = Instant::now();
        let before = self.missing_since.len();
        self.missing_since.retain(|subnet, (_, since)| {
            let keep = now < *since + RESYNC_GRACE;
            if !keep {
                tracing::info!(%subnet, "IPv6 peer still missing {RESYNC_GRACE:?} after a resync; removing it");
            }
            keep
        });
        if self.missing_since.len() != before {
            self.rebuild_ipv6_of_ipv4();
        }
        let subnets: std::collections::BTreeSet<Ipv6Net> = self
            .installed
            .keys()
            .chain(self.desired.keys())
            .chain(self.missing_since.keys())
            .copied()
            .collect();
        for subnet in subnets {
            self.apply_one(subnet, dp, own);
        }
    }

    fn apply_one(&mut self, subnet: Ipv6Net, dp: &dyn Dataplane, own: &Own) {
        let want = self.target_of(subnet, own);
        if self.installed.get(&subnet).copied() == want {
            return;
        }
        match want {
            Some(underlay) => match dp.upsert_peer6(subnet, underlay) {
                Ok(()) => {
                    tracing::info!(%subnet, %underlay, "IPv6 peer programmed");
                    self.installed.insert(subnet, underlay);
                }
                Err(e) => {
                    tracing::error!(%subnet, %underlay, "programming IPv6 peer failed: {e:#}")
                }
            },
            None => match dp.remove_peer6(subnet) {
                Ok(()) => {
                    if self.installed.remove(&subnet).is_some() {
                        tracing::info!(%subnet, "IPv6 peer removed");
                    }
                }
                Err(e) => tracing::error!(%subnet, "removing IPv6 peer failed: {e:#}"),
            },
        }
    }

    /// The installed IPv6 peers (for the status).
    pub fn installed(&self) -> &BTreeMap<Ipv6Net, IpAddr> {
        &self.installed
    }
}

/// Keys whose value differs between `a` and `b` (added, removed or changed).
fn changed_keys(a: &BTreeMap<Ipv4Net, Ipv6Addr>, b: &BTreeMap<Ipv4Net, Ipv6Addr>) -> Vec<Ipv4Net> {
    let mut keys: Vec<Ipv4Net> = a
        .iter()
        .filter(|(k, v)| b.get(k) != Some(v))
        .map(|(k, _)| *k)
        .chain(
            b.iter()
                .filter(|(k, v)| a.get(k) != Some(v))
                .map(|(k, _)| *k),
        )
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::tests::{net, setup, ME, PEER};

    const ME6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
    const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn half(v4: &str, ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Ipv6Peer {
        Ipv6Peer {
            ipv4_subnet: Some(net(v4)),
            public_ip: ip,
            public_ipv6: ip6,
        }
    }

    /// Our lease, a dual-stack peer with a PublicIPv6, one without, as the registry sends them.
    fn dual_stack_listing() -> Vec<PeerEvent> {
        vec![
            PeerEvent::Ipv6Snapshot(
                [
                    (net6("fc00:0:0:1::/64"), half("10.5.1.0/24", ME, Some(ME6))),
                    (
                        net6("fc00:0:0:2::/64"),
                        half("10.5.2.0/24", PEER, Some(PEER6)),
                    ),
                    (
                        net6("fc00:0:0:3::/64"),
                        half("10.5.3.0/24", Ipv4Addr::new(192, 168, 0, 3), None),
                    ),
                ]
                .into(),
            ),
            PeerEvent::Snapshot(
                [
                    (net("10.5.1.0/24"), ME),
                    (net("10.5.2.0/24"), PEER),
                    (net("10.5.3.0/24"), Ipv4Addr::new(192, 168, 0, 3)),
                    // A flannel udp host: no IPv6 half.
                    (net("10.5.4.0/24"), Ipv4Addr::new(192, 168, 0, 4)),
                ]
                .into(),
            ),
        ]
    }

    #[test]
    fn peers_with_a_public_ipv6_are_reached_over_ipv6_for_both_families() {
        let (r, dp, _, _tx) = setup();
        let mut r = r.with_public_ipv6(Some(ME6));
        for event in dual_stack_listing() {
            r.handle(event);
        }
        let underlays = dp.underlays.lock().unwrap().clone();
        let expect: BTreeMap<Ipv4Net, IpAddr> = [
            (net("10.5.2.0/24"), IpAddr::V6(PEER6)),
            (
                net("10.5.3.0/24"),
                IpAddr::V4(Ipv4Addr::new(192, 168, 0, 3)),
            ),
            (
                net("10.5.4.0/24"),
                IpAddr::V4(Ipv4Addr::new(192, 168, 0, 4)),
            ),
        ]
        .into();
        assert_eq!(underlays, expect);
        let peers6 = dp.peers6.lock().unwrap().clone();
        let expect6: BTreeMap<Ipv6Net, IpAddr> = [
            (net6("fc00:0:0:2::/64"), IpAddr::V6(PEER6)),
            (
                net6("fc00:0:0:3::/64"),
                IpAddr::V4(Ipv4Addr::new(192, 168, 0, 3)),
            ),
        ]
        .into();
        assert_eq!(
            peers6, expect6,
            "no IPv6 route to ourselves or to the flannel host"
        );
    }

    #[test]
    fn without_our_own_public_ipv6_every_peer_is_reached_over_ipv4() {
        let (mut r, dp, _, _tx) = setup();
        for event in dual_stack_listing() {
            r.handle(event);
        }
        assert!(dp.underlays.lock().unwrap().values().all(IpAddr::is_ipv4));
        assert_eq!(
            dp.peers6.lock().unwrap().get(&net6("fc00:0:0:2::/64")),
            Some(&IpAddr::V4(PEER))
        );
    }

    #[test]
    fn a_peer_that_gains_or_loses_its_public_ipv6_moves_family_and_goes_with_its_lease() {
        let (r, dp, _, _tx) = setup();
        let mut r = r.with_public_ipv6(Some(ME6));
        for event in dual_stack_listing() {
            r.handle(event);
        }
        let subnet6 = net6("fc00:0:0:3::/64");
        let new6 = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 3);
        let ip3 = Ipv4Addr::new(192, 168, 0, 3);
        r.handle(PeerEvent::Ipv6Upsert(
            subnet6,
            half("10.5.3.0/24", ip3, Some(new6)),
        ));
        assert_eq!(
            dp.underlays.lock().unwrap()[&net("10.5.3.0/24")],
            IpAddr::V6(new6)
        );
        assert_eq!(dp.peers6.lock().unwrap()[&subnet6], IpAddr::V6(new6));
        // PublicIPv6 gone again: back to IPv4 outer.
        r.handle(PeerEvent::Ipv6Upsert(
            subnet6,
            half("10.5.3.0/24", ip3, None),
        ));
        assert_eq!(
            dp.underlays.lock().unwrap()[&net("10.5.3.0/24")],
            IpAddr::V4(ip3)
        );
        // The lease deleted: both halves go.
        r.handle(PeerEvent::Ipv6Remove(subnet6));
        r.handle(PeerEvent::Remove(net("10.5.3.0/24")));
        assert!(!dp.peers6.lock().unwrap().contains_key(&subnet6));
        assert!(!dp
            .underlays
            .lock()
            .unwrap()
            .contains_key(&net("10.5.3.0/24")));
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_halves_missing_from_a_resync_stay_for_the_grace_period() {
        let (mut r, dp, _, _tx) = setup();
        for event in dual_stack_listing() {
            r.handle(event);
        }
        r.handle(PeerEvent::Ipv6Snapshot(Ipv6PeerMap::new()));
        assert_eq!(dp.peers6.lock().unwrap().len(), 2, "kept during the grace");
        tokio::time::advance(RESYNC_GRACE).await;
        assert_eq!(
            r.next_grace_expiry().map(|t| t <= Instant::now()),
            Some(true)
        );
        r.apply();
        assert!(dp.peers6.lock().unwrap().is_empty());
    }

    #[test]
    fn an_ipv6_only_peer_is_unreachable_from_a_host_without_a_public_ipv6() {
        assert_eq!(underlay(None, Ipv4Addr::UNSPECIFIED, Some(PEER6)), None);
        assert_eq!(
            underlay(Some(ME6), Ipv4Addr::UNSPECIFIED, Some(PEER6)),
            Some(IpAddr::V6(PEER6))
        );
        assert_eq!(underlay(Some(ME6), PEER, None), Some(IpAddr::V4(PEER)));
    }
}
