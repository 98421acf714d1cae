//! A set of subnets of any length that answers "which member overlaps this one?", so that no
//! two leases ever overlap, whatever `SubnetLen` each was carved with.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Clone, Debug, Default)]
pub struct SubnetSet {
    /// (network address, prefix length): ordered by start address.
    members: BTreeSet<(u32, u8)>,
}

fn key(net: Ipv4Net) -> (u32, u8) {
    (u32::from(net.network()), net.prefix_len())
}

fn net_of((start, len): (u32, u8)) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(start), len).expect("stored from a valid Ipv4Net")
}

impl SubnetSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, net: Ipv4Net) {
        self.members.insert(key(net.trunc()));
    }

    pub fn remove(&mut self, net: Ipv4Net) {
        self.members.remove(&key(net.trunc()));
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A member that overlaps `net` (contains it, lies inside it or equals it), if any.
    /// Subnets are aligned blocks, so two overlap exactly when one contains the other: a
    /// member containing `net` is one of its at most 33 supernets; a member inside `net`
    /// starts within its address range.
    pub fn overlapping(&self, net: Ipv4Net) -> Option<Ipv4Net> {
        let net = net.trunc();
        let start = u32::from(net.network());
        let end = u32::from(net.broadcast());
        let containing = (0..=net.prefix_len()).find_map(|len| {
            let supernet = Ipv4Net::new(net.network(), len).ok()?.trunc();
            self.members.contains(&key(supernet)).then_some(supernet)
        });
        containing.or_else(|| {
            self.members
                .range((start, 0)..=(end, 32))
                .next()
                .map(|member| net_of(*member))
        })
    }
}

impl FromIterator<Ipv4Net> for SubnetSet {
    fn from_iter<I: IntoIterator<Item = Ipv4Net>>(iter: I) -> Self {
        let mut set = SubnetSet::new();
        for net in iter {
            set.insert(net);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn overlap_is_containment_either_way_or_equality() {
        let set: SubnetSet = [net("10.5.3.0/24"), net("10.5.32.0/20")]
            .into_iter()
            .collect();
        assert_eq!(
            set.overlapping(net("10.5.3.0/24")),
            Some(net("10.5.3.0/24"))
        );
        // A bigger block that contains a member.
        assert_eq!(
            set.overlapping(net("10.5.0.0/20")),
            Some(net("10.5.3.0/24"))
        );
        assert_eq!(
            set.overlapping(net("10.5.0.0/16")),
            Some(net("10.5.3.0/24"))
        );
        // A smaller block inside a member.
        assert_eq!(
            set.overlapping(net("10.5.40.0/24")),
            Some(net("10.5.32.0/20"))
        );
        assert_eq!(
            set.overlapping(net("10.5.47.255/32")),
            Some(net("10.5.32.0/20"))
        );
        // Neighbours do not overlap.
        assert_eq!(set.overlapping(net("10.5.2.0/24")), None);
        assert_eq!(set.overlapping(net("10.5.4.0/22")), None);
        assert_eq!(set.overlapping(net("10.5.48.0/20")), None);
        assert_eq!(set.overlapping(net("10.5.16.0/20")), None);
    }

    #[test]
    fn removed_members_no_longer_overlap() {
        let mut set = SubnetSet::new();
        set.insert(net("10.5.0.0/20"));
        assert!(set.overlapping(net("10.5.7.0/24")).is_some());
        set.remove(net("10.5.0.0/20"));
        assert!(set.is_empty());
        assert_eq!(set.overlapping(net("10.5.7.0/24")), None);
    }

    #[test]
    fn agrees_with_a_brute_force_check() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let members: Vec<Ipv4Net> = (0..20)
                .map(|_| {
                    let len = rng.random_range(20..=28);
                    Ipv4Net::new(Ipv4Addr::new(10, 5, rng.random(), rng.random()), len)
                        .unwrap()
                        .trunc()
                })
                .collect();
            let set: SubnetSet = members.iter().copied().collect();
            let probe = Ipv4Net::new(
                Ipv4Addr::new(10, 5, rng.random(), rng.random()),
                rng.random_range(18..=30),
            )
            .unwrap()
            .trunc();
            let brute = members
                .iter()
                .any(|m| m.contains(&probe) || probe.contains(m));
            assert_eq!(
                set.overlapping(probe).is_some(),
                brute,
                "{probe} vs {members:?}"
            );
        }
    }
}
