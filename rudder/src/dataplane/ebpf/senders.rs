//! The peers' bookkeeping that keeps the sender map (public IP -> its number of peer
//! subnets) in step with `State::peers` in O(1) per change.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use ipnet::Ipv4Net;

use super::kernel::ignore_missing;
use super::State;

impl State {
    /// Records `subnet` at `public_ip` in `peers`; returns the address it had.
    pub(super) fn insert_peer(&mut self, subnet: Ipv4Net, public_ip: Ipv4Addr) -> Option<Ipv4Addr> {
        let previous = self.peers.insert(subnet, public_ip);
        if previous != Some(public_ip) {
            *self.subnets_per_sender.entry(public_ip).or_insert(0) += 1;
            if let Some(old) = previous {
                self.forget_sender_subnet(old);
            }
        }
        previous
    }

    /// Drops `subnet` from `peers`; returns the address it had.
    pub(super) fn remove_peer_entry(&mut self, subnet: Ipv4Net) -> Option<Ipv4Addr> {
        let previous = self.peers.remove(&subnet);
        if let Some(old) = previous {
            self.forget_sender_subnet(old);
        }
        previous
    }

    fn forget_sender_subnet(&mut self, public_ip: Ipv4Addr) {
        if let Some(count) = self.subnets_per_sender.get_mut(&public_ip) {
            *count -= 1;
            if *count == 0 {
                self.subnets_per_sender.remove(&public_ip);
            }
        }
    }

    /// Keeps the sender map in step with `peers` for one public IP.
    pub(super) fn sync_sender(&mut self, public_ip: Ipv4Addr) -> anyhow::Result<()> {
        let subnets = self
            .subnets_per_sender
            .get(&public_ip)
            .copied()
            .unwrap_or(0);
        let kernel = self.kernel_mut()?;
        if subnets == 0 {
            ignore_missing(kernel.senders.remove(&public_ip.octets()))
        } else {
            kernel.senders.insert(public_ip.octets(), subnets, 0)
        }
        .with_context(|| format!("updating the sender map for {public_ip}"))
    }
}
