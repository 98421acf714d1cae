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
        let peers: Vec<_> = state.peers.iter().map(|(s, ip)| (*s, *ip)).collect();
        if let Some((subnet, e)) = state.routes()?.add_peers(&peers, overlay_mtu, src).pop() {
            return Err(e.context(format!("peer route {subnet} with MTU {overlay_mtu}")));
        }
        Ok(())
    }

    /// Asks the kernel again for each peer's next hop (`ip route get <peer>`) and replaces the
    /// peer routes whose next hop moved; returns how many. Missing routes are left to the
    /// route-loss check (`route_loss.rs`), which restores them and says what removed them.
    pub(super) fn refresh_next_hops(&self) -> anyhow::Result<usize> {
        let state = self.lock();
        let routes = state.routes()?;
        let installed = routes.installed_next_hops()?;
        let src = state.pref_source();
        // One lookup per public IP, pipelined: 65,536 peers were 65,536 round trips in a row.
        let next_hops = routes.next_hops(state.peers.values().copied());
        let mut moved = Vec::new();
        for (subnet, public_ip) in &state.peers {
            let (Some(old), Some(next_hop)) = (installed.get(subnet), next_hops.get(public_ip))
            else {
                continue;
            };
            if old == next_hop {
                continue;
            }
            tracing::info!(
                %subnet, peer = %public_ip, %old, new = %next_hop,
                "peer route: next hop changed"
            );
            moved.push((*subnet, *public_ip));
        }
        if let Some((subnet, e)) = routes.add_peers(&moved, state.opts.overlay_mtu, src).pop() {
            return Err(e.context(format!("re-routing peer {subnet}")));
        }
        Ok(moved.len())
    }
}
