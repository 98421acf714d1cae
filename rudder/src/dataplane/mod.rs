//! The data plane: moves overlay packets between this host and its peers.
//!
//! Two implementations sit behind one trait: `tun` (portable: a TUN device and a UDP
//! socket in the daemon) and `ebpf` (in-kernel encapsulation). The reconciler only ever
//! tells a data plane which peers exist; it never waits on etcd, so installed state stays
//! as it is while etcd is unreachable.
//!
//! Shared rooms, below both planes: `counters` (snapshots, per-peer traffic) and
//! `forwarding` (the userspace forwarding table and rules; `forwarding6` the rules for inner
//! IPv6). `create` picks and starts one.

pub mod counters;
mod create;
pub mod ebpf;
pub mod forwarding;
pub mod forwarding6;
pub mod stack_rules;
pub mod tun;

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use counters::{CounterSnapshot, PeerTraffic};
pub use create::{create, DataplaneOptions, Ipv6Plane};

/// Which implementation carries the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneKind {
    /// Try eBPF, fall back to TUN on any failure.
    Auto,
    /// eBPF only: fail when it cannot load.
    Ebpf,
    /// TUN device and UDP socket in the daemon.
    Tun,
}

impl DataplaneKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneKind::Auto => "auto",
            DataplaneKind::Ebpf => "ebpf",
            DataplaneKind::Tun => "tun",
        }
    }
}

/// One installed peer as the data plane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStats {
    /// An IPv4 peer subnet, or (on a dual-stack network) an IPv6 one.
    pub subnet: IpNet,
    /// Where its datagrams go: its PublicIP, or its PublicIPv6 (see [`Dataplane::upsert_peer`]).
    pub public_ip: IpAddr,
    /// When the entry was installed or last pointed at another public IP; `traffic`
    /// counts from then.
    pub changed: std::time::SystemTime,
    pub traffic: PeerTraffic,
}

/// Where the in-kernel fast paths serve local containers (eBPF only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FastPath {
    /// The adopted bridge `rudder_br_in` is attached to.
    pub bridge: Option<String>,
    /// Containers behind it that decapsulated packets are redirected into directly.
    pub local_endpoints: usize,
    /// Containers it serves by their IPv6 address (a dual-stack network), counted apart.
    pub local_endpoints6: usize,
}

/// What every data plane does. Methods are idempotent: applying the same peer twice, or
/// removing an absent one, is not an error.
pub trait Dataplane: Send + Sync {
    /// `ebpf` or `tun`.
    fn kind(&self) -> DataplaneKind;

    /// Our own subnet changed (first acquisition, or a re-acquire that got another one).
    fn set_local_subnet(&self, subnet: Ipv4Net) -> anyhow::Result<()>;

    /// The underlay's MTU changed: carry at most `overlay_mtu` bytes per inner packet from
    /// now on (device and route MTUs, the "fragmentation needed" checks).
    fn set_overlay_mtu(&self, overlay_mtu: u16) -> anyhow::Result<()>;

    /// The host's routes or neighbours changed: re-resolve what was derived from them (the
    /// eBPF peer routes' next hops). Nothing by default: the TUN plane's UDP socket is
    /// routed by the kernel packet by packet.
    fn underlay_routes_changed(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Add or update the host owning `subnet`, reached at `underlay`: its PublicIPv6 when
    /// this host and the peer both announce one (an IPv6 outer header), else its PublicIP.
    fn upsert_peer(&self, subnet: Ipv4Net, underlay: IpAddr) -> anyhow::Result<()>;

    /// Forget the host that owned `subnet`.
    fn remove_peer(&self, subnet: Ipv4Net) -> anyhow::Result<()>;

    /// Our own IPv6 subnet changed (only with IPv6 on: first acquisition or re-acquire).
    fn set_local_subnet6(&self, subnet: Ipv6Net) -> anyhow::Result<()>;

    /// Add or update the host owning the IPv6 subnet `subnet`, reached at `underlay` (chosen
    /// as for [`Dataplane::upsert_peer`]). Never called for a lease without an IPv6 subnet.
    fn upsert_peer6(&self, subnet: Ipv6Net, underlay: IpAddr) -> anyhow::Result<()>;

    /// Forget the host that owned the IPv6 subnet `subnet`.
    fn remove_peer6(&self, subnet: Ipv6Net) -> anyhow::Result<()>;

    /// Many peer changes follow (a full resync): the data plane may defer publishing them
    /// until [`Dataplane::end_peer_batch`], so n changes cost O(n), not n publications.
    fn begin_peer_batch(&self) {}

    /// Publishes what the batch deferred.
    fn end_peer_batch(&self) {}

    /// Current packet counters.
    fn counters(&self) -> CounterSnapshot;

    /// Current byte counters, by the same [`Counter`](rudder_ebpf::Counter) index.
    fn byte_counters(&self) -> CounterSnapshot;

    /// Every installed peer with its traffic, ordered by subnet.
    fn peer_stats(&self) -> Vec<PeerStats>;

    /// Stop forwarding and remove what this data plane created in the kernel.
    fn shutdown(&self) -> anyhow::Result<()>;

    /// Stop this process's part, leaving in the kernel what can keep forwarding without it
    /// for the next start to adopt. By default the same as [`Dataplane::shutdown`].
    fn stop_keeping_state(&self) -> anyhow::Result<()> {
        self.shutdown()
    }

    /// Re-reads what the data plane learns from the host rather than from etcd (the eBPF
    /// path's bridge, local containers and lost routes); called every few seconds as a
    /// safety net. Nothing by default.
    fn refresh_host_state(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Something about the host's local containers changed (a netlink event, see
    /// `endpoint_watch`): re-read the bridge and the local endpoints now. Nothing by default.
    fn local_endpoints_changed(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// The fast paths' view of local containers; `None` for a data plane without them.
    fn fast_path(&self) -> Option<FastPath> {
        None
    }
}
