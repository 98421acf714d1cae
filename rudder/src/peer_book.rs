//! Which well-formed leases become peers: one that overlaps an earlier lease (by etcd create
//! revision; e.g. carved with another `SubnetLen`, or written by hand) is refused and
//! reported, and admitted once the lease it overlapped is gone. Two overlapping routes would
//! send one subnet's traffic to whichever host the kernel's longest match picks.

use std::collections::BTreeMap;
use std::fmt::Display;

use ipnet::Ipv4Net;

use crate::subnet_set::{Block, SubnetSet};

/// A lease (one family's subnet) with what its peer entry holds and its etcd create revision.
pub type Entry<N, V> = (N, V, i64);

/// `subnet` was refused because it overlaps the earlier lease `earlier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused<N = Ipv4Net> {
    pub subnet: N,
    pub earlier: N,
}

/// What a lease change does to the peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<N, V> {
    Upsert(N, V),
    Remove(N),
}

/// The peers of one address family: IPv4 subnets → PublicIP, or the IPv6 halves.
#[derive(Debug)]
pub struct PeerBook<N, V> {
    accepted: BTreeMap<N, (V, i64)>,
    accepted_set: SubnetSet<N>,
    refused: BTreeMap<N, (V, i64)>,
}

impl<N, V> Default for PeerBook<N, V> {
    fn default() -> Self {
        PeerBook {
            accepted: BTreeMap::new(),
            accepted_set: SubnetSet::default(),
            refused: BTreeMap::new(),
        }
    }
}

impl<N: Block + Ord + Display, V: Copy> PeerBook<N, V> {
    /// Starts over from a full listing; returns the peers and the refusals.
    pub fn reset(&mut self, mut leases: Vec<Entry<N, V>>) -> (BTreeMap<N, V>, Vec<Refused<N>>) {
        *self = PeerBook::default();
        leases.sort_by_key(|(subnet, _, revision)| (*revision, *subnet));
        let refusals = leases
            .into_iter()
            .filter_map(|(subnet, value, revision)| self.admit(subnet, value, revision).err())
            .collect();
        (self.peers(), refusals)
    }

    /// The accepted peers.
    pub fn peers(&self) -> BTreeMap<N, V> {
        self.accepted.iter().map(|(s, (v, _))| (*s, *v)).collect()
    }

    pub fn get(&self, subnet: &N) -> Option<V> {
        self.accepted.get(subnet).map(|(v, _)| *v)
    }

    /// A lease written (created or changed): the change to pass on, or why it is refused.
    pub fn upsert(
        &mut self,
        subnet: N,
        value: V,
        revision: i64,
    ) -> Result<Change<N, V>, Refused<N>> {
        if let Some(entry) = self.accepted.get_mut(&subnet) {
            entry.0 = value;
            return Ok(Change::Upsert(subnet, value));
        }
        self.admit(subnet, value, revision)
            .map(|()| Change::Upsert(subnet, value))
    }

    /// A lease gone: its removal (if it was a peer), then refused leases that fit now.
    pub fn remove(&mut self, subnet: N) -> Vec<Change<N, V>> {
        if self.refused.remove(&subnet).is_some() || self.accepted.remove(&subnet).is_none() {
            return Vec::new();
        }
        self.accepted_set.remove(subnet);
        let mut changes = vec![Change::Remove(subnet)];
        let mut waiting: Vec<Entry<N, V>> = self
            .refused
            .iter()
            .filter(|(s, _)| s.overlaps(subnet))
            .map(|(s, (value, revision))| (*s, *value, *revision))
            .collect();
        waiting.sort_by_key(|(s, _, revision)| (*revision, *s));
        for (s, value, revision) in waiting {
            self.refused.remove(&s);
            if self.admit(s, value, revision).is_ok() {
                changes.push(Change::Upsert(s, value));
            }
        }
        changes
    }

    fn admit(&mut self, subnet: N, value: V, revision: i64) -> Result<(), Refused<N>> {
        if let Some(earlier) = self.accepted_set.overlapping(subnet) {
            self.refused.insert(subnet, (value, revision));
            return Err(Refused { subnet, earlier });
        }
        self.accepted.insert(subnet, (value, revision));
        self.accepted_set.insert(subnet);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    const A: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 11);
    const B: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 12);
    const C: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 13);

    #[test]
    fn the_later_of_two_overlapping_leases_is_refused_in_a_listing() {
        let mut book = PeerBook::default();
        let (peers, refused) = book.reset(vec![
            (net("10.5.0.0/20"), B, 9),
            (net("10.5.3.0/24"), A, 5),
            (net("10.5.20.0/24"), C, 7),
        ]);
        assert_eq!(
            peers,
            [(net("10.5.3.0/24"), A), (net("10.5.20.0/24"), C)].into()
        );
        assert_eq!(
            refused,
            vec![Refused {
                subnet: net("10.5.0.0/20"),
                earlier: net("10.5.3.0/24")
            }]
        );
    }

    #[test]
    fn a_refused_lease_is_admitted_when_the_one_it_overlapped_goes() {
        let mut book = PeerBook::default();
        book.reset(vec![(net("10.5.3.0/24"), A, 5)]);
        let refused = book.upsert(net("10.5.0.0/20"), B, 9).unwrap_err();
        assert_eq!(refused.earlier, net("10.5.3.0/24"));
        // Rewriting the refused lease changes nothing.
        assert!(book.upsert(net("10.5.0.0/20"), B, 9).is_err());
        assert_eq!(
            book.remove(net("10.5.3.0/24")),
            vec![
                Change::Remove(net("10.5.3.0/24")),
                Change::Upsert(net("10.5.0.0/20"), B)
            ]
        );
        // Now the /24 is the later one.
        assert!(book.upsert(net("10.5.3.0/24"), A, 12).is_err());
    }

    #[test]
    fn removing_a_refused_lease_passes_nothing_on() {
        let mut book = PeerBook::default();
        book.reset(vec![(net("10.5.3.0/24"), A, 5), (net("10.5.3.0/25"), B, 6)]);
        assert_eq!(book.remove(net("10.5.3.0/25")), vec![]);
        assert_eq!(book.remove(net("10.5.9.0/24")), vec![]);
        assert_eq!(
            book.upsert(net("10.5.3.0/24"), C, 5),
            Ok(Change::Upsert(net("10.5.3.0/24"), C)),
            "a peer that moves to another public IP keeps its place"
        );
    }
}
