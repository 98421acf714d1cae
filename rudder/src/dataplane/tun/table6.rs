//! The TUN plane's IPv6 peer table: the IPv6 subnets of the peers and where each sits on
//! the underlay (an IPv6 address when both ends announce a PublicIPv6, else IPv4), read by
//! [`decide_outbound6`](crate::dataplane::forwarding6::decide_outbound6) and
//! [`decide_inbound6`](crate::dataplane::forwarding6::decide_inbound6) through
//! [`PeerRoutes6`]. Kept like the IPv4 [`ForwardingTable`](crate::dataplane::forwarding::ForwardingTable):
//! a master copy updated in place, clones published to the forwarding tasks.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use ipnet::Ipv6Net;

use crate::dataplane::counters::PeerCounters;
use crate::dataplane::forwarding6::{Overlay6, PeerRoutes6};
use crate::subnet::gateway6;

/// The overlay's "router" address for ICMPv6 errors written into the device (not a local
/// address, or the kernel would drop it as a martian): the network's first host address,
/// or its last when our own subnet holds the first (the IPv4 rule's counterpart).
pub(crate) fn default_device_icmp_source6(network: Ipv6Net, local_subnet: Ipv6Net) -> Ipv6Addr {
    let first = gateway6(network);
    if local_subnet.contains(&first) {
        Ipv6Addr::from(u128::from(network.broadcast()) - 1)
    } else {
        first
    }
}

/// This host's place in the IPv6 overlay: ICMPv6 errors to peers from our subnet's first
/// address, into the device from [`default_device_icmp_source6`].
pub(crate) fn overlay6(network: Ipv6Net, local_subnet: Ipv6Net) -> Overlay6 {
    Overlay6 {
        local_subnet,
        network,
        icmp_to_peers: gateway6(local_subnet),
        icmp_into_device: default_device_icmp_source6(network, local_subnet),
    }
}

#[derive(Clone, Debug)]
struct PrefixBucket6 {
    prefix_len: u8,
    /// (subnet network address, peer underlay address), sorted by network address.
    entries: Vec<(u128, IpAddr)>,
    /// The traffic counters of `entries[i]`.
    traffic: Vec<Arc<PeerCounters>>,
}

/// Where a route leads: the peer's underlay address, and where its entry is in this
/// snapshot of the table ([`PeerTable6::traffic`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Route6 {
    pub(crate) underlay: IpAddr,
    slot: (u16, u32),
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub(crate) struct PeerTable6 {
    pub(crate) overlay: Overlay6,
    /// Longest prefix first: a lookup masks once per length and binary-searches.
    by_prefix: Vec<PrefixBucket6>,
    /// (underlay address, subnet), sorted: one sender's subnets are a contiguous slice.
    sender_ips: Vec<IpAddr>,
    sender_subnets: Vec<Ipv6Net>,
}

fn mask(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl PeerTable6 {
    pub(crate) fn new(overlay: Overlay6) -> Self {
        PeerTable6 {
            overlay,
            by_prefix: Vec::new(),
            sender_ips: Vec::new(),
            sender_subnets: Vec::new(),
        }
    }

    /// Adds `subnet` at `underlay` counting into `traffic`, replacing the entry that had it
    /// at `previous`.
    pub(crate) fn upsert(
        &mut self,
        subnet: Ipv6Net,
        underlay: IpAddr,
        previous: Option<IpAddr>,
        traffic: Arc<PeerCounters>,
    ) {
        if let Some(previous) = previous {
            self.remove_sender(previous, subnet);
        }
        if let Err(at) = self.sender_at(underlay, subnet) {
            self.sender_ips.insert(at, underlay);
            self.sender_subnets.insert(at, subnet);
        }
        // Our own subnet is delivered locally; sending it to ourselves would loop.
        if subnet == self.overlay.local_subnet {
            return;
        }
        let len = subnet.prefix_len();
        let bucket_at = match self.by_prefix.binary_search_by(|b| len.cmp(&b.prefix_len)) {
            Ok(at) => at,
            Err(at) => {
                let bucket = PrefixBucket6 {
                    prefix_len: len,
                    entries: Vec::new(),
                    traffic: Vec::new(),
                };
                self.by_prefix.insert(at, bucket);
                at
            }
        };
        let bucket = &mut self.by_prefix[bucket_at];
        let key = u128::from(subnet.network());
        match bucket.entries.binary_search_by_key(&key, |(net, _)| *net) {
            Ok(i) => {
                bucket.entries[i].1 = underlay;
                bucket.traffic[i] = traffic;
            }
            Err(i) => {
                bucket.entries.insert(i, (key, underlay));
                bucket.traffic.insert(i, traffic);
            }
        }
    }

    /// Removes `subnet`, which was at `underlay`.
    pub(crate) fn remove(&mut self, subnet: Ipv6Net, underlay: IpAddr) {
        self.remove_sender(underlay, subnet);
        let len = subnet.prefix_len();
        if let Ok(at) = self.by_prefix.binary_search_by(|b| len.cmp(&b.prefix_len)) {
            let bucket = &mut self.by_prefix[at];
            let key = u128::from(subnet.network());
            if let Ok(i) = bucket.entries.binary_search_by_key(&key, |(net, _)| *net) {
                bucket.entries.remove(i);
                bucket.traffic.remove(i);
            }
            if bucket.entries.is_empty() {
                self.by_prefix.remove(at);
            }
        }
    }

    fn sender_at(&self, underlay: IpAddr, subnet: Ipv6Net) -> Result<usize, usize> {
        let (mut low, mut high) = (0, self.sender_ips.len());
        while low < high {
            let mid = low + (high - low) / 2;
            match (self.sender_ips[mid], self.sender_subnets[mid]).cmp(&(underlay, subnet)) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(low)
    }

    fn remove_sender(&mut self, underlay: IpAddr, subnet: Ipv6Net) {
        if let Ok(at) = self.sender_at(underlay, subnet) {
            self.sender_ips.remove(at);
            self.sender_subnets.remove(at);
        }
    }
}

impl PeerTable6 {
    /// The traffic counters of the entry `route` (from this snapshot) leads to.
    pub(crate) fn traffic(&self, route: Route6) -> &Arc<PeerCounters> {
        &self.by_prefix[usize::from(route.slot.0)].traffic[route.slot.1 as usize]
    }
}

impl PeerRoutes6 for PeerTable6 {
    type Peer = Route6;

    fn route(&self, dst: Ipv6Addr) -> Option<Route6> {
        let dst = u128::from(dst);
        self.by_prefix
            .iter()
            .enumerate()
            .find_map(|(bucket_at, bucket)| {
                let key = dst & mask(bucket.prefix_len);
                let entries = &bucket.entries;
                let i = entries.binary_search_by_key(&key, |(net, _)| *net).ok()?;
                Some(Route6 {
                    underlay: entries[i].1,
                    // At most 129 prefix lengths; entries are far below 2^32.
                    slot: (bucket_at as u16, i as u32),
                })
            })
    }

    fn subnets_of(&self, sender: IpAddr) -> &[Ipv6Net] {
        let start = self.sender_ips.partition_point(|ip| *ip < sender);
        let end = self.sender_ips.partition_point(|ip| *ip <= sender);
        &self.sender_subnets[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Where `dst` is routed to (the underlay address).
    fn underlay_of(t: &PeerTable6, dst: &str) -> Option<IpAddr> {
        t.route(dst.parse().unwrap()).map(|r| r.underlay)
    }

    #[test]
    fn routes_by_longest_prefix_and_knows_each_senders_subnets() {
        let mut t = PeerTable6::new(overlay6(net("fc00::/48"), net("fc00:0:0:1::/64")));
        t.upsert(
            net("fc00:0:0:2::/64"),
            ip("fd00:77::12"),
            None,
            Arc::default(),
        );
        t.upsert(
            net("fc00:0:0:3::/64"),
            ip("192.168.77.13"),
            None,
            Arc::default(),
        );
        t.upsert(
            net("fc00:0:0:3:8000::/65"),
            ip("fd00:77::14"),
            None,
            Arc::default(),
        );
        // Our own lease is no route, but is known as ours.
        t.upsert(
            net("fc00:0:0:1::/64"),
            ip("fd00:77::11"),
            None,
            Arc::default(),
        );
        assert_eq!(underlay_of(&t, "fc00:0:0:2::9"), Some(ip("fd00:77::12")));
        assert_eq!(underlay_of(&t, "fc00:0:0:3::9"), Some(ip("192.168.77.13")));
        assert_eq!(
            underlay_of(&t, "fc00:0:0:3:8000::9"),
            Some(ip("fd00:77::14"))
        );
        assert_eq!(underlay_of(&t, "fc00:0:0:1::2"), None);
        assert_eq!(underlay_of(&t, "fc00:0:0:9::2"), None);
        assert_eq!(t.subnets_of(ip("fd00:77::12")), &[net("fc00:0:0:2::/64")]);
        assert_eq!(t.subnets_of(ip("192.168.77.13")), &[net("fc00:0:0:3::/64")]);
        assert!(t.subnets_of(ip("fd00:77::99")).is_empty());

        // A peer moving to another underlay address: the old one no longer vouches for it.
        t.upsert(
            net("fc00:0:0:2::/64"),
            ip("fd00:77::22"),
            Some(ip("fd00:77::12")),
            Arc::default(),
        );
        assert!(t.subnets_of(ip("fd00:77::12")).is_empty());
        assert_eq!(underlay_of(&t, "fc00:0:0:2::9"), Some(ip("fd00:77::22")));
        t.remove(net("fc00:0:0:2::/64"), ip("fd00:77::22"));
        assert_eq!(underlay_of(&t, "fc00:0:0:2::9"), None);
        assert!(t.subnets_of(ip("fd00:77::22")).is_empty());
    }

    #[test]
    fn each_route_leads_to_its_subnets_counters() {
        let mut t = PeerTable6::new(overlay6(net("fc00::/48"), net("fc00:0:0:1::/64")));
        let (two, three): (Arc<PeerCounters>, Arc<PeerCounters>) = Default::default();
        t.upsert(net("fc00:0:0:2::/64"), ip("fd00:77::12"), None, two.clone());
        t.upsert(
            net("fc00:0:0:3::/64"),
            ip("fd00:77::13"),
            None,
            three.clone(),
        );
        t.upsert(
            net("fc00:0:0:3:8000::/65"),
            ip("fd00:77::14"),
            None,
            Arc::default(),
        );
        let route = t.route("fc00:0:0:3::9".parse().unwrap()).unwrap();
        t.traffic(route).add_tx(1, 100);
        let route = t.route("fc00:0:0:2::9".parse().unwrap()).unwrap();
        t.traffic(route).add_rx(2, 300);
        assert_eq!(
            (three.snapshot().tx_packets, three.snapshot().rx_packets),
            (1, 0)
        );
        assert_eq!(
            (two.snapshot().tx_packets, two.snapshot().rx_bytes),
            (0, 300)
        );
    }

    #[test]
    fn device_icmp_source_is_never_in_our_subnet() {
        let network = net("fc00::/48");
        assert_eq!(
            default_device_icmp_source6(network, net("fc00:0:0:1::/64")),
            "fc00::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            default_device_icmp_source6(network, net("fc00::/64")),
            "fc00:0:0:ffff:ffff:ffff:ffff:fffe"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
    }
}
