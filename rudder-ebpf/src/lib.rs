//! Types shared by rudder's BPF programs and the userspace daemon.
//!
//! This is the one place where the wire constants, the BPF map layouts and the counter
//! indices are defined: the kernel programs (`src/main.rs`, built for the BPF target) and
//! the daemon (which also uses the counters for its TUN data plane) both import them.
#![no_std]

/// Names of the BPF programs and maps in the object built from `src/main.rs`; userspace
/// looks them up by these names.
pub mod names {
    pub const PROG_EGRESS: &str = "rudder_egress";
    pub const PROG_INGRESS: &str = "rudder_ingress";
    pub const PROG_BRIDGE: &str = "rudder_br_in";
    pub const MAP_CONFIG: &str = "RUDDER_CONFIG";
    pub const MAP_PEERS: &str = "RUDDER_PEERS";
    pub const MAP_SENDERS: &str = "RUDDER_SENDERS";
    pub const MAP_ENDPOINTS: &str = "RUDDER_ENDPTS";
    pub const MAP_ENDPOINTS6: &str = "RUDDER_ENDPTS6";
    pub const MAP_COUNTERS: &str = "RUDDER_COUNTERS";
    pub const MAP_BYTES: &str = "RUDDER_BYTES";
    pub const MAP_PEER_TRAFFIC: &str = "RUDDER_PEER_TRAF";
    pub const MAP_STACK_FLOWS: &str = "RUDDER_STK_FLOWS";
    pub const MAP_STACK_FLOWS6: &str = "RUDDER_STK_FLOWS6";
    pub const MAP_TRAIN_SENDERS: &str = "RUDDER_TRAIN_SRC";
    pub const MAP_CONFIG6: &str = "RUDDER_CONFIG6";
    pub const MAP_PEERS6: &str = "RUDDER_PEERS6";
    pub const MAP_SENDERS6: &str = "RUDDER_SENDERS6";
    pub const MAP_PEERS46: &str = "RUDDER_PEERS46";
}

/// Capacity of the peer maps: a /8 network cut into /24 subnets has 65536 of them.
pub const MAX_PEERS: u32 = 65536;

/// Capacity of the local endpoint map (containers on this host).
pub const MAX_LOCAL_ENDPOINTS: u32 = 4096;

/// Capacity of the LRU map of flows the host's stack forwarded to peers (possibly NAT'd).
pub const MAX_STACK_FLOWS: u32 = 65536;

/// Packet mark bit (`skb->mark`) that rudder's nftables rule sets on packets of NAT'd
/// connections after DNAT: `rudder_br_in` leaves such packets to the stack.
pub const STACK_MARK: u32 = 0x0100_0000;

/// flannel's udp backend port: rudder speaks the same wire format on it.
pub const DEFAULT_UDP_PORT: u16 = 8285;

/// Outer IPv4 header (20) + UDP header (8) added around every inner packet.
pub const ENCAP_OVERHEAD: u16 = 28;

/// TTL written into the outer IPv4 header.
pub const OUTER_TTL: u8 = 64;

/// Outer IPv6 header (40) + UDP header (8).
pub const ENCAP_OVERHEAD6: u16 = 48;

/// What happened to a packet, as counted by both data planes.
///
/// The discriminants index the per-CPU counter arrays in the BPF programs (packets and
/// bytes) and the counter tables of the TUN path, so the two report the same names.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// Inner packet wrapped in UDP and sent to a peer.
    Encapsulated = 0,
    /// Overlay datagram unwrapped and delivered to the local subnet.
    Decapsulated = 1,
    /// Not overlay traffic: handed to the normal stack untouched (eBPF path only).
    Passed = 2,
    /// Payload is not an IPv4 packet.
    DropNotIpv4 = 3,
    /// Shorter than an IPv4 header, or than its own header/total length says.
    DropTruncated = 4,
    /// IHL below 5, total length below the header, or a bad header checksum.
    DropMalformed = 5,
    /// Inner destination is not inside our subnet.
    DropNotOurSubnet = 6,
    /// Inner source is not inside the sending peer's subnet (spoofed).
    DropSpoofedSource = 7,
    /// Datagram from an underlay address that holds no lease.
    DropUnknownSender = 8,
    /// TTL expired where the rules make the router hop (the eBPF socket path); where the
    /// kernel's forwarding makes it, the kernel drops and answers it (`IcmpOutTimeExcds`).
    DropTtlExceeded = 9,
    /// No peer subnet holds the inner destination.
    DropNoRoute = 10,
    /// Inner packet larger than the overlay MTU allows.
    DropTooBig = 11,
    /// A send or receive on the device or socket failed.
    DropIoError = 12,
    /// Overlay datagrams the BPF programs hand to the daemon's UDP socket instead: UDP GSO
    /// trains (several datagrams in one buffer) that arrive unsegmented over virtual links.
    ToDaemon = 13,
    /// A plain (unencapsulated) packet from the underlay whose source and destination lie in
    /// the overlay network: only a tunnel may carry such packets.
    DropUnencapsulated = 14,
    /// Outer header marked congestion experienced (CE) around an inner packet that is not
    /// ECN-capable: RFC 6040 has the decapsulator drop it (the sender cannot be told).
    DropCeNotEct = 15,
    /// An ICMP error the userspace rules would have sent, suppressed by the rate limit
    /// (the offending packet is counted under its own reason as well).
    IcmpRateLimited = 16,
}

impl Counter {
    /// Number of counters; the length of the counter arrays.
    pub const COUNT: usize = 17;

    /// Every counter in index order.
    pub const ALL: [Counter; Counter::COUNT] = [
        Counter::Encapsulated,
        Counter::Decapsulated,
        Counter::Passed,
        Counter::DropNotIpv4,
        Counter::DropTruncated,
        Counter::DropMalformed,
        Counter::DropNotOurSubnet,
        Counter::DropSpoofedSource,
        Counter::DropUnknownSender,
        Counter::DropTtlExceeded,
        Counter::DropNoRoute,
        Counter::DropTooBig,
        Counter::DropIoError,
        Counter::ToDaemon,
        Counter::DropUnencapsulated,
        Counter::DropCeNotEct,
        Counter::IcmpRateLimited,
    ];

    pub const fn index(self) -> usize {
        self as usize
    }

    /// Stable name used in logs, status output and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Encapsulated => "encapsulated",
            Counter::Decapsulated => "decapsulated",
            Counter::Passed => "passed",
            Counter::DropNotIpv4 => "not_ipv4",
            Counter::DropTruncated => "truncated",
            Counter::DropMalformed => "malformed",
            Counter::DropNotOurSubnet => "not_our_subnet",
            Counter::DropSpoofedSource => "spoofed_source",
            Counter::DropUnknownSender => "unknown_sender",
            Counter::DropTtlExceeded => "ttl_exceeded",
            Counter::DropNoRoute => "no_route",
            Counter::DropTooBig => "too_big",
            Counter::DropIoError => "io_error",
            Counter::ToDaemon => "to_daemon",
            Counter::DropUnencapsulated => "unencapsulated",
            Counter::DropCeNotEct => "ce_not_ect",
            Counter::IcmpRateLimited => "icmp_rate_limited",
        }
    }

    /// True for the counters that record a dropped packet.
    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Counter::Encapsulated
                | Counter::Decapsulated
                | Counter::Passed
                | Counter::ToDaemon
                | Counter::IcmpRateLimited
        )
    }
}

/// Key of the peer LPM trie: a prefix length and an IPv4 address in network byte order.
/// Layout matches the kernel's `struct bpf_lpm_trie_key` followed by 4 address bytes, and
/// aya's `lpm_trie::Key<[u8; 4]>` on both sides (the maps are declared with that type).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

impl PeerKey {
    /// Key for `addr`/`prefix_len`; a lookup uses prefix length 32.
    pub const fn new(addr: [u8; 4], prefix_len: u32) -> Self {
        PeerKey { prefix_len, addr }
    }
}

/// Value of the peer LPM trie: where the subnet's host is on the underlay.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerValue {
    /// The peer's public (underlay) IPv4 address, network byte order.
    pub public_ip: [u8; 4],
    /// Key of this entry's traffic counters in the per-CPU traffic map: a new id per
    /// installation, so a peer that moves starts from zero.
    pub traffic_id: u32,
}

impl PeerValue {
    pub const fn new(public_ip: [u8; 4], traffic_id: u32) -> Self {
        PeerValue {
            public_ip,
            traffic_id,
        }
    }
}

/// Packets and bytes (inner packets as the kernel handles them: a GSO packet counts
/// once) encapsulated towards one peer subnet and decapsulated from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTraffic {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl PeerTraffic {
    pub const ZERO: PeerTraffic = PeerTraffic {
        tx_packets: 0,
        tx_bytes: 0,
        rx_packets: 0,
        rx_bytes: 0,
    };
}

/// Value of the local endpoint maps, keyed by a container's IPv4 address (network byte
/// order) or IPv6 address: where the ingress program hands a decapsulated packet with `bpf_redirect_peer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Host-side veth of the container (its peer is the container's interface).
    pub host_ifindex: u32,
    /// The container interface's MAC: the Ethernet destination written before the redirect.
    pub container_mac: [u8; 6],
    /// The container's gateway MAC (the bridge): the Ethernet source.
    pub gateway_mac: [u8; 6],
}

/// Key of the stack-flow map: one direction of a flow (ports 0 for protocols without them).
/// `rudder_egress` stores the reversed tuple of what the host's stack forwarded to a peer, so
/// `rudder_ingress` recognises the replies and hands them to the stack (conntrack un-NATs them).
/// `N` is the address length: 4 (`RUDDER_STK_FLOWS`) or 16 ([`FlowKey6`], `RUDDER_STK_FLOWS6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey<const N: usize = 4> {
    pub src: [u8; N],
    pub dst: [u8; N],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// An IPv6 flow of the stack-flow map (upper layer right after the fixed header).
pub type FlowKey6 = FlowKey<16>;

impl<const N: usize> FlowKey<N> {
    pub const fn new(
        src: [u8; N],
        dst: [u8; N],
        src_port: u16,
        dst_port: u16,
        protocol: u8,
    ) -> Self {
        FlowKey {
            src,
            dst,
            src_port,
            dst_port,
            protocol,
            pad: [0; 3],
        }
    }

    /// The other direction of the same flow.
    pub const fn reversed(self) -> Self {
        FlowKey::new(
            self.dst,
            self.src,
            self.dst_port,
            self.src_port,
            self.protocol,
        )
    }
}

/// Per-host settings the daemon writes into a single-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Our own subnet: only inner destinations inside it are decapsulated.
    pub local_subnet: [u8; 4],
    pub local_prefix_len: u32,
    /// The overlay network as a whole.
    pub network: [u8; 4],
    pub network_prefix_len: u32,
    /// The underlay address this host owns: outer source of what it encapsulates, outer
    /// destination of what it accepts (behind a 1:1 NAT not the lease's PublicIP).
    pub local_ip: [u8; 4],
    /// UDP port of the overlay, host byte order.
    pub udp_port: u16,
    /// Overlay MTU: inner packets larger than this are not encapsulated.
    pub overlay_mtu: u16,
    /// Underlay device: where the bridge fast path redirects encapsulated packets.
    pub underlay_ifindex: u32,
}

/// An underlay address of either family as 16 bytes: an IPv4 address IPv4-mapped
/// (`::ffff:a.b.c.d`, what `Ipv4Addr::to_ipv6_mapped` gives), an IPv6 address as is.
pub type UnderlayAddr = [u8; 16];

/// `addr` as an [`UnderlayAddr`].
pub const fn ipv4_mapped(addr: [u8; 4]) -> UnderlayAddr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

/// The IPv4 address inside an IPv4-mapped [`UnderlayAddr`], if it is one.
pub const fn mapped_ipv4(addr: &UnderlayAddr) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return None;
        }
        i += 1;
    }
    if addr[10] != 0xff || addr[11] != 0xff {
        return None;
    }
    Some([addr[12], addr[13], addr[14], addr[15]])
}

/// Value of the IPv6 peer LPM trie (keyed by `lpm_trie::Key<[u8; 16]>`): the host that
/// leases the IPv6 subnet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerValue6 {
    /// The peer's underlay address: IPv4-mapped when the outer header is IPv4.
    pub underlay: UnderlayAddr,
    /// Key of this entry's traffic counters, from the same id space as [`PeerValue`]'s.
    pub traffic_id: u32,
}

/// Value of the sender map keyed by [`UnderlayAddr`]: how many IPv6 subnets the host at
/// that underlay address leases, and how many IPv4 subnets it is reached for over IPv6
/// (tells a spoofed inner source from an unknown sender).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Senders6 {
    pub ipv6_subnets: u32,
    pub ipv4_subnets: u32,
}

/// This host's place in the IPv6 overlay, a single-entry array map beside
/// [`DataplaneConfig`]; `enabled == 0` (the default) means the network has no IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig6 {
    /// Our PublicIPv6: the outer source towards peers reached over IPv6 and the outer
    /// destination accepted from them; all zero without one.
    pub local_ip: [u8; 16],
    pub local_subnet: [u8; 16],
    /// [`ipv6_mask`] of the local subnet's prefix length.
    pub local_mask: [u8; 16],
    pub network: [u8; 16],
    pub network_mask: [u8; 16],
    pub enabled: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are `repr(C)`, made only of integers and byte arrays, without padding.
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PeerValue {}
    unsafe impl aya::Pod for super::PeerTraffic {}
    unsafe impl aya::Pod for super::LocalEndpoint {}
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::PeerValue6 {}
    unsafe impl aya::Pod for super::Senders6 {}
    unsafe impl aya::Pod for super::DataplaneConfig6 {}
}

// The kernel reads these with fixed layouts; a changed size is a wire break.
const _: () = assert!(core::mem::size_of::<PeerKey>() == 8);
const _: () = assert!(core::mem::size_of::<PeerValue>() == 8);
const _: () = assert!(core::mem::size_of::<PeerTraffic>() == 32);
const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 16);
const _: () = assert!(core::mem::size_of::<DataplaneConfig>() == 28);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<PeerValue6>() == 20);
const _: () = assert!(core::mem::size_of::<DataplaneConfig6>() == 84);

/// True when `addr` lies inside `net`/`prefix_len` (all in network byte order).
pub const fn ipv4_in_subnet(addr: [u8; 4], net: [u8; 4], prefix_len: u32) -> bool {
    if prefix_len == 0 {
        return true;
    }
    if prefix_len > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - prefix_len);
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(net) & mask)
}

/// The netmask of an IPv6 prefix length (clamped to 128), 16 bytes.
pub const fn ipv6_mask(prefix_len: u32) -> [u8; 16] {
    let mut mask = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let bits = prefix_len as i32 - i as i32 * 8;
        mask[i] = if bits >= 8 {
            0xff
        } else if bits <= 0 {
            0
        } else {
            0xff << (8 - bits)
        };
        i += 1;
    }
    mask
}

/// True when `addr` lies inside the subnet `net` with netmask `mask` (see [`ipv6_mask`]).
/// Branch-free over two 64-bit words: precomputed masks keep the BPF verifier's path count
/// flat, and the words stay in registers (a byte loop took a 328-byte BPF stack frame).
#[inline(always)]
pub const fn ipv6_in_subnet(addr: &[u8; 16], net: &[u8; 16], mask: &[u8; 16]) -> bool {
    let high = (half(addr, 0) ^ half(net, 0)) & half(mask, 0);
    let low = (half(addr, 8) ^ half(net, 8)) & half(mask, 8);
    high | low == 0
}

#[inline(always)]
const fn half(b: &[u8; 16], at: usize) -> u64 {
    u64::from_ne_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_dense_and_ordered() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{} out of place", c.name());
        }
    }

    #[test]
    fn subnet_membership() {
        assert!(ipv4_in_subnet([10, 5, 34, 7], [10, 5, 34, 0], 24));
        assert!(!ipv4_in_subnet([10, 5, 35, 7], [10, 5, 34, 0], 24));
        assert!(ipv4_in_subnet([1, 2, 3, 4], [0, 0, 0, 0], 0));
        assert!(!ipv4_in_subnet([10, 5, 34, 7], [10, 5, 34, 0], 33));
    }

    #[test]
    fn ipv6_subnet_membership() {
        let inside_of =
            |addr: &[u8; 16], net: &[u8; 16], len| ipv6_in_subnet(addr, net, &ipv6_mask(len));
        let net = [0xfd, 0, 0, 5, 0, 0x22, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut inside = net;
        inside[15] = 7;
        assert!(inside_of(&inside, &net, 64));
        assert!(inside_of(&inside, &net, 120));
        assert!(!inside_of(&inside, &net, 128));
        let mut outside = net;
        outside[5] = 0x23;
        assert!(!inside_of(&outside, &net, 64));
        assert!(inside_of(&outside, &net, 47));
        assert!(!inside_of(&outside, &net, 48));
        assert!(inside_of(&outside, &[0; 16], 0));
        assert_eq!(ipv6_mask(200), [0xff; 16]);
        assert_eq!(ipv6_mask(12)[..3], [0xff, 0xf0, 0]);
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let mapped = ipv4_mapped([192, 168, 1, 2]);
        assert_eq!(
            mapped,
            core::net::Ipv4Addr::new(192, 168, 1, 2)
                .to_ipv6_mapped()
                .octets()
        );
        assert_eq!(mapped_ipv4(&mapped), Some([192, 168, 1, 2]));
        let mut v6 = mapped;
        v6[0] = 0xfd;
        assert_eq!(mapped_ipv4(&v6), None);
    }
}
