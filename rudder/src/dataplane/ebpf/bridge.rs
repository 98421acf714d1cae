//! The containers' bridge, adopted whoever made it: `--bridge`, else the interface holding
//! the subnet's gateway address (docker0, cni0). `rudder_br_in` follows it as it appears,
//! goes and comes back; the peer routes use the gateway address as source while it is local.

use anyhow::Context as _;

use super::kernel::SchedClassifierLinkId;
use super::{EbpfDataplane, State};
use crate::subnet::gateway;

/// A bridge made by someone else (or by `--bridge`) that the fast paths serve.
pub(super) struct AdoptedBridge {
    pub(super) name: String,
    pub(super) ifindex: u32,
    /// `None` when attaching failed (logged; container traffic takes the host's path).
    pub(super) link: Option<SchedClassifierLinkId>,
}

impl EbpfDataplane {
    /// Finds the containers' bridge and the gateway address (see the module documentation)
    /// and follows what changed: attaches `rudder_br_in` to a new or re-created bridge, and
    /// re-programs the peer routes when the gateway address comes or goes.
    pub(super) fn adopt_bridge(&self) -> anyhow::Result<()> {
        let mut state = self.lock();
        let gateway = gateway(state.opts.local_subnet);
        let holder = state.routes()?.interface_holding(gateway)?;
        let found = match &state.opts.bridge {
            Some(name) => state.routes()?.link_index(name)?.map(|i| (name.clone(), i)),
            None => holder.clone(),
        };
        let current = state.bridge.as_ref().map(|b| b.ifindex);
        if found.as_ref().map(|(_, i)| *i) != current {
            let State { kernel, bridge, .. } = &mut *state;
            let kernel = kernel.as_mut().context("eBPF data plane is shut down")?;
            if let Some(old) = bridge.take() {
                if let Some(link) = old.link {
                    kernel.detach_bridge(link);
                }
                tracing::info!(bridge = %old.name, "the containers' bridge is gone");
            }
            if let Some((name, ifindex)) = found {
                let link = match kernel.attach_bridge(&name) {
                    Ok(link) => {
                        tracing::info!(bridge = %name, ifindex, %gateway, "adopted the containers' bridge: container to peer fast path attached");
                        Some(link)
                    }
                    Err(e) => {
                        tracing::warn!(bridge = %name, "{e:#}; container traffic to peers takes the host's forwarding path");
                        None
                    }
                };
                *bridge = Some(AdoptedBridge {
                    name,
                    ifindex,
                    link,
                });
            }
        }
        let gateway_local = holder.is_some();
        if gateway_local != state.gateway_local {
            state.gateway_local = gateway_local;
            let src = state.pref_source();
            let mtu = state.opts.overlay_mtu;
            let routes = state.routes()?;
            for (subnet, public_ip) in &state.peers {
                routes.add_peer(*subnet, *public_ip, mtu, src)?;
            }
            if !state.peers.is_empty() {
                tracing::info!(
                    peers = state.peers.len(),
                    src = ?src,
                    "peer routes re-programmed: the gateway address {gateway} {}",
                    if gateway_local { "is now on this host" } else { "left this host" }
                );
            }
        }
        Ok(())
    }
}
