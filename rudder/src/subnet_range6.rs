//! The IPv6 subnets a network hands out, and a random free pick among them.
//!
//! An IPv6 range can hold 2^64 subnets or more, so nothing here walks it: a pick works on
//! the (few) leases that exist, as index intervals they block.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use rand::Rng;

/// IPv6SubnetMin..=IPv6SubnetMax of one length, addressed by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Range {
    first: u128,
    /// Subnets in the range minus one (a full /0 of /128s would not fit a count).
    last_index: u128,
    len: u8,
}

impl Ipv6Range {
    /// `min <= max`, both aligned to `len` (the config checks it).
    pub fn new(min: Ipv6Addr, max: Ipv6Addr, len: u8) -> Self {
        Ipv6Range {
            first: u128::from(min),
            last_index: (u128::from(max) - u128::from(min)) >> (128 - u32::from(len)),
            len,
        }
    }

    /// How many subnets (at least one), saturating at u128::MAX.
    pub fn count(&self) -> u128 {
        self.last_index.saturating_add(1)
    }

    pub fn subnet_len(&self) -> u8 {
        self.len
    }

    fn step_shift(&self) -> u32 {
        128 - u32::from(self.len)
    }

    pub fn get(&self, index: u128) -> Ipv6Net {
        let addr = self.first + (index << self.step_shift());
        Ipv6Net::new(Ipv6Addr::from(addr), self.len).expect("subnet length validated by the config")
    }

    /// Whether `subnet` is one this range hands out.
    pub fn contains(&self, subnet: Ipv6Net) -> bool {
        let addr = u128::from(subnet.addr());
        subnet.prefix_len() == self.len
            && subnet.addr() == subnet.network()
            && addr >= self.first
            && (addr - self.first) >> self.step_shift() <= self.last_index
    }

    /// The index interval of this range's subnets that `lease` overlaps, if any.
    fn blocked_by(&self, lease: Ipv6Net) -> Option<(u128, u128)> {
        let lo = u128::from(lease.network());
        let hi = u128::from(lease.broadcast());
        let range_hi =
            self.first + (self.last_index << self.step_shift()) + (u128::MAX >> self.len);
        if hi < self.first || lo > range_hi {
            return None;
        }
        let first_index = lo.saturating_sub(self.first) >> self.step_shift();
        let last_index = ((hi.min(range_hi)) - self.first) >> self.step_shift();
        Some((first_index, last_index))
    }

    /// A uniformly random subnet overlapping no lease in `taken` (of any length), or `None`
    /// when every one is taken. O(leases · log leases), whatever the range's size.
    pub fn pick_free(&self, taken: &[Ipv6Net], rng: &mut impl Rng) -> Option<Ipv6Net> {
        let mut blocked: Vec<(u128, u128)> =
            taken.iter().filter_map(|l| self.blocked_by(*l)).collect();
        blocked.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(blocked.len());
        for (lo, hi) in blocked {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        // Free subnets minus one, counted in u128 (a full range of 2^128 would not fit).
        let blocked_count: u128 = merged.iter().map(|(lo, hi)| hi - lo + 1).sum();
        if blocked_count > self.last_index {
            return None;
        }
        let free_last = self.last_index - blocked_count;
        let mut pick = rng.random_range(0..=free_last);
        // The pick-th free index: skip each blocked interval at or before it.
        for (lo, hi) in merged {
            if pick < lo {
                break;
            }
            pick += hi - lo + 1;
        }
        Some(self.get(pick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn indexing_and_membership() {
        let r = Ipv6Range::new(addr("fc00:0:0:1::"), addr("fc00:0:0:ffff::"), 64);
        assert_eq!(r.count(), 0xffff);
        assert_eq!(r.get(0), net("fc00:0:0:1::/64"));
        assert_eq!(r.get(0x21), net("fc00:0:0:22::/64"));
        assert!(r.contains(net("fc00:0:0:22::/64")));
        assert!(!r.contains(net("fc00::/64")));
        assert!(!r.contains(net("fc00:0:0:22::/65")));
        assert!(!r.contains(net("fc00:0:1:22::/64")));
    }

    #[test]
    fn pick_free_in_a_huge_range_is_inside_and_fast() {
        // 2^64 /64s: only workable without walking the range.
        let r = Ipv6Range::new(addr("fc00:0:0:1::"), addr("fc00:ffff:ffff:ffff::"), 64);
        let mut rng = rand::rng();
        let taken = [net("fc00::/32")];
        for _ in 0..200 {
            let s = r.pick_free(&taken, &mut rng).unwrap();
            assert!(r.contains(s), "{s}");
            assert!(!taken[0].contains(&s.network()), "{s} inside a taken /32");
        }
    }

    #[test]
    fn pick_free_skips_taken_of_any_length_and_reports_exhaustion() {
        let r = Ipv6Range::new(addr("fc00::10"), addr("fc00::40"), 124);
        assert_eq!(r.count(), 4);
        let mut rng = rand::rng();
        // fc00::/122 covers ::0..::3f, i.e. the first three subnets of the range.
        let taken = vec![net("fc00::/122")];
        for _ in 0..50 {
            assert_eq!(r.pick_free(&taken, &mut rng), Some(net("fc00::40/124")));
        }
        let mut taken = vec![net("fc00::20/124")];
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 {
            let s = r.pick_free(&taken, &mut rng).unwrap();
            assert!(seen.insert(s), "{s} handed out twice");
            assert_ne!(s, net("fc00::20/124"));
            taken.push(s);
        }
        assert_eq!(r.pick_free(&taken, &mut rng), None);
        assert_eq!(r.pick_free(&[net("::/0")], &mut rng), None);
    }
}
