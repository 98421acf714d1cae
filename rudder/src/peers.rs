//! The other hosts: list `<prefix>/subnets/`, then watch from the next revision.
//!
//! On compaction, a cancelled watch or a broken stream the registry lists again and sends a
//! full snapshot (the reconciler diffs it), after a capped back-off so a down etcd costs no CPU.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use etcd_client::{EventType, WatchOptions};
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::mpsc;

use crate::etcd::listing::Pages;
use crate::etcd::{Backoff, Etcd};
use crate::peer_book::{Change, PeerBook, Refused};
use crate::status::State;
use crate::subnet::{parse_lease_key, LeaseSubnets, LeaseValue};

/// Subnet → public IP of every usable peer lease (ours included; the reconciler skips it).
pub type PeerMap = BTreeMap<Ipv4Net, Ipv4Addr>;

/// The IPv6 half of a peer lease. A lease without an IPv6 subnet (every flannel udp host) has
/// no entry, so it gets no IPv6 route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Peer {
    /// The same lease's IPv4 subnet; `None` for an IPv6-only host.
    pub ipv4_subnet: Option<Ipv4Net>,
    /// PublicIP: where the peer is reached when either end has no PublicIPv6 (0.0.0.0 for an
    /// IPv6-only host).
    pub public_ip: Ipv4Addr,
    /// PublicIPv6; `None` when the peer announced none.
    pub public_ipv6: Option<Ipv6Addr>,
}

/// IPv6 subnet → its peer (ours included).
pub type Ipv6PeerMap = BTreeMap<Ipv6Net, Ipv6Peer>;

/// One usable peer lease, both families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLease {
    pub subnets: LeaseSubnets,
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The complete set after a (re-)listing.
    Snapshot(PeerMap),
    Upsert(Ipv4Net, Ipv4Addr),
    Remove(Ipv4Net),
    /// The IPv6 halves (only with IPv6 on): the complete set after a listing, sent before
    /// the IPv4 [`PeerEvent::Snapshot`]; a lease's IPv6 change is sent before its IPv4 one.
    Ipv6Snapshot(Ipv6PeerMap),
    Ipv6Upsert(Ipv6Net, Ipv6Peer),
    Ipv6Remove(Ipv6Net),
}

/// A real lease value is ~80 bytes; anything this large is junk, not parsed.
pub const MAX_LEASE_VALUE: usize = 4096;

/// Why a key under `subnets/` is not a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// Malformed: warn every time it changes.
    Invalid(String),
    /// A well-formed lease of another backend: log once.
    OtherBackend(String),
    /// An IPv6-only lease: no IPv4 peer.
    NoIpv4,
}

/// Parses one lease as a peer of an IPv4 network: its IPv4 subnet and PublicIP. An IPv6-only
/// lease is not an IPv4 peer ([`Skip::NoIpv4`]).
pub fn parse_peer(
    subnets_prefix: &str,
    network: Ipv4Net,
    key: &[u8],
    value: &[u8],
) -> Result<(Ipv4Net, Ipv4Addr), Skip> {
    let lease = parse_peer_lease(subnets_prefix, Some(network), None, key, value)?;
    match lease.subnets.ipv4 {
        Some(subnet) => Ok((subnet, lease.public_ip)),
        None => Err(Skip::NoIpv4),
    }
}

/// Parses one lease, both halves: each subnet must lie inside that family's network when
/// this host has it on (an IPv6 half is not checked while IPv6 is off here: it is unused).
pub fn parse_peer_lease(
    subnets_prefix: &str,
    network: Option<Ipv4Net>,
    network6: Option<Ipv6Net>,
    key: &[u8],
    value: &[u8],
) -> Result<PeerLease, Skip> {
    let suffix = key
        .strip_prefix(subnets_prefix.as_bytes())
        .and_then(|s| std::str::from_utf8(s).ok())
        .ok_or_else(|| Skip::Invalid("key is not under the subnets prefix".into()))?;
    let subnets = parse_lease_key(suffix).map_err(|e| Skip::Invalid(e.to_string()))?;
    if let (Some(subnet), Some(network)) = (subnets.ipv4, network) {
        if !network.contains(&subnet) || subnet.prefix_len() < network.prefix_len() {
            return Err(Skip::Invalid(format!(
                "subnet {subnet} lies outside the network {network}"
            )));
        }
    }
    if let (Some(subnet), Some(network)) = (subnets.ipv6, network6) {
        if !network.contains(&subnet) || subnet.prefix_len() < network.prefix_len() {
            return Err(Skip::Invalid(format!(
                "IPv6 subnet {subnet} lies outside the IPv6 network {network}"
            )));
        }
    }
    if value.len() > MAX_LEASE_VALUE {
        return Err(Skip::Invalid(format!(
            "lease value is {} bytes; a lease is a short JSON object (at most {MAX_LEASE_VALUE})",
            value.len()
        )));
    }
    let lease = LeaseValue::parse(value).map_err(|e| Skip::Invalid(e.to_string()))?;
    if !lease.speaks_udp() {
        return Err(Skip::OtherBackend(lease.backend_type.unwrap_or_default()));
    }
    Ok(PeerLease {
        subnets,
        public_ip: lease.public_ip,
        public_ipv6: lease.public_ipv6,
    })
}

fn ipv6_peer(lease: &PeerLease) -> Ipv6Peer {
    Ipv6Peer {
        ipv4_subnet: lease.subnets.ipv4,
        public_ip: lease.public_ip,
        public_ipv6: lease.public_ipv6,
    }
}

fn ipv4_event(change: Change<Ipv4Net, Ipv4Addr>) -> PeerEvent {
    match change {
        Change::Upsert(subnet, ip) => PeerEvent::Upsert(subnet, ip),
        Change::Remove(subnet) => PeerEvent::Remove(subnet),
    }
}

fn ipv6_event(change: Change<Ipv6Net, Ipv6Peer>) -> PeerEvent {
    match change {
        Change::Upsert(subnet, peer) => PeerEvent::Ipv6Upsert(subnet, peer),
        Change::Remove(subnet) => PeerEvent::Ipv6Remove(subnet),
    }
}

pub struct PeerRegistry {
    etcd: Etcd,
    subnets_prefix: String,
    network: Ipv4Net,
    /// IPv6Network when the network has IPv6 on: the IPv6 halves are then kept in `ipv6`.
    network6: Option<Ipv6Net>,
    events: mpsc::Sender<PeerEvent>,
    /// Metrics, and where the IPv6 peer view is published.
    state: State,
    /// Keys of other backends' leases, logged once each (forgotten when the key goes).
    logged_other_backend: HashSet<Vec<u8>>,
    book: PeerBook<Ipv4Net, Ipv4Addr>,
    /// The IPv6 halves, refused on overlap as the IPv4 subnets are.
    book6: PeerBook<Ipv6Net, Ipv6Peer>,
}

impl PeerRegistry {
    pub fn new(
        etcd: Etcd,
        subnets_prefix: String,
        network: Ipv4Net,
        network6: Option<Ipv6Net>,
        events: mpsc::Sender<PeerEvent>,
        state: State,
    ) -> Self {
        PeerRegistry {
            etcd,
            subnets_prefix,
            network,
            network6,
            events,
            state,
            logged_other_backend: HashSet::new(),
            book: PeerBook::default(),
            book6: PeerBook::default(),
        }
    }

    /// Records (or drops, `lease: None`) the IPv6 half of the lease at `subnets`; the events
    /// for the reconciler when it changed.
    fn set_ipv6(
        &mut self,
        subnets: LeaseSubnets,
        lease: Option<(&PeerLease, i64)>,
    ) -> Vec<PeerEvent> {
        let (Some(_), Some(subnet6)) = (self.network6, subnets.ipv6) else {
            return Vec::new();
        };
        let changes = match lease {
            Some((lease, revision)) => {
                let peer = ipv6_peer(lease);
                if self.book6.get(&subnet6) == Some(peer) {
                    return Vec::new();
                }
                match self.book6.upsert(subnet6, peer, revision) {
                    Ok(change) => vec![change],
                    Err(refused) => {
                        self.report(refused);
                        Vec::new()
                    }
                }
            }
            None => self.book6.remove(subnet6),
        };
        if !changes.is_empty() {
            self.publish_ipv6();
        }
        changes.into_iter().map(ipv6_event).collect()
    }

    fn publish_ipv6(&self) {
        let view = self.book6.peers();
        self.state.update(|s| s.ipv6_peers = view);
    }

    /// Runs until the receiving side is gone.
    pub async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut first = true;
        loop {
            if !first {
                self.state.metrics.etcd_reconnects.inc();
            }
            first = false;
            match self.list_and_watch(&mut backoff).await {
                Ok(Stop::ReceiverGone) => return,
                Ok(Stop::Resync(reason)) => {
                    tracing::info!("peer watch ended ({reason}); listing again")
                }
                Err(e) => {
                    tracing::warn!("peer watch failed: {e}");
                    self.etcd.failed().await;
                }
            }
            let wait = backoff.next_delay();
            tokio::time::sleep(wait).await;
        }
    }

    async fn list_and_watch(&mut self, backoff: &mut Backoff) -> Result<Stop, etcd_client::Error> {
        // Page by page, so a big cluster's listing never sits in memory twice.
        let mut pages = Pages::new(self.etcd.client(), &self.subnets_prefix);
        let mut leases = Vec::new();
        let mut leases6 = Vec::new();
        // Only keys that still exist stay remembered as "logged once".
        let mut still_other_backend = HashSet::new();
        while let Some(page) = pages.next().await? {
            for kv in &page {
                if let Some(lease) = self.accept(kv.key(), kv.value()) {
                    if let (Some(subnet6), true) = (lease.subnets.ipv6, self.network6.is_some()) {
                        leases6.push((subnet6, ipv6_peer(&lease), kv.create_revision()));
                    }
                    if let Some(subnet) = lease.subnets.ipv4 {
                        leases.push((subnet, lease.public_ip, kv.create_revision()));
                    }
                } else if self.logged_other_backend.contains(kv.key()) {
                    still_other_backend.insert(kv.key().to_vec());
                }
            }
        }
        self.logged_other_backend = still_other_backend;
        let revision = pages.revision().unwrap_or(0);
        let (snapshot6, refusals6) = self.book6.reset(leases6);
        for refused in refusals6 {
            self.report(refused);
        }
        self.publish_ipv6();
        let (snapshot, refusals) = self.book.reset(leases);
        for refused in refusals {
            self.report(refused);
        }
        if self.network6.is_some()
            && self
                .events
                .send(PeerEvent::Ipv6Snapshot(snapshot6))
                .await
                .is_err()
        {
            return Ok(Stop::ReceiverGone);
        }
        if self
            .events
            .send(PeerEvent::Snapshot(snapshot))
            .await
            .is_err()
        {
            return Ok(Stop::ReceiverGone);
        }

        let mut stream = self
            .etcd
            .client()
            .watch(
                self.subnets_prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_prev_key()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        while let Some(resp) = stream.message().await? {
            backoff.reset();
            if resp.compact_revision() > 0 {
                return Ok(Stop::Resync(format!(
                    "revision {} compacted",
                    resp.compact_revision()
                )));
            }
            if resp.canceled() {
                return Ok(Stop::Resync(format!("cancelled: {}", resp.cancel_reason())));
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let peer_events = match event.event_type() {
                    EventType::Put => match self.accept(kv.key(), kv.value()) {
                        Some(lease) => {
                            let mut peer_events =
                                self.set_ipv6(lease.subnets, Some((&lease, kv.create_revision())));
                            if let Some(subnet) = lease.subnets.ipv4 {
                                match self.book.upsert(
                                    subnet,
                                    lease.public_ip,
                                    kv.create_revision(),
                                ) {
                                    Ok(change) => peer_events.push(ipv4_event(change)),
                                    Err(refused) => self.report(refused),
                                }
                            }
                            peer_events
                        }
                        // A key that turned bad, or another backend, is no peer of ours any more.
                        None => match self.subnets_of(kv.key()) {
                            Some(subnets) => self.forget(subnets),
                            None => continue,
                        },
                    },
                    EventType::Delete => {
                        self.logged_other_backend.remove(kv.key());
                        match self.subnets_of(kv.key()) {
                            Some(subnets) => self.forget(subnets),
                            None => continue,
                        }
                    }
                };
                for peer_event in peer_events {
                    if self.events.send(peer_event).await.is_err() {
                        return Ok(Stop::ReceiverGone);
                    }
                }
            }
        }
        Ok(Stop::Resync("stream closed by etcd".into()))
    }

    /// A lease gone (or turned bad): both halves stop being peers.
    fn forget(&mut self, subnets: LeaseSubnets) -> Vec<PeerEvent> {
        let mut events = self.set_ipv6(subnets, None);
        if let Some(subnet) = subnets.ipv4 {
            events.extend(self.book.remove(subnet).into_iter().map(ipv4_event));
        }
        events
    }

    fn subnets_of(&self, key: &[u8]) -> Option<LeaseSubnets> {
        let suffix = key.strip_prefix(self.subnets_prefix.as_bytes())?;
        parse_lease_key(std::str::from_utf8(suffix).ok()?).ok()
    }

    fn report<N: std::fmt::Display>(&self, refused: Refused<N>) {
        tracing::error!(
            "refusing lease {}: it overlaps the earlier lease {} (leases carved with different SubnetLen or Network, or written by hand?); it becomes a peer once that one is gone",
            refused.subnet,
            refused.earlier
        );
        self.state.metrics.invalid_leases.inc();
    }

    fn accept(&mut self, key: &[u8], value: &[u8]) -> Option<PeerLease> {
        let network = (self.network != Ipv4Net::default()).then_some(self.network);
        match parse_peer_lease(&self.subnets_prefix, network, self.network6, key, value) {
            Ok(peer) => Some(peer),
            Err(Skip::NoIpv4) => None,
            Err(Skip::Invalid(why)) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "skipping lease: {why}");
                self.state.metrics.invalid_leases.inc();
                None
            }
            Err(Skip::OtherBackend(kind)) => {
                if self.logged_other_backend.insert(key.to_vec()) {
                    tracing::info!(
                        key = %String::from_utf8_lossy(key),
                        "ignoring a {kind:?} backend lease: rudder only exchanges packets with udp hosts"
                    );
                }
                None
            }
        }
    }
}

enum Stop {
    ReceiverGone,
    Resync(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "/coreos.com/network/subnets/";

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn parse(key: &str, value: &str) -> Result<(Ipv4Net, Ipv4Addr), Skip> {
        parse_peer(PREFIX, net("10.5.0.0/16"), key.as_bytes(), value.as_bytes())
    }

    #[test]
    fn udp_and_unmarked_leases_are_peers() {
        let ok = r#"{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"udp"}"#;
        assert_eq!(
            parse("/coreos.com/network/subnets/10.5.34.0-24", ok),
            Ok((net("10.5.34.0/24"), Ipv4Addr::new(192, 168, 1, 10)))
        );
        let flannel_udp = r#"{"PublicIP":"192.168.1.11","PublicIPv6":null}"#;
        assert!(parse("/coreos.com/network/subnets/10.5.35.0-24", flannel_udp).is_ok());
    }

    fn lease6(key: &str, value: &str) -> Result<PeerLease, Skip> {
        parse_peer_lease(
            PREFIX,
            Some(net("10.5.0.0/16")),
            Some("fc00::/48".parse().unwrap()),
            key.as_bytes(),
            value.as_bytes(),
        )
    }

    #[test]
    fn dual_stack_and_ipv6_only_leases_carry_their_ipv6_half() {
        let dual = lease6(
            "/coreos.com/network/subnets/10.5.34.0-24&fc00:0:0:22::-64",
            r#"{"PublicIP":"192.168.1.10","PublicIPv6":"fd00::10","BackendType":"udp"}"#,
        )
        .unwrap();
        assert_eq!(dual.subnets.ipv4, Some(net("10.5.34.0/24")));
        assert_eq!(dual.subnets.ipv6, Some("fc00:0:0:22::/64".parse().unwrap()));
        assert_eq!(dual.public_ipv6, Some("fd00::10".parse().unwrap()));
        // Still the same IPv4 peer as before.
        assert_eq!(
            parse(
                "/coreos.com/network/subnets/10.5.34.0-24&fc00:0:0:22::-64",
                r#"{"PublicIP":"192.168.1.10","PublicIPv6":"fd00::10"}"#
            ),
            Ok((net("10.5.34.0/24"), Ipv4Addr::new(192, 168, 1, 10)))
        );
        let only6_key = "/coreos.com/network/subnets/0.0.0.0-0&fc00:0:0:23::-64";
        let only6_value = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::11"}"#;
        let only6 = lease6(only6_key, only6_value).unwrap();
        assert_eq!(only6.subnets.ipv4, None);
        assert_eq!(parse(only6_key, only6_value), Err(Skip::NoIpv4));
    }

    #[test]
    fn a_flannel_udp_lease_is_a_peer_without_ipv6() {
        let v4 = lease6(
            "/coreos.com/network/subnets/10.5.35.0-24",
            r#"{"PublicIP":"192.168.1.11","PublicIPv6":null}"#,
        )
        .unwrap();
        assert_eq!(v4.subnets.ipv4, Some(net("10.5.35.0/24")));
        assert_eq!((v4.subnets.ipv6, v4.public_ipv6), (None, None));
    }

    #[test]
    fn an_ipv6_half_outside_the_ipv6_network_is_invalid() {
        assert_eq!(
            lease6(
                "/coreos.com/network/subnets/10.5.34.0-24&fd99::-64",
                r#"{"PublicIP":"192.168.1.10"}"#
            ),
            Err(Skip::Invalid(
                "IPv6 subnet fd99::/64 lies outside the IPv6 network fc00::/48".into()
            ))
        );
        assert!(matches!(
            lease6(
                "/coreos.com/network/subnets/10.5.34.0-24&fc00::1-64",
                r#"{"PublicIP":"192.168.1.10"}"#
            ),
            Err(Skip::Invalid(_))
        ));
    }

    #[test]
    fn other_backends_and_malformed_leases_are_skipped() {
        assert_eq!(
            parse(
                "/coreos.com/network/subnets/10.5.34.0-24",
                r#"{"PublicIP":"192.168.1.10","BackendType":"vxlan"}"#
            ),
            Err(Skip::OtherBackend("vxlan".into()))
        );
        for (key, value) in [
            (
                "/coreos.com/network/subnets/garbage",
                r#"{"PublicIP":"1.2.3.4"}"#,
            ),
            ("/coreos.com/network/subnets/10.5.34.0-24", "not json"),
            (
                "/coreos.com/network/subnets/10.9.34.0-24",
                r#"{"PublicIP":"1.2.3.4"}"#,
            ),
            (
                "/coreos.com/network/subnets/10.0.0.0-8",
                r#"{"PublicIP":"1.2.3.4"}"#,
            ),
            ("/other/10.5.34.0-24", r#"{"PublicIP":"1.2.3.4"}"#),
            (
                "/coreos.com/network/subnets/10.5.36.0-24",
                &format!(r#"{{"PublicIP":"1.2.3.4","Pad":"{}"}}"#, "x".repeat(5000)),
            ),
        ] {
            assert!(
                matches!(parse(key, value), Err(Skip::Invalid(_))),
                "{key} = {value} should be invalid"
            );
        }
    }
}
