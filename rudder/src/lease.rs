//! Our own subnet: acquire it from etcd, keep it alive, get it back when it is lost.
//!
//! Acquisition costs a bounded number of round trips: one range read of all leases, one
//! lease grant, then one create-if-absent transaction per attempt (a lost race marks that
//! subnet taken and tries another without re-reading).

use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipnet::Ipv4Net;

use crate::config::NetworkConfig;
use crate::etcd::listing::list_prefix;
use crate::etcd::Etcd;
use crate::subnet::{key_to_subnet, subnet_to_key, LeaseValue};
use crate::subnet_set::SubnetSet;

/// Create attempts after one listing before we list again.
const ATTEMPTS_PER_LISTING: usize = 8;

/// A subnet we hold in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    /// The etcd lease the key is attached to.
    pub lease_id: i64,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error(
        "network {network} is exhausted: all {total} subnets of /{subnet_len} between \
         {min} and {max} are leased; free one (or widen the Network/SubnetMin/SubnetMax)"
    )]
    Exhausted {
        network: Ipv4Net,
        total: u32,
        subnet_len: u8,
        min: Ipv4Addr,
        max: Ipv4Addr,
    },
    #[error(
        "another host announces our public IP {public_ip} and took our subnet {subnet}: two \
         hosts behind one address cannot share the overlay (peers tell hosts apart by it); give \
         each host its own --public-ip. Not taking the lease back"
    )]
    PublicIpConflict {
        public_ip: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// Outcome of one renewal.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours for this long.
    Renewed(Duration),
    /// etcd no longer knows the lease (expired or revoked): acquire again.
    Lost,
}

pub struct LeaseManager {
    etcd: Etcd,
    prefix: String,
    config: NetworkConfig,
    public_ip: Ipv4Addr,
    ttl: Duration,
    /// The etcd lease our key was last attached to in this process: a key naming our public
    /// IP on another live etcd lease is then another host's, not ours from before a restart.
    held: Option<i64>,
}

impl LeaseManager {
    pub fn new(
        etcd: Etcd,
        prefix: &str,
        config: NetworkConfig,
        public_ip: Ipv4Addr,
        ttl: Duration,
    ) -> Self {
        LeaseManager {
            etcd,
            prefix: prefix.trim_end_matches('/').to_string(),
            config,
            public_ip,
            ttl,
            held: None,
        }
    }

    /// The connection, for reporting a failed request ([`Etcd::failed`]).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    pub fn subnets_prefix(&self) -> String {
        subnets_prefix(&self.prefix)
    }

    pub fn key_of(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_to_key(subnet))
    }

    /// Takes a subnet: one already leased to our public IP, else `hint` (the subnet we had
    /// before) when free, else a random free one.
    pub async fn acquire(&mut self, hint: Option<Ipv4Net>) -> Result<Lease, AcquireError> {
        let value = LeaseValue::udp(self.public_ip).encode();
        let ttl_secs = self.ttl.as_secs().max(1) as i64;
        let granted = self.etcd.client().lease_grant(ttl_secs, None).await?.id();
        let result = self.acquire_with(granted, hint, &value).await;
        if let Ok(lease) = &result {
            self.held = Some(lease.lease_id);
        }
        if !matches!(result, Ok(ref l) if l.lease_id == granted) {
            // Never leave an unused etcd lease behind.
            if let Err(e) = self.etcd.client().lease_revoke(granted).await {
                tracing::warn!(
                    lease_id = granted,
                    "could not revoke unused etcd lease: {e}"
                );
            }
        }
        result
    }

    async fn acquire_with(
        &mut self,
        lease_id: i64,
        hint: Option<Ipv4Net>,
        value: &str,
    ) -> Result<Lease, AcquireError> {
        let range = self.config.range();
        loop {
            let listing = self.list().await?;
            // Every lease, of any length: a new one must overlap none of them.
            let mut taken: SubnetSet = listing.iter().map(|l| l.subnet).collect();

            // Ours from before a change of Network or SubnetLen: give it back (as flannel
            // does) instead of letting it linger until its TTL runs out.
            if let Some(stale) = listing.iter().find(|l| {
                l.value
                    .as_ref()
                    .is_some_and(|v| v.public_ip == self.public_ip)
                    && !range.contains(l.subnet)
            }) {
                let key = self.key_of(stale.subnet);
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        stale.mod_revision,
                    )])
                    .and_then([TxnOp::delete(key.as_str(), None)]);
                if self.etcd.client().txn(txn).await?.succeeded() {
                    tracing::warn!(
                        subnet = %stale.subnet,
                        "released our lease from an earlier network config: it does not fit Network {} with SubnetLen {}",
                        self.config.network,
                        self.config.subnet_len
                    );
                }
                continue;
            }

            // A lease that already names our public IP is ours (e.g. from before a restart):
            // move it onto the fresh etcd lease, unless someone changed it meanwhile.
            if let Some(mine) = listing.iter().find(|l| {
                l.value
                    .as_ref()
                    .is_some_and(|v| v.public_ip == self.public_ip)
                    && range.contains(l.subnet)
            }) {
                if let Some(held) = self.held.filter(|held| {
                    mine.etcd_lease != 0 && mine.etcd_lease != *held && mine.etcd_lease != lease_id
                }) {
                    tracing::debug!(
                        held,
                        other = mine.etcd_lease,
                        "our subnet's key is on another etcd lease"
                    );
                    return Err(AcquireError::PublicIpConflict {
                        public_ip: self.public_ip,
                        subnet: mine.subnet,
                    });
                }
                // flannel's order: the lease naming our public IP wins over the subnet file.
                if let Some(hint) = hint.filter(|h| *h != mine.subnet) {
                    tracing::info!(
                        "the subnet file says {hint} but the lease naming our public IP {} is {}: using that one (as flannel does)",
                        self.public_ip,
                        mine.subnet
                    );
                }
                let key = self.key_of(mine.subnet);
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        mine.mod_revision,
                    )])
                    .and_then([TxnOp::put(
                        key.as_str(),
                        value,
                        Some(PutOptions::new().with_lease(lease_id)),
                    )]);
                if self.etcd.client().txn(txn).await?.succeeded() {
                    if mine.etcd_lease != 0 && mine.etcd_lease != lease_id {
                        // The key left that lease: revoking it deletes nothing of ours.
                        let _ = self.etcd.client().lease_revoke(mine.etcd_lease).await;
                    }
                    tracing::info!(subnet = %mine.subnet, "reusing the lease already held by {}", self.public_ip);
                    return Ok(self.lease(mine.subnet, lease_id));
                }
                continue;
            }

            let mut candidate =
                hint.filter(|h| range.contains(*h) && taken.overlapping(*h).is_none());
            for _ in 0..ATTEMPTS_PER_LISTING {
                let subnet = match candidate.take() {
                    Some(s) => s,
                    None => match range.pick_free(&taken, &mut rand::rng()) {
                        Some(s) => s,
                        None => {
                            return Err(AcquireError::Exhausted {
                                network: self.config.network,
                                total: range.len(),
                                subnet_len: range.subnet_len(),
                                min: self.config.subnet_min,
                                max: self.config.subnet_max,
                            });
                        }
                    },
                };
                if self.try_create(subnet, lease_id, value).await? {
                    return Ok(self.lease(subnet, lease_id));
                }
                tracing::debug!(%subnet, "lost the race for a subnet; trying another");
                taken.insert(subnet);
            }
        }
    }

    fn lease(&self, subnet: Ipv4Net, lease_id: i64) -> Lease {
        Lease {
            subnet,
            lease_id,
            ttl: self.ttl,
        }
    }

    /// Creates the key only if nobody holds it.
    async fn try_create(
        &mut self,
        subnet: Ipv4Net,
        lease_id: i64,
        value: &str,
    ) -> Result<bool, etcd_client::Error> {
        let key = self.key_of(subnet);
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        Ok(self.etcd.client().txn(txn).await?.succeeded())
    }

    /// Every key under `subnets/` that parses as a subnet, with its value when that parses.
    async fn list(&mut self) -> Result<Vec<Listed>, etcd_client::Error> {
        let prefix = self.subnets_prefix();
        let (kvs, _) = list_prefix(self.etcd.client(), &prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let suffix = kv.key().strip_prefix(prefix.as_bytes())?;
                let subnet = key_to_subnet(std::str::from_utf8(suffix).ok()?)?;
                Some(Listed {
                    subnet,
                    value: LeaseValue::parse(kv.value()).ok(),
                    mod_revision: kv.mod_revision(),
                    etcd_lease: kv.lease(),
                })
            })
            .collect())
    }

    /// Refreshes the etcd lease to its full TTL (one keep-alive round trip: no new lease, so
    /// nothing is orphaned).
    pub async fn renew(&mut self, lease: &Lease) -> Result<Renewal, etcd_client::Error> {
        let (mut keeper, mut responses) =
            self.etcd.client().lease_keep_alive(lease.lease_id).await?;
        keeper.keep_alive().await?;
        let ttl = match responses.message().await? {
            Some(resp) => resp.ttl(),
            None => 0,
        };
        Ok(if ttl > 0 {
            Renewal::Renewed(Duration::from_secs(ttl as u64))
        } else {
            Renewal::Lost
        })
    }

    /// Whether our key still exists and still names us.
    pub async fn holds(&mut self, lease: &Lease) -> Result<bool, etcd_client::Error> {
        let resp = self
            .etcd
            .client()
            .get(self.key_of(lease.subnet), None)
            .await?;
        Ok(resp.kvs().first().is_some_and(|kv| {
            kv.lease() == lease.lease_id
                && LeaseValue::parse(kv.value()).is_ok_and(|v| v.public_ip == self.public_ip)
        }))
    }

    /// Gives the subnet back: revoking the etcd lease deletes the key.
    pub async fn release(&mut self, lease: &Lease) -> Result<(), etcd_client::Error> {
        self.etcd.client().lease_revoke(lease.lease_id).await?;
        Ok(())
    }
}

pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

struct Listed {
    subnet: Ipv4Net,
    value: Option<LeaseValue>,
    mod_revision: i64,
    etcd_lease: i64,
}

/// When to renew a lease of `ttl`: `margin` before expiry, or half-way through when the
/// margin is not shorter than the lease (short test leases).
pub fn renew_after(ttl: Duration, margin: Duration) -> Duration {
    if margin < ttl {
        ttl - margin
    } else {
        ttl / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_happens_margin_before_expiry() {
        let h = Duration::from_secs(3600);
        assert_eq!(renew_after(24 * h, h), 23 * h);
        assert_eq!(
            renew_after(Duration::from_secs(20), h),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn subnets_prefix_ignores_trailing_slash() {
        assert_eq!(
            subnets_prefix("/coreos.com/network"),
            "/coreos.com/network/subnets/"
        );
        assert_eq!(
            subnets_prefix("/coreos.com/network/"),
            "/coreos.com/network/subnets/"
        );
    }
}
