//! The BPF side: maps and the three classifiers. Only compiled for `target_arch = "bpf"`.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_redir_neigh, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::generated::{bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use rudder_ebpf::{
    ipv4_in_subnet, ipv4_mapped, Counter, DataplaneConfig, LocalEndpoint, PeerTraffic, PeerValue,
    ENCAP_OVERHEAD, MAX_LOCAL_ENDPOINTS, MAX_PEERS, STACK_MARK,
};

use crate::ipv4_headers::{decrement_ttl, encapsulate, header_checksum_ok, set_tos};
use crate::ipv6::ETH_P_IPV6;
use crate::stack_flows::{remember_stack_flow, reply_to_stack_flow};
use crate::train_senders::to_socket_path;

const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const IPV4_HLEN: usize = 20;
pub(crate) const UDP_HLEN: usize = 8;
pub(crate) const IPPROTO_UDP: u8 = 17;
pub(crate) const IPPROTO_TCP: u8 = 6;
const TCP_HLEN: usize = 20;
pub(crate) const IP_DF: u16 = 0x4000;
/// MF flag and fragment offset: any of them set means "a fragment".
pub(crate) const IP_FRAG_MASK: u16 = 0x3fff;
/// The ECN field of the TOS byte and two of its values (RFC 3168).
pub(crate) const ECN_MASK: u8 = 0x03;
pub(crate) const ECN_CE: u8 = 0x03;
pub(crate) const ECN_NOT_ECT: u8 = 0x00;

/// Where the outer (or, on egress before encapsulation, the only) IPv4 header starts.
pub(crate) const L3_OFF: usize = ETH_HLEN;
pub(crate) const UDP_OFF: usize = L3_OFF + IPV4_HLEN;
/// Where the inner IPv4 header starts in an overlay datagram.
pub(crate) const INNER_OFF: usize = UDP_OFF + UDP_HLEN;

/// UDP source ports are spread over 49152..=65535 by flow hash so that ECMP and RSS on
/// the underlay see per-flow entropy, like vxlan does.
pub(crate) const SRC_PORT_BASE: u16 = 49152;
pub(crate) const SRC_PORT_MASK: u32 = 0x3fff;

/// TCX: "next program decides" (pass when last); used for traffic that is not ours.
pub(crate) const TCX_NEXT: i32 = TC_ACT_UNSPEC;

#[map(name = "RUDDER_CONFIG")]
static CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

/// Peer subnet → the peer's public IP.
#[map(name = "RUDDER_PEERS")]
static PEERS: LpmTrie<[u8; 4], PeerValue> = LpmTrie::with_max_entries(MAX_PEERS, 0);

/// Public IP of every peer → number of subnets it holds; tells a spoofed source (known
/// sender, foreign subnet) from an unknown sender.
#[map(name = "RUDDER_SENDERS")]
static SENDERS: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_PEERS, 0);

/// Local container IP → where to `bpf_redirect_peer` it. Fed by the daemon.
#[map(name = "RUDDER_ENDPTS")]
static ENDPOINTS: HashMap<[u8; 4], LocalEndpoint> =
    HashMap::with_max_entries(MAX_LOCAL_ENDPOINTS, 0);

/// Packets by [`Counter`].
#[map(name = "RUDDER_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT as u32, 0);

/// Bytes by [`Counter`]: IPv4 bytes as they arrived, inner bytes for (de)encapsulation.
#[map(name = "RUDDER_BYTES")]
static BYTES: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT as u32, 0);

#[inline(always)]
pub(crate) fn count(counter: Counter, bytes: u32) {
    // SAFETY: per-CPU slots, programs do not migrate CPUs mid-run.
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *slot += 1 };
    }
    if let Some(slot) = BYTES.get_ptr_mut(counter as u32) {
        unsafe { *slot += u64::from(bytes) };
    }
}

/// IPv4 bytes of the packet as it is now (the Ethernet header excluded).
#[inline(always)]
pub(crate) fn l3_len(ctx: &TcContext) -> u32 {
    ctx.len().saturating_sub(ETH_HLEN as u32)
}

/// Traffic per peer entry, keyed by [`PeerValue::traffic_id`]. Per CPU, so no atomics
/// (an atomic add on a value shared by all CPUs made the path 20x slower, measured);
/// allocated on first use, removed by the daemon with the peer.
#[map(name = "RUDDER_PEER_TRAF")]
static PEER_TRAFFIC: PerCpuHashMap<u32, PeerTraffic> =
    PerCpuHashMap::with_max_entries(MAX_PEERS, BPF_F_NO_PREALLOC);

#[inline(always)]
pub(crate) fn add_traffic(peer: &PeerValue, rx: bool, bytes: u32) {
    let id = peer.traffic_id;
    let slot = match PEER_TRAFFIC.get_ptr_mut(id) {
        Some(slot) => slot,
        None => {
            // Another CPU may win the race: either way the entry exists afterwards.
            let _ = PEER_TRAFFIC.insert(id, PeerTraffic::ZERO, u64::from(BPF_NOEXIST));
            match PEER_TRAFFIC.get_ptr_mut(id) {
                Some(slot) => slot,
                None => return,
            }
        }
    };
    // SAFETY: this CPU's slot; programs do not migrate CPUs mid-run.
    unsafe {
        if rx {
            (*slot).rx_packets += 1;
            (*slot).rx_bytes += u64::from(bytes);
        } else {
            (*slot).tx_packets += 1;
            (*slot).tx_bytes += u64::from(bytes);
        }
    }
}

/// Logs a helper failure through aya-log on its 1st, 2nd, 4th, 8th… occurrence per CPU (the
/// caller counts it): a broken path shows up in the daemon's log without a line per packet.
// Out of line: the log formatting is large and must not be copied into every hot path.
#[inline(never)]
pub(crate) fn io_error(ctx: &TcContext, what: &str, err: i64) -> Counter {
    let seen = COUNTERS
        .get(Counter::DropIoError as u32)
        .copied()
        .unwrap_or(0);
    let n = seen + 1;
    if n.is_power_of_two() {
        warn!(ctx, "{} failed: {} (failure {} on this CPU)", what, err, n);
    }
    Counter::DropIoError
}

#[inline(always)]
pub(crate) fn drop_with(ctx: &TcContext, counter: Counter) -> i32 {
    count(counter, l3_len(ctx));
    TC_ACT_SHOT as i32
}

#[inline(always)]
pub(crate) fn pass(ctx: &TcContext) -> i32 {
    count(Counter::Passed, l3_len(ctx));
    TCX_NEXT
}

#[inline(always)]
fn config() -> Option<DataplaneConfig> {
    CONFIG.get(0).copied()
}

#[inline(always)]
fn in_overlay_range(dst: [u8; 4], cfg: &DataplaneConfig) -> bool {
    // Length 0: an IPv6-only network, no IPv4 overlay at all (not "everything").
    cfg.network_prefix_len != 0 && ipv4_in_subnet(dst, cfg.network, cfg.network_prefix_len)
}

#[inline(always)]
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline(always)]
pub(crate) fn addr(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

#[classifier]
pub fn rudder_egress(ctx: TcContext) -> i32 {
    egress(&ctx)
}

fn egress(ctx: &TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TCX_NEXT;
    };
    if ctx.skb.protocol() == u32::from(ETH_P_IPV6.to_be()) {
        let verdict = crate::ipv6::egress6(ctx, &cfg);
        // Encapsulated: the stack forwarded it (maybe NAT'd), so its replies must come back
        // through the stack. Here, not in `egress6`: its stack frame has no room left.
        if verdict == aya_ebpf::bindings::TC_ACT_REDIRECT as i32 {
            crate::stack_flows::remember_stack_flow6(ctx);
        }
        return verdict;
    }
    if ctx.skb.protocol() != u32::from(ETH_P_IP.to_be()) {
        return pass(ctx);
    }
    let Ok(inner) = ctx.load::<[u8; IPV4_HLEN]>(L3_OFF) else {
        return pass(ctx);
    };
    if inner[0] >> 4 != 4 {
        return pass(ctx);
    }
    let dst = addr(&inner, 16);
    if inner[9] == IPPROTO_UDP
        && addr(&inner, 12) == cfg.local_ip
        && !in_overlay_range(dst, &cfg)
        && ctx.load::<[u8; 4]>(UDP_OFF).map(|udp| be16(&udp, 2)) == Ok(cfg.udp_port)
    {
        // Already encapsulated by `rudder_br_in`: counted there.
        return TCX_NEXT;
    }
    let Some(peer) = PEERS.get(Key::new(32, dst)) else {
        if let Some(verdict) = crate::ipv6_outer::egress_ipv4_over_ipv6(ctx, &cfg, &inner) {
            return verdict;
        }
        // Overlay traffic without a peer must not leak unencapsulated onto the underlay.
        if in_overlay_range(dst, &cfg)
            && !ipv4_in_subnet(dst, cfg.local_subnet, cfg.local_prefix_len)
        {
            return drop_with(ctx, Counter::DropNoRoute);
        }
        return pass(ctx);
    };

    let inner_len = be16(&inner, 2);
    // The peer routes carry the overlay MTU, so the kernel already answered with
    // "fragmentation needed" (or fragmented); this only catches bypasses of those routes.
    if !is_gso(ctx) && inner_len > cfg.overlay_mtu {
        return drop_with(ctx, Counter::DropTooBig);
    }
    // The fast path (`rudder_br_in`) skips this program, so this packet went through the
    // host's stack and may have been NAT'd there (a DNAT'd service address, a published port).
    remember_stack_flow(ctx, &inner);
    let inner_bytes = l3_len(ctx);
    if let Err(counter) = encapsulate(ctx, &cfg, &inner, peer.public_ip) {
        return drop_with(ctx, counter);
    }
    count(Counter::Encapsulated, inner_bytes);
    add_traffic(peer, false, inner_bytes);
    TC_ACT_OK as i32
}

#[inline(always)]
pub(crate) fn is_gso(ctx: &TcContext) -> bool {
    gso_size(ctx) != 0
}

#[inline(always)]
pub(crate) fn gso_size(ctx: &TcContext) -> u16 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { (*ctx.skb.skb).gso_size as u16 }
}

/// True when the packet, or each segment of a GSO packet (segment payload + IPv4 header +
/// TCP/UDP header), fits the overlay MTU. Encapsulated and redirected, a too-large segment
/// would be dropped on the underlay without "fragmentation needed": a blackhole.
#[inline(always)]
fn fits_overlay_mtu(ctx: &TcContext, inner: &[u8; IPV4_HLEN], overlay_mtu: u16) -> bool {
    let segment_payload = gso_size(ctx);
    if segment_payload == 0 {
        return be16(inner, 2) <= overlay_mtu;
    }
    let header_len = usize::from(inner[0] & 0x0f) * 4;
    let l4_len = match inner[9] {
        IPPROTO_UDP => UDP_HLEN,
        IPPROTO_TCP => match ctx.load::<u8>(L3_OFF + header_len + 12) {
            Ok(data_offset) => usize::from(data_offset >> 4) * 4,
            Err(_) => return false,
        },
        _ => return false,
    };
    if l4_len < UDP_HLEN || (inner[9] == IPPROTO_TCP && l4_len < TCP_HLEN) {
        return false;
    }
    u32::from(segment_payload) + (header_len + l4_len) as u32 <= u32::from(overlay_mtu)
}

#[classifier]
pub fn rudder_br_in(ctx: TcContext) -> i32 {
    bridge_ingress(&ctx)
}

/// Fast path for container → peer traffic; anything unusual goes on to the stack.
fn bridge_ingress(ctx: &TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TCX_NEXT;
    };
    if cfg.underlay_ifindex == 0 {
        return TCX_NEXT;
    }
    if ctx.skb.protocol() == u32::from(ETH_P_IPV6.to_be()) {
        return crate::ipv6_fast::bridge_ingress6(ctx, &cfg);
    }
    if ctx.skb.protocol() != u32::from(ETH_P_IP.to_be()) {
        return TCX_NEXT;
    }
    // A NAT'd connection (marked by rudder's nftables rule, after a bridge-level DNAT): only
    // the stack completes its conntrack entry, so its replies can be un-NATed.
    // SAFETY: the context pointer is valid for the whole program run.
    if unsafe { (*ctx.skb.skb).mark } & STACK_MARK != 0 {
        return TCX_NEXT;
    }
    let Ok(mut inner) = ctx.load::<[u8; IPV4_HLEN]>(L3_OFF) else {
        return TCX_NEXT;
    };
    if inner[0] >> 4 != 4 || inner[0] & 0x0f < 5 {
        return TCX_NEXT;
    }
    let Some(peer) = PEERS.get(Key::new(32, addr(&inner, 16))) else {
        return TCX_NEXT;
    };
    let ttl = inner[8];
    // The stack sends "time exceeded" and "fragmentation needed" for these (the peer routes
    // carry the overlay MTU). A GSO packet is judged by the size of its segments.
    if ttl <= 1 || !fits_overlay_mtu(ctx, &inner, cfg.overlay_mtu) {
        return TCX_NEXT;
    }
    if let Err(counter) = decrement_ttl(ctx, L3_OFF, ttl, inner[9]) {
        return drop_with(ctx, counter);
    }
    inner[8] = ttl - 1;
    let inner_bytes = l3_len(ctx);
    if let Err(counter) = encapsulate(ctx, &cfg, &inner, peer.public_ip) {
        return drop_with(ctx, counter);
    }
    count(Counter::Encapsulated, inner_bytes);
    add_traffic(peer, false, inner_bytes);
    // No parameters: the kernel looks the outer destination up in the FIB and fills in
    // the Ethernet header from the neighbour table (resolving it if needed).
    // SAFETY: a null params pointer with length 0 is the documented "do the lookup" form.
    unsafe {
        bpf_redirect_neigh(
            cfg.underlay_ifindex,
            core::ptr::null_mut::<bpf_redir_neigh>(),
            0,
            0,
        ) as i32
    }
}

#[classifier]
pub fn rudder_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx)
}

/// Dispatches by outer family; each half is out of line so their stack frames do not add up.
fn ingress(ctx: &TcContext) -> i32 {
    let Some(cfg) = config() else {
        return TCX_NEXT;
    };
    if ctx.skb.protocol() == u32::from(ETH_P_IPV6.to_be()) {
        return crate::ipv6_outer::ingress_ipv6_outer(ctx, &cfg);
    }
    match ingress_ipv4_outer(ctx, &cfg) {
        // Called from here, not from inside: the two frames would exceed the 512-byte stack.
        INNER_IPV6 => match ctx.load::<[u8; IPV4_HLEN]>(L3_OFF) {
            Ok(outer) => crate::ipv6::decap_ipv6_inner(
                ctx,
                &ipv4_mapped(addr(&outer, 12)),
                outer[1],
                INNER_OFF,
            ),
            Err(_) => drop_with(ctx, Counter::DropTruncated),
        },
        verdict => verdict,
    }
}

/// `ingress_ipv4_outer`'s answer for an overlay datagram whose payload is IPv6.
const INNER_IPV6: i32 = i32::MIN;

#[inline(never)]
fn ingress_ipv4_outer(ctx: &TcContext, cfg: &DataplaneConfig) -> i32 {
    let cfg = *cfg;
    if ctx.skb.protocol() != u32::from(ETH_P_IP.to_be()) {
        return pass(ctx);
    }
    let Ok(outer_ip) = ctx.load::<[u8; IPV4_HLEN]>(L3_OFF) else {
        return pass(ctx);
    };
    // Overlay to overlay only ever travels encapsulated: a plain one is forged by a neighbour
    // on the underlay (forwarding is on and the peer routes satisfy rp_filter). Overlay
    // sources to other destinations (a peer container reaching this host's underlay address
    // without masquerade) are legitimate.
    if outer_ip[0] >> 4 == 4
        && in_overlay_range(addr(&outer_ip, 12), &cfg)
        && in_overlay_range(addr(&outer_ip, 16), &cfg)
    {
        return drop_with(ctx, Counter::DropUnencapsulated);
    }
    let Ok(outer) = ctx.load::<[u8; IPV4_HLEN + UDP_HLEN]>(L3_OFF) else {
        return pass(ctx);
    };
    // Only option-less, unfragmented UDP to our address and port is overlay traffic.
    // Outer fragments go to the stack, which drops them (nothing listens on the port).
    if outer[0] != 0x45
        || outer[9] != IPPROTO_UDP
        || be16(&outer, 6) & IP_FRAG_MASK != 0
        || addr(&outer, 16) != cfg.local_ip
        || be16(&outer, IPV4_HLEN + 2) != cfg.udp_port
    {
        return pass(ctx);
    }
    let outer_src = addr(&outer, 12);

    let payload_len = ctx.len().saturating_sub(INNER_OFF as u32);
    let Ok(first) = ctx.load::<u8>(INNER_OFF) else {
        return drop_with(ctx, Counter::DropTruncated);
    };
    if first >> 4 == 6 {
        return INNER_IPV6;
    }
    if first >> 4 != 4 {
        return drop_with(ctx, Counter::DropNotIpv4);
    }
    let Ok(inner) = ctx.load::<[u8; IPV4_HLEN]>(INNER_OFF) else {
        return drop_with(ctx, Counter::DropTruncated);
    };
    let header_len = u32::from(first & 0x0f) * 4;
    let total_len = u32::from(be16(&inner, 2));
    if header_len < IPV4_HLEN as u32 || total_len < header_len {
        return drop_with(ctx, Counter::DropMalformed);
    }
    if total_len > payload_len {
        return drop_with(ctx, Counter::DropTruncated);
    }
    // A UDP GSO train: several datagrams back to back, which only a socket can split (an
    // encapsulated TCP GSO packet is one inner packet: its lengths match); and the peer's
    // datagrams behind its trains, in order (see `train_senders`).
    let is_train = is_gso(ctx) && total_len < payload_len;
    if to_socket_path(ctx, &ipv4_mapped(outer_src), is_train) {
        return TCX_NEXT;
    }
    if !header_checksum_ok(ctx, INNER_OFF, &inner, header_len) {
        return drop_with(ctx, Counter::DropMalformed);
    }

    let src = addr(&inner, 12);
    let dst = addr(&inner, 16);
    if !ipv4_in_subnet(dst, cfg.local_subnet, cfg.local_prefix_len) {
        return drop_with(ctx, Counter::DropNotOurSubnet);
    }
    let owner = PEERS.get(Key::new(32, src));
    let Some(owner) = owner.filter(|peer| peer.public_ip == outer_src) else {
        // SAFETY: the value is only tested for presence.
        let known_sender = unsafe { SENDERS.get(outer_src) }.is_some();
        return drop_with(
            ctx,
            if known_sender {
                Counter::DropSpoofedSource
            } else {
                Counter::DropUnknownSender
            },
        );
    };
    // RFC 6040 (normal mode), as `packet::decapsulate_ecn`: an outer CE mark goes into an
    // ECN-capable inner header; around a Not-ECT one it cannot be passed on: drop.
    let inner_tos = inner[1];
    let mark_ce = outer[1] & ECN_MASK == ECN_CE && inner_tos & ECN_MASK != ECN_CE;
    if mark_ce && inner_tos & ECN_MASK == ECN_NOT_ECT {
        return drop_with(ctx, Counter::DropCeNotEct);
    }

    // FIXED_GSO: the inner MSS is already right; without it the kernel would grow it by 28.
    if let Err(e) = ctx.adjust_room(
        -i32::from(ENCAP_OVERHEAD),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    ) {
        return drop_with(ctx, io_error(ctx, "decap: bpf_skb_adjust_room", e));
    }
    if mark_ce {
        if let Err(counter) = set_tos(ctx, L3_OFF, inner[0], inner_tos, inner_tos | ECN_CE) {
            return drop_with(ctx, counter);
        }
    }

    let inner_bytes = l3_len(ctx);
    let ttl = inner[8];
    // Up the stack, the kernel's forwarding makes this host's router hop (TTL - 1, or
    // "time exceeded" for a TTL that runs out): not a known container (e.g. the bridge
    // address), TTL <= 1, or a reply the stack must see (conntrack un-NATs it).
    let endpoint = if ttl > 1 {
        // SAFETY: the value is copied out before any other map call.
        unsafe { ENDPOINTS.get(dst) }.copied()
    } else {
        None
    };
    let Some(endpoint) = endpoint.filter(|_| !reply_to_stack_flow(ctx, &inner, header_len)) else {
        count(Counter::Decapsulated, inner_bytes);
        add_traffic(owner, true, inner_bytes);
        return TC_ACT_OK as i32;
    };
    // bpf_redirect_peer skips the host's forwarding: the program makes the hop.
    if let Err(counter) = decrement_ttl(ctx, L3_OFF, ttl, inner[9]) {
        return drop_with(ctx, counter);
    }
    let mut eth = [0u8; 12];
    eth[0..6].copy_from_slice(&endpoint.container_mac);
    eth[6..12].copy_from_slice(&endpoint.gateway_mac);
    if ctx.store(0, &eth, 0).is_err() {
        return drop_with(ctx, Counter::DropIoError);
    }
    count(Counter::Decapsulated, inner_bytes);
    add_traffic(owner, true, inner_bytes);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT or TC_ACT_SHOT.
    unsafe { bpf_redirect_peer(endpoint.host_ifindex, 0) as i32 }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
