//! Which well-formed leases become peers: one that overlaps an earlier lease (by etcd create
//! revision; e.g. carved with another `SubnetLen`, or written by hand) is refused and
//! reported, and admitted once the lease it overlapped is gone. Two overlapping routes would
//! send one subnet's traffic to whichever host the kernel's longest match picks.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::peers::{PeerEvent, PeerMap};
use crate::subnet_set::SubnetSet;

/// A lease with its public IP and etcd create revision.
pub type Entry = (Ipv4Net, Ipv4Addr, i64);

/// `subnet` was refused because it overlaps the earlier lease `earlier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub subnet: Ipv4Net,
    pub earlier: Ipv4Net,
}

#[derive(Debug, Default)]
pub struct PeerBook {
    accepted: BTreeMap<Ipv4Net, (Ipv4Addr, i64)>,
    accepted_set: SubnetSet,
    refused: BTreeMap<Ipv4Net, (Ipv4Addr, i64)>,
}

impl PeerBook {
    /// Starts over from a full listing; returns the peers and the refusals.
    pub fn reset(&mut self, mut leases: Vec<Entry>) -> (PeerMap, Vec<Refused>) {
        *self = PeerBook::default();
        leases.sort_by_key(|(subnet, _, revision)| (*revision, *subnet));
        let refusals = leases
            .into_iter()
            .filter_map(|(subnet, ip, revision)| self.admit(subnet, ip, revision).err())
            .collect();
        let peers = self.accepted.iter().map(|(s, (ip, _))| (*s, *ip)).collect();
        (peers, refusals)
    }

    /// A lease written (created or changed): the event to pass on, or why it is refused.
    pub fn upsert(
        &mut self,
        subnet: Ipv4Net,
        ip: Ipv4Addr,
        revision: i64,
    ) -> Result<PeerEvent, Refused> {
        if let Some(entry) = self.accepted.get_mut(&subnet) {
            entry.0 = ip;
            return Ok(PeerEvent::Upsert(subnet, ip));
        }
        self.admit(subnet, ip, revision)
            .map(|()| PeerEvent::Upsert(subnet, ip))
    }

    /// A lease gone: its removal (if it was a peer), then refused leases that fit now.
    pub fn remove(&mut self, subnet: Ipv4Net) -> Vec<PeerEvent> {
        if self.refused.remove(&subnet).is_some() || self.accepted.remove(&subnet).is_none() {
            return Vec::new();
        }
        self.accepted_set.remove(subnet);
        let mut events = vec![PeerEvent::Remove(subnet)];
        let mut waiting: Vec<Entry> = self
            .refused
            .iter()
            .filter(|(s, _)| s.contains(&subnet) || subnet.contains(*s))
            .map(|(s, (ip, revision))| (*s, *ip, *revision))
            .collect();
        waiting.sort_by_key(|(s, _, revision)| (*revision, *s));
        for (s, ip, revision) in waiting {
            self.refused.remove(&s);
            if self.admit(s, ip, revision).is_ok() {
                events.push(PeerEvent::Upsert(s, ip));
            }
        }
        events
    }

    fn admit(&mut self, subnet: Ipv4Net, ip: Ipv4Addr, revision: i64) -> Result<(), Refused> {
        if let Some(earlier) = self.accepted_set.overlapping(subnet) {
            self.refused.insert(subnet, (ip, revision));
            return Err(Refused { subnet, earlier });
        }
        self.accepted.insert(subnet, (ip, revision));
        self.accepted_set.insert(subnet);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                PeerEvent::Remove(net("10.5.3.0/24")),
                PeerEvent::Upsert(net("10.5.0.0/20"), B)
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
            Ok(PeerEvent::Upsert(net("10.5.3.0/24"), C)),
            "a peer that moves to another public IP keeps its place"
        );
    }
}
