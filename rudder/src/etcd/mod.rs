//! etcd connection (endpoints, TLS, auth) and the back-off every etcd loop uses.

pub mod diagnose;
pub mod listing;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rand::Rng;

use crate::cli::EtcdArgs;

/// Builds the connect options; partial TLS flags are an error, never a plain-text fall-back.
pub fn connect_options(args: &EtcdArgs) -> anyhow::Result<ConnectOptions> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        // A member cut from quorum refuses (and cancels our watches) instead of serving
        // stale data forever; we then go on to another member.
        .with_require_leader(true)
        // etcd's simple tokens expire when idle (--auth-token-ttl, 300 s) and vanish when it
        // restarts, JWTs after a fixed time: log in again and retry instead of failing for good.
        .with_auto_token_refresh(true);

    match (&args.etcd_username, &args.etcd_password) {
        (Some(user), Some(password)) => opts = opts.with_user(user, password),
        (None, None) => {}
        _ => bail!("--etcd-username and --etcd-password must be given together"),
    }

    let identity = match (&args.etcd_certfile, &args.etcd_keyfile) {
        (Some(cert), Some(key)) => {
            let cert = std::fs::read(cert)
                .with_context(|| format!("reading --etcd-certfile {}", cert.display()))?;
            let key = std::fs::read(key)
                .with_context(|| format!("reading --etcd-keyfile {}", key.display()))?;
            Some(Identity::from_pem(cert, key))
        }
        (None, None) => None,
        _ => bail!("--etcd-certfile and --etcd-keyfile must be given together"),
    };
    let ca = match &args.etcd_cafile {
        Some(path) => Some(Certificate::from_pem(
            std::fs::read(path)
                .with_context(|| format!("reading --etcd-cafile {}", path.display()))?,
        )),
        None => None,
    };
    let wants_tls = identity.is_some()
        || ca.is_some()
        || args
            .etcd_endpoints
            .iter()
            .any(|e| e.starts_with("https://"));
    if wants_tls {
        if let Some(plain) = args
            .etcd_endpoints
            .iter()
            .find(|e| !e.starts_with("https://"))
        {
            bail!(
                "TLS flags are set but endpoint {plain} is not https://: use https:// endpoints \
                 (rudder never falls back to plain text)"
            );
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(ca);
        }
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

/// The daemon's etcd connection, shared by its tasks (cheap to clone).
///
/// The client's channel balances over the endpoints it was built with but keeps sending
/// requests to a member that is down, so after a failed request [`Etcd::failed`] probes every
/// endpoint and rebuilds the client over the ones that accept connections.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    opts: ConnectOptions,
    /// The client and the endpoints it was built over.
    current: Mutex<(Client, Vec<String>)>,
}

impl Etcd {
    /// Connects, retrying with back-off until an etcd endpoint answers. Never gives up: the
    /// daemon must outlive an etcd outage at start.
    pub async fn connect(args: &EtcdArgs) -> anyhow::Result<Self> {
        let opts = connect_options(args)?;
        let mut backoff = Backoff::default();
        loop {
            let live = live_endpoints(&args.etcd_endpoints, &opts).await;
            let endpoints = if live.is_empty() {
                args.etcd_endpoints.clone()
            } else {
                live
            };
            match Client::connect(&endpoints, Some(opts.clone())).await {
                Ok(client) => {
                    return Ok(Etcd {
                        inner: Arc::new(Inner {
                            endpoints: args.etcd_endpoints.clone(),
                            opts,
                            current: Mutex::new((client, endpoints)),
                        }),
                    });
                }
                Err(e) => {
                    let problem = diagnose::describe(&args.etcd_endpoints, &e).await;
                    let wait = backoff.next_delay();
                    tracing::warn!("{problem}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The endpoints as configured (`--etcd-endpoints`).
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// The client to use for the next request.
    pub fn client(&self) -> Client {
        self.lock().0.clone()
    }

    /// Called after a request failed: if the set of endpoints accepting connections changed,
    /// rebuild the client over them. Bounded time (one probe round), so a caller can keep
    /// honouring shutdown.
    pub async fn failed(&self) {
        let live = live_endpoints(&self.inner.endpoints, &self.inner.opts).await;
        if live.is_empty() || live == self.lock().1 {
            return;
        }
        match Client::connect(&live, Some(self.inner.opts.clone())).await {
            Ok(client) => {
                tracing::info!(endpoints = %live.join(","), "etcd client now uses the endpoints that answer");
                *self.lock() = (client, live);
            }
            Err(e) => tracing::debug!("reconnecting to etcd: {e}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Client, Vec<String>)> {
        self.inner
            .current
            .lock()
            .expect("etcd client lock poisoned")
    }
}

/// The endpoints that accept a TCP connection within a short timeout and do not say they
/// have no leader, probed together, in the order given. A member cut from the others still
/// accepts connections and answers every request at once with "no leader"; the client's
/// balancer favours such a fast answer, so it must be left out by name.
async fn live_endpoints(endpoints: &[String], opts: &ConnectOptions) -> Vec<String> {
    let probes = endpoints.iter().map(|endpoint| async move {
        let live = accepts_connections(endpoint).await && !without_leader(endpoint, opts).await;
        live.then(|| endpoint.clone())
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

async fn accepts_connections(endpoint: &str) -> bool {
    diagnose::probe(endpoint, Duration::from_millis(500))
        .await
        .is_ok()
}

/// True only when the member answers that it has no leader (or its status names none); a
/// slow or odd answer is no proof, so it keeps the member.
async fn without_leader(endpoint: &str, opts: &ConnectOptions) -> bool {
    let ask = async {
        let mut client = Client::connect([endpoint], Some(opts.clone())).await?;
        client.status().await
    };
    match tokio::time::timeout(Duration::from_secs(2), ask).await {
        Ok(Ok(status)) => status.leader() == 0,
        Ok(Err(e)) => says_no_leader(&e),
        Err(_) => false,
    }
}

/// etcd's answer from a member outside the quorum (`require_leader` requests, raft requests).
fn says_no_leader(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::Unavailable && status.message().contains("no leader"))
}

/// Capped exponential back-off with jitter: no busy loop while etcd is down.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay to wait now; doubles each call up to the cap, with +-20% jitter.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::rng().random_range(0.8..1.2);
        base.mul_f64(jitter).min(self.max)
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoints: &[&str]) -> EtcdArgs {
        EtcdArgs {
            etcd_endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            etcd_prefix: "/coreos.com/network".into(),
            etcd_keyfile: None,
            etcd_certfile: None,
            etcd_cafile: None,
            etcd_username: None,
            etcd_password: None,
        }
    }

    #[tokio::test]
    async fn only_endpoints_that_accept_connections_are_live() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = format!("http://{}", listener.local_addr().unwrap());
        // A port that was just free: nothing listens there.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        // `open` never answers gRPC: no proof that it lacks a leader, so it stays.
        let opts = ConnectOptions::new();
        let live = live_endpoints(&[closed.clone(), open.clone()], &opts).await;
        assert_eq!(live, vec![open]);
        assert!(live_endpoints(&[closed], &opts).await.is_empty());
    }

    #[test]
    fn only_etcds_no_leader_answer_counts_as_leaderless() {
        let no_leader = tonic::Status::unavailable("etcdserver: no leader");
        assert!(says_no_leader(&etcd_client::Error::GRpcStatus(no_leader)));
        let refused = tonic::Status::unavailable("tcp connect error");
        assert!(!says_no_leader(&etcd_client::Error::GRpcStatus(refused)));
        let other = tonic::Status::internal("etcdserver: no leader");
        assert!(!says_no_leader(&etcd_client::Error::GRpcStatus(other)));
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(120));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(800));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }

    #[test]
    fn partial_credentials_are_errors() {
        let mut a = args(&["http://127.0.0.1:2379"]);
        a.etcd_username = Some("root".into());
        let err = connect_options(&a).unwrap_err().to_string();
        assert!(err.contains("--etcd-username and --etcd-password"), "{err}");

        let mut a = args(&["https://127.0.0.1:2379"]);
        a.etcd_certfile = Some("/nonexistent.pem".into());
        let err = connect_options(&a).unwrap_err().to_string();
        assert!(err.contains("--etcd-certfile and --etcd-keyfile"), "{err}");
    }

    #[test]
    fn tls_flags_with_plain_endpoint_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not checked here").unwrap();
        let mut a = args(&["http://127.0.0.1:2379"]);
        a.etcd_cafile = Some(ca);
        let err = connect_options(&a).unwrap_err().to_string();
        assert!(err.contains("is not https://"), "{err}");
    }

    #[test]
    fn unreadable_ca_names_the_file() {
        let mut a = args(&["https://127.0.0.1:2379"]);
        a.etcd_cafile = Some("/nonexistent/ca.pem".into());
        let err = format!("{:#}", connect_options(&a).unwrap_err());
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
