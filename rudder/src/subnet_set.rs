//! A set of subnets of any length that answers "which member overlaps this one?", so that no
//! two leases ever overlap, whatever `SubnetLen` each was carved with. One per address family.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// A subnet of one address family, as the set orders it: (network address, prefix length).
pub trait Block: Copy {
    fn key(self) -> (u128, u8);
    fn last(self) -> u128;
    /// The block `len` bits long that holds this one's network address.
    fn supernet(self, len: u8) -> Self;
    fn from_key(key: (u128, u8)) -> Self;
    /// The longest prefix of the family.
    const BITS: u8;

    /// One contains the other (aligned blocks overlap no other way).
    fn overlaps(self, other: Self) -> bool {
        let (a, b) = (self.key().0, other.key().0);
        (a <= b && other.last() <= self.last()) || (b <= a && self.last() <= other.last())
    }
}

impl Block for Ipv4Net {
    fn key(self) -> (u128, u8) {
        (u32::from(self.network()).into(), self.prefix_len())
    }
    fn last(self) -> u128 {
        u32::from(self.broadcast()).into()
    }
    fn supernet(self, len: u8) -> Self {
        Ipv4Net::new(self.network(), len)
            .expect("len <= 32")
            .trunc()
    }
    fn from_key((start, len): (u128, u8)) -> Self {
        Ipv4Net::new(Ipv4Addr::from(start as u32), len).expect("stored from a valid Ipv4Net")
    }
    const BITS: u8 = 32;
}

impl Block for Ipv6Net {
    fn key(self) -> (u128, u8) {
        (u128::from(self.network()), self.prefix_len())
    }
    fn last(self) -> u128 {
        u128::from(self.broadcast())
    }
    fn supernet(self, len: u8) -> Self {
        Ipv6Net::new(self.network(), len)
            .expect("len <= 128")
            .trunc()
    }
    fn from_key((start, len): (u128, u8)) -> Self {
        Ipv6Net::new(Ipv6Addr::from(start), len).expect("stored from a valid Ipv6Net")
    }
    const BITS: u8 = 128;
}

#[derive(Clone, Debug)]
pub struct SubnetSet<N = Ipv4Net> {
    /// (network address, prefix length): ordered by start address.
    members: BTreeSet<(u128, u8)>,
    family: std::marker::PhantomData<N>,
}

impl<N> Default for SubnetSet<N> {
    fn default() -> Self {
        SubnetSet {
            members: BTreeSet::new(),
            family: std::marker::PhantomData,
        }
    }
}

impl<N: Block> SubnetSet<N> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, net: N) {
        self.members.insert(net.supernet(net.key().1).key());
    }

    pub fn remove(&mut self, net: N) {
        self.members.remove(&net.supernet(net.key().1).key());
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A member that overlaps `net` (contains it, lies inside it or equals it), if any.
    /// Subnets are aligned blocks, so two overlap exactly when one contains the other: a
    /// member containing `net` is one of its at most BITS + 1 supernets; a member inside
    /// `net` starts within its address range.
    pub fn overlapping(&self, net: N) -> Option<N> {
        let (_, len) = net.key();
        let net = net.supernet(len);
        let (start, _) = net.key();
        let containing = (0..=len).find_map(|len| {
            let supernet = net.supernet(len);
            self.members.contains(&supernet.key()).then_some(supernet)
        });
        containing.or_else(|| {
            self.members
                .range((start, 0)..=(net.last(), N::BITS))
                .next()
                .map(|member| N::from_key(*member))
        })
    }
}

impl<N: Block> FromIterator<N> for SubnetSet<N> {
    fn from_iter<I: IntoIterator<Item = N>>(iter: I) -> Self {
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
    fn ipv6_blocks_overlap_by_containment_too() {
        let v6 = |s: &str| -> Ipv6Net { s.parse().unwrap() };
        let set: SubnetSet<Ipv6Net> = [v6("fc00:0:0:22::/64"), v6("fc00:0:0:40::/60")]
            .into_iter()
            .collect();
        assert_eq!(
            set.overlapping(v6("fc00:0:0:22::/64")),
            Some(v6("fc00:0:0:22::/64"))
        );
        assert_eq!(
            set.overlapping(v6("fc00:0:0:20::/62")),
            Some(v6("fc00:0:0:22::/64"))
        );
        assert_eq!(
            set.overlapping(v6("fc00:0:0:4f::/64")),
            Some(v6("fc00:0:0:40::/60"))
        );
        assert_eq!(
            set.overlapping(v6("fc00:0:0:4f:ffff::/80")),
            Some(v6("fc00:0:0:40::/60"))
        );
        assert_eq!(set.overlapping(v6("fc00:0:0:23::/64")), None);
        assert_eq!(set.overlapping(v6("fc00:0:0:50::/60")), None);
        assert_eq!(
            set.overlapping(v6("fc00::/48")),
            Some(v6("fc00:0:0:22::/64"))
        );
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
