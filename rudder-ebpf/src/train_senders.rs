//! Peers that send UDP GSO trains (a batching TUN host on a virtual underlay, where no NIC
//! splits them): a train can only go up to the daemon's socket path, so for a while after
//! one, every datagram of that peer goes there too, whatever its inner or outer family.
//! Split between the BPF path and the socket path, one flow would be reordered, and TCP
//! takes reordering for loss (measured on a veth underlay: 1227 SACK reorders and 559 fast
//! retransmits in a 50 MB transfer).

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap, programs::TcContext};
use rudder_ebpf::{Counter, UnderlayAddr, MAX_PEERS};

use crate::programs::{count, l3_len};

/// Outer source address (IPv4-mapped for IPv4) → when its last train arrived
/// (`bpf_ktime_get_ns`).
#[map(name = "RUDDER_TRAIN_SRC")]
static TRAIN_SENDERS: LruHashMap<UnderlayAddr, u64> = LruHashMap::with_max_entries(MAX_PEERS, 0);

/// How long a peer's datagrams keep taking the socket path after its last train: longer
/// than the socket path's queue takes to drain, so nothing overtakes what is queued there.
const HOLD_NS: u64 = 1_000_000_000;

/// Whether this overlay datagram from `sender` goes up to the socket path (counted
/// `to_daemon`): it is a train (`is_train`: the buffer holds more than its first inner
/// packet), or its sender sent one within [`HOLD_NS`].
#[inline(always)]
pub(crate) fn to_socket_path(ctx: &TcContext, sender: &UnderlayAddr, is_train: bool) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let follow = if is_train {
        let _ = TRAIN_SENDERS.insert(sender, &now, 0);
        true
    } else {
        // SAFETY: the value is copied out at once.
        unsafe { TRAIN_SENDERS.get(sender) }
            .copied()
            .is_some_and(|at| now.wrapping_sub(at) < HOLD_NS)
    };
    if follow {
        count(Counter::ToDaemon, l3_len(ctx));
    }
    follow
}
