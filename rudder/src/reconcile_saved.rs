//! A start before etcd answers: the peers of the state file (both halves) are programmed by
//! the reconciler's own rules (ourselves skipped; IPv6 outer where both ends announce a
//! PublicIPv6), then handed to the [`crate::reconcile::Reconciler`] as installed, so etcd's
//! first snapshot is applied to them as a diff (a saved peer etcd no longer lists is removed
//! after the resync grace, as any other).

use crate::dataplane::Dataplane;
use crate::peers::{Ipv6PeerMap, PeerEvent, PeerMap};
use crate::reconcile6::{Ipv6Reconciler, Own};

/// What [`SavedPeers::program`] gave the data plane.
pub struct SavedPeers {
    /// IPv4 subnet → PublicIP, as installed.
    pub(crate) peers: PeerMap,
    /// Every saved IPv6 half (ours included), with what of it was installed.
    pub(crate) ipv6_peers: Ipv6PeerMap,
    pub(crate) ipv6: Ipv6Reconciler,
}

impl SavedPeers {
    pub fn program(
        dp: &dyn Dataplane,
        own: Own,
        peers: &PeerMap,
        ipv6_peers: &Ipv6PeerMap,
    ) -> Self {
        let mut ipv6 = Ipv6Reconciler::default();
        dp.begin_peer_batch();
        // The IPv6 halves first: they say which IPv4 peers are reached over IPv6.
        ipv6.handle(PeerEvent::Ipv6Snapshot(ipv6_peers.clone()), dp, &own);
        let mut installed = PeerMap::new();
        for (subnet, ip) in peers {
            if *subnet == own.subnet || *ip == own.public_ip {
                continue;
            }
            let underlay = ipv6.underlay_of_ipv4(&own, *subnet, *ip);
            match dp.upsert_peer(*subnet, underlay) {
                Ok(()) => {
                    installed.insert(*subnet, *ip);
                }
                Err(e) => {
                    tracing::warn!(%subnet, %underlay, "programming saved peer {ip} failed: {e:#}")
                }
            }
        }
        dp.end_peer_batch();
        SavedPeers {
            peers: installed,
            ipv6_peers: ipv6_peers.clone(),
            ipv6,
        }
    }

    /// Peers a previous run left in the kernel (eBPF pins, IPv4 over IPv4) that the state
    /// file lacks (it is written up to 250 ms after a change): counted as installed too, so
    /// etcd's first snapshot removes them if their leases are gone. The saved address wins.
    pub fn with_pinned(mut self, pinned: PeerMap) -> Self {
        for (subnet, ip) in pinned {
            self.peers.entry(subnet).or_insert(ip);
        }
        self
    }

    /// How many IPv4 and IPv6 peers were programmed.
    pub fn counts(&self) -> (usize, usize) {
        (self.peers.len(), self.ipv6.installed().len())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use ipnet::Ipv6Net;

    use super::*;
    use crate::peers::Ipv6Peer;
    use crate::reconcile::tests::{net, setup, ME, PEER};

    const ME6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
    const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
    const GONE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 3);

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn saved_peers_are_programmed_by_the_reconcilers_rules_and_handed_over() {
        let (r, dp, _, _tx) = setup();
        let own = Own {
            subnet: net("10.5.1.0/24"),
            public_ip: ME,
            public_ipv6: Some(ME6),
        };
        let peers: PeerMap = [
            (net("10.5.1.0/24"), ME),
            (net("10.5.2.0/24"), PEER),
            (net("10.5.3.0/24"), GONE),
        ]
        .into();
        let half = |v4: &str, ip, ip6| Ipv6Peer {
            ipv4_subnet: Some(net(v4)),
            public_ip: ip,
            public_ipv6: ip6,
        };
        let ipv6_peers: Ipv6PeerMap = [
            (net6("fc00:0:0:1::/64"), half("10.5.1.0/24", ME, Some(ME6))),
            (
                net6("fc00:0:0:2::/64"),
                half("10.5.2.0/24", PEER, Some(PEER6)),
            ),
            (net6("fc00:0:0:3::/64"), half("10.5.3.0/24", GONE, None)),
        ]
        .into();
        let saved = SavedPeers::program(&*dp, own, &peers, &ipv6_peers);
        assert_eq!(saved.counts(), (2, 2), "ourselves skipped in both halves");
        // Both ends announce a PublicIPv6: the IPv4 peer is reached over IPv6.
        assert_eq!(
            dp.underlays.lock().unwrap()[&net("10.5.2.0/24")],
            IpAddr::V6(PEER6)
        );
        assert_eq!(
            dp.underlays.lock().unwrap()[&net("10.5.3.0/24")],
            IpAddr::V4(GONE)
        );
        assert_eq!(
            dp.peers6.lock().unwrap()[&net6("fc00:0:0:2::/64")],
            IpAddr::V6(PEER6)
        );

        // Handed over: etcd's snapshot without the third lease is a diff (nothing
        // re-programmed for the second), and the third stays for the resync grace.
        let mut r = r.with_public_ipv6(Some(ME6)).with_saved(saved);
        let before = dp.calls.lock().unwrap().len();
        r.handle(PeerEvent::Ipv6Snapshot(
            ipv6_peers
                .iter()
                .filter(|(s, _)| **s != net6("fc00:0:0:3::/64"))
                .map(|(s, p)| (*s, *p))
                .collect(),
        ));
        r.handle(PeerEvent::Snapshot(
            [(net("10.5.1.0/24"), ME), (net("10.5.2.0/24"), PEER)].into(),
        ));
        assert_eq!(
            dp.calls.lock().unwrap().len(),
            before,
            "{:?}",
            dp.calls.lock().unwrap()
        );
        assert!(dp
            .peers6
            .lock()
            .unwrap()
            .contains_key(&net6("fc00:0:0:3::/64")));
        // A delete event removes at once, both halves.
        r.handle(PeerEvent::Ipv6Remove(net6("fc00:0:0:3::/64")));
        r.handle(PeerEvent::Remove(net("10.5.3.0/24")));
        assert!(!dp
            .peers6
            .lock()
            .unwrap()
            .contains_key(&net6("fc00:0:0:3::/64")));
        assert!(!dp.peers.lock().unwrap().contains_key(&net("10.5.3.0/24")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_peer_the_state_file_lacks_is_removed_when_etcd_no_longer_lists_it() {
        let (r, dp, _, _tx) = setup();
        let own = Own {
            subnet: net("10.5.1.0/24"),
            public_ip: ME,
            public_ipv6: None,
        };
        let saved_peers: PeerMap = [(net("10.5.2.0/24"), PEER)].into();
        let saved = SavedPeers::program(&*dp, own, &saved_peers, &Ipv6PeerMap::new());
        // The previous run had 10.5.4.0/24 in the kernel, not yet in its state file; its
        // pinned copy of 10.5.2.0/24 names an older address.
        dp.upsert_peer(net("10.5.4.0/24"), IpAddr::V4(GONE))
            .unwrap();
        let pinned: PeerMap = [(net("10.5.2.0/24"), GONE), (net("10.5.4.0/24"), GONE)].into();
        let saved = saved.with_pinned(pinned);
        assert_eq!(
            saved.peers[&net("10.5.2.0/24")],
            PEER,
            "the saved address wins"
        );
        let mut r = r.with_saved(saved);
        r.handle(PeerEvent::Snapshot([(net("10.5.2.0/24"), PEER)].into()));
        tokio::time::advance(crate::reconcile::RESYNC_GRACE).await;
        r.apply();
        let left: Vec<_> = dp.peers.lock().unwrap().keys().copied().collect();
        assert_eq!(
            left,
            vec![net("10.5.2.0/24")],
            "the stale pinned peer stayed"
        );
    }
}
