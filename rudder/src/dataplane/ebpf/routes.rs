//! Peer routes over rtnetlink: one route per peer subnet, the network's unreachable
//! route, and finding and removing the routes a crashed daemon left.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::route::{RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteType},
    RouteMessageBuilder,
};

/// Route protocol number marking the routes this data plane owns (`ip route show proto 211`).
pub const RTPROT_RUDDER: u8 = 211;

/// Route requests pipelined at once by [`Routes::add_peers`].
const ROUTES_IN_FLIGHT: usize = 64;

/// Route changes over rtnetlink. rtnetlink is async; the daemon calls us from sync code
/// that may itself run inside tokio, so requests run on a private current-thread runtime,
/// driven from the calling thread (under `block_in_place` on a multi-thread runtime; a
/// helper thread only on a current-thread runtime, which cannot block inside itself).
pub(super) struct Routes {
    runtime: Option<tokio::runtime::Runtime>,
    pub(super) handle: rtnetlink::Handle,
    pub(super) underlay_ifindex: u32,
    /// IPv4 route writes completed: a check that dumps without the data plane's lock
    /// compares it before and after to know whether its dump can be trusted.
    writes: std::sync::atomic::AtomicU64,
}

impl Routes {
    /// Opens the netlink socket in the calling thread's network namespace.
    pub(super) fn connect(underlay_ifindex: u32) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("creating the netlink runtime")?;
        let handle = {
            let _entered = runtime.enter();
            let (connection, handle, _) =
                rtnetlink::new_connection().context("opening a route netlink socket")?;
            runtime.spawn(connection);
            handle
        };
        Ok(Routes {
            runtime: Some(runtime),
            handle,
            underlay_ifindex,
            writes: Default::default(),
        })
    }

    /// IPv4 route writes completed so far (successful or not).
    pub(super) fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counted once the request is answered: a dump that began after it sees its effect.
    fn wrote<T>(&self, result: T) -> T {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        result
    }

    pub(super) fn run<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let runtime = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as Routes");
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            // A thread per request cost two thread spawns per peer route: lend this one.
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| runtime.block_on(future))
            }
            Err(_) => runtime.block_on(future),
            // A current-thread runtime cannot lend its only thread.
            Ok(_) => std::thread::scope(|scope| {
                scope
                    .spawn(|| runtime.block_on(future))
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            }),
        }
    }

    /// Installs (or replaces) the route of one peer subnet.
    pub(super) fn add_peer(
        &self,
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        overlay_mtu: u16,
        pref_source: Option<Ipv4Addr>,
    ) -> anyhow::Result<()> {
        self.wrote(self.run(self.add_peer_async(subnet, public_ip, overlay_mtu, pref_source)))
    }

    /// [`Self::add_peer`] for many peers with up to [`ROUTES_IN_FLIGHT`] requests in flight:
    /// n routes cost the kernel's work, not n round trips. The failures, per subnet.
    pub(super) fn add_peers(
        &self,
        peers: &[(Ipv4Net, Ipv4Addr)],
        overlay_mtu: u16,
        pref_source: Option<Ipv4Addr>,
    ) -> Vec<(Ipv4Net, anyhow::Error)> {
        use futures::StreamExt as _;
        if peers.is_empty() {
            return Vec::new();
        }
        self.wrote(
            self.run(
                futures::stream::iter(peers)
                    .map(|&(subnet, ip)| async move {
                        (
                            subnet,
                            self.add_peer_async(subnet, ip, overlay_mtu, pref_source)
                                .await,
                        )
                    })
                    .buffer_unordered(ROUTES_IN_FLIGHT)
                    .filter_map(|(subnet, result)| async move { result.err().map(|e| (subnet, e)) })
                    .collect(),
            ),
        )
    }

    async fn add_peer_async(
        &self,
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        overlay_mtu: u16,
        pref_source: Option<Ipv4Addr>,
    ) -> anyhow::Result<()> {
        let next_hop = self.next_hop_async(public_ip).await;
        let build = |src: Option<Ipv4Addr>| {
            let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(subnet.network(), subnet.prefix_len())
                .gateway(next_hop)
                .output_interface(self.underlay_ifindex)
                .protocol(RouteProtocol::Other(RTPROT_RUDDER))
                .onlink();
            if let Some(src) = src {
                builder = builder.pref_source(src);
            }
            let mut message = builder.build();
            message
                .attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(u32::from(
                    overlay_mtu,
                ))]));
            message
        };
        let result = self
            .handle
            .route()
            .add(build(pref_source))
            .replace()
            .execute()
            .await;
        let result = match result {
            // The gateway address is not on the bridge (yet): route without it.
            Err(_) if pref_source.is_some() => {
                tracing::warn!(%subnet, src = ?pref_source, "preferred source not configured locally; peer route added without it");
                self.handle
                    .route()
                    .add(build(None))
                    .replace()
                    .execute()
                    .await
            }
            other => other,
        };
        result.with_context(|| {
            format!("adding route {subnet} via {next_hop} (peer {public_ip}) dev ifindex {} mtu {overlay_mtu}", self.underlay_ifindex)
        })
    }

    /// The underlay gateway towards each of `ips` if the kernel routes it through one, else
    /// the address itself (same link), up to [`ROUTES_IN_FLIGHT`] lookups in flight.
    pub(super) fn next_hops(
        &self,
        ips: impl IntoIterator<Item = Ipv4Addr>,
    ) -> std::collections::HashMap<Ipv4Addr, Ipv4Addr> {
        use futures::StreamExt as _;
        let ips: std::collections::BTreeSet<Ipv4Addr> = ips.into_iter().collect();
        self.run(
            futures::stream::iter(ips)
                .map(|ip| async move { (ip, self.next_hop_async(ip).await) })
                .buffer_unordered(ROUTES_IN_FLIGHT)
                .collect(),
        )
    }

    /// One `ip route get <public_ip>`: its gateway, or `public_ip` itself.
    async fn next_hop_async(&self, public_ip: Ipv4Addr) -> Ipv4Addr {
        let query = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(public_ip, 32)
            .build();
        let mut stream = self.handle.route().get(query).execute();
        stream
            .try_next()
            .await
            .ok()
            .flatten()
            .and_then(|route| {
                route.attributes.iter().find_map(|attr| match attr {
                    RouteAttribute::Gateway(
                        rtnetlink::packet_route::route::RouteAddress::Inet(gw),
                    ) => Some(*gw),
                    _ => None,
                })
            })
            .unwrap_or(public_ip)
    }

    pub(super) fn remove_peer(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(subnet.network(), subnet.prefix_len())
            .protocol(RouteProtocol::Other(RTPROT_RUDDER))
            .build();
        self.delete_route(message)
            .with_context(|| format!("removing route {subnet}"))
    }

    /// Deletes the route `message` names; one already gone is no error.
    pub(super) fn delete_route(&self, message: RouteMessage) -> Result<(), rtnetlink::Error> {
        match self.wrote(self.run(self.handle.route().del(message).execute())) {
            Err(e) if is_no_such_route(&e) => Ok(()),
            other => other,
        }
    }

    pub(super) fn add_unreachable(&self, network: Ipv4Net) -> anyhow::Result<()> {
        let mut message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network.network(), network.prefix_len())
            .protocol(RouteProtocol::Other(RTPROT_RUDDER))
            .kind(RouteType::Unreachable)
            .build();
        message.header.scope = rtnetlink::packet_route::route::RouteScope::Universe;
        Ok(self.wrote(self.run(self.handle.route().add(message).replace().execute()))?)
    }

    /// Every IPv4 route with our protocol number, reduced to what the checks need while the
    /// dump streams in (65,536 full route messages would be tens of MB).
    fn ours(&self) -> anyhow::Result<Vec<OurRoute>> {
        let dump = RouteMessageBuilder::<Ipv4Addr>::new().build();
        self.run(async {
            let mut stream = self.handle.route().get(dump).execute();
            let mut ours = Vec::new();
            while let Some(route) = stream.try_next().await? {
                if route.header.protocol == RouteProtocol::Other(RTPROT_RUDDER) {
                    ours.extend(OurRoute::of(&route));
                }
            }
            Ok::<_, rtnetlink::Error>(ours)
        })
        .context("listing IPv4 routes")
    }

    /// Destinations of our routes that are present now.
    pub(super) fn installed_destinations(
        &self,
    ) -> anyhow::Result<std::collections::BTreeSet<Ipv4Net>> {
        Ok(self.ours()?.iter().map(|r| r.destination).collect())
    }

    /// The next hop (gateway) of each of our peer routes present now.
    pub(super) fn installed_next_hops(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<Ipv4Net, Ipv4Addr>> {
        Ok(self
            .ours()?
            .iter()
            .filter_map(|r| Some((r.destination, r.gateway?)))
            .collect())
    }

    /// Deletes every route (IPv4 and IPv6) with our protocol number; returns how many.
    pub(super) fn remove_stale(&self) -> anyhow::Result<usize> {
        let ours = self.ours()?;
        let count = ours.len() + self.remove_stale6()?;
        for route in ours {
            let mut message = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(route.destination.network(), route.destination.prefix_len())
                .protocol(RouteProtocol::Other(RTPROT_RUDDER))
                .kind(route.kind)
                .build();
            message.header.scope = route.scope;
            self.delete_route(message)
                .with_context(|| format!("removing stale route {}", route.destination))?;
        }
        Ok(count)
    }
}

/// What the checks keep of one of our routes.
struct OurRoute {
    destination: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    kind: RouteType,
    scope: rtnetlink::packet_route::route::RouteScope,
}

impl OurRoute {
    fn of(route: &RouteMessage) -> Option<Self> {
        use rtnetlink::packet_route::route::RouteAddress;
        let mut destination = None;
        let mut gateway = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(addr)) => {
                    destination = Ipv4Net::new(*addr, route.header.destination_prefix_length).ok()
                }
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => gateway = Some(*gw),
                _ => {}
            }
        }
        Some(OurRoute {
            destination: destination?,
            gateway,
            kind: route.header.kind,
            scope: route.header.scope,
        })
    }
}

impl Drop for Routes {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; this never blocks.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn is_no_such_route(error: &rtnetlink::Error) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(msg)
        if msg.code.map(|c| c.get()) == Some(-libc::ESRCH))
}
