//! rudder's in-kernel data plane: two TC (TCX) programs on the underlay interface.
//!
//! Hook points (see `rudder/src/dataplane/ebpf/` for the userspace half):
//! - `rudder_egress`, TCX egress of the underlay device. The daemon routes every peer
//!   subnet `via <peer public IP> dev <underlay> mtu <overlay MTU>`, so the kernel forwards
//!   a container's packet to the underlay with the peer's MAC already resolved by the
//!   neighbour subsystem; this program only inserts outer IPv4 + UDP after the Ethernet
//!   header. `bpf_skb_adjust_room(MAC, FIXED_GSO | ENCAP_*)` keeps 64 KB GSO packets whole
//!   until the device (or late software GSO) segments them.
//! - `rudder_ingress`, TCX ingress of the underlay device. Overlay datagrams are checked
//!   (well-formed inner IPv4, destination ours, source owned by the sender), the inner TTL
//!   is decremented and the outer headers removed. A known local container gets the packet
//!   through `bpf_redirect_peer` straight into its namespace: that skips the host's
//!   forwarding and bridge, where a still tunnel-marked GSO packet would be segmented in
//!   software. Unknown local addresses fall back to the normal stack (correct, slower).
//!
//! - `rudder_br_in`, TCX ingress of the containers' bridge (optional): a container's packet
//!   for a peer subnet reaches the bridge device because it is addressed to the gateway
//!   MAC; the program decrements its TTL, encapsulates it and sends it with
//!   `bpf_redirect_neigh` straight to the underlay (FIB + neighbour lookup on the outer
//!   destination), skipping the host's forwarding path. Whatever it does not handle
//!   (TTL about to expire, too big (for GSO: a segment too big), not for a peer, a NAT'd
//!   connection marked by rudder's nftables rule) continues to the stack, which answers
//!   with the proper ICMP error and then reaches `rudder_egress` through the peer route.
//! - `train_senders`: after a UDP GSO train from a peer (which only the daemon's socket
//!   path can split), that peer's other datagrams go to the socket path too for a second,
//!   so its flows are not reordered.
//! - `stack_flows`: what reached `rudder_egress` went through the stack (maybe NAT'd); its
//!   replies are handed to the stack by `rudder_ingress`, so conntrack un-NATs them.
//!
//! All packet access goes through `bpf_skb_load_bytes`/`store_bytes`, so non-linear skbs
//! need no pulls and the verifier sees no packet-pointer arithmetic.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod ipv4_headers;
#[cfg(target_arch = "bpf")]
mod ipv6;
#[cfg(target_arch = "bpf")]
mod ipv6_fast;
#[cfg(target_arch = "bpf")]
mod ipv6_outer;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod stack_flows;
#[cfg(target_arch = "bpf")]
mod train_senders;

/// On the host this binary is empty: the programs exist only for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
