//! Our lease while running: acquiring it (retried until it succeeds), renewing it,
//! re-acquiring it when lost, and what a stop does with it and the data plane.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::{oneshot, watch, Notify};

use crate::daemon::stop_dataplane;
use crate::dataplane::Dataplane;
use crate::etcd::Backoff;
use crate::lease::{renew_after, AcquireError, Lease, LeaseManager, Renewal};
use crate::local_setup::LocalSetup;
use crate::reconcile::sleep_until_opt;
use crate::status::State;

/// Acquires until it succeeds: exhaustion and etcd errors are logged and retried with back-off.
pub(crate) async fn acquire_until_done(
    leases: &mut LeaseManager,
    hint: Option<Ipv4Net>,
    hint6: Option<Ipv6Net>,
    state: &State,
) -> Lease {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match leases.acquire(hint, hint6).await {
            Ok(lease) => {
                tracing::info!(subnet = %lease.subnet, ipv6_subnet = ?lease.ipv6_subnet, ttl = ?lease.ttl, "lease acquired");
                state.metrics.lease_acquisitions.inc();
                state.update(|s| {
                    s.subnet = Some(lease.subnet);
                    s.ipv6_subnet = lease.ipv6_subnet;
                    s.lease_expires_unix = Some(unix_now() + lease.ttl.as_secs());
                });
                return lease;
            }
            Err(
                e @ (AcquireError::Exhausted { .. }
                | AcquireError::Ipv6Exhausted { .. }
                | AcquireError::PublicIpConflict { .. }),
            ) => {
                let wait = backoff.next_delay();
                tracing::error!("{e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                leases.etcd().failed().await;
                let wait = backoff.next_delay();
                tracing::warn!("acquiring a subnet lease failed: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Owns our lease after start: renews it, and re-acquires it when it is lost.
pub(crate) struct LeaseKeeper {
    pub(crate) leases: LeaseManager,
    pub(crate) lease: Lease,
    pub(crate) renew_margin: Duration,
    pub(crate) check: Arc<Notify>,
    pub(crate) subnet_tx: watch::Sender<Ipv4Net>,
    pub(crate) local: LocalSetup,
    pub(crate) dataplane: Arc<dyn Dataplane>,
    pub(crate) state: State,
}

impl LeaseKeeper {
    /// Runs until `stop` fires, then hands itself back for [`LeaseKeeper::finish`].
    pub(crate) async fn run(mut self, mut stop: oneshot::Receiver<()>) -> Self {
        let mut next_renewal = Instant::now() + renew_after(self.lease.ttl, self.renew_margin);
        let mut backoff = Backoff::default();
        // A check that could not reach etcd is asked again: nothing else would ask.
        let mut recheck: Option<Instant> = None;
        let mut recheck_backoff = Backoff::default();
        loop {
            let check_now = tokio::select! {
                _ = &mut stop => return self,
                _ = tokio::time::sleep_until(next_renewal.into()) => {
                    match self.leases.renew(&self.lease).await {
                        Ok(Renewal::Renewed(ttl)) => {
                            backoff.reset();
                            next_renewal = Instant::now() + renew_after(ttl, self.renew_margin);
                            self.state.metrics.lease_renewals.inc();
                            self.state.update(|s| s.lease_expires_unix = Some(unix_now() + ttl.as_secs()));
                            tracing::debug!(subnet = %self.lease.subnet, ?ttl, "lease renewed");
                        }
                        Ok(Renewal::Lost) => {
                            tracing::warn!(subnet = %self.lease.subnet, "etcd lease expired or revoked");
                            self.reacquire().await;
                            next_renewal = Instant::now() + renew_after(self.lease.ttl, self.renew_margin);
                        }
                        Err(e) => {
                            // Keep trying until the lease would have expired; the data plane
                            // is untouched meanwhile.
                            self.leases.etcd().failed().await;
                            let wait = backoff.next_delay();
                            tracing::warn!(subnet = %self.lease.subnet, "renewing the lease failed: {e}; retrying in {wait:?}");
                            next_renewal = Instant::now() + wait;
                        }
                    }
                    false
                }
                _ = self.check.notified() => true,
                _ = sleep_until_opt(recheck.map(Into::into)) => true,
            };
            if !check_now {
                continue;
            }
            recheck = None;
            match self.leases.holds(&self.lease).await {
                Ok(true) => recheck_backoff.reset(),
                Ok(false) => {
                    recheck_backoff.reset();
                    tracing::warn!(subnet = %self.lease.subnet, "our lease key is gone from etcd (expired or deleted); re-acquiring");
                    self.reacquire().await;
                    next_renewal = Instant::now() + renew_after(self.lease.ttl, self.renew_margin);
                }
                Err(e) => {
                    self.leases.etcd().failed().await;
                    let wait = recheck_backoff.next_delay();
                    tracing::warn!("checking our lease failed: {e}; asking again in {wait:?}");
                    recheck = Some(Instant::now() + wait);
                }
            }
        }
    }

    /// Gets a lease again (the same subnet when still free) without tearing down the data plane.
    async fn reacquire(&mut self) {
        let old = self.lease.subnet;
        let old6 = self.lease.ipv6_subnet;
        let lease = acquire_until_done(&mut self.leases, Some(old), old6, &self.state).await;
        if lease.subnet == old {
            tracing::info!(subnet = %old, "lease re-acquired: same subnet");
            if lease.ipv6_subnet != old6 {
                tracing::error!(
                    old = ?old6, new = ?lease.ipv6_subnet,
                    "our IPv6 subnet was taken by another host while we had lost our lease; moved to a new one"
                );
                if let Err(e) = self.local.apply(lease.subnet, lease.ipv6_subnet).await {
                    tracing::error!("applying the new IPv6 subnet locally failed: {e:#}");
                }
                self.move_ipv6_subnet(lease.ipv6_subnet);
            }
        } else {
            tracing::error!(
                old = %old, new = %lease.subnet,
                "our subnet was taken by another host while we had lost our lease; moved to a new \
                 subnet: containers must be re-addressed"
            );
            if let Err(e) = self.local.apply(lease.subnet, lease.ipv6_subnet).await {
                tracing::error!("applying the new subnet locally failed: {e:#}");
            }
            if let Err(e) = self.dataplane.set_local_subnet(lease.subnet) {
                tracing::error!("moving the data plane to the new subnet failed: {e:#}");
            }
            if lease.ipv6_subnet != old6 {
                self.move_ipv6_subnet(lease.ipv6_subnet);
            }
            self.subnet_tx.send_replace(lease.subnet);
        }
        self.lease = lease;
    }

    fn move_ipv6_subnet(&self, subnet: Option<ipnet::Ipv6Net>) {
        if let Some(subnet) = subnet {
            if let Err(e) = self.dataplane.set_local_subnet6(subnet) {
                tracing::error!("moving the data plane to the new IPv6 subnet failed: {e:#}");
            }
        }
    }

    /// `cleanup`: remove the data plane and the local setup (uninstall); otherwise leave
    /// what keeps forwarding in the kernel for the next start to adopt.
    pub(crate) async fn finish(mut self, release: bool, cleanup: bool) {
        stop_dataplane(&*self.dataplane, &self.local, cleanup).await;
        if release {
            match self.leases.release(&self.lease).await {
                Ok(()) => tracing::info!(subnet = %self.lease.subnet, "lease released"),
                Err(e) => {
                    tracing::warn!(subnet = %self.lease.subnet, "releasing the lease failed: {e}")
                }
            }
        } else {
            tracing::info!(subnet = %self.lease.subnet, "lease kept for the next start");
        }
    }
}
