//! Counters of the control plane (leases, etcd watch); the status view in `status`
//! exports them.

use prometheus_client::metrics::counter::Counter;

/// Control-plane counters; cheap to clone (each is an `Arc` inside).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub lease_acquisitions: Counter,
    pub lease_renewals: Counter,
    pub etcd_reconnects: Counter,
    pub invalid_leases: Counter,
}
