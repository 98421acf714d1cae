//! In-kernel data plane: TC (TCX) programs from `rudder-ebpf` on the underlay interface
//! and on the containers' bridge, whoever made it (adopted, see below).
//!
//! # Design
//! - **Egress** (`rudder_egress`, TCX egress of the underlay device): every peer subnet gets
//!   a route `<subnet> via <next hop> dev <underlay> onlink mtu <overlay MTU> proto 211`,
//!   where the next hop is the peer's public IP, or the underlay gateway the kernel uses to
//!   reach it (looked up when the peer is added). The kernel forwards a container's packet
//!   onto the underlay with the right MAC already resolved; the program looks the inner
//!   destination up in the peer LPM trie and inserts outer IPv4 + UDP after the Ethernet
//!   header (GSO kept). This path also carries host-originated overlay traffic.
//! - **Bridge fast path** (`rudder_br_in`, TCX ingress of the bridge): container packets
//!   for a peer reach the bridge device (they are addressed to the gateway MAC); the
//!   program decrements the TTL, encapsulates and `bpf_redirect_neigh`s them to the
//!   underlay, skipping the host's forwarding path. Exceptions (TTL 1, too big, no peer)
//!   continue to the stack and then to `rudder_egress`.
//! - **Ingress** (`rudder_ingress`, TCX ingress of the underlay device): checks and
//!   decapsulates overlay datagrams (ECN CE copied inside) and hands packets for known
//!   local containers to `bpf_redirect_peer` with the inner TTL decremented (straight into
//!   the container's namespace, GSO kept); TTL <= 1 and other local destinations go up the
//!   host stack, whose forwarding decrements or answers (correct, ~4x slower for
//!   TCP here, because the still tunnel-marked GSO packet is segmented in software).
//! - **MTU**: the peer routes carry the overlay MTU, so the kernel itself sends
//!   "fragmentation needed" to senders (or fragments DF-less packets) before the program
//!   sees them; a non-GSO packet still larger than the overlay MTU is dropped and counted
//!   as `too_big` (only possible when something bypasses those routes). The bridge fast
//!   path leaves such packets to the stack for the same ICMP answer.
//! - **Unknown overlay destinations**: an `unreachable <network> proto 211` route makes the
//!   kernel answer with ICMP "destination unreachable" instead of leaking the packet onto
//!   the underlay; the egress program also drops (and counts `no_route`) any such packet.
//!
//! - **The bridge is adopted, not owned**: `--bridge` names it, else it is whichever
//!   interface holds the subnet's gateway address (first host address, what docker's
//!   `--bip` and CNI's `isGateway` put on docker0/cni0). It is looked for whenever a link
//!   or an address changes (netlink events, `endpoint_watch`): when it appears, or is
//!   deleted and re-created (a docker restart), `rudder_br_in` is attached to it, and the peer routes get the gateway
//!   address as preferred source while that address is local (host-originated overlay
//!   traffic then passes the peers' anti-spoofing check), and lose it when it goes.
//!
//! # What the daemon must provide
//! - `net.ipv4.ip_forward=1`; containers' MTU = the overlay MTU.
//! - Call [`Dataplane::local_endpoints_changed`] when links, addresses, neighbours or /32
//!   routes change (`endpoint_watch` does): it adopts the bridge and re-reads the local
//!   endpoints; and [`Dataplane::refresh_host_state`] every few seconds as a safety net
//!   (also restores lost routes). Or feed [`EbpfDataplane::upsert_local_endpoint`] yourself.
//! - Redirected packets bypass the host's forwarding path: host netfilter (forward chain,
//!   conntrack) does not see container ↔ peer traffic on the fast paths.
//!
//! Kernel state outlives the process: maps and the underlay's TCX links are pinned under
//! `--bpf-pin-dir`/<underlay> (`pins`), and a stop leaves them and the routes (protocol
//! [`RTPROT_RUDDER`]) in place; the next `load` adopts them (opens the maps, puts its
//! programs into the links atomically, reads the installed peers back), so a restart or a
//! crash loses no packet. [`Dataplane::shutdown`] removes it all (`--cleanup-on-exit`).
//! Without a bpffs the links die with the process and `load` removes the stale routes.
//!
//! Rooms: `kernel` (the BPF object, its programs and maps), `routes` (peer routes),
//! `bridge` (adopting the containers' bridge),
//! `endpoints` and `routed_endpoints` (local container discovery), `socket_path` (datagrams BPF passes up);
//! this file ties them into [`EbpfDataplane`].

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{bail, Context as _};
use aya::maps::lpm_trie::Key;
use ipnet::{Ipv4Net, Ipv6Net};
use rudder_ebpf::{names, Counter, DataplaneConfig, LocalEndpoint, PeerValue};

use super::{CounterSnapshot, Dataplane, DataplaneKind, PeerStats};

mod bridge;
#[cfg(test)]
mod bridge_tests;
mod endpoints;
mod kernel;
#[cfg(test)]
mod kernel_decap_tests;
#[cfg(test)]
mod kernel_tests;
#[cfg(test)]
mod kernel_tests6;
#[cfg(test)]
mod kernel_tests_fast6;
#[cfg(test)]
mod kernel_tests_full_tables;
#[cfg(test)]
mod kernel_tests_outer6;
#[cfg(test)]
mod kernel_tests_stack_flows;
#[cfg(test)]
mod kernel_tests_stack_flows6;
#[cfg(test)]
mod kernel_tests_trains;
mod peer_stats;
mod peers6;
mod pins;
mod route_loss;
mod routed_endpoints;
mod routes;
mod routes6;
mod senders;
#[cfg(test)]
mod smoke_tests;
#[cfg(test)]
mod smoke_tests6;
mod socket_path;
mod underlay_change;

use bridge::AdoptedBridge;
use kernel::{ignore_missing, Kernel};
pub(crate) use routed_endpoints::usable as usable_neighbour_state;
use routes::Routes;
pub use routes::RTPROT_RUDDER;

/// What [`EbpfDataplane::load`] needs to know about this host.
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    /// Underlay interface: both programs attach to it, peer routes point out of it.
    pub underlay_ifname: String,
    pub underlay_ifindex: u32,
    /// The underlay address this host owns: the outer source of encapsulated packets and
    /// the outer destination of accepted ones.
    pub local_ip: Ipv4Addr,
    /// The whole overlay network (e.g. 10.5.0.0/16).
    pub network: Ipv4Net,
    /// Our leased subnet (e.g. 10.5.34.0/24).
    pub local_subnet: Ipv4Net,
    pub udp_port: u16,
    /// Underlay MTU − 28.
    pub overlay_mtu: u16,
    /// The containers' bridge by name (`--bridge`); `None`: the interface that holds the
    /// local subnet's gateway address, whoever made it (docker0, cni0).
    pub bridge: Option<String>,
    /// Test hook: fail as if the kernel refused the programs.
    pub force_fail: bool,
    /// bpffs directory for the pins (`--bpf-pin-dir`); `None`: nothing pinned.
    pub pin_dir: Option<std::path::PathBuf>,
    /// The overlay's IPv6 side; `None` while the network has IPv6 off.
    pub ipv6: Option<super::Ipv6Plane>,
}

impl EbpfOptions {
    /// False on an IPv6-only network, whose IPv4 network and subnet are 0.0.0.0/0.
    pub fn carries_ipv4(&self) -> bool {
        self.network != Ipv4Net::default()
    }
}

/// The eBPF data plane. See the module documentation for the design.
pub struct EbpfDataplane {
    state: Mutex<State>,
    /// Where the datagrams BPF passes up are handled; set by [`Self::start_socket_path`].
    socket_path: Mutex<Option<Arc<socket_path::SocketPath>>>,
}

struct State {
    opts: EbpfOptions,
    /// `None` after `shutdown`.
    kernel: Option<Kernel>,
    /// Route writes; shared so that a check can compare its write count without the lock.
    routes: Option<Arc<Routes>>,
    /// The periodic checks' dumps, on a socket of their own: on the writes' socket a
    /// 65,536-route dump held up every peer change behind it.
    check_routes: Arc<Routes>,
    peers: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// IPv6 peer subnets → (underlay address, traffic id), as in the IPv6 trie (`peers6`).
    peers6: BTreeMap<Ipv6Net, (IpAddr, u32)>,
    /// When each IPv6 peer entry was installed or moved: its traffic counts from then.
    peer6_changed: BTreeMap<Ipv6Net, std::time::SystemTime>,
    /// IPv4 peer subnets reached at a PublicIPv6 → (it, traffic id, installed at): in the
    /// `peers46` trie, never in `peers`.
    peers_over6: BTreeMap<Ipv4Net, (std::net::Ipv6Addr, u32, std::time::SystemTime)>,
    /// How many of `peers` each public IP has (the sender map's value), kept with `peers`:
    /// counting them per change made a resync of n peers O(n^2).
    subnets_per_sender: HashMap<Ipv4Addr, u32>,
    /// Each peer entry's traffic id (see [`PeerValue::traffic_id`]) and when it was
    /// installed or moved: its traffic counters start there.
    peer_entries: BTreeMap<Ipv4Net, (u32, std::time::SystemTime)>,
    /// The next traffic id to hand out.
    next_traffic_id: u32,
    /// Endpoints installed by `refresh_local_endpoints` (container IP → entry).
    discovered: BTreeMap<Ipv4Addr, LocalEndpoint>,
    /// The same for containers' IPv6 addresses.
    discovered6: BTreeMap<std::net::Ipv6Addr, LocalEndpoint>,
    /// The bridge `rudder_br_in` is attached to.
    bridge: Option<AdoptedBridge>,
    /// The bridgeless container veths it is attached to as well.
    routed_veths: routed_endpoints::RoutedVeths,
    /// Whether the gateway address is on this host (then it is the peer routes' source).
    gateway_local: bool,
    /// What the last route check saw (tells why routes went missing since).
    route_events: Option<route_loss::RouteEvents>,
    /// Where maps and links are pinned (they outlive the process).
    pins: Option<pins::PinDir>,
    /// Inside a peer batch: routes still to add, pipelined at its end.
    pending_routes: Option<BTreeMap<Ipv4Net, Ipv4Addr>>,
}

impl EbpfDataplane {
    /// Loads the programs, attaches them to the underlay (TCX ingress and egress), fills the
    /// config map and installs the network's unreachable route. Removes routes a previous
    /// (crashed) instance left behind first.
    ///
    /// Must run in the host's network namespace (the calling thread's is used for the
    /// interface lookup, the TCX attach and the netlink socket).
    pub fn load(opts: EbpfOptions) -> anyhow::Result<Self> {
        if opts.force_fail {
            bail!("eBPF data plane load failed on purpose (force_fail test hook)");
        }
        validate(&opts)?;
        let pins = match &opts.pin_dir {
            Some(base) => pins::PinDir::open(base, &opts.underlay_ifname)?,
            None => None,
        };
        // A previous run's links, maps and routes: adopted, not rebuilt, so traffic
        // never stops.
        let adopting = pins.as_ref().is_some_and(pins::PinDir::has_links);
        let mut kernel = match Kernel::load(pins.as_ref()) {
            Ok(kernel) => kernel,
            // Pinned maps another version made may not fit these programs: start afresh.
            Err(e) if adopting => {
                tracing::warn!(
                    "{e:#}: the pinned maps do not fit this version's programs; replacing them"
                );
                let pins = pins.as_ref().expect("adopting implies pins");
                pins.remove_maps()?;
                Kernel::load(Some(pins))?
            }
            Err(e) => return Err(e),
        };
        let routes = Routes::connect(opts.underlay_ifindex)?;
        let check_routes = Arc::new(Routes::connect(opts.underlay_ifindex)?);
        if !adopting {
            // Before touching any route: a running instance must keep its state.
            Kernel::ensure_not_attached(&opts.underlay_ifname)?;
            let removed = routes.remove_stale()?;
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed routes left by a previous rudder (proto {RTPROT_RUDDER})"
                );
            }
        }
        kernel.set_config(&config_of(&opts))?;
        kernel.set_config6(&peers6::config6_of(opts.ipv6.as_ref()))?;
        // Without it only NAT'd flows across hosts break (with br_netfilter): not a reason to
        // give up the whole data plane.
        if let Err(e) = super::stack_rules::install_nat_mark() {
            tracing::warn!("{e:#}: NAT'd connections to containers on other hosts may fail when the bridge DNATs (br_netfilter)");
        }
        kernel.attach(&opts.underlay_ifname, pins.as_ref())?;
        // (An IPv6-only network has no IPv4 network to answer for: 0.0.0.0/0 is everything.)
        if opts.carries_ipv4() {
            routes
                .add_unreachable(opts.network)
                .with_context(|| format!("adding the route `unreachable {}`", opts.network))?;
        }
        if let Some(plane) = &opts.ipv6 {
            routes.add_unreachable6(plane.network)?;
        }
        let adopted = if adopting {
            kernel.installed_peers()
        } else {
            BTreeMap::new()
        };
        if adopting {
            tracing::info!(
                peers = adopted.len(),
                "adopted the BPF programs' links, maps and routes a previous rudder left"
            );
        }
        let peers: BTreeMap<Ipv4Net, Ipv4Addr> =
            adopted.iter().map(|(s, (ip, _))| (*s, *ip)).collect();
        let mut subnets_per_sender = HashMap::new();
        for ip in peers.values() {
            *subnets_per_sender.entry(*ip).or_insert(0) += 1;
        }
        let peer_entries = adopted
            .iter()
            .map(|(s, (_, id))| (*s, (*id, std::time::SystemTime::now())))
            .collect();
        let peers6 = if adopting {
            kernel.installed_peers6()
        } else {
            BTreeMap::new()
        };
        let peer6_changed = peers6
            .keys()
            .map(|subnet| (*subnet, std::time::SystemTime::now()))
            .collect();
        let next_traffic_id = adopted
            .values()
            .map(|(_, id)| *id)
            .chain(peers6.values().map(|(_, id)| *id))
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
            .max(1);
        let dataplane = EbpfDataplane {
            socket_path: Mutex::new(None),
            state: Mutex::new(State {
                opts,
                kernel: Some(kernel),
                routes: Some(Arc::new(routes)),
                check_routes,
                peers,
                peers6,
                peer6_changed,
                peers_over6: BTreeMap::new(),
                subnets_per_sender,
                peer_entries,
                next_traffic_id,
                discovered: BTreeMap::new(),
                discovered6: BTreeMap::new(),
                bridge: None,
                routed_veths: Default::default(),
                gateway_local: false,
                route_events: None,
                pins,
                pending_routes: None,
            }),
        };
        dataplane.adopt_bridge()?;
        Ok(dataplane)
    }

    /// Binds the overlay port for the datagrams the ingress program passes up (see
    /// [`socket_path`]). Must run inside tokio.
    pub async fn start_socket_path(&self) -> anyhow::Result<()> {
        let (config, peers, peers_over6, peers6) = {
            let state = self.lock();
            let config = socket_path::SocketPathConfig {
                local: std::net::SocketAddrV4::new(state.opts.local_ip, state.opts.udp_port),
                local_subnet: state.opts.local_subnet,
                network: state.opts.network,
                ipv6: state.opts.ipv6,
                underlay_index: state.opts.underlay_ifindex,
            };
            (
                config,
                state.peers.clone(),
                state.peers_over6_underlays(),
                state.peers6_underlays(),
            )
        };
        let path = socket_path::SocketPath::start(config, &peers).await?;
        for (subnet, underlay) in peers_over6 {
            path.upsert_peer(subnet, underlay, None);
        }
        for (subnet, underlay) in peers6 {
            path.upsert_peer6(subnet, underlay, None);
        }
        *self.socket_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
        Ok(())
    }

    /// A counter snapshot of the BPF programs plus the socket path's.
    fn both_paths(
        &self,
        kernel: fn(&Kernel) -> CounterSnapshot,
        socket: fn(&socket_path::SocketPath) -> CounterSnapshot,
    ) -> CounterSnapshot {
        let from_kernel = self
            .lock()
            .kernel
            .as_ref()
            .map_or([0; Counter::COUNT], kernel);
        let from_socket = self.socket_path().map(|p| socket(&p)).unwrap_or_default();
        std::array::from_fn(|i| from_kernel[i] + from_socket[i])
    }

    fn socket_path(&self) -> Option<Arc<socket_path::SocketPath>> {
        self.socket_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For status output: (program name, instructions after translation, instructions
    /// the verifier processed) of every loaded program.
    pub fn program_sizes(&self) -> anyhow::Result<Vec<(&'static str, u32, u32)>> {
        let state = self.lock();
        let kernel = state
            .kernel
            .as_ref()
            .context("eBPF data plane is shut down")?;
        [names::PROG_EGRESS, names::PROG_INGRESS, names::PROG_BRIDGE]
            .into_iter()
            .map(|name| {
                let (verified, size) = kernel.program_sizes(name)?;
                Ok((name, size, verified))
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn kernel_mut(&mut self) -> anyhow::Result<&mut Kernel> {
        self.kernel.as_mut().context("eBPF data plane is shut down")
    }

    fn routes(&self) -> anyhow::Result<&Routes> {
        Ok(self.shared_routes()?)
    }

    fn shared_routes(&self) -> anyhow::Result<&Arc<Routes>> {
        self.routes.as_ref().context("eBPF data plane is shut down")
    }

    /// (writes, the checks' own connection for reading), while not shut down.
    fn routes_for_check(&self) -> anyhow::Result<(Arc<Routes>, Arc<Routes>)> {
        Ok((self.shared_routes()?.clone(), self.check_routes.clone()))
    }

    /// Preferred source for peer routes: the local subnet's gateway address, while it is on
    /// this host (a route with a source the host lacks cannot be added).
    fn pref_source(&self) -> Option<Ipv4Addr> {
        self.gateway_local
            .then(|| crate::subnet::gateway(self.opts.local_subnet))
    }
}

impl Dataplane for EbpfDataplane {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Ebpf
    }

    fn refresh_host_state(&self) -> anyhow::Result<()> {
        self.adopt_bridge()?;
        self.restore_lost_routes()?;
        self.restore_lost_routes6()?;
        {
            let mut state = self.lock();
            let live = state
                .peer_entries
                .values()
                .map(|(id, _)| *id)
                .chain(state.peers6.values().map(|(_, id)| *id))
                .chain(state.peers_over6.values().map(|(_, id, _)| *id))
                .collect();
            state.kernel_mut()?.forget_traffic_except(&live);
        }
        self.refresh_local_endpoints()?;
        Ok(())
    }

    fn local_endpoints_changed(&self) -> anyhow::Result<()> {
        self.adopt_bridge()?;
        self.refresh_local_endpoints()?;
        Ok(())
    }

    /// The adopted bridge and how many local containers are on the fast delivery path.
    fn fast_path(&self) -> Option<super::FastPath> {
        let state = self.lock();
        Some(super::FastPath {
            bridge: state
                .bridge
                .as_ref()
                .filter(|b| b.link.is_some())
                .map(|b| b.name.clone()),
            local_endpoints: state.discovered.len(),
            local_endpoints6: state.discovered6.len(),
        })
    }

    fn set_local_subnet(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        let mut state = self.lock();
        state.opts.local_subnet = subnet;
        // Re-checked for the new gateway address by the next `adopt_bridge`.
        state.gateway_local = false;
        let config = config_of(&state.opts);
        state.kernel_mut()?.set_config(&config)?;
        // The preferred source of the peer routes follows the subnet.
        let src = state.pref_source();
        let mtu = state.opts.overlay_mtu;
        let routes = state.routes()?;
        for (peer_subnet, public_ip) in &state.peers {
            routes.add_peer(*peer_subnet, *public_ip, mtu, src)?;
        }
        if let Some(path) = self.socket_path() {
            let over6 = state.peers_over6_underlays();
            path.set_local_subnet(subnet, state.opts.network, &state.peers, over6);
        }
        Ok(())
    }

    fn set_overlay_mtu(&self, overlay_mtu: u16) -> anyhow::Result<()> {
        self.apply_overlay_mtu(overlay_mtu)
    }

    fn underlay_routes_changed(&self) -> anyhow::Result<()> {
        self.refresh_next_hops().map(|_| ())
    }

    fn upsert_peer(&self, subnet: Ipv4Net, underlay: IpAddr) -> anyhow::Result<()> {
        let public_ip = match underlay {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => return self.upsert_peer_over6(subnet, ip),
        };
        // Reached over IPv4 now: out of the IPv6-outer trie.
        self.remove_peer_over6(subnet)?;
        let mut state = self.lock();
        let subnet = subnet.trunc();
        let local = state.opts.local_subnet;
        if subnet.contains(&local.network()) || local.contains(&subnet.network()) {
            bail!(
                "peer subnet {subnet} overlaps our own subnet {}; not installing it",
                state.opts.local_subnet
            );
        }
        let key = Key::new(u32::from(subnet.prefix_len()), subnet.network().octets());
        let unchanged = state.peers.get(&subnet) == Some(&public_ip);
        let existing = state.peer_entries.get(&subnet).map(|&(id, _)| id);
        let (traffic_id, stale_id) = match existing {
            Some(id) if unchanged => (id, None),
            _ => {
                let id = state.next_traffic_id;
                state.next_traffic_id = id.wrapping_add(1).max(1);
                (id, existing)
            }
        };
        let value = PeerValue::new(public_ip.octets(), traffic_id);
        let kernel = state.kernel_mut()?;
        kernel
            .peers
            .insert(&key, value, 0)
            .with_context(|| format!("adding peer {subnet} -> {public_ip} to the BPF LPM trie"))?;
        if let Some(stale) = stale_id {
            let _ = kernel.peer_traffic.remove(&stale);
        }
        let previous = state.insert_peer(subnet, public_ip);
        if let Some(path) = self.socket_path() {
            path.upsert_peer(subnet, public_ip.into(), previous.map(IpAddr::from));
        }
        if !unchanged {
            state
                .peer_entries
                .insert(subnet, (traffic_id, std::time::SystemTime::now()));
        }
        state.sync_sender(public_ip)?;
        if let Some(old_ip) = previous.filter(|old| *old != public_ip) {
            state.sync_sender(old_ip)?;
        }
        if let Some(pending) = &mut state.pending_routes {
            pending.insert(subnet, public_ip);
            return Ok(());
        }
        let src = state.pref_source();
        let mtu = state.opts.overlay_mtu;
        state.routes()?.add_peer(subnet, public_ip, mtu, src)
    }

    fn begin_peer_batch(&self) {
        self.lock().pending_routes.get_or_insert_with(BTreeMap::new);
    }

    /// Adds the batch's routes with the requests pipelined (a resync of 65,536 peers was
    /// two netlink round trips per peer, one after the other). A route that fails is logged;
    /// the periodic route check restores it.
    fn end_peer_batch(&self) {
        let mut state = self.lock();
        let Some(pending) = state.pending_routes.take() else {
            return;
        };
        if pending.is_empty() {
            return;
        }
        let peers: Vec<(Ipv4Net, Ipv4Addr)> = pending.into_iter().collect();
        let (src, mtu) = (state.pref_source(), state.opts.overlay_mtu);
        let failures = match state.routes() {
            Ok(routes) => routes.add_peers(&peers, mtu, src),
            Err(e) => {
                tracing::error!("adding {} peer routes: {e:#}", peers.len());
                return;
            }
        };
        for (subnet, e) in failures.iter().take(5) {
            tracing::error!(%subnet, "adding the peer route failed: {e:#}");
        }
        if failures.len() > 5 {
            tracing::error!("... and {} more peer routes failed", failures.len() - 5);
        }
    }

    fn remove_peer(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        self.remove_peer_over4(subnet)?;
        self.remove_peer_over6(subnet)
    }

    fn set_local_subnet6(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        self.set_local_subnet6_impl(subnet)
    }

    fn upsert_peer6(&self, subnet: Ipv6Net, underlay: IpAddr) -> anyhow::Result<()> {
        self.upsert_peer6_impl(subnet, underlay)
    }

    fn remove_peer6(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        self.remove_peer6_impl(subnet)
    }

    fn counters(&self) -> CounterSnapshot {
        self.both_paths(Kernel::packet_counts, socket_path::SocketPath::packets)
    }

    fn byte_counters(&self) -> CounterSnapshot {
        self.both_paths(Kernel::byte_counts, socket_path::SocketPath::bytes)
    }

    fn peer_stats(&self) -> Vec<PeerStats> {
        self.peer_stats_of_all()
    }

    fn shutdown(&self) -> anyhow::Result<()> {
        self.stop_socket_path();
        let mut state = self.lock();
        // Unpinning and dropping the programs releases the TCX links: traffic stops here.
        if let Some(pins) = state.pins.take() {
            if let Err(e) = pins.remove() {
                tracing::warn!("{e:#}");
            }
        }
        drop(state.kernel.take());
        state.peers.clear();
        state.peers6.clear();
        state.peer6_changed.clear();
        state.peers_over6.clear();
        state.subnets_per_sender.clear();
        state.peer_entries.clear();
        state.discovered.clear();
        state.discovered6.clear();
        if let Some(routes) = state.routes.take() {
            routes
                .remove_stale()
                .context("removing rudder's routes at shutdown")?;
        }
        if let Err(e) = super::stack_rules::remove_nat_mark() {
            tracing::warn!("removing the NAT'd-flow mark rule at shutdown: {e:#}");
        }
        Ok(())
    }

    fn stop_keeping_state(&self) -> anyhow::Result<()> {
        self.stop_socket_path();
        let mut state = self.lock();
        if state.pins.is_none() {
            drop(state);
            tracing::warn!("BPF links are not pinned: removing the data plane at stop");
            return self.shutdown();
        }
        // The pinned links keep the programs attached and the maps alive; routes stay.
        drop(state.kernel.take());
        state.routes.take();
        tracing::info!("BPF programs, maps and routes left in place for the next start");
        Ok(())
    }
}

impl EbpfDataplane {
    /// Forgets an IPv4 peer subnet reached over IPv4 (absent: nothing to do).
    fn remove_peer_over4(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        let mut state = self.lock();
        let subnet = subnet.trunc();
        if let Some(pending) = &mut state.pending_routes {
            pending.remove(&subnet);
        }
        state.routes()?.remove_peer(subnet)?;
        let key = Key::new(u32::from(subnet.prefix_len()), subnet.network().octets());
        ignore_missing(state.kernel_mut()?.peers.remove(&key))
            .with_context(|| format!("removing peer {subnet} from the BPF LPM trie"))?;
        if let Some((traffic_id, _)) = state.peer_entries.remove(&subnet) {
            let _ = state.kernel_mut()?.peer_traffic.remove(&traffic_id);
        }
        if let Some(public_ip) = state.remove_peer_entry(subnet) {
            if let Some(path) = self.socket_path() {
                path.remove_peer(subnet, public_ip.into());
            }
            state.sync_sender(public_ip)?;
        }
        Ok(())
    }

    fn stop_socket_path(&self) {
        if let Some(path) = self
            .socket_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            path.stop();
        }
    }
}

fn validate(opts: &EbpfOptions) -> anyhow::Result<()> {
    if !opts.network.contains(&opts.local_subnet) {
        bail!(
            "local subnet {} is not inside the network {}",
            opts.local_subnet,
            opts.network
        );
    }
    if opts.overlay_mtu < 68 {
        bail!(
            "overlay MTU {} is below IPv4's minimum of 68",
            opts.overlay_mtu
        );
    }
    if opts.udp_port == 0 {
        bail!("UDP port 0 is not usable for the overlay");
    }
    if let Some(plane) = &opts.ipv6 {
        if !plane.network.contains(&plane.local_subnet) {
            bail!(
                "local IPv6 subnet {} is not inside the IPv6 network {}",
                plane.local_subnet,
                plane.network
            );
        }
    }
    Ok(())
}

fn config_of(opts: &EbpfOptions) -> DataplaneConfig {
    DataplaneConfig {
        local_subnet: opts.local_subnet.network().octets(),
        local_prefix_len: u32::from(opts.local_subnet.prefix_len()),
        network: opts.network.network().octets(),
        network_prefix_len: u32::from(opts.network.prefix_len()),
        local_ip: opts.local_ip.octets(),
        udp_port: opts.udp_port,
        overlay_mtu: opts.overlay_mtu,
        underlay_ifindex: opts.underlay_ifindex,
    }
}
