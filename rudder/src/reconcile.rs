//! Keeps the data plane in step with the peer registry: desired peers vs installed peers.
//!
//! A snapshot after a resync is applied as a diff, so an etcd outage or compaction costs
//! nothing when nothing changed; while etcd is unreachable no events arrive and installed
//! state stays as it is.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::dataplane::Dataplane;
use crate::peers::{PeerEvent, PeerMap};
use crate::reconcile6::{Ipv6Reconciler, Own};
use crate::status::State;

/// How long a peer missing from a resync snapshot (but never deleted by a watch event)
/// stays installed: longer than the peers' own reconnect back-off plus a re-acquisition.
pub const RESYNC_GRACE: Duration = Duration::from_secs(30);

pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

pub struct Reconciler {
    dataplane: Arc<dyn Dataplane>,
    state: State,
    public_ip: Ipv4Addr,
    own_subnet: watch::Receiver<Ipv4Net>,
    /// Poked when etcd no longer shows our lease as ours.
    lease_check: Arc<Notify>,
    /// Every usable lease etcd holds, ours included.
    desired: PeerMap,
    /// What the data plane has been given.
    installed: PeerMap,
    /// Peers a resync snapshot no longer listed (subnet → public IP, since when): they
    /// stay installed for [`RESYNC_GRACE`], so an etcd whose data was wiped or restored
    /// from an old backup does not cut traffic while the hosts re-register.
    missing_since: BTreeMap<Ipv4Net, (Ipv4Addr, Instant)>,
    /// Public IPs held by several leases, as last reported (to warn once per change).
    shared_ips_warned: BTreeMap<Ipv4Addr, Vec<Ipv4Net>>,
    /// This host's PublicIPv6 (IPv6 on): peers announcing one too are reached over IPv6.
    public_ipv6: Option<Ipv6Addr>,
    /// Installed IPv4 peers reached over an IPv6 outer header, at that address.
    over_ipv6: BTreeMap<Ipv4Net, Ipv6Addr>,
    /// The IPv6 halves of the leases.
    ipv6: Ipv6Reconciler,
}

impl Reconciler {
    pub fn new(
        dataplane: Arc<dyn Dataplane>,
        state: State,
        public_ip: Ipv4Addr,
        own_subnet: watch::Receiver<Ipv4Net>,
        lease_check: Arc<Notify>,
    ) -> Self {
        Reconciler {
            dataplane,
            state,
            public_ip,
            own_subnet,
            lease_check,
            desired: BTreeMap::new(),
            installed: BTreeMap::new(),
            shared_ips_warned: BTreeMap::new(),
            missing_since: BTreeMap::new(),
            public_ipv6: None,
            over_ipv6: BTreeMap::new(),
            ipv6: Ipv6Reconciler::default(),
        }
    }

    /// This host announces `public_ipv6`: peers that announce one too are reached over IPv6.
    pub fn with_public_ipv6(mut self, public_ipv6: Option<Ipv6Addr>) -> Self {
        self.public_ipv6 = public_ipv6;
        self
    }

    fn own(&self) -> Own {
        Own {
            subnet: *self.own_subnet.borrow(),
            public_ip: self.public_ip,
            public_ipv6: self.public_ipv6,
        }
    }

    /// Starts from peers already in the data plane (adopted from a previous run): they are
    /// desired and installed until etcd's first snapshot says otherwise (with the resync
    /// grace for those it no longer lists).
    pub fn with_installed(mut self, peers: PeerMap) -> Self {
        self.state.update(|s| s.peers = peers.clone());
        self.desired = peers.clone();
        self.installed = peers;
        self
    }

    /// Starts from what a start programmed from the state file (both halves): desired and
    /// installed until etcd's first snapshot says otherwise.
    pub fn with_saved(mut self, saved: crate::reconcile_saved::SavedPeers) -> Self {
        let own = self.own();
        self.over_ipv6 = saved
            .peers
            .iter()
            .filter_map(
                |(subnet, ip)| match saved.ipv6.underlay_of_ipv4(&own, *subnet, *ip) {
                    IpAddr::V6(v6) => Some((*subnet, v6)),
                    IpAddr::V4(_) => None,
                },
            )
            .collect();
        self.ipv6 = saved.ipv6;
        let ipv6_peers = saved.ipv6_peers;
        self.state.update(|s| s.ipv6_peers = ipv6_peers);
        self.with_installed(saved.peers)
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<PeerEvent>) {
        loop {
            let next_expiry = self.next_grace_expiry();
            tokio::select! {
                _ = sleep_until_opt(next_expiry) => self.apply(),
                event = events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => return,
                },
                changed = self.own_subnet.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.apply();
                }
            }
        }
    }

    pub(crate) fn handle(&mut self, event: PeerEvent) {
        if matches!(
            event,
            PeerEvent::Ipv6Snapshot(_) | PeerEvent::Ipv6Upsert(..) | PeerEvent::Ipv6Remove(_)
        ) {
            let own = self.own();
            self.dataplane.begin_peer_batch();
            let moved = self.ipv6.handle(event, &*self.dataplane, &own);
            // IPv4 peers whose PublicIPv6 changed may now be reached over another family.
            for subnet in moved {
                self.apply_one(subnet);
            }
            self.dataplane.end_peer_batch();
            return;
        }
        let own = *self.own_subnet.borrow();
        // Our own key written (it changes only when we acquire): make sure it is still ours,
        // on our etcd lease; another host announcing our public IP writes the same value.
        let own_written = matches!(event, PeerEvent::Upsert(subnet, _) if subnet == own);
        let (check_own, changed) = match event {
            PeerEvent::Snapshot(all) => {
                let now = Instant::now();
                for (subnet, ip) in &self.desired {
                    if !all.contains_key(subnet) {
                        self.missing_since.entry(*subnet).or_insert((*ip, now));
                    }
                }
                self.missing_since
                    .retain(|subnet, _| !all.contains_key(subnet));
                self.desired = all;
                (true, None)
            }
            PeerEvent::Upsert(subnet, ip) => {
                self.missing_since.remove(&subnet);
                self.desired.insert(subnet, ip);
                (subnet == own, Some(subnet))
            }
            PeerEvent::Remove(subnet) => {
                // A delete event is authoritative: no grace.
                self.missing_since.remove(&subnet);
                self.desired.remove(&subnet);
                (subnet == own, Some(subnet))
            }
            PeerEvent::Ipv6Snapshot(_) | PeerEvent::Ipv6Upsert(..) | PeerEvent::Ipv6Remove(_) => {
                unreachable!("handled above")
            }
        };
        // (IPv6-only: no IPv4 lease of ours to look for.)
        let check_own = check_own && own != Ipv4Net::default();
        if check_own && self.desired.get(&own) != Some(&self.public_ip) {
            tracing::warn!(subnet = %own, "our lease is gone from etcd or names another host; checking");
            self.lease_check.notify_one();
        } else if own_written {
            self.lease_check.notify_one();
        }
        match changed {
            // Only this subnet's entry can differ: no full diff of every peer per event.
            Some(subnet) => self.apply_one(subnet),
            None => self.apply(),
        }
    }

    /// When the earliest grace period of a peer missing from a resync runs out.
    pub(crate) fn next_grace_expiry(&self) -> Option<Instant> {
        let ipv4 = self
            .missing_since
            .values()
            .map(|(_, since)| *since + RESYNC_GRACE)
            .min();
        ipv4.into_iter().chain(self.ipv6.next_grace_expiry()).min()
    }

    /// Where the IPv4 peer `subnet` at `ip` is reached, and what is installed for it.
    fn underlay_of(&self, subnet: Ipv4Net, ip: Ipv4Addr) -> IpAddr {
        self.ipv6.underlay_of_ipv4(&self.own(), subnet, ip)
    }

    fn installed_underlay(&self, subnet: Ipv4Net) -> Option<IpAddr> {
        let ip = *self.installed.get(&subnet)?;
        Some(match self.over_ipv6.get(&subnet) {
            Some(v6) => IpAddr::V6(*v6),
            None => IpAddr::V4(ip),
        })
    }

    /// Applies the difference between desired (minus our own subnet) and installed.
    pub(crate) fn apply(&mut self) {
        let own = *self.own_subnet.borrow();
        let now = Instant::now();
        self.missing_since.retain(|subnet, (_, since)| {
            let keep = now < *since + RESYNC_GRACE;
            if !keep {
                tracing::info!(%subnet, "peer still missing {RESYNC_GRACE:?} after a resync; removing it");
            }
            keep
        });
        let in_grace = self.missing_since.iter().map(|(s, (ip, _))| (s, ip));
        let target: PeerMap = self
            .desired
            .iter()
            .chain(in_grace)
            // A lease naming our own address is ours (current or stale): never route to self.
            .filter(|(subnet, ip)| **subnet != own && **ip != self.public_ip)
            .map(|(s, ip)| (*s, *ip))
            .collect();
        self.warn_on_shared_public_ips(&target);
        let stale: Vec<Ipv4Net> = self
            .installed
            .keys()
            .filter(|s| !target.contains_key(s))
            .copied()
            .collect();
        self.dataplane.begin_peer_batch();
        for subnet in stale {
            self.install(subnet, None);
        }
        for (subnet, ip) in &target {
            if self.installed.get(subnet) != Some(ip)
                || self.installed_underlay(*subnet) != Some(self.underlay_of(*subnet, *ip))
            {
                self.install(*subnet, Some(*ip));
            }
        }
        let own = self.own();
        self.ipv6.apply(&*self.dataplane, &own);
        self.dataplane.end_peer_batch();
        let installed = self.installed.clone();
        self.state.update(|s| s.peers = installed);
    }

    /// [`Self::apply`] for one subnet whose lease changed: O(log n) plus a scan without
    /// allocations for the shared-address check, so a change costs little with 10k peers.
    fn apply_one(&mut self, subnet: Ipv4Net) {
        let own = *self.own_subnet.borrow();
        let want = self
            .desired
            .get(&subnet)
            .or_else(|| self.missing_since.get(&subnet).map(|(ip, _)| ip))
            .copied()
            .filter(|ip| subnet != own && *ip != self.public_ip);
        self.recheck_shared_ips(subnet, want, own);
        if self.installed.get(&subnet).copied() == want
            && want.is_none_or(|ip| {
                self.installed_underlay(subnet) == Some(self.underlay_of(subnet, ip))
            })
        {
            return;
        }
        if self.install(subnet, want) {
            self.state.update(|s| match want {
                Some(ip) => {
                    s.peers.insert(subnet, ip);
                }
                None => {
                    s.peers.remove(&subnet);
                }
            });
        }
    }

    /// Gives the data plane `subnet` at `ip` (`None`: removes it) and records it as
    /// installed; false when the data plane refused (logged).
    fn install(&mut self, subnet: Ipv4Net, ip: Option<Ipv4Addr>) -> bool {
        match ip {
            None => match self.dataplane.remove_peer(subnet) {
                Ok(()) => {
                    tracing::info!(%subnet, "peer removed");
                    self.installed.remove(&subnet);
                    self.over_ipv6.remove(&subnet);
                    true
                }
                Err(e) => {
                    tracing::error!(%subnet, "removing peer failed: {e:#}");
                    false
                }
            },
            Some(ip) => {
                let underlay = self.underlay_of(subnet, ip);
                match self.dataplane.upsert_peer(subnet, underlay) {
                    Ok(()) => {
                        tracing::info!(%subnet, public_ip = %ip, %underlay, "peer programmed");
                        self.installed.insert(subnet, ip);
                        match underlay {
                            IpAddr::V6(v6) => self.over_ipv6.insert(subnet, v6),
                            IpAddr::V4(_) => self.over_ipv6.remove(&subnet),
                        };
                        true
                    }
                    Err(e) => {
                        tracing::error!(%subnet, public_ip = %ip, %underlay, "programming peer failed: {e:#}");
                        false
                    }
                }
            }
        }
    }

    /// [`Self::warn_on_shared_public_ips`] for the addresses one subnet's change can
    /// affect: its new address and any shared address it was listed under.
    fn recheck_shared_ips(&mut self, subnet: Ipv4Net, ip: Option<Ipv4Addr>, own: Ipv4Net) {
        let mut ips: Vec<Ipv4Addr> = self
            .shared_ips_warned
            .iter()
            .filter(|(_, subnets)| subnets.contains(&subnet))
            .map(|(ip, _)| *ip)
            .collect();
        ips.extend(ip);
        for ip in ips {
            let in_grace = self.missing_since.iter().map(|(s, (ip, _))| (s, ip));
            let mut subnets: Vec<Ipv4Net> = self
                .desired
                .iter()
                .chain(in_grace)
                .filter(|(s, i)| **i == ip && **s != own)
                .map(|(s, _)| *s)
                .collect();
            if subnets.len() < 2 {
                self.shared_ips_warned.remove(&ip);
                continue;
            }
            subnets.sort();
            if self.shared_ips_warned.get(&ip) != Some(&subnets) {
                tracing::warn!(public_ip = %ip, ?subnets, "several leases name the same public IP; check for a stale lease (rudder leases)");
                self.shared_ips_warned.insert(ip, subnets);
            }
        }
    }

    /// Two leases naming one address usually mean a stale lease or a misconfigured host; both
    /// subnets are routed to it, which is what etcd says, but an operator should look.
    fn warn_on_shared_public_ips(&mut self, target: &PeerMap) {
        let mut by_ip: BTreeMap<Ipv4Addr, Vec<Ipv4Net>> = BTreeMap::new();
        for (subnet, ip) in target {
            by_ip.entry(*ip).or_default().push(*subnet);
        }
        by_ip.retain(|_, subnets| subnets.len() > 1);
        if by_ip != self.shared_ips_warned {
            for (ip, subnets) in &by_ip {
                tracing::warn!(public_ip = %ip, ?subnets, "several leases name the same public IP; check for a stale lease (rudder leases)");
            }
            self.shared_ips_warned = by_ip;
        }
    }
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
pub(crate) mod tests;
