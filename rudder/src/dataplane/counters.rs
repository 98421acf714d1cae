//! Counter snapshots, and the atomic counters userspace forwarding fills: per result (by
//! [`Counter`]) and per peer (its traffic).

use std::sync::atomic::{AtomicU64, Ordering};

use rudder_ebpf::Counter;

/// Packet (or byte) counters indexed by [`Counter`], summed over CPUs/queues.
pub type CounterSnapshot = [u64; Counter::COUNT];

pub use rudder_ebpf::PeerTraffic;

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
    pub(crate) fn add_tx(&self, packets: usize, bytes: usize) {
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
