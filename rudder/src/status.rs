//! The shared view of the daemon's state that the status and metrics endpoints read,
//! and the Prometheus registry over it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use rudder_ebpf::Counter as PacketCounter;

use crate::dataplane::{Dataplane, PeerStats};
use crate::metrics::Metrics;
use crate::peers::{Ipv6PeerMap, PeerMap};

/// What the daemon knows about itself, updated by its tasks, read by status and metrics.
#[derive(Debug, Default, Clone)]
pub struct StatusInfo {
    pub network: Option<Ipv4Net>,
    pub subnet: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
    pub public_ip: Option<Ipv4Addr>,
    /// PublicIPv6 in our lease (`--public-ipv6`, else the interface's), with IPv6 on.
    pub public_ipv6: Option<Ipv6Addr>,
    /// The underlay address datagrams leave from; differs from `public_ip` behind a 1:1 NAT.
    pub local_ip: Option<Ipv4Addr>,
    pub iface: Option<String>,
    pub mtu: Option<u16>,
    pub dataplane: Option<String>,
    /// Why this data plane (e.g. the eBPF load error that made `auto` fall back to TUN).
    pub dataplane_reason: Option<String>,
    /// Unix time at which the etcd lease runs out unless renewed.
    pub lease_expires_unix: Option<u64>,
    /// Set once the network config is valid; cleared while it is not.
    pub config_error: Option<String>,
    pub peers: PeerMap,
    /// The IPv6 half of every peer lease that has one (the control plane's view: this
    /// build's data plane does not route IPv6 yet).
    pub ipv6_peers: Ipv6PeerMap,
}

/// Shared state: the status record, the data plane once it exists, and the metrics.
#[derive(Clone, Default)]
pub struct State {
    pub metrics: Metrics,
    pub status: Arc<RwLock<StatusInfo>>,
    pub dataplane: Arc<RwLock<Option<Arc<dyn Dataplane>>>>,
    /// The per-peer traffic `/metrics` showed last, and when it was read.
    metrics_peer_stats: Arc<Mutex<Option<ReadAt>>>,
}

/// Per-peer traffic and when it was read.
type ReadAt = (Instant, Arc<Vec<PeerStats>>);

/// How old the per-peer traffic in `/metrics` may be: reading it costs a BPF map lookup per
/// peer, and a scraper polling many times a second must not make the daemon do that each time.
const METRICS_PEER_STATS_MAX_AGE: Duration = Duration::from_secs(1);

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").finish_non_exhaustive()
    }
}

impl State {
    pub fn update(&self, f: impl FnOnce(&mut StatusInfo)) {
        f(&mut self.status.write().expect("status lock poisoned"));
    }

    pub fn snapshot(&self) -> StatusInfo {
        self.status.read().expect("status lock poisoned").clone()
    }

    /// The data plane's per-peer traffic, at most [`METRICS_PEER_STATS_MAX_AGE`] old.
    fn metrics_peer_stats(&self) -> Arc<Vec<PeerStats>> {
        let mut cached = self
            .metrics_peer_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, stats)) = cached.as_ref() {
            if at.elapsed() < METRICS_PEER_STATS_MAX_AGE {
                return stats.clone();
            }
        }
        let stats = Arc::new(self.dataplane().map(|d| d.peer_stats()).unwrap_or_default());
        *cached = Some((Instant::now(), stats.clone()));
        stats
    }

    pub fn dataplane(&self) -> Option<Arc<dyn Dataplane>> {
        self.dataplane
            .read()
            .expect("dataplane lock poisoned")
            .clone()
    }

    /// Ready: a lease is held and a data plane carries traffic.
    pub fn is_ready(&self) -> bool {
        let status = self.status.read().expect("status lock poisoned");
        status.subnet.is_some() && status.config_error.is_none() && self.dataplane().is_some()
    }

    /// Packet counters by name; zeros before a data plane exists.
    pub fn packet_counters(&self) -> Vec<(&'static str, u64)> {
        let values = self.dataplane().map(|d| d.counters()).unwrap_or_default();
        named(values)
    }

    /// Byte counters by name, as [`State::packet_counters`].
    pub fn byte_counters(&self) -> Vec<(&'static str, u64)> {
        let values = self
            .dataplane()
            .map(|d| d.byte_counters())
            .unwrap_or_default();
        named(values)
    }

    /// The Prometheus registry for `/metrics`.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::with_prefix("rudder");
        let m = &self.metrics;
        registry.register(
            "lease_acquisitions",
            "Subnet leases acquired (first time and after a loss)",
            m.lease_acquisitions.clone(),
        );
        registry.register(
            "lease_renewals",
            "Subnet lease renewals",
            m.lease_renewals.clone(),
        );
        registry.register(
            "etcd_reconnects",
            "Peer watch re-established after a failure or compaction",
            m.etcd_reconnects.clone(),
        );
        registry.register(
            "invalid_leases",
            "Lease keys or values skipped as malformed",
            m.invalid_leases.clone(),
        );
        registry.register_collector(Box::new(DataplaneCollector(self.clone())));
        registry
    }
}

fn named(values: crate::dataplane::CounterSnapshot) -> Vec<(&'static str, u64)> {
    PacketCounter::ALL
        .iter()
        .map(|c| (c.name(), values[c.index()]))
        .collect()
}

/// Reads the data plane's counters at scrape time.
#[derive(Debug)]
struct DataplaneCollector(State);

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let peers = ConstGauge::new(self.0.snapshot().peers.len() as i64);
        peers.encode(encoder.encode_descriptor(
            "peers",
            "Peer subnets programmed into the data plane",
            None,
            peers.metric_type(),
        )?)?;

        let dataplane = self.0.snapshot().dataplane.unwrap_or_default();
        let families = [
            (
                "packets",
                "Packets handled by the data plane, by result (drops by reason)",
                self.0.packet_counters(),
            ),
            (
                "bytes",
                "IPv4 bytes handled by the data plane, by result (inner packets for encapsulated/decapsulated)",
                self.0.byte_counters(),
            ),
        ];
        for (name, help, values) in families {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (result, value) in values {
                let labels = [("dataplane", dataplane.as_str()), ("result", result)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        encode_peer_traffic(&mut encoder, &dataplane, &self.0)
    }
}

/// A peer's (tx, rx) figure of one metric family.
type TxRx = fn(&crate::dataplane::PeerStats) -> (u64, u64);

/// One line per peer subnet (IPv4 and IPv6) and direction: `rudder_peer_packets_total` and
/// `rudder_peer_bytes_total` with labels `dataplane`, `subnet`, `direction` (tx/rx). Only
/// peers that carried traffic: at 65,536 idle peers every scrape was 262,144 lines (~25 MB).
fn encode_peer_traffic(
    encoder: &mut DescriptorEncoder,
    dataplane: &str,
    state: &State,
) -> Result<(), std::fmt::Error> {
    let stats = state.metrics_peer_stats();
    let families: [(&str, &str, TxRx); 2] = [
        (
            "peer_packets",
            "Inner packets sent to (tx) and received from (rx) each peer subnet since its entry was installed",
            |p| (p.traffic.tx_packets, p.traffic.rx_packets),
        ),
        (
            "peer_bytes",
            "Inner bytes sent to (tx) and received from (rx) each peer subnet since its entry was installed",
            |p| (p.traffic.tx_bytes, p.traffic.rx_bytes),
        ),
    ];
    for (name, help, values) in families {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for p in stats
            .iter()
            .filter(|p| p.traffic.tx_packets + p.traffic.rx_packets > 0)
        {
            let subnet = p.subnet.to_string();
            let (tx, rx) = values(p);
            for (direction, value) in [("tx", tx), ("rx", rx)] {
                let labels = [
                    ("dataplane", dataplane),
                    ("subnet", subnet.as_str()),
                    ("direction", direction),
                ];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    Ok(())
}
