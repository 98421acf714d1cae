//! Our own subnet: acquire it from etcd, keep it alive, get it back when it is lost.
//!
//! Acquisition costs a bounded number of round trips: one range read of all leases, one
//! lease grant, then one create-if-absent transaction per attempt (a lost race marks that
//! subnet taken and tries another without re-reading).
//!
//! Dual stack as flannel's `tryAcquireLease` (pkg/subnet/etcd/local_manager.go): one key
//! names both subnets (`10.5.34.0-24&fc00:0:0:22::-64`), created in one transaction; a lease
//! of ours that lacks the half the config now wants (or has one it no longer wants) is
//! deleted and taken again.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::NetworkConfig;
use crate::etcd::listing::list_prefix;
use crate::etcd::Etcd;
use crate::subnet::{lease_key, parse_lease_key, LeaseSubnets, LeaseValue};
use crate::subnet_set::SubnetSet;

/// Create attempts after one listing before we list again.
const ATTEMPTS_PER_LISTING: usize = 8;

/// A subnet we hold in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 subnet; 0.0.0.0/0 on an IPv6-only network (flannel's empty subnet).
    pub subnet: Ipv4Net,
    /// The IPv6 subnet when the network has IPv6 on.
    pub ipv6_subnet: Option<Ipv6Net>,
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
    #[error(
        "IPv6 network {network} is exhausted: every /{subnet_len} between {min} and {max} is \
         leased; free one (or widen IPv6Network/IPv6SubnetMin/IPv6SubnetMax)"
    )]
    Ipv6Exhausted {
        network: Ipv6Net,
        subnet_len: u8,
        min: Ipv6Addr,
        max: Ipv6Addr,
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
    /// Written as PublicIPv6 when the network has IPv6 on (flannel leaves it null otherwise).
    public_ipv6: Option<Ipv6Addr>,
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
        public_ipv6: Option<Ipv6Addr>,
        ttl: Duration,
    ) -> Self {
        let public_ipv6 = public_ipv6.filter(|_| config.ipv6.is_some());
        // flannel writes 0.0.0.0 as PublicIP on an IPv6-only network.
        let public_ip = if config.enable_ipv4 {
            public_ip
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        LeaseManager {
            etcd,
            prefix: prefix.trim_end_matches('/').to_string(),
            config,
            public_ip,
            public_ipv6,
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

    /// The key of a lease holding these subnets (0.0.0.0/0 stands for "no IPv4").
    pub fn key_of(&self, subnet: Ipv4Net, ipv6: Option<Ipv6Net>) -> String {
        let ipv4 = (subnet != Ipv4Net::default()).then_some(subnet);
        format!("{}{}", self.subnets_prefix(), lease_key(ipv4, ipv6))
    }

    fn key_of_listed(&self, subnets: LeaseSubnets) -> String {
        format!(
            "{}{}",
            self.subnets_prefix(),
            lease_key(subnets.ipv4, subnets.ipv6)
        )
    }

    /// Whether a lease value is this host's: by PublicIP, or PublicIPv6 when IPv6-only.
    fn is_ours(&self, value: &LeaseValue) -> bool {
        if self.config.enable_ipv4 {
            value.public_ip == self.public_ip
        } else {
            self.public_ipv6.is_some() && value.public_ipv6 == self.public_ipv6
        }
    }

    /// Whether a lease's subnets are the ones this config hands out, in each family (flannel's
    /// `isSubnetConfigCompat` and `isIPv6SubnetConfigCompat`).
    fn fits_config(&self, subnets: LeaseSubnets) -> bool {
        let v4_fits = match subnets.ipv4 {
            Some(v4) => self.config.enable_ipv4 && self.config.range().contains(v4),
            None => !self.config.enable_ipv4,
        };
        let v6_fits = match (subnets.ipv6, &self.config.ipv6) {
            (Some(v6), Some(c)) => c.range().contains(v6),
            (None, None) => true,
            _ => false,
        };
        v4_fits && v6_fits
    }

    /// Takes a subnet (with an IPv6 one when the network has IPv6): one already leased to our
    /// public IP, else the hints (the subnets we had before) when free, else random free ones.
    pub async fn acquire(
        &mut self,
        hint: Option<Ipv4Net>,
        hint6: Option<Ipv6Net>,
    ) -> Result<Lease, AcquireError> {
        let value = LeaseValue::udp(self.public_ip)
            .with_ipv6(self.public_ipv6)
            .encode();
        let ttl_secs = self.ttl.as_secs().max(1) as i64;
        let granted = self.etcd.client().lease_grant(ttl_secs, None).await?.id();
        let result = self.acquire_with(granted, hint, hint6, &value).await;
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
        mut hint: Option<Ipv4Net>,
        hint6: Option<Ipv6Net>,
        value: &str,
    ) -> Result<Lease, AcquireError> {
        let range = self.config.range();
        let range6 = self.config.ipv6.map(|c| c.range());
        loop {
            let listing = self.list().await?;
            // Every lease, of any length: a new one must overlap none of them.
            let mut taken: SubnetSet = listing.iter().filter_map(|l| l.subnets.ipv4).collect();
            let mut taken6: Vec<Ipv6Net> = listing.iter().filter_map(|l| l.subnets.ipv6).collect();

            // Ours from before a change of the config (Network, SubnetLen, IPv6 on or off):
            // give it back (as flannel does) instead of letting it linger until its TTL runs
            // out. Its IPv4 subnet stays our first choice, so turning IPv6 on keeps the
            // containers' IPv4 addresses (flannel would also drop those when its subnet file
            // has no IPv6 subnet yet).
            if let Some(stale) = listing.iter().find(|l| {
                l.value.as_ref().is_some_and(|v| self.is_ours(v)) && !self.fits_config(l.subnets)
            }) {
                let key = self.key_of_listed(stale.subnets);
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        stale.mod_revision,
                    )])
                    .and_then([TxnOp::delete(key.as_str(), None)]);
                if self.etcd.client().txn(txn).await?.succeeded() {
                    tracing::warn!(
                        key = %key,
                        "released our lease from an earlier network config: it does not fit Network {} with SubnetLen {} (IPv6: {})",
                        self.config.network,
                        self.config.subnet_len,
                        self.config.ipv6.map_or("off".to_string(), |c| format!("{} with IPv6SubnetLen {}", c.network, c.subnet_len)),
                    );
                    if hint.is_none() {
                        hint = stale.subnets.ipv4;
                    }
                }
                continue;
            }

            // A lease that already names our public IP is ours (e.g. from before a restart):
            // move it onto the fresh etcd lease, unless someone changed it meanwhile.
            if let Some(mine) = listing
                .iter()
                .find(|l| l.value.as_ref().is_some_and(|v| self.is_ours(v)))
            {
                let mine_v4 = mine.subnets.ipv4.unwrap_or_default();
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
                        subnet: mine_v4,
                    });
                }
                // flannel's order: the lease naming our public IP wins over the subnet file.
                if let Some(hint) = hint.filter(|h| *h != mine_v4 && self.config.enable_ipv4) {
                    tracing::info!(
                        "the subnet file says {hint} but the lease naming our public IP {} is {}: using that one (as flannel does)",
                        self.public_ip,
                        mine_v4
                    );
                }
                let key = self.key_of_listed(mine.subnets);
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
                    tracing::info!(key = %key, "reusing the lease already held by this host");
                    return Ok(self.lease(mine_v4, mine.subnets.ipv6, lease_id));
                }
                continue;
            }

            let mut candidate =
                hint.filter(|h| range.contains(*h) && taken.overlapping(*h).is_none());
            let mut candidate6 = hint6.filter(|h| {
                range6.is_some_and(|r| r.contains(*h)) && !taken6.iter().any(|t| overlaps6(*t, *h))
            });
            for _ in 0..ATTEMPTS_PER_LISTING {
                let subnet = if !self.config.enable_ipv4 {
                    None
                } else {
                    match candidate.take() {
                        Some(s) => Some(s),
                        None => match range.pick_free(&taken, &mut rand::rng()) {
                            Some(s) => Some(s),
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
                    }
                };
                let subnet6 = match (range6, self.config.ipv6) {
                    (Some(r), Some(c)) => match candidate6.take() {
                        Some(s) => Some(s),
                        None => Some(r.pick_free(&taken6, &mut rand::rng()).ok_or(
                            AcquireError::Ipv6Exhausted {
                                network: c.network,
                                subnet_len: c.subnet_len,
                                min: c.subnet_min,
                                max: c.subnet_max,
                            },
                        )?),
                    },
                    _ => None,
                };
                let subnets = LeaseSubnets {
                    ipv4: subnet,
                    ipv6: subnet6,
                };
                if self.try_create(subnets, lease_id, value).await? {
                    if self.yields_ipv6(subnets).await? {
                        if let Some(s) = subnet6 {
                            taken6.push(s);
                        }
                        candidate = subnet;
                        continue;
                    }
                    return Ok(self.lease(subnet.unwrap_or_default(), subnet6, lease_id));
                }
                tracing::debug!(?subnets, "lost the race for a subnet; trying another");
                if let Some(s) = subnet {
                    taken.insert(s);
                }
                taken6.extend(subnet6);
            }
        }
    }

    fn lease(&self, subnet: Ipv4Net, ipv6_subnet: Option<Ipv6Net>, lease_id: i64) -> Lease {
        Lease {
            subnet,
            ipv6_subnet,
            lease_id,
            ttl: self.ttl,
        }
    }

    /// Creates the key only if nobody holds it, nor its IPv4 subnet under another key (a
    /// dual-stack key with another IPv6 half, or the IPv4-only key).
    async fn try_create(
        &mut self,
        subnets: LeaseSubnets,
        lease_id: i64,
        value: &str,
    ) -> Result<bool, etcd_client::Error> {
        let key = self.key_of_listed(subnets);
        let mut free = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
        if let Some(v4) = subnets.ipv4 {
            let v4_only = self.key_of_listed(LeaseSubnets {
                ipv4: Some(v4),
                ipv6: None,
            });
            free.push(Compare::version(v4_only.as_str(), CompareOp::Equal, 0));
            free.push(Compare::version(format!("{v4_only}&"), CompareOp::Equal, 0).with_prefix());
        }
        let txn = Txn::new().when(free).and_then([TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease_id)),
        )]);
        Ok(self.etcd.client().txn(txn).await?.succeeded())
    }

    /// After creating `ours`: whether an earlier-created key holds an overlapping IPv6 subnet
    /// (no transaction can guard it: it is the end of other keys). The later creator yields
    /// and deletes its key; it always sees the earlier one, which committed before it.
    async fn yields_ipv6(&mut self, ours: LeaseSubnets) -> Result<bool, etcd_client::Error> {
        let Some(v6) = ours.ipv6 else {
            return Ok(false);
        };
        let listing = self.list().await?;
        let Some(mine) = listing.iter().find(|l| l.subnets == ours) else {
            return Ok(false);
        };
        let earlier = listing.iter().find(|l| {
            l.subnets != ours
                && l.create_revision < mine.create_revision
                && l.subnets.ipv6.is_some_and(|o| overlaps6(o, v6))
        });
        let Some(earlier) = earlier else {
            return Ok(false);
        };
        let key = self.key_of_listed(ours);
        tracing::debug!(%key, earlier = ?earlier.subnets, "lost the race for an IPv6 subnet; trying another");
        self.etcd.client().delete(key.as_str(), None).await?;
        Ok(true)
    }

    /// Every key under `subnets/` that parses as a subnet, with its value when that parses.
    async fn list(&mut self) -> Result<Vec<Listed>, etcd_client::Error> {
        let prefix = self.subnets_prefix();
        let (kvs, _) = list_prefix(self.etcd.client(), &prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| {
                let suffix = kv.key().strip_prefix(prefix.as_bytes())?;
                let subnets = parse_lease_key(std::str::from_utf8(suffix).ok()?).ok()?;
                Some(Listed {
                    subnets,
                    value: LeaseValue::parse(kv.value()).ok(),
                    mod_revision: kv.mod_revision(),
                    create_revision: kv.create_revision(),
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
            .get(self.key_of(lease.subnet, lease.ipv6_subnet), None)
            .await?;
        Ok(resp.kvs().first().is_some_and(|kv| {
            kv.lease() == lease.lease_id
                && LeaseValue::parse(kv.value()).is_ok_and(|v| self.is_ours(&v))
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
    subnets: LeaseSubnets,
    create_revision: i64,
    value: Option<LeaseValue>,
    mod_revision: i64,
    etcd_lease: i64,
}

/// Whether two IPv6 subnets share an address (one contains the other).
fn overlaps6(a: Ipv6Net, b: Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
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
