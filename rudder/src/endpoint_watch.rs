//! Follows the host's local containers for the eBPF fast paths: links (a bridge or veth
//! appearing, moving, going), IPv4 addresses (the gateway address landing on a bridge),
//! neighbours (a container's IPv4 or IPv6 entry; AF_BRIDGE FDB entries come in the same
//! group) and /32 (/128) routes into the overlay (CNI ptp style veths). One rtnetlink multicast subscription;
//! events flow one way: [`watch`] → [`follow_host_state`] (a daemon task) → data plane,
//! which then re-reads the local endpoints at once instead of at its next periodic resync.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

use crate::dataplane::ebpf::{usable_neighbour_state, RTPROT_RUDDER};
use crate::dataplane::Dataplane;

/// A burst of messages (a veth pair made, moved, addressed, brought up) becomes one refresh.
const SETTLE: Duration = Duration::from_millis(5);
/// Before re-subscribing after the subscription failed or ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// The safety net: everything (bridge, endpoints, lost routes) is re-read this often.
pub const RESYNC_EVERY: Duration = Duration::from_secs(2);

/// The overlay networks whose neighbours and host routes can be local containers.
#[derive(Clone, Copy, Debug)]
pub struct Networks {
    pub v4: Ipv4Net,
    /// `None` while the network has no IPv6.
    pub v6: Option<Ipv6Net>,
}

impl Networks {
    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.v4.contains(&ip),
            IpAddr::V6(ip) => self.v6.is_some_and(|net| net.contains(&ip)),
        }
    }
}

/// Watches the host for changes to its local containers (the underlay's own interface
/// `underlay` excluded; neighbours and routes only inside `network`) until the receiver is
/// dropped. A message on the channel means "re-read the local endpoints"; one pending is
/// enough, so the channel holds one. A (re)subscription or lost events send one too.
pub fn watch(underlay: u32, network: Networks) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            if let Err(e) = subscription(underlay, network, &tx).await {
                tracing::warn!("endpoint watch: {e:#}; re-subscribing in {RESUBSCRIBE_AFTER:?}");
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    });
    rx
}

async fn subscription(
    underlay: u32,
    network: Networks,
    tx: &mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let (mut connection, _, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    crate::route_event_filter::drop_own_route_events(&mut connection)?;
    let driver = tokio::spawn(connection);
    let _stop_driver = AbortOnDrop(driver);
    // Subscribed first, then re-read: a change from before is seen by that read.
    let _ = tx.try_send(());
    let mut filter = Filter {
        underlay,
        network,
        neighbours: HashMap::new(),
    };
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = sleep_until(due) => {
                due = None;
                // Full: a refresh is pending already.
                let _ = tx.try_send(());
                continue;
            }
            // The daemon stopped following: so do we.
            _ = tx.closed() => return Ok(()),
        };
        let Some((message, _)) = next else {
            anyhow::bail!("the netlink subscription ended");
        };
        let relevant = match message.payload {
            NetlinkPayload::InnerMessage(message) => filter.relevant(&message),
            // Events were lost: what the filter knows is stale, and a full re-read is due.
            NetlinkPayload::Overrun(_) => {
                tracing::warn!("endpoint watch: netlink events lost (buffer full); re-reading");
                filter.neighbours.clear();
                true
            }
            _ => false,
        };
        if relevant {
            due.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
        }
    }
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Decides which messages can change the local endpoints.
struct Filter {
    underlay: u32,
    network: Networks,
    /// Neighbours in the networks as last seen: (ifindex, IP) → (MAC, usable). A
    /// container's entry cycles reachable → stale → delay → reachable under traffic; only a
    /// change of MAC or usability matters.
    neighbours: HashMap<(u32, IpAddr), NeighbourSeen>,
}

/// A neighbour entry's MAC and whether its state is usable.
type NeighbourSeen = (Option<Vec<u8>>, bool);

impl Filter {
    fn relevant(&mut self, message: &RouteNetlinkMessage) -> bool {
        match message {
            RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link) => {
                link.header.index != self.underlay
            }
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                address_of(a).is_some_and(|ip| self.network.v4.contains(&ip))
            }
            RouteNetlinkMessage::NewNeighbour(n) => self.neighbour(n, true),
            RouteNetlinkMessage::DelNeighbour(n) => self.neighbour(n, false),
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                r.header.protocol != RouteProtocol::Other(RTPROT_RUDDER)
                    && r.attributes.iter().any(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                            r.header.destination_prefix_length == 32
                                && self.network.contains(IpAddr::V4(*ip))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                            r.header.destination_prefix_length == 128
                                && self.network.contains(IpAddr::V6(*ip))
                        }
                        _ => false,
                    })
            }
            _ => false,
        }
    }

    fn neighbour(&mut self, n: &NeighbourMessage, present: bool) -> bool {
        if n.header.ifindex == self.underlay {
            return false;
        }
        match n.header.family {
            // FDB: which bridge port a MAC sits behind; only entries on a bridge's ports.
            AddressFamily::Bridge => n
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Controller(_))),
            AddressFamily::Inet | AddressFamily::Inet6 => {
                let Some(ip) = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        Some(IpAddr::V4(*ip))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        Some(IpAddr::V6(*ip))
                    }
                    _ => None,
                }) else {
                    return false;
                };
                if !self.network.contains(ip) {
                    return false;
                }
                let key = (n.header.ifindex, ip);
                if !present {
                    self.neighbours.remove(&key);
                    return true;
                }
                let mac = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.clone()),
                    _ => None,
                });
                let seen = (mac, usable_neighbour_state(n.header.state));
                self.neighbours.insert(key, seen.clone()) != Some(seen)
            }
            _ => false,
        }
    }
}

fn address_of(message: &AddressMessage) -> Option<std::net::Ipv4Addr> {
    message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
            Some(*ip)
        }
        _ => None,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the data plane's view of the host current: on every event from `events` the local
/// endpoints (and the bridge) are re-read at once, and every [`RESYNC_EVERY`] everything
/// is (`Dataplane::refresh_host_state`), events or not. `events` is `None` for a data
/// plane without fast paths (only the periodic resync runs).
pub async fn follow_host_state(dp: Arc<dyn Dataplane>, mut events: Option<mpsc::Receiver<()>>) {
    let mut tick = tokio::time::interval(RESYNC_EVERY);
    // After a slow refresh, the next resync comes a period later, not in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let full = tokio::select! {
            _ = tick.tick() => true,
            Some(()) = recv(&mut events) => false,
        };
        let dp = dp.clone();
        let result = tokio::task::spawn_blocking(move || {
            if full {
                dp.refresh_host_state()
            } else {
                dp.local_endpoints_changed()
            }
        })
        .await;
        match result {
            Ok(Ok(())) => failing = false,
            // Log the first failure of a run of failures, not every one.
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!("refreshing the data plane's host state failed: {e:#}");
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::error!("data plane refresh panicked: {e}"),
        }
    }
}

/// The next event; never, without a watch (or once it ended).
async fn recv(events: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match events {
        Some(rx) => match rx.recv().await {
            Some(()) => Some(()),
            None => {
                *events = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::LinkMessage;
    use rtnetlink::packet_route::neighbour::NeighbourState;

    fn filter() -> Filter {
        Filter {
            underlay: 2,
            network: Networks {
                v4: "10.5.0.0/16".parse().unwrap(),
                v6: Some("fc00::/48".parse().unwrap()),
            },
            neighbours: HashMap::new(),
        }
    }

    fn neighbour(
        ifindex: u32,
        ip: impl Into<IpAddr>,
        state: NeighbourState,
    ) -> RouteNetlinkMessage {
        let ip = ip.into();
        let mut n = NeighbourMessage::default();
        n.header.ifindex = ifindex;
        n.header.state = state;
        let (family, address) = match ip {
            IpAddr::V4(ip) => (AddressFamily::Inet, NeighbourAddress::Inet(ip)),
            IpAddr::V6(ip) => (AddressFamily::Inet6, NeighbourAddress::Inet6(ip)),
        };
        n.header.family = family;
        n.attributes.push(NeighbourAttribute::Destination(address));
        n.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]));
        RouteNetlinkMessage::NewNeighbour(n)
    }

    #[test]
    fn a_container_neighbour_counts_once_until_its_usability_changes() {
        let mut f = filter();
        let ip = std::net::Ipv4Addr::new(10, 5, 1, 2);
        assert!(f.relevant(&neighbour(7, ip, NeighbourState::Reachable)));
        // Reachable → stale → reachable: the same container.
        assert!(!f.relevant(&neighbour(7, ip, NeighbourState::Stale)));
        assert!(!f.relevant(&neighbour(7, ip, NeighbourState::Reachable)));
        assert!(f.relevant(&neighbour(7, ip, NeighbourState::Failed)));
        // Outside the network, or on the underlay: not a container.
        assert!(!f.relevant(&neighbour(
            7,
            std::net::Ipv4Addr::new(192, 168, 1, 1),
            NeighbourState::Reachable
        )));
        assert!(!f.relevant(&neighbour(
            2,
            std::net::Ipv4Addr::new(10, 5, 9, 9),
            NeighbourState::Reachable
        )));
    }

    #[test]
    fn ipv6_container_neighbours_and_host_routes_in_the_ipv6_network_count() {
        use rtnetlink::packet_route::route::RouteMessage;
        let mut f = filter();
        let ip: std::net::Ipv6Addr = "fc00:0:0:3::2".parse().unwrap();
        assert!(f.relevant(&neighbour(7, ip, NeighbourState::Reachable)));
        assert!(!f.relevant(&neighbour(7, ip, NeighbourState::Stale)));
        // The underlay's own IPv6 neighbours are not containers.
        let underlay_ip: std::net::Ipv6Addr = "fd00:77::11".parse().unwrap();
        assert!(!f.relevant(&neighbour(7, underlay_ip, NeighbourState::Reachable)));
        let route = |len: u8, dst: std::net::Ipv6Addr| {
            let mut r = RouteMessage::default();
            r.header.destination_prefix_length = len;
            r.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet6(dst)));
            RouteNetlinkMessage::NewRoute(r)
        };
        assert!(f.relevant(&route(128, ip)));
        assert!(!f.relevant(&route(64, ip)));
        assert!(!f.relevant(&route(128, underlay_ip)));
        // Without IPv6 in the network, none of them matter.
        f.network.v6 = None;
        assert!(!f.relevant(&route(128, ip)));
        assert!(!f.relevant(&neighbour(8, ip, NeighbourState::Reachable)));
    }

    #[test]
    fn links_but_the_underlay_and_bridge_port_fdb_entries_count() {
        let mut f = filter();
        let mut link = LinkMessage::default();
        link.header.index = 9;
        assert!(f.relevant(&RouteNetlinkMessage::NewLink(link.clone())));
        link.header.index = 2;
        assert!(!f.relevant(&RouteNetlinkMessage::NewLink(link)));

        let mut fdb = NeighbourMessage::default();
        fdb.header.family = AddressFamily::Bridge;
        fdb.header.ifindex = 9;
        assert!(!f.relevant(&RouteNetlinkMessage::NewNeighbour(fdb.clone())));
        fdb.attributes.push(NeighbourAttribute::Controller(5));
        assert!(f.relevant(&RouteNetlinkMessage::NewNeighbour(fdb)));
    }
}
