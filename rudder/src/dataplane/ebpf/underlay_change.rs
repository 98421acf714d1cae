//! Following the underlay at run time: a new MTU (the programs' limit and the peer routes'
//! MTU) and new next hops for the peer routes when the host's routes change (a new default
//! gateway, a router gone).

use anyhow::bail;

use super::{config_of, EbpfDataplane};

impl EbpfDataplane {
    /// The programs' "fragmentation needed" limit and every peer route's MTU.
    pub(super) fn apply_overlay_mtu(&self, overlay_mtu: u16) -> anyhow::Result<()> {
        if overlay_mtu < 68 {
            bail!("overlay MTU {overlay_mtu} is below IPv4's minimum of 68");
        }
        let mut state = self.lock();
        state.opts.overlay_mtu = overlay_mtu;
        let config = config_of(&state.opts);
        state.kernel_mut()?.set_config(&config)?;
        let src = state.pref_source();
        let routes = state.routes()?;
        for (subnet, public_ip) in &state.peers {
            routes.add_peer(*subnet, *public_ip, overlay_mtu, src)?;
        }
        state.reinstall_routes6()
    }

    /// Asks the kernel again for each peer's next hop (`ip route get <peer>`) and replaces the
    /// peer routes whose next hop moved; returns how many. Missing routes are left to the
    /// route-loss check (`route_loss.rs`), which restores them and says what removed them.
    pub(super) fn refresh_next_hops(&self) -> anyhow::Result<usize> {
        let state = self.lock();
        let routes = state.routes()?;
        let installed = routes.installed_next_hops()?;
        let src = state.pref_source();
        let mut replaced = 0;
        for (subnet, public_ip) in &state.peers {
            let next_hop = routes.next_hop(*public_ip);
            let Some(old) = installed.get(subnet).copied() else {
                continue;
            };
            if old == next_hop {
                continue;
            }
            tracing::info!(
                %subnet, peer = %public_ip, %old, new = %next_hop,
                "peer route: next hop changed"
            );
            routes.add_peer(*subnet, *public_ip, state.opts.overlay_mtu, src)?;
            replaced += 1;
        }
        Ok(replaced)
    }
}
