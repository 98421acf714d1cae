//! Peers that send UDP GSO trains (a batching TUN host on a virtual underlay, where no NIC
//! splits them): a train can only go up to the daemon's socket path, so for a while after
//! one, every datagram of that peer goes there too. Split between the BPF path and the
//! socket path, one flow would be reordered, and TCP takes reordering for loss (measured on
//! a veth underlay: 1227 SACK reorders and 559 fast retransmits in a 50 MB transfer).

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap};
use rudder_ebpf::MAX_PEERS;

/// Outer source address → when its last train arrived (`bpf_ktime_get_ns`).
#[map(name = "RUDDER_TRAIN_SRC")]
static TRAIN_SENDERS: LruHashMap<[u8; 4], u64> = LruHashMap::with_max_entries(MAX_PEERS, 0);

/// How long a peer's datagrams keep taking the socket path after its last train: longer
/// than the socket path's queue takes to drain, so nothing overtakes what is queued there.
const HOLD_NS: u64 = 1_000_000_000;

#[inline(always)]
pub(crate) fn saw_train_from(sender: [u8; 4]) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = TRAIN_SENDERS.insert(&sender, &now, 0);
}

/// True while `sender`'s datagrams must follow its trains to the socket path.
#[inline(always)]
pub(crate) fn sends_trains(sender: [u8; 4]) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(at) = (unsafe { TRAIN_SENDERS.get(&sender) }).copied() else {
        return false;
    };
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }.wrapping_sub(at) < HOLD_NS
}
