//! Putting back the peer routes the kernel or an operator removed, and saying why they
//! went: the kernel deletes a link's routes when the link goes down, and the routes whose
//! preferred source is an address that is removed (re-addressing the bridge that holds the
//! gateway address does that). Both leave a trace the daemon compares between checks: the
//! underlay's carrier-down count and the gateway address's creation stamp.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;

use super::routes::Routes;
use super::EbpfDataplane;
use crate::subnet::gateway;

/// What the kernel deletes routes for, as seen at one check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct RouteEvents {
    /// `IFLA_CARRIER_DOWN_COUNT` of the underlay link.
    pub(super) carrier_downs: Option<u32>,
    /// Creation stamp (`IFA_CACHEINFO` cstamp) of the gateway address; `None` while no
    /// interface holds it. A removed and re-added address gets a new stamp.
    pub(super) gateway_created: Option<u32>,
}

impl Routes {
    /// The underlay's carrier-down count and the creation stamp of `gateway`, now.
    pub(super) fn route_events(
        &self,
        underlay_ifindex: u32,
        gateway: Ipv4Addr,
    ) -> anyhow::Result<RouteEvents> {
        use rtnetlink::packet_route::{address::AddressAttribute, link::LinkAttribute};
        self.run(async {
            let mut links = self
                .handle
                .link()
                .get()
                .match_index(underlay_ifindex)
                .execute();
            let carrier_downs = links.try_next().await?.and_then(|link| {
                link.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::CarrierDownCount(n) => Some(n),
                    _ => None,
                })
            });
            let mut gateway_created = None;
            let mut dump = self.handle.address().get().execute();
            while let Some(msg) = dump.try_next().await? {
                let holds = msg.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Local(std::net::IpAddr::V4(ip)) if *ip == gateway)
                });
                if holds {
                    gateway_created = msg.attributes.iter().find_map(|a| match a {
                        AddressAttribute::CacheInfo(info) => Some(info.cstamp),
                        _ => None,
                    });
                }
            }
            Ok::<_, rtnetlink::Error>(RouteEvents {
                carrier_downs,
                gateway_created,
            })
        })
        .context("reading the underlay link's and the gateway address's state")
    }
}

/// Why routes went missing between the check that saw `before` and the one that sees
/// `now`, in words for the log.
pub(super) fn route_loss_cause(
    before: Option<RouteEvents>,
    now: RouteEvents,
    underlay: &str,
    gateway: Ipv4Addr,
    bridge: Option<&str>,
) -> String {
    let Some(before) = before else {
        return "removed before the first check (cause not known)".into();
    };
    let mut causes = Vec::new();
    if now.carrier_downs > before.carrier_downs {
        causes.push(format!(
            "the underlay link {underlay} went down (the kernel deletes a link's routes)"
        ));
    }
    if now.gateway_created != before.gateway_created && before.gateway_created.is_some() {
        let on = bridge.map(|b| format!(" on {b}")).unwrap_or_default();
        let again = if now.gateway_created.is_some() {
            " and added again (the bridge was re-addressed)"
        } else {
            ""
        };
        causes.push(format!(
            "the gateway address {gateway}{on} was removed{again}; the kernel deletes the \
             routes it was the source of"
        ));
    }
    if causes.is_empty() {
        return format!(
            "removed by something else: {underlay} stayed up and {gateway} stayed in place \
             (`ip route del`?)"
        );
    }
    causes.join(", and ")
}

/// Up to four subnets, then how many more.
fn list_subnets(subnets: &[Ipv4Net]) -> String {
    let mut text = subnets
        .iter()
        .take(4)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if subnets.len() > 4 {
        text.push_str(&format!(" and {} more", subnets.len() - 4));
    }
    text
}

impl EbpfDataplane {
    /// Puts back routes the kernel or an operator removed behind our back, and logs what
    /// removed them: without them the peers would stay unreachable until the peer set
    /// changed.
    pub(super) fn restore_lost_routes(&self) -> anyhow::Result<usize> {
        // The dumps run without the lock: at 65,536 peers they take a few hundred ms, and
        // every peer change waited for them.
        let ((routes, reader), gateway, underlay_ifindex) = {
            let state = self.lock();
            let gateway = gateway(state.opts.local_subnet);
            (
                state.routes_for_check()?,
                gateway,
                state.opts.underlay_ifindex,
            )
        };
        let writes = routes.writes();
        let now = reader.route_events(underlay_ifindex, gateway)?;
        let present = reader.installed_destinations()?;
        let mut state = self.lock();
        if routes.writes() != writes || gateway != crate::subnet::gateway(state.opts.local_subnet) {
            // Routes were written meanwhile: the dump may miss them. The next check decides.
            return Ok(0);
        }
        // Recorded only once the routes are back: a check that fails (the link still down)
        // must not hide the change from the next one.
        let before = state.route_events;
        let mut unreachable_restored = false;
        if state.opts.carries_ipv4() && !present.contains(&state.opts.network) {
            routes.add_unreachable(state.opts.network)?;
            unreachable_restored = true;
        }
        let src = state.pref_source();
        let mut peers_restored = Vec::new();
        let pending = state.pending_routes.as_ref();
        for (subnet, public_ip) in &state.peers {
            // A batch's routes are added at its end: not lost.
            if !present.contains(subnet) && !pending.is_some_and(|p| p.contains_key(subnet)) {
                routes.add_peer(*subnet, *public_ip, state.opts.overlay_mtu, src)?;
                peers_restored.push(*subnet);
            }
        }
        let restored = peers_restored.len() + usize::from(unreachable_restored);
        if restored > 0 {
            let underlay = &state.opts.underlay_ifname;
            let bridge = state.bridge.as_ref().map(|b| b.name.as_str());
            let cause = route_loss_cause(before, now, underlay, gateway, bridge);
            let src = src.map(|s| format!(" src {s}")).unwrap_or_default();
            let unreachable = if unreachable_restored {
                format!(" and `unreachable {}`", state.opts.network)
            } else {
                String::new()
            };
            tracing::warn!(
                restored,
                "data plane routes were removed: {cause}; re-added {} peer route(s) via \
                 {underlay}{src} ({}){unreachable}",
                peers_restored.len(),
                list_subnets(&peers_restored),
            );
        }
        state.route_events = Some(now);
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 5, 7, 1);

    fn events(carrier_downs: u32, gateway_created: Option<u32>) -> RouteEvents {
        RouteEvents {
            carrier_downs: Some(carrier_downs),
            gateway_created,
        }
    }

    #[test]
    fn the_cause_names_what_changed_between_checks() {
        let cause = |before, now| route_loss_cause(Some(before), now, "eth0", GW, Some("rbr0"));
        let readdressed = cause(events(1, Some(100)), events(1, Some(250)));
        assert_eq!(
            readdressed,
            "the gateway address 10.5.7.1 on rbr0 was removed and added again (the bridge was \
             re-addressed); the kernel deletes the routes it was the source of"
        );
        assert!(cause(events(1, Some(100)), events(1, None)).contains("was removed; the kernel"));
        let flapped = cause(events(1, Some(100)), events(2, Some(100)));
        assert_eq!(
            flapped,
            "the underlay link eth0 went down (the kernel deletes a link's routes)"
        );
        let both = cause(events(1, Some(100)), events(2, Some(300)));
        assert!(
            both.contains("went down") && both.contains("re-addressed"),
            "{both}"
        );
        let unexplained = cause(events(1, Some(100)), events(1, Some(100)));
        assert!(
            unexplained.starts_with("removed by something else"),
            "{unexplained}"
        );
        assert!(route_loss_cause(None, events(1, None), "eth0", GW, None).contains("not known"));
    }

    #[test]
    fn long_route_lists_are_cut_short() {
        let subnets: Vec<Ipv4Net> = (0..6)
            .map(|i| Ipv4Net::new(Ipv4Addr::new(10, 5, i, 0), 24).unwrap())
            .collect();
        assert_eq!(
            list_subnets(&subnets),
            "10.5.0.0/24, 10.5.1.0/24, 10.5.2.0/24, 10.5.3.0/24 and 2 more"
        );
        assert_eq!(list_subnets(&subnets[..1]), "10.5.0.0/24");
    }
}
