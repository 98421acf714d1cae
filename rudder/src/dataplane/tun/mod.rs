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
//! The per-packet decisions are the overlay's userspace forwarding rules in
//! [`crate::dataplane::forwarding`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

use super::counters::{Counters, PeerCounters};
use super::forwarding::{default_device_icmp_source, ForwardingTable, IcmpSources, PublishedTable};
use super::{CounterSnapshot, Dataplane, DataplaneKind, PeerStats};
use crate::packet;
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
            table: PublishedTable::new(table.clone()),
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

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
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
