//! The overlay's userspace forwarding: the peer table and the per-packet rules over it.
//! Both planes use it: the TUN data plane for every packet, the eBPF plane's socket path
//! for the datagrams BPF passes up.
//!
//! The per-packet decisions are pure functions ([`decide_outbound`], [`decide_inbound`])
//! over the packet bytes and a [`ForwardingTable`] snapshot, so they are tested without
//! a device.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ipnet::Ipv4Net;
use rudder_ebpf::Counter;

use super::counters::PeerCounters;
use crate::packet::{self, IcmpError, ICMP_ERROR_MAX_LEN};
use crate::subnet::gateway;

/// The overlay's "router" address for ICMP errors written into the device: the network's
/// first host address, in the first subnet, which flannel never leases by default
/// (SubnetMin skips it). If our own lease is that subnet, the network's last host
/// address instead.
pub fn default_device_icmp_source(network: Ipv4Net, local_subnet: Ipv4Net) -> Ipv4Addr {
    let first = gateway(network);
    if local_subnet.contains(&first) {
        Ipv4Addr::from(u32::from(network.broadcast()).saturating_sub(1))
    } else {
        first
    }
}

/// Where the ICMP errors we originate come from (see [`TunOptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpSources {
    /// For errors sent to peers: inside our subnet.
    pub to_peers: Ipv4Addr,
    /// For errors written into the device: not a local address.
    pub into_device: Ipv4Addr,
}

/// Where a peer sits in a [`ForwardingTable`]: (prefix bucket, entry). Valid for the
/// table it came from only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSlot(u32, u32);

/// Everything a forwarding decision needs. The control plane updates a master copy in
/// place and publishes a clone per change (control-plane rate, O(n) memcpy); the
/// forwarding tasks read their snapshot on every packet without locking.
#[derive(Clone, Debug)]
pub struct ForwardingTable {
    local_subnet: Ipv4Net,
    network: Ipv4Net,
    icmp_sources: IcmpSources,
    /// Peer subnets grouped by prefix length, longest first: a lookup masks the
    /// destination once per length and binary-searches, O(k log n) with k distinct
    /// lengths (one in a flannel network, where every lease has the same length).
    by_prefix: Vec<PrefixBucket>,
    /// Peer subnets sorted by public IP, for the sender check: parallel vectors so that
    /// one sender's subnets are a contiguous slice. A peer's underlay address is IPv4 or,
    /// when both ends announce a PublicIPv6, IPv6 (dual stack).
    public_ips: Vec<IpAddr>,
    public_subnets: Vec<Ipv4Net>,
}

#[derive(Clone, Debug)]
struct PrefixBucket {
    prefix_len: u8,
    mask: u32,
    /// (subnet network address, peer underlay address), sorted by network address.
    entries: Vec<(u32, IpAddr)>,
    /// The traffic counters of `entries[i]`.
    traffic: Vec<Arc<PeerCounters>>,
}

impl ForwardingTable {
    pub fn new(
        local_subnet: Ipv4Net,
        network: Ipv4Net,
        icmp_sources: IcmpSources,
        peers: &BTreeMap<Ipv4Net, Ipv4Addr>,
    ) -> Self {
        let mut table = ForwardingTable {
            local_subnet,
            network,
            icmp_sources,
            by_prefix: Vec::new(),
            public_ips: Vec::with_capacity(peers.len()),
            public_subnets: Vec::with_capacity(peers.len()),
        };
        for (&subnet, &public_ip) in peers {
            table.upsert(subnet, public_ip, None::<IpAddr>, Arc::default());
        }
        table
    }

    /// Adds `subnet` at `public_ip` counting into `traffic`, replacing the entry that had
    /// it at `previous`. O(n) memory moves at worst, no rebuild: a full resync of 10k
    /// peers stays cheap.
    pub(crate) fn upsert(
        &mut self,
        subnet: Ipv4Net,
        public_ip: impl Into<IpAddr>,
        previous: Option<impl Into<IpAddr>>,
        traffic: Arc<PeerCounters>,
    ) {
        let public_ip = public_ip.into();
        if let Some(previous) = previous {
            self.remove_sender_entry(previous.into(), subnet);
        }
        if let Err(at) = self.sender_entry(public_ip, subnet) {
            self.public_ips.insert(at, public_ip);
            self.public_subnets.insert(at, subnet);
        }
        // Our own lease is in the registry too; sending it to ourselves would loop.
        if subnet == self.local_subnet {
            return;
        }
        let len = subnet.prefix_len();
        let bucket_at = match self.by_prefix.binary_search_by(|b| len.cmp(&b.prefix_len)) {
            Ok(at) => at,
            Err(at) => {
                self.by_prefix.insert(
                    at,
                    PrefixBucket {
                        prefix_len: len,
                        mask: u32::from(subnet.netmask()),
                        entries: Vec::new(),
                        traffic: Vec::new(),
                    },
                );
                at
            }
        };
        let bucket = &mut self.by_prefix[bucket_at];
        let key = u32::from(subnet.network());
        match bucket.entries.binary_search_by_key(&key, |(net, _)| *net) {
            Ok(i) => {
                bucket.entries[i].1 = public_ip;
                bucket.traffic[i] = traffic;
            }
            Err(i) => {
                bucket.entries.insert(i, (key, public_ip));
                bucket.traffic.insert(i, traffic);
            }
        }
    }

    /// Removes `subnet`, which was at `public_ip`.
    pub(crate) fn remove(&mut self, subnet: Ipv4Net, public_ip: impl Into<IpAddr>) {
        self.remove_sender_entry(public_ip.into(), subnet);
        let len = subnet.prefix_len();
        if let Ok(at) = self.by_prefix.binary_search_by(|b| len.cmp(&b.prefix_len)) {
            let bucket = &mut self.by_prefix[at];
            let key = u32::from(subnet.network());
            if let Ok(i) = bucket.entries.binary_search_by_key(&key, |(net, _)| *net) {
                bucket.entries.remove(i);
                bucket.traffic.remove(i);
            }
            if bucket.entries.is_empty() {
                self.by_prefix.remove(at);
            }
        }
    }

    /// Position of (public_ip, subnet) in the sender index: `Ok` when present, `Err`
    /// with the insertion point otherwise.
    fn sender_entry(&self, public_ip: IpAddr, subnet: Ipv4Net) -> Result<usize, usize> {
        let (mut low, mut high) = (0, self.public_ips.len());
        while low < high {
            let mid = low + (high - low) / 2;
            match (self.public_ips[mid], self.public_subnets[mid]).cmp(&(public_ip, subnet)) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(low)
    }

    fn remove_sender_entry(&mut self, public_ip: IpAddr, subnet: Ipv4Net) {
        if let Ok(at) = self.sender_entry(public_ip, subnet) {
            self.public_ips.remove(at);
            self.public_subnets.remove(at);
        }
    }

    /// Underlay address of the peer whose subnet holds `dst` (longest prefix wins).
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<IpAddr> {
        self.slot_of(dst).map(|slot| self.peer_at(slot))
    }

    /// Where the peer subnet holding `addr` is (longest prefix wins).
    pub fn slot_of(&self, addr: Ipv4Addr) -> Option<PeerSlot> {
        let addr = u32::from(addr);
        self.by_prefix.iter().enumerate().find_map(|(b, bucket)| {
            let key = addr & bucket.mask;
            bucket
                .entries
                .binary_search_by_key(&key, |(net, _)| *net)
                .ok()
                .map(|i| PeerSlot(b as u32, i as u32))
        })
    }

    fn peer_at(&self, slot: PeerSlot) -> IpAddr {
        self.by_prefix[slot.0 as usize].entries[slot.1 as usize].1
    }

    /// The traffic counters of the peer at `slot`.
    pub fn traffic(&self, slot: PeerSlot) -> &Arc<PeerCounters> {
        &self.by_prefix[slot.0 as usize].traffic[slot.1 as usize]
    }

    /// The subnets leased by the host at underlay address `public_ip`.
    pub fn subnets_of(&self, public_ip: impl Into<IpAddr>) -> &[Ipv4Net] {
        let public_ip = public_ip.into();
        let start = self.public_ips.partition_point(|ip| *ip < public_ip);
        let end = self.public_ips.partition_point(|ip| *ip <= public_ip);
        &self.public_subnets[start..end]
    }

    fn subnet_prefix_len(&self) -> u8 {
        self.local_subnet.prefix_len()
    }
}

/// What to do with a packet read from the TUN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Send `packet[..len]` (unchanged) to the peer at `peer`, whose
    /// entry is at `slot`.
    Encapsulate {
        len: usize,
        peer: IpAddr,
        slot: PeerSlot,
    },
    /// Drop it; when `icmp_len` is set, write the ICMP error built in the scratch buffer
    /// back into the TUN device.
    Drop {
        reason: Counter,
        icmp_len: Option<usize>,
    },
}

/// What to do with a datagram payload received from the underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Deliver `packet[..len]` (TTL decremented for [`ReceiverHop::Rules`], ECN CE
    /// copied from the outer header); `from` is the entry of the sending subnet.
    Deliver { len: usize, from: Option<PeerSlot> },
    /// Drop it; when `icmp_len` is set, send the ICMP error built in the scratch buffer
    /// back to the sending peer, encapsulated, to its overlay port (not the datagram's
    /// source port: an eBPF peer sends from a flow-hash port nothing listens on).
    Drop {
        reason: Counter,
        icmp_len: Option<usize>,
    },
}

/// Decides the fate of a packet the kernel routed into the overlay. Never changes the
/// packet's bytes; may build an ICMP error into `icmp`.
pub fn decide_outbound(
    packet: &mut [u8],
    table: &ForwardingTable,
    mtu: usize,
    icmp: &mut [u8; ICMP_ERROR_MAX_LEN],
) -> Outbound {
    let view = match packet::parse_ipv4(packet) {
        Ok(view) => view,
        Err(reason) => {
            return Outbound::Drop {
                reason,
                icmp_len: None,
            }
        }
    };
    let packet = &mut packet[..view.total_len];
    if view.total_len > mtu {
        // The device MTU stops these in the kernel already; never send what peers reject.
        return Outbound::Drop {
            reason: Counter::DropTooBig,
            icmp_len: None,
        };
    }
    // No TTL rule here: the kernel's forwarding on the way into the device was this host's
    // router hop (TTL - 1, time exceeded); the receiving host's kernel makes the next one.
    match table.slot_of(view.dst) {
        Some(slot) => Outbound::Encapsulate {
            len: view.total_len,
            peer: table.peer_at(slot),
            slot,
        },
        None => {
            // Outside the overlay network the kernel misrouted: nothing to tell the sender.
            let icmp_len = if table.network.contains(&view.dst) {
                let source = table.icmp_sources.into_device;
                icmp_error(
                    IcmpError::NetUnreachable,
                    packet,
                    &view,
                    source,
                    table,
                    icmp,
                )
            } else {
                None
            };
            Outbound::Drop {
                reason: Counter::DropNoRoute,
                icmp_len,
            }
        }
    }
}

/// Who makes the receiving host's router hop (TTL - 1, ICMP time exceeded) for a packet
/// that arrived through the overlay. One overlay hop costs what two routers cost, the
/// sending host and the receiving host, on every data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverHop {
    /// The packet goes on through the kernel's forwarding (written into the TUN device,
    /// or passed up by the BPF ingress): the kernel decrements and answers.
    Kernel,
    /// The packet re-enters as if sent locally (the eBPF socket path's raw socket), which
    /// the kernel does not decrement: the rules make the hop.
    Rules,
}

/// Decides the fate of a datagram payload that arrived from underlay address `sender` in
/// a datagram whose outer TOS byte was `outer_tos`. May change the TTL and ECN field in
/// place; may build an ICMP error into `icmp`.
pub fn decide_inbound(
    packet: &mut [u8],
    sender: impl Into<IpAddr>,
    outer_tos: u8,
    table: &ForwardingTable,
    hop: ReceiverHop,
    icmp: &mut [u8; ICMP_ERROR_MAX_LEN],
) -> Inbound {
    let view = match packet::parse_ipv4(packet) {
        Ok(view) => view,
        Err(reason) => {
            return Inbound::Drop {
                reason,
                icmp_len: None,
            }
        }
    };
    let packet = &mut packet[..view.total_len];
    let sender_subnets = table.subnets_of(sender);
    if let Err(reason) = packet::check_received(&view, table.local_subnet, sender_subnets) {
        return Inbound::Drop {
            reason,
            icmp_len: None,
        };
    }
    if let Err(reason) = packet::decapsulate_ecn(packet, outer_tos) {
        return Inbound::Drop {
            reason,
            icmp_len: None,
        };
    }
    if hop == ReceiverHop::Rules {
        if let Err(reason) = packet::decrement_ttl(packet) {
            // The source is inside the sender's subnet (checked above), so the error can go
            // straight back to the sender.
            let source = table.icmp_sources.to_peers;
            let icmp_len = icmp_error(IcmpError::TimeExceeded, packet, &view, source, table, icmp);
            return Inbound::Drop { reason, icmp_len };
        }
    }
    Inbound::Deliver {
        len: view.total_len,
        from: table.slot_of(view.src),
    }
}

/// A token bucket for the ICMP errors the userspace rules originate, like the kernel's
/// global `icmp_msgs_per_sec`/`icmp_msgs_burst`: a flood of offending packets must not
/// become a flood of errors (RFC 1812 4.3.2.8).
#[derive(Clone, Debug)]
pub struct IcmpRateLimit {
    tokens: u32,
    burst: u32,
    per_second: u32,
    /// Time up to which tokens have been credited.
    credited: std::time::Instant,
}

impl IcmpRateLimit {
    /// The kernel's defaults: 1000 errors a second, bursts of 50.
    pub const PER_SECOND: u32 = 1000;
    pub const BURST: u32 = 50;

    pub fn new(now: std::time::Instant) -> Self {
        Self::with_rate(Self::PER_SECOND, Self::BURST, now)
    }

    pub fn with_rate(per_second: u32, burst: u32, now: std::time::Instant) -> Self {
        IcmpRateLimit {
            tokens: burst,
            burst,
            per_second: per_second.max(1),
            credited: now,
        }
    }

    /// Whether an error may be sent at `now`; takes a token when it may.
    pub fn allow(&mut self, now: std::time::Instant) -> bool {
        let interval = std::time::Duration::from_secs(1) / self.per_second;
        let elapsed = now.saturating_duration_since(self.credited);
        let earned = (elapsed.as_nanos() / interval.as_nanos().max(1)) as u64;
        if earned > 0 {
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(self.burst)) as u32;
            // Keep the remainder: the next token comes one interval after the last one.
            self.credited += interval * earned.min(u64::from(u32::MAX)) as u32;
            if self.tokens == self.burst {
                self.credited = now;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

fn icmp_error(
    kind: IcmpError,
    packet: &[u8],
    view: &packet::Ipv4View,
    source: Ipv4Addr,
    table: &ForwardingTable,
    icmp: &mut [u8; ICMP_ERROR_MAX_LEN],
) -> Option<usize> {
    packet::build_icmp_error(kind, packet, view, source, table.subnet_prefix_len(), icmp)
}

/// The current [`ForwardingTable`] (or another table, e.g. the TUN plane's IPv6 peers),
/// published to the forwarding tasks.
///
/// Writers replace the `Arc` under the lock, then bump `version`. Readers keep their own
/// `Arc` and only take the (uncontended) read lock when `version` moved, so the hot
/// path costs one atomic load per packet.
pub(crate) struct PublishedTable<T = ForwardingTable> {
    version: AtomicU64,
    current: RwLock<Arc<T>>,
}

impl<T> PublishedTable<T> {
    pub(crate) fn new(table: T) -> Self {
        PublishedTable {
            version: AtomicU64::new(0),
            current: RwLock::new(Arc::new(table)),
        }
    }

    pub(crate) fn publish(&self, table: T) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        self.version.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn reader(&self) -> TableReader<T> {
        let version = self.version.load(Ordering::Acquire);
        TableReader {
            version,
            table: self.load(),
        }
    }

    fn load(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A forwarding task's cached view of the [`PublishedTable`].
pub(crate) struct TableReader<T = ForwardingTable> {
    version: u64,
    table: Arc<T>,
}

impl<T> TableReader<T> {
    pub(crate) fn current(&mut self, published: &PublishedTable<T>) -> &T {
        let version = published.version.load(Ordering::Acquire);
        if version != self.version {
            self.table = published.load();
            self.version = version;
        }
        &self.table
    }
}

#[cfg(test)]
#[path = "forwarding_tests.rs"]
mod tests;
