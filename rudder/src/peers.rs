//! The other hosts: list `<prefix>/subnets/`, then watch from the next revision.
//!
//! On compaction, a cancelled watch or a broken stream the registry lists again and sends a
//! full snapshot (the reconciler diffs it), after a capped back-off so a down etcd costs no CPU.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use etcd_client::{EventType, WatchOptions};
use ipnet::Ipv4Net;
use tokio::sync::mpsc;

use crate::etcd::listing::Pages;
use crate::etcd::{Backoff, Etcd};
use crate::metrics::Metrics;
use crate::peer_book::{PeerBook, Refused};
use crate::subnet::{key_to_subnet, LeaseValue};

/// Subnet → public IP of every usable peer lease (ours included; the reconciler skips it).
pub type PeerMap = BTreeMap<Ipv4Net, Ipv4Addr>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The complete set after a (re-)listing.
    Snapshot(PeerMap),
    Upsert(Ipv4Net, Ipv4Addr),
    Remove(Ipv4Net),
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
}

/// Turns one etcd key/value into a peer, or says why not.
pub fn parse_peer(
    subnets_prefix: &str,
    network: Ipv4Net,
    key: &[u8],
    value: &[u8],
) -> Result<(Ipv4Net, Ipv4Addr), Skip> {
    let suffix = key
        .strip_prefix(subnets_prefix.as_bytes())
        .and_then(|s| std::str::from_utf8(s).ok())
        .ok_or_else(|| Skip::Invalid("key is not under the subnets prefix".into()))?;
    let subnet = key_to_subnet(suffix).ok_or_else(|| {
        Skip::Invalid(format!("{suffix:?} is not a subnet key like 10.5.34.0-24"))
    })?;
    if !network.contains(&subnet) || subnet.prefix_len() < network.prefix_len() {
        return Err(Skip::Invalid(format!(
            "subnet {subnet} lies outside the network {network}"
        )));
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
    Ok((subnet, lease.public_ip))
}

pub struct PeerRegistry {
    etcd: Etcd,
    subnets_prefix: String,
    network: Ipv4Net,
    events: mpsc::Sender<PeerEvent>,
    metrics: Metrics,
    /// Keys of other backends' leases, logged once each (forgotten when the key goes).
    logged_other_backend: HashSet<Vec<u8>>,
    book: PeerBook,
}

impl PeerRegistry {
    pub fn new(
        etcd: Etcd,
        subnets_prefix: String,
        network: Ipv4Net,
        events: mpsc::Sender<PeerEvent>,
        metrics: Metrics,
    ) -> Self {
        PeerRegistry {
            etcd,
            subnets_prefix,
            network,
            events,
            metrics,
            logged_other_backend: HashSet::new(),
            book: PeerBook::default(),
        }
    }

    /// Runs until the receiving side is gone.
    pub async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut first = true;
        loop {
            if !first {
                self.metrics.etcd_reconnects.inc();
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
        // Only keys that still exist stay remembered as "logged once".
        let mut still_other_backend = HashSet::new();
        while let Some(page) = pages.next().await? {
            for kv in &page {
                if let Some((subnet, ip)) = self.accept(kv.key(), kv.value()) {
                    leases.push((subnet, ip, kv.create_revision()));
                } else if self.logged_other_backend.contains(kv.key()) {
                    still_other_backend.insert(kv.key().to_vec());
                }
            }
        }
        self.logged_other_backend = still_other_backend;
        let revision = pages.revision().unwrap_or(0);
        let (snapshot, refusals) = self.book.reset(leases);
        for refused in refusals {
            self.report(refused);
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
                        Some((subnet, ip)) => {
                            match self.book.upsert(subnet, ip, kv.create_revision()) {
                                Ok(peer_event) => vec![peer_event],
                                Err(refused) => {
                                    self.report(refused);
                                    continue;
                                }
                            }
                        }
                        // A key that turned bad, or another backend, is no peer of ours any more.
                        None => match self.subnet_of(kv.key()) {
                            Some(subnet) => self.book.remove(subnet),
                            None => continue,
                        },
                    },
                    EventType::Delete => {
                        self.logged_other_backend.remove(kv.key());
                        match self.subnet_of(kv.key()) {
                            Some(subnet) => self.book.remove(subnet),
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

    fn subnet_of(&self, key: &[u8]) -> Option<Ipv4Net> {
        let suffix = key.strip_prefix(self.subnets_prefix.as_bytes())?;
        key_to_subnet(std::str::from_utf8(suffix).ok()?)
    }

    fn report(&self, refused: Refused) {
        tracing::error!(
            "refusing lease {}: it overlaps the earlier lease {} (leases carved with different SubnetLen or Network, or written by hand?); it becomes a peer once that one is gone",
            refused.subnet,
            refused.earlier
        );
        self.metrics.invalid_leases.inc();
    }

    fn accept(&mut self, key: &[u8], value: &[u8]) -> Option<(Ipv4Net, Ipv4Addr)> {
        match parse_peer(&self.subnets_prefix, self.network, key, value) {
            Ok(peer) => Some(peer),
            Err(Skip::Invalid(why)) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "skipping lease: {why}");
                self.metrics.invalid_leases.inc();
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
