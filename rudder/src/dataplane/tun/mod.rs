//! The portable data plane: a TUN device and a UDP socket in the daemon.
//!
//! Two tasks move packets, one per direction:
//! - TUN → UDP: the kernel routes the whole overlay Network into the TUN device; each
//!   packet is validated, its TTL decremented, its destination looked up among the peer
//!   subnets (longest prefix), and sent as the payload of a UDP datagram to the peer's
//!   public address (flannel's udp backend wire format).
//! - UDP → TUN: each datagram's payload is validated, checked against the sender's lease
//!   (anti-spoofing) and our subnet, its TTL decremented, and written into the TUN device.
//!
//! The per-packet decisions are pure functions ([`decide_outbound`], [`decide_inbound`])
//! over the packet bytes and a [`ForwardingTable`] snapshot, so they are tested without
//! a device. The loops reuse one buffer each and never allocate; a batched
//! recv/send (recvmmsg, GSO) can replace the single-packet calls without touching the
//! decisions.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use rudder_ebpf::{Counter, DEFAULT_UDP_PORT, ENCAP_OVERHEAD};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

mod forward;

use super::{CounterSnapshot, Dataplane, DataplaneKind, PeerStats, PeerTraffic};
use crate::packet::{self, IcmpError, ICMP_ERROR_MAX_LEN};
use crate::subnet::gateway;

/// Name of the TUN device unless configured otherwise.
pub const DEFAULT_DEVICE_NAME: &str = "rudder0";

/// Largest IPv4 packet: the receive buffers hold any datagram the kernel can hand us.
const MAX_PACKET_LEN: usize = 65_535;

/// At most one log line per this interval and kind of event, with a count of the
/// events it stands for: a flood of bad packets must not become a flood of log lines.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Pause after a failed device/socket receive, so a persistent error cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// How the TUN data plane is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunOptions {
    /// Name of the TUN device; a stale device of that name is removed first.
    pub device_name: String,
    /// MTU of the TUN device: the underlay MTU minus [`ENCAP_OVERHEAD`].
    pub mtu: u16,
    /// Our leased subnet: its network address /32 goes on the device, and only
    /// destinations inside it are delivered from the underlay.
    pub local_subnet: Ipv4Net,
    /// The whole overlay network: routed into the device.
    pub network: Ipv4Net,
    /// Local address of the UDP socket. Its port is also the port every peer listens on.
    pub bind: SocketAddrV4,
    /// Source of the ICMP errors we send to peers over the underlay (time exceeded on
    /// arrival): our subnet's first host address, so the peer's anti-spoofing accepts it.
    pub gateway: Ipv4Addr,
    /// Source of the ICMP errors we write back into the device (no lease, TTL expired
    /// on the way out). It must not be a local address: on a real host the gateway
    /// address sits on the container bridge, and the kernel drops a packet arriving on
    /// the TUN device with a local source as a martian. An unleased address of the
    /// network is routed back through the device, so it also passes strict rp_filter.
    pub device_icmp_source: Ipv4Addr,
    /// Batch with the kernel's offloads: TSO/USO on the device (`IFF_VNET_HDR`), GSO and
    /// GRO on the socket. Off means one packet per system call, as flannel's udp backend.
    pub offload: bool,
}

impl TunOptions {
    /// Defaults for a host: device `rudder0`, UDP on 0.0.0.0:8285, MTU from the underlay
    /// interface's MTU, ICMP errors to peers from the subnet's first host address and
    /// into the device from [`default_device_icmp_source`].
    pub fn new(local_subnet: Ipv4Net, network: Ipv4Net, underlay_mtu: u16) -> Self {
        TunOptions {
            device_name: DEFAULT_DEVICE_NAME.to_owned(),
            mtu: underlay_mtu.saturating_sub(ENCAP_OVERHEAD),
            local_subnet,
            network,
            bind: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_UDP_PORT),
            gateway: gateway(local_subnet),
            device_icmp_source: default_device_icmp_source(network, local_subnet),
            offload: true,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.device_name.is_empty() || self.device_name.len() > 15 {
            bail!(
                "TUN device name {:?} must be 1 to 15 bytes long (Linux IFNAMSIZ); choose a shorter name",
                self.device_name
            );
        }
        if usize::from(self.mtu) < packet::IPV4_MIN_HEADER_LEN + 48 {
            bail!(
                "overlay MTU {} is too small (IPv4 needs at least 68); check the underlay interface MTU",
                self.mtu
            );
        }
        if !self.network.contains(&self.local_subnet) {
            bail!(
                "local subnet {} is not inside the overlay network {}; the lease and the network config disagree",
                self.local_subnet,
                self.network
            );
        }
        if !self.network.contains(&self.device_icmp_source)
            || self.local_subnet.contains(&self.device_icmp_source)
        {
            bail!(
                "ICMP source {} for the TUN device must be inside the overlay network {} but outside our subnet {} (a local address would be dropped as martian)",
                self.device_icmp_source,
                self.network,
                self.local_subnet
            );
        }
        if self.bind.port() == 0 {
            bail!(
                "UDP port 0 cannot be used: every peer sends to the same fixed port (default 8285)"
            );
        }
        Ok(())
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

fn device_error(options: &TunOptions) -> String {
    format!(
        "creating TUN device {:?} with MTU {} failed; is /dev/net/tun present and are we root (CAP_NET_ADMIN)?",
        options.device_name, options.mtu
    )
}

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

/// Packet and byte counters shared by the forwarding tasks: relaxed atomics, no locks.
#[derive(Debug, Default)]
pub struct Counters {
    packets: [AtomicU64; Counter::COUNT],
    bytes: [AtomicU64; Counter::COUNT],
}

impl Counters {
    /// Counts one packet of `bytes` IPv4 bytes (the inner packet for (de)encapsulation).
    pub fn add(&self, counter: Counter, bytes: usize) {
        self.add_many(counter, 1, bytes);
    }

    /// Counts `packets` packets of `bytes` bytes in all.
    pub fn add_many(&self, counter: Counter, packets: usize, bytes: usize) {
        self.packets[counter.index()].fetch_add(packets as u64, Ordering::Relaxed);
        self.bytes[counter.index()].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        std::array::from_fn(|i| self.packets[i].load(Ordering::Relaxed))
    }

    pub fn bytes_snapshot(&self) -> CounterSnapshot {
        std::array::from_fn(|i| self.bytes[i].load(Ordering::Relaxed))
    }
}

/// Traffic with one peer subnet, shared by the forwarding tables that list it.
#[derive(Debug, Default)]
pub struct PeerCounters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
}

impl PeerCounters {
    fn add_tx(&self, packets: usize, bytes: usize) {
        self.tx_packets.fetch_add(packets as u64, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_rx(&self, packets: usize, bytes: usize) {
        self.rx_packets.fetch_add(packets as u64, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> PeerTraffic {
        PeerTraffic {
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
        }
    }
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
    /// one sender's subnets are a contiguous slice.
    public_ips: Vec<Ipv4Addr>,
    public_subnets: Vec<Ipv4Net>,
}

#[derive(Clone, Debug)]
struct PrefixBucket {
    prefix_len: u8,
    mask: u32,
    /// (subnet network address, peer public IP), sorted by network address.
    entries: Vec<(u32, Ipv4Addr)>,
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
            table.upsert(subnet, public_ip, None, Arc::default());
        }
        table
    }

    /// Adds `subnet` at `public_ip` counting into `traffic`, replacing the entry that had
    /// it at `previous`. O(n) memory moves at worst, no rebuild: a full resync of 10k
    /// peers stays cheap.
    pub(crate) fn upsert(
        &mut self,
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        previous: Option<Ipv4Addr>,
        traffic: Arc<PeerCounters>,
    ) {
        if let Some(previous) = previous {
            self.remove_sender_entry(previous, subnet);
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
    pub(crate) fn remove(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) {
        self.remove_sender_entry(public_ip, subnet);
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
    fn sender_entry(&self, public_ip: Ipv4Addr, subnet: Ipv4Net) -> Result<usize, usize> {
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

    fn remove_sender_entry(&mut self, public_ip: Ipv4Addr, subnet: Ipv4Net) {
        if let Ok(at) = self.sender_entry(public_ip, subnet) {
            self.public_ips.remove(at);
            self.public_subnets.remove(at);
        }
    }

    /// Public IP of the peer whose subnet holds `dst` (longest prefix wins).
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
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

    fn peer_at(&self, slot: PeerSlot) -> Ipv4Addr {
        self.by_prefix[slot.0 as usize].entries[slot.1 as usize].1
    }

    /// The traffic counters of the peer at `slot`.
    pub fn traffic(&self, slot: PeerSlot) -> &Arc<PeerCounters> {
        &self.by_prefix[slot.0 as usize].traffic[slot.1 as usize]
    }

    /// The subnets leased by the host at underlay address `public_ip`.
    pub fn subnets_of(&self, public_ip: Ipv4Addr) -> &[Ipv4Net] {
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
    /// Send `packet[..len]` (TTL already decremented) to the peer at `peer`, whose
    /// entry is at `slot`.
    Encapsulate {
        len: usize,
        peer: Ipv4Addr,
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
    /// Write `packet[..len]` (TTL already decremented) into the TUN device; `from` is
    /// the entry of the sending subnet.
    Deliver { len: usize, from: Option<PeerSlot> },
    /// Drop it; when `icmp_len` is set, send the ICMP error built in the scratch buffer
    /// back to the sending peer, encapsulated.
    Drop {
        reason: Counter,
        icmp_len: Option<usize>,
    },
}

/// Decides the fate of a packet the kernel routed into the overlay. May decrement the
/// TTL in place; may build an ICMP error into `icmp`.
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
    if let Err(reason) = packet::decrement_ttl(packet) {
        let source = table.icmp_sources.into_device;
        let icmp_len = icmp_error(IcmpError::TimeExceeded, packet, &view, source, table, icmp);
        return Outbound::Drop { reason, icmp_len };
    }
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

/// Decides the fate of a datagram payload that arrived from underlay address `sender`.
/// May decrement the TTL in place; may build an ICMP error into `icmp`.
pub fn decide_inbound(
    packet: &mut [u8],
    sender: Ipv4Addr,
    table: &ForwardingTable,
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
    if let Err(reason) = packet::check_received(&view, table.local_subnet, table.subnets_of(sender))
    {
        return Inbound::Drop {
            reason,
            icmp_len: None,
        };
    }
    if let Err(reason) = packet::decrement_ttl(packet) {
        // The source is inside the sender's subnet (checked above), so the error can go
        // straight back to the sender.
        let source = table.icmp_sources.to_peers;
        let icmp_len = icmp_error(IcmpError::TimeExceeded, packet, &view, source, table, icmp);
        return Inbound::Drop { reason, icmp_len };
    }
    Inbound::Deliver {
        len: view.total_len,
        from: table.slot_of(view.src),
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

/// One installed peer: where it is, since when, and its traffic since then.
struct PeerEntry {
    public_ip: Ipv4Addr,
    changed: std::time::SystemTime,
    traffic: Arc<PeerCounters>,
}

/// The control plane's copy of the peers and the master forwarding table.
struct PeerState {
    local_subnet: Ipv4Net,
    icmp_sources: IcmpSources,
    peers: BTreeMap<Ipv4Net, PeerEntry>,
    /// The master copy of the forwarding table, updated in place; readers get clones.
    table: ForwardingTable,
}

/// The current [`ForwardingTable`], published to the forwarding tasks.
///
/// Writers replace the `Arc` under the lock, then bump `version`. Readers keep their own
/// `Arc` and only take the (uncontended) read lock when `version` moved, so the hot
/// path costs one atomic load per packet.
struct PublishedTable {
    version: AtomicU64,
    current: RwLock<Arc<ForwardingTable>>,
}

impl PublishedTable {
    fn publish(&self, table: ForwardingTable) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        self.version.fetch_add(1, Ordering::Release);
    }

    fn reader(&self) -> TableReader {
        let version = self.version.load(Ordering::Acquire);
        TableReader {
            version,
            table: self.load(),
        }
    }

    fn load(&self) -> Arc<ForwardingTable> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A forwarding task's cached view of the [`PublishedTable`].
struct TableReader {
    version: u64,
    table: Arc<ForwardingTable>,
}

impl TableReader {
    fn current(&mut self, published: &PublishedTable) -> &ForwardingTable {
        let version = published.version.load(Ordering::Acquire);
        if version != self.version {
            self.table = published.load();
            self.version = version;
        }
        &self.table
    }
}

/// State shared between the data plane handle and its tasks.
struct Shared {
    counters: Counters,
    table: PublishedTable,
    /// Port every peer listens on (ours too).
    peer_port: u16,
    mtu: usize,
    /// The device was opened with `IFF_VNET_HDR` and offloads.
    offload: bool,
}

/// Logs an event at most once per [`LOG_INTERVAL`], with how many were suppressed.
struct LogLimiter {
    next_allowed: Instant,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> Self {
        LogLimiter {
            next_allowed: Instant::now(),
            suppressed: 0,
        }
    }

    /// Returns how many events were suppressed since the last line when a line may be
    /// written now, or `None` to stay quiet.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now < self.next_allowed {
            self.suppressed += 1;
            return None;
        }
        self.next_allowed = now + LOG_INTERVAL;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Per-task rate limiters: one per kind of event so a flood of one kind cannot hide
/// another.
struct TaskLogs {
    drops: LogLimiter,
    io: LogLimiter,
}

impl TaskLogs {
    fn new() -> Self {
        TaskLogs {
            drops: LogLimiter::new(),
            io: LogLimiter::new(),
        }
    }

    fn dropped(&mut self, direction: &str, reason: Counter, detail: impl std::fmt::Display) {
        if let Some(suppressed) = self.drops.allow() {
            tracing::debug!(
                direction,
                reason = reason.name(),
                suppressed,
                "dropped packet: {detail}"
            );
        }
    }

    fn io(&mut self, what: &str, error: &std::io::Error) {
        if let Some(suppressed) = self.io.allow() {
            tracing::warn!(suppressed, "{what} failed: {error}");
        }
    }
}

/// The TUN data plane. See the module documentation.
pub struct TunDataplane {
    options: TunOptions,
    shared: Arc<Shared>,
    state: Mutex<PeerState>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut_down: AtomicBool,
    /// Sends are batched with `UDP_SEGMENT`.
    udp_gso: bool,
}

impl TunDataplane {
    /// Creates and configures the device, binds the UDP socket and starts forwarding.
    /// Must be called inside a tokio runtime (the forwarding tasks run on it).
    pub async fn start(options: TunOptions) -> anyhow::Result<Self> {
        options.validate()?;
        // Bound first: a busy port should fail the start before any device is touched.
        let socket = UdpSocket::bind(options.bind).await.with_context(|| {
            format!(
                "binding the overlay UDP socket to {} failed; is another flanneld/rudder using the port?",
                options.bind
            )
        })?;
        let socket = forward::OverlaySocket::new(socket, options.offload)
            .context("configuring the overlay UDP socket (GSO/GRO) failed")?;

        let handle = netlink_connect()?;
        if let Some(stale) = link_index(&handle, &options.device_name).await? {
            tracing::warn!(
                device = %options.device_name,
                "removing a stale device of the same name (left by a crashed daemon?)"
            );
            delete_link(&handle, stale, &options.device_name).await?;
        }

        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(&options.device_name)
                .mtu(options.mtu)
                .offload(offload)
                // Up only once configured: IPv6 must be off before the link comes up.
                .enable(false)
                .build_async()
        };
        let (device, offload) = match build(options.offload) {
            Ok(device) => (device, options.offload),
            Err(error) if options.offload => {
                tracing::warn!(
                    "TUN device with offloads failed ({error}); using one packet per read"
                );
                let device = build(false).with_context(|| device_error(&options))?;
                (device, false)
            }
            Err(error) => return Err(anyhow::Error::from(error).context(device_error(&options))),
        };
        let device = Arc::new(device);
        let index = device.if_index().with_context(|| {
            format!(
                "reading the interface index of new TUN device {:?} failed",
                options.device_name
            )
        })?;
        configure_device(&handle, index, &options).await?;

        let icmp_sources = IcmpSources {
            to_peers: options.gateway,
            into_device: options.device_icmp_source,
        };
        let table = ForwardingTable::new(
            options.local_subnet,
            options.network,
            icmp_sources,
            &BTreeMap::new(),
        );
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            table: PublishedTable {
                version: AtomicU64::new(0),
                current: RwLock::new(Arc::new(table.clone())),
            },
            peer_port: options.bind.port(),
            mtu: usize::from(options.mtu),
            offload,
        });
        let socket_gso = socket.gso();
        let socket = Arc::new(socket);
        let tasks = vec![
            tokio::spawn(forward::tun_to_udp(
                device.clone(),
                socket.clone(),
                shared.clone(),
            )),
            tokio::spawn(forward::udp_to_tun(device, socket, shared.clone())),
        ];
        tracing::info!(
            device = %options.device_name,
            subnet = %options.local_subnet,
            network = %options.network,
            mtu = options.mtu,
            bind = %options.bind,
            device_offload = offload,
            udp_gso = socket_gso,
            "TUN data plane started"
        );
        Ok(TunDataplane {
            state: Mutex::new(PeerState {
                local_subnet: options.local_subnet,
                icmp_sources,
                peers: BTreeMap::new(),
                table,
            }),
            options,
            shared,
            tasks: Mutex::new(tasks),
            shut_down: AtomicBool::new(false),
            udp_gso: socket_gso,
        })
    }

    /// How the forwarding loops batch, for the status line.
    pub fn batching(&self) -> String {
        format!(
            "device offloads (TSO/USO) {}, UDP GSO {}, UDP GRO {}",
            on_off(self.shared.offload),
            on_off(self.udp_gso),
            on_off(self.options.offload)
        )
    }

    /// The options the data plane was started with (`local_subnet` as at start).
    pub fn options(&self) -> &TunOptions {
        &self.options
    }

    /// Applies `change` to the peer state and publishes the new snapshot.
    fn update(&self, change: impl FnOnce(&mut PeerState)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut state);
        // A clone is a few memcpys: O(n) per change, no sorting or map walks.
        self.shared.table.publish(state.table.clone());
    }
}

impl Dataplane for TunDataplane {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Tun
    }

    /// Moves the device address to the new subnet's network address and re-targets the
    /// receive checks. ICMP errors to peers then come from the new subnet's first host
    /// address.
    fn set_local_subnet(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        if !self.options.network.contains(&subnet) {
            bail!(
                "new local subnet {subnet} is not inside the overlay network {}; refusing to use it",
                self.options.network
            );
        }
        let old = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .local_subnet;
        if old == subnet {
            return Ok(());
        }
        let name = self.options.device_name.clone();
        run_netlink_blocking(move |handle| async move {
            let index = link_index(&handle, &name)
                .await?
                .with_context(|| format!("TUN device {name:?} disappeared"))?;
            add_device_address(&handle, index, subnet.network()).await?;
            remove_device_address(&handle, index, old.network()).await
        })?;
        self.update(|state| {
            state.local_subnet = subnet;
            state.icmp_sources.to_peers = gateway(subnet);
            if subnet.contains(&state.icmp_sources.into_device) {
                state.icmp_sources.into_device =
                    default_device_icmp_source(self.options.network, subnet);
            }
            // Rare: rebuild, since our own subnet's exclusion from forwarding moves.
            let mut table = ForwardingTable::new(
                subnet,
                self.options.network,
                state.icmp_sources,
                &BTreeMap::new(),
            );
            for (subnet, peer) in &state.peers {
                table.upsert(*subnet, peer.public_ip, None, peer.traffic.clone());
            }
            state.table = table;
        });
        Ok(())
    }

    fn upsert_peer(&self, subnet: Ipv4Net, public_ip: Ipv4Addr) -> anyhow::Result<()> {
        self.update(|state| {
            let subnet = subnet.trunc();
            let previous = state.peers.get(&subnet).map(|peer| peer.public_ip);
            if previous == Some(public_ip) {
                return;
            }
            // A new place is a new peer: its counters start from zero.
            let entry = PeerEntry {
                public_ip,
                changed: std::time::SystemTime::now(),
                traffic: Arc::default(),
            };
            state
                .table
                .upsert(subnet, public_ip, previous, entry.traffic.clone());
            state.peers.insert(subnet, entry);
        });
        Ok(())
    }

    fn remove_peer(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        self.update(|state| {
            let subnet = subnet.trunc();
            if let Some(previous) = state.peers.remove(&subnet) {
                state.table.remove(subnet, previous.public_ip);
            }
        });
        Ok(())
    }

    fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    fn byte_counters(&self) -> CounterSnapshot {
        self.shared.counters.bytes_snapshot()
    }

    fn peer_stats(&self) -> Vec<PeerStats> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .peers
            .iter()
            .map(|(subnet, peer)| PeerStats {
                subnet: *subnet,
                public_ip: peer.public_ip,
                changed: peer.changed,
                traffic: peer.traffic.snapshot(),
            })
            .collect()
    }

    /// Stops both tasks and deletes the device, which takes its address and route with
    /// it. Blocks briefly on a netlink request in a helper thread (the trait is sync).
    fn shutdown(&self) -> anyhow::Result<()> {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        // The aborted tasks drop their device handles asynchronously; deleting the link
        // now makes the removal immediate and certain.
        let name = self.options.device_name.clone();
        run_netlink_blocking(move |handle| async move {
            if let Some(index) = link_index(&handle, &name).await? {
                delete_link(&handle, index, &name).await?;
            }
            Ok(())
        })?;
        tracing::info!(device = %self.options.device_name, "TUN data plane stopped");
        Ok(())
    }
}

impl Drop for TunDataplane {
    fn drop(&mut self) {
        // Without an explicit shutdown, at least stop the tasks: closing the last device
        // descriptor then removes the (non-persistent) device.
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

// --- netlink helpers (candidates for rudder/src/host.rs) ---

/// Opens an rtnetlink connection whose driver runs on the current tokio runtime.
fn netlink_connect() -> anyhow::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .context("opening a netlink socket failed; is this Linux with NETLINK_ROUTE?")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs a netlink job to completion from synchronous code, on a helper thread with its
/// own runtime: safe to call from inside any tokio runtime, even a single-threaded one
/// (which could not drive a connection spawned on itself while we block it).
fn run_netlink_blocking<F, Fut>(job: F) -> anyhow::Result<()>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a runtime for a netlink request failed")?;
        runtime.block_on(async move { job(netlink_connect()?).await })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netlink helper thread panicked"))?
}

/// Interface index of the link called `name`, or `None` when there is none.
async fn link_index(handle: &Handle, name: &str) -> anyhow::Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|link| link.header.index)),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.to_io().raw_os_error() == Some(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("looking up network device {name:?} failed")),
    }
}

async fn delete_link(handle: &Handle, index: u32, name: &str) -> anyhow::Result<()> {
    handle.link().del(index).execute().await.with_context(|| {
        format!("deleting network device {name:?} (index {index}) failed; remove it by hand with `ip link del {name}`")
    })
}

/// Puts the subnet's network address /32 on the device, brings it up and routes the whole
/// overlay network into it (flannel's udp backend layout).
async fn configure_device(handle: &Handle, index: u32, options: &TunOptions) -> anyhow::Result<()> {
    disable_ipv6(&options.device_name)?;
    add_device_address(handle, index, options.local_subnet.network()).await?;
    set_link_up(handle, index, &options.device_name).await?;
    add_network_route(handle, index, options.network).await
}

/// The overlay is IPv4 only. With IPv6 on, the kernel sends router solicitations and
/// MLD reports from the link-local address into the device, which would only show up
/// as `not_ipv4` drops.
fn disable_ipv6(device: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{device}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        // IPv6 is not in this kernel at all: nothing to disable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("writing 1 to {path} failed; is /proc/sys writable?"))
        }
    }
}

async fn set_link_up(handle: &Handle, index: u32, name: &str) -> anyhow::Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("bringing network device {name:?} (index {index}) up failed"))
}

async fn add_device_address(handle: &Handle, index: u32, address: Ipv4Addr) -> anyhow::Result<()> {
    handle
        .address()
        .add(index, IpAddr::V4(address), 32)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding address {address}/32 to interface index {index} failed"))
}

async fn remove_device_address(
    handle: &Handle,
    index: u32,
    address: Ipv4Addr,
) -> anyhow::Result<()> {
    let mut addresses = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(IpAddr::V4(address))
        .execute();
    while let Some(message) = addresses
        .try_next()
        .await
        .with_context(|| format!("listing addresses of interface index {index} failed"))?
    {
        handle
            .address()
            .del(message)
            .execute()
            .await
            .with_context(|| {
                format!("removing address {address} from interface index {index} failed")
            })?;
    }
    Ok(())
}

async fn add_network_route(handle: &Handle, index: u32, network: Ipv4Net) -> anyhow::Result<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    // Replace: a leftover route for the network (an old flannel0) must not block us.
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .with_context(|| {
            format!("adding route {network} via interface index {index} failed; check `ip route show {network}`")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::parse_ipv4;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    const SOURCES: IcmpSources = IcmpSources {
        to_peers: Ipv4Addr::new(10, 5, 1, 1),
        into_device: Ipv4Addr::new(10, 5, 0, 1),
    };

    fn table(peers: &[(&str, &str)]) -> ForwardingTable {
        let peers = peers.iter().map(|(n, p)| (net(n), ip(p))).collect();
        ForwardingTable::new(net("10.5.1.0/24"), net("10.5.0.0/16"), SOURCES, &peers)
    }

    /// IPv4/UDP packet with a correct header checksum (recomputed from scratch).
    fn udp_packet(src: &str, dst: &str, ttl: u8, payload: &[u8]) -> Vec<u8> {
        let total = (28 + payload.len()) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 1, 0, 0, ttl, 17, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&ip(src).octets());
        p.extend_from_slice(&ip(dst).octets());
        p.extend_from_slice(&[0x30, 0x39, 0x1f, 0x90, 0, (8 + payload.len()) as u8, 0, 0]);
        p.extend_from_slice(payload);
        let c = packet::internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("10.5.0.0/16", "192.168.0.1"),
            ("10.5.2.0/24", "192.168.0.2"),
            ("10.5.2.128/25", "192.168.0.3"),
        ]);
        assert_eq!(t.lookup(ip("10.5.2.7")), Some(ip("192.168.0.2")));
        assert_eq!(t.lookup(ip("10.5.2.200")), Some(ip("192.168.0.3")));
        assert_eq!(t.lookup(ip("10.5.9.1")), Some(ip("192.168.0.1")));
        assert_eq!(t.lookup(ip("10.6.0.1")), None);
    }

    #[test]
    fn own_subnet_is_never_a_forwarding_target() {
        let t = table(&[("10.5.1.0/24", "192.168.0.9")]);
        assert_eq!(t.lookup(ip("10.5.1.7")), None);
        // ... but the sender check still knows whose it is.
        assert_eq!(t.subnets_of(ip("192.168.0.9")), &[net("10.5.1.0/24")]);
    }

    #[test]
    fn ten_thousand_peers_look_up_exactly() {
        let peers: BTreeMap<Ipv4Net, Ipv4Addr> = (0..10_000u32)
            .map(|i| {
                let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
                (subnet, Ipv4Addr::from(0xc0a8_0000 + i))
            })
            .collect();
        let t = ForwardingTable::new(net("10.200.0.0/24"), net("10.0.0.0/8"), SOURCES, &peers);
        for i in (0..10_000u32).step_by(97) {
            let dst = Ipv4Addr::from(0x0a00_0000 + (i << 8) + 42);
            assert_eq!(t.lookup(dst), Some(Ipv4Addr::from(0xc0a8_0000 + i)));
            assert_eq!(t.subnets_of(Ipv4Addr::from(0xc0a8_0000 + i)).len(), 1);
        }
        assert!(t.subnets_of(ip("1.2.3.4")).is_empty());
    }

    /// The incremental updates must leave exactly the table a rebuild would make.
    #[test]
    fn incremental_updates_match_a_rebuild() {
        let mut peers = BTreeMap::new();
        let mut t = table(&[]);
        let steps: [(&str, Option<&str>); 8] = [
            ("10.5.2.0/24", Some("192.168.0.2")),
            ("10.5.3.0/24", Some("192.168.0.3")),
            ("10.5.4.0/25", Some("192.168.0.2")),
            ("10.5.1.0/24", Some("192.168.0.1")), // our own lease
            ("10.5.2.0/24", Some("192.168.0.9")), // moved to another host
            ("10.5.4.0/25", None),                // last of its prefix length
            ("10.5.9.0/24", None),                // absent: no-op
            ("10.5.3.0/24", Some("192.168.0.3")), // unchanged
        ];
        for (subnet, public_ip) in steps {
            let subnet = net(subnet);
            match public_ip {
                Some(public_ip) => {
                    let previous = peers.insert(subnet, ip(public_ip));
                    t.upsert(subnet, ip(public_ip), previous, Arc::default());
                }
                None => {
                    if let Some(previous) = peers.remove(&subnet) {
                        t.remove(subnet, previous);
                    }
                }
            }
            let rebuilt =
                ForwardingTable::new(net("10.5.1.0/24"), net("10.5.0.0/16"), SOURCES, &peers);
            assert_eq!(format!("{t:?}"), format!("{rebuilt:?}"), "after {subnet}");
        }
        assert_eq!(t.lookup(ip("10.5.2.1")), Some(ip("192.168.0.9")));
        assert_eq!(t.lookup(ip("10.5.4.1")), None);
        assert!(t.subnets_of(ip("192.168.0.2")).is_empty());
    }

    #[test]
    fn ten_thousand_upserts_stay_cheap() {
        let mut t = table(&[]);
        let start = Instant::now();
        for i in 0..10_000u32 {
            let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            t.upsert(
                subnet,
                Ipv4Addr::from(0xc0a8_0000 + (i * 7919) % 10_000),
                None,
                Arc::default(),
            );
            // What publishing costs per change.
            std::hint::black_box(Arc::new(t.clone()));
        }
        // Generous for an unoptimised build on a loaded 2-core machine; a rebuild per
        // change took 12 s here.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn sender_with_two_leases_owns_both() {
        let t = table(&[
            ("10.5.2.0/24", "192.168.0.2"),
            ("10.5.3.0/24", "192.168.0.2"),
            ("10.5.4.0/24", "192.168.0.4"),
        ]);
        assert_eq!(
            t.subnets_of(ip("192.168.0.2")),
            &[net("10.5.2.0/24"), net("10.5.3.0/24")]
        );
    }

    #[test]
    fn outbound_to_a_peer_is_encapsulated_with_ttl_decremented() {
        let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
        let mut p = udp_packet("10.5.1.7", "10.5.2.9", 64, b"hi");
        let len = p.len();
        p.extend_from_slice(&[0; 5]); // trailing bytes are trimmed
        let mut icmp = [0; ICMP_ERROR_MAX_LEN];
        assert_eq!(
            decide_outbound(&mut p, &t, 1472, &mut icmp),
            Outbound::Encapsulate {
                len,
                peer: ip("192.168.0.2"),
                slot: t.slot_of(ip("10.5.2.9")).unwrap(),
            }
        );
        let v = parse_ipv4(&p[..len]).unwrap();
        assert_eq!(v.ttl, 63);
    }

    #[test]
    fn outbound_without_lease_is_net_unreachable() {
        let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
        let mut p = udp_packet("10.5.1.7", "10.5.77.1", 64, b"hi");
        let mut icmp = [0; ICMP_ERROR_MAX_LEN];
        let Outbound::Drop {
            reason: Counter::DropNoRoute,
            icmp_len: Some(n),
        } = decide_outbound(&mut p, &t, 1472, &mut icmp)
        else {
            panic!("expected a no-route drop with an ICMP error");
        };
        let v = parse_ipv4(&icmp[..n]).unwrap();
        assert_eq!((v.src, v.dst), (ip("10.5.0.1"), ip("10.5.1.7")));
        assert_eq!((icmp[20], icmp[21]), (3, 0));
        // Outside the overlay: dropped silently.
        let mut p = udp_packet("10.5.1.7", "8.8.8.8", 64, b"hi");
        assert_eq!(
            decide_outbound(&mut p, &t, 1472, &mut icmp),
            Outbound::Drop {
                reason: Counter::DropNoRoute,
                icmp_len: None
            }
        );
    }

    #[test]
    fn outbound_ttl_one_is_time_exceeded() {
        let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
        let mut p = udp_packet("10.5.1.7", "10.5.2.9", 1, b"hi");
        let mut icmp = [0; ICMP_ERROR_MAX_LEN];
        let Outbound::Drop {
            reason: Counter::DropTtlExceeded,
            icmp_len: Some(n),
        } = decide_outbound(&mut p, &t, 1472, &mut icmp)
        else {
            panic!("expected a TTL drop with an ICMP error");
        };
        assert_eq!((icmp[20], icmp[21]), (11, 0));
        assert_eq!(&icmp[28..n], &p[..28]);
    }

    #[test]
    fn outbound_garbage_and_oversize_are_dropped() {
        let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
        let mut icmp = [0; ICMP_ERROR_MAX_LEN];
        assert_eq!(
            decide_outbound(&mut [0x60; 40], &t, 1472, &mut icmp),
            Outbound::Drop {
                reason: Counter::DropNotIpv4,
                icmp_len: None
            }
        );
        let mut big = udp_packet("10.5.1.7", "10.5.2.9", 64, &[0; 1500]);
        assert_eq!(
            decide_outbound(&mut big, &t, 1472, &mut icmp),
            Outbound::Drop {
                reason: Counter::DropTooBig,
                icmp_len: None
            }
        );
    }

    #[test]
    fn inbound_rules() {
        let t = table(&[("10.5.2.0/24", "192.168.0.2")]);
        let peer = ip("192.168.0.2");
        let mut icmp = [0; ICMP_ERROR_MAX_LEN];
        let mut p = udp_packet("10.5.2.9", "10.5.1.7", 64, b"hi");
        let len = p.len();
        assert_eq!(
            decide_inbound(&mut p, peer, &t, &mut icmp),
            Inbound::Deliver {
                len,
                from: t.slot_of(ip("10.5.2.9")),
            }
        );
        assert_eq!(p[8], 63);

        let cases = [
            (
                udp_packet("10.5.2.9", "10.5.1.7", 64, b"hi"),
                ip("192.168.0.99"),
                Counter::DropUnknownSender,
            ),
            (
                udp_packet("10.5.3.9", "10.5.1.7", 64, b"hi"),
                peer,
                Counter::DropSpoofedSource,
            ),
            (
                udp_packet("10.5.2.9", "10.5.4.7", 64, b"hi"),
                peer,
                Counter::DropNotOurSubnet,
            ),
            (b"garbage".to_vec(), peer, Counter::DropNotIpv4),
        ];
        for (mut packet, sender, expected) in cases {
            assert_eq!(
                decide_inbound(&mut packet, sender, &t, &mut icmp),
                Inbound::Drop {
                    reason: expected,
                    icmp_len: None
                },
                "{}",
                expected.name()
            );
        }

        let mut p = udp_packet("10.5.2.9", "10.5.1.7", 1, b"hi");
        let Inbound::Drop {
            reason: Counter::DropTtlExceeded,
            icmp_len: Some(n),
        } = decide_inbound(&mut p, peer, &t, &mut icmp)
        else {
            panic!("expected a TTL drop with an ICMP error");
        };
        let v = parse_ipv4(&icmp[..n]).unwrap();
        assert_eq!((v.src, v.dst), (ip("10.5.1.1"), ip("10.5.2.9")));
    }

    #[test]
    fn published_table_reaches_readers() {
        let published = PublishedTable {
            version: AtomicU64::new(0),
            current: RwLock::new(Arc::new(table(&[]))),
        };
        let mut reader = published.reader();
        assert_eq!(reader.current(&published).lookup(ip("10.5.2.1")), None);
        published.publish(table(&[("10.5.2.0/24", "192.168.0.2")]));
        assert_eq!(
            reader.current(&published).lookup(ip("10.5.2.1")),
            Some(ip("192.168.0.2"))
        );
    }

    #[test]
    fn options_defaults_follow_flannel() {
        let o = TunOptions::new(net("10.5.34.0/24"), net("10.5.0.0/16"), 1500);
        assert_eq!(o.device_name, "rudder0");
        assert_eq!(o.mtu, 1472);
        assert_eq!(o.bind, "0.0.0.0:8285".parse().unwrap());
        assert_eq!(o.gateway, ip("10.5.34.1"));
        assert_eq!(o.device_icmp_source, ip("10.5.0.1"));
        assert_eq!(
            default_device_icmp_source(net("10.5.0.0/16"), net("10.5.0.0/24")),
            ip("10.5.255.254")
        );
        o.validate().unwrap();
        let mut bad = o.clone();
        bad.local_subnet = net("10.6.0.0/24");
        assert!(bad.validate().is_err());
        let mut bad = o.clone();
        bad.device_icmp_source = ip("10.5.34.1");
        assert!(
            bad.validate().is_err(),
            "a local ICMP source would be martian"
        );
        let mut bad = o;
        bad.device_name = "a-name-that-is-too-long".into();
        assert!(bad.validate().is_err());
    }
}

#[cfg(test)]
mod device_tests;
