//! Follows the underlay while running: its MTU (link messages) and the host's IPv4 routes
//! and neighbours (the eBPF peer routes' next hops). One rtnetlink multicast subscription;
//! events flow one way: [`watch`] → [`UnderlayFollower`] (a daemon task) → data plane,
//! subnet file, bridge, status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use tokio::sync::mpsc;

use crate::dataplane::ebpf::RTPROT_RUDDER;
use crate::dataplane::Dataplane;
use crate::host::Netlink;
use crate::local_setup::LocalSetup;
use crate::status::State;
use crate::underlay::{overlay_mtu_over, OuterFamily};

/// What changed on the host that the data plane derives something from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderlayEvent {
    /// The underlay link's MTU is now this.
    Mtu(u32),
    /// IPv4 routes (not ours) or the underlay's neighbours changed.
    Routes,
}

/// IPv4's minimum MTU.
const MIN_OVERLAY_MTU: u16 = 68;

/// Bursts of route messages (a link going down flushes many) become one event.
const ROUTE_SETTLE: Duration = Duration::from_millis(100);
/// Before re-subscribing after the subscription failed or ended.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Watches the underlay (interface `index`, started with MTU `mtu`) until the receiver is
/// dropped. A (re)subscription re-reads the MTU and reports a route change, so nothing
/// missed in between is lost.
pub fn watch(index: u32, mtu: u32) -> mpsc::Receiver<UnderlayEvent> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut known_mtu = mtu;
        loop {
            if let Err(e) = subscription(index, &mut known_mtu, &tx).await {
                tracing::warn!("underlay watch: {e:#}; re-subscribing in {RESUBSCRIBE_AFTER:?}");
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
    index: u32,
    known_mtu: &mut u32,
    tx: &mpsc::Sender<UnderlayEvent>,
) -> anyhow::Result<()> {
    let (mut connection, _, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Neigh,
    ])?;
    crate::route_event_filter::drop_own_route_events(&mut connection)?;
    let driver = tokio::spawn(connection);
    let _stop_driver = AbortOnDrop(driver);
    // Subscribed first, then read: a change from before is seen here, one after as an event.
    let netlink = Netlink::new()?;
    resync(&netlink, index, known_mtu, tx).await?;
    // When the pending route event is due: a fixed time after the first change, however
    // many unrelated messages arrive meanwhile.
    let mut routes_due: Option<tokio::time::Instant> = None;
    loop {
        let next = match routes_due {
            Some(due) => tokio::select! {
                next = messages.next() => next,
                _ = tokio::time::sleep_until(due) => {
                    routes_due = None;
                    // Full: a route event is queued already.
                    let _ = tx.try_send(UnderlayEvent::Routes);
                    continue;
                }
            },
            None => messages.next().await,
        };
        let Some((message, _)) = next else {
            anyhow::bail!("the netlink subscription ended");
        };
        let message = match message.payload {
            NetlinkPayload::InnerMessage(message) => message,
            // The socket's buffer overflowed and events were lost: read the state again.
            NetlinkPayload::Overrun(_) => {
                tracing::warn!("underlay watch: netlink events lost (buffer full); re-reading");
                resync(&netlink, index, known_mtu, tx).await?;
                continue;
            }
            _ => continue,
        };
        if let Some(event) = classify(index, &message) {
            if let UnderlayEvent::Mtu(mtu) = event {
                report_mtu(known_mtu, mtu, tx).await;
            }
            // Link changes (down/up) also flush or restore routes through it.
            routes_due.get_or_insert_with(|| tokio::time::Instant::now() + ROUTE_SETTLE);
        }
    }
}

/// Reads the underlay's MTU and reports a route change: for what happened unseen.
async fn resync(
    netlink: &Netlink,
    index: u32,
    known_mtu: &mut u32,
    tx: &mpsc::Sender<UnderlayEvent>,
) -> anyhow::Result<()> {
    let link = netlink.link_by_index(index).await?;
    report_mtu(known_mtu, link.mtu, tx).await;
    // Full: a route event is queued already.
    let _ = tx.try_send(UnderlayEvent::Routes);
    Ok(())
}

async fn report_mtu(known: &mut u32, mtu: u32, tx: &mpsc::Sender<UnderlayEvent>) {
    if *known != mtu {
        *known = mtu;
        let _ = tx.send(UnderlayEvent::Mtu(mtu)).await;
    }
}

/// What one netlink message means for us, if anything.
fn classify(underlay: u32, message: &RouteNetlinkMessage) -> Option<UnderlayEvent> {
    match message {
        RouteNetlinkMessage::NewLink(link) if link.header.index == underlay => {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(UnderlayEvent::Mtu(*mtu)),
                _ => None,
            })
        }
        // Our own peer routes would make every change of ours an event.
        RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route)
            if route.header.protocol != RouteProtocol::Other(RTPROT_RUDDER) =>
        {
            Some(UnderlayEvent::Routes)
        }
        // A next hop that stopped answering, or whose entry was removed.
        RouteNetlinkMessage::DelNeighbour(n) if n.header.ifindex == underlay => {
            Some(UnderlayEvent::Routes)
        }
        RouteNetlinkMessage::NewNeighbour(n)
            if n.header.ifindex == underlay && n.header.state == NeighbourState::Failed =>
        {
            Some(UnderlayEvent::Routes)
        }
        _ => None,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Applies underlay events in a task of its own: an etcd outage (which a gateway change can
/// cause) must not hold up the fix.
pub(crate) struct UnderlayFollower {
    pub(crate) name: String,
    pub(crate) mtu: u32,
    /// The largest outer header this host sends (IPv6 when it has a PublicIPv6).
    pub(crate) outer: OuterFamily,
    /// The overlay carries IPv6: it needs 1280 bytes.
    pub(crate) carries_ipv6: bool,
    pub(crate) dataplane: Arc<dyn Dataplane>,
    pub(crate) state: State,
}

impl UnderlayFollower {
    pub(crate) async fn run(
        mut self,
        mut events: mpsc::Receiver<UnderlayEvent>,
        local: LocalSetup,
    ) {
        while let Some(event) = events.recv().await {
            self.apply(event, &local).await;
        }
    }

    async fn apply(&mut self, event: UnderlayEvent, local: &LocalSetup) {
        tracing::debug!(?event, "underlay event");
        match event {
            UnderlayEvent::Mtu(mtu) if mtu != self.mtu => self.mtu_changed(mtu, local).await,
            UnderlayEvent::Mtu(_) => {}
            UnderlayEvent::Routes => {
                if let Err(e) = self.dataplane.underlay_routes_changed() {
                    tracing::warn!("re-resolving the peer routes' next hops failed: {e:#}");
                }
            }
        }
    }

    async fn mtu_changed(&mut self, mtu: u32, local: &LocalSetup) {
        let overlay = overlay_mtu_over(mtu, self.outer);
        let old = std::mem::replace(&mut self.mtu, mtu);
        if overlay < MIN_OVERLAY_MTU {
            tracing::error!(
                "underlay {} MTU {old} → {mtu}: an overlay MTU of {overlay} is below IPv4's \
                 minimum of {MIN_OVERLAY_MTU}; keeping the previous one",
                self.name
            );
            return;
        }
        if self.carries_ipv6 {
            if let Err(e) = crate::underlay::ipv6_overlay_mtu(&self.name, mtu, self.outer) {
                tracing::error!("{e:#}; keeping the previous overlay MTU");
                return;
            }
        }
        tracing::info!(
            "underlay {} MTU {old} → {mtu}: overlay MTU {overlay}",
            self.name
        );
        if let Err(e) = self.dataplane.set_overlay_mtu(overlay) {
            tracing::error!("the data plane could not take the new overlay MTU {overlay}: {e:#}");
            return;
        }
        if let Err(e) = local.set_overlay_mtu(overlay).await {
            tracing::error!("applying the new overlay MTU {overlay} locally failed: {e:#}");
        }
        self.state.update(|s| s.mtu = Some(overlay));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::LinkMessage;
    use rtnetlink::packet_route::route::RouteMessage;

    #[test]
    fn only_the_underlays_mtu_and_foreign_routes_are_events() {
        let mut link = LinkMessage::default();
        link.header.index = 2;
        link.attributes.push(LinkAttribute::Mtu(1400));
        assert_eq!(
            classify(2, &RouteNetlinkMessage::NewLink(link.clone())),
            Some(UnderlayEvent::Mtu(1400))
        );
        assert_eq!(classify(3, &RouteNetlinkMessage::NewLink(link)), None);

        let mut route = RouteMessage::default();
        route.header.protocol = RouteProtocol::Boot;
        assert_eq!(
            classify(2, &RouteNetlinkMessage::NewRoute(route.clone())),
            Some(UnderlayEvent::Routes)
        );
        route.header.protocol = RouteProtocol::Other(RTPROT_RUDDER);
        assert_eq!(classify(2, &RouteNetlinkMessage::NewRoute(route)), None);
    }
}
