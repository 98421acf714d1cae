//! Concurrent joins against a small network: 20 real daemons started at the same moment,
//! and 100 concurrent acquisitions through the lease module. No subnet is handed out twice;
//! every contender gets a subnet or the exhaustion error.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use rudder::cli::EtcdArgs;
use rudder::config::NetworkConfig;
use rudder::etcd::Etcd;
use rudder::lease::{AcquireError, LeaseManager};
use rudder_tests::cluster::DEFAULT_PREFIX;
use rudder_tests::{check, e2e, netns, wait_until, Cluster, HostOpts};

/// 10.5.0.0/24 cut into /28s: SubnetMin .16 .. SubnetMax .240, 15 subnets.
const SMALL_NETWORK: &str = r#"{"Network":"10.5.0.0/24","SubnetLen":28}"#;
const CAPACITY: usize = 15;

/// Subnet key → PublicIP of every lease in etcd.
fn leases(c: &Cluster, prefix: &str) -> anyhow::Result<BTreeMap<String, String>> {
    c.etcd_get_prefix(&format!("{prefix}/subnets/"))?
        .into_iter()
        .map(|(k, v)| {
            let value: serde_json::Value = serde_json::from_str(&v)?;
            Ok((
                k,
                value["PublicIP"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

#[test]
fn twenty_daemons_started_at_once_never_share_a_subnet() {
    e2e(|c| {
        c.put_config(SMALL_NETWORK)?;
        let hosts: Vec<_> = (0..20)
            .map(|_| {
                c.add_host_without_daemon(HostOpts {
                    wait_ready: false,
                    ..HostOpts::default()
                })
            })
            .collect::<Result<_, _>>()?;
        for h in &hosts {
            h.start()?;
        }
        wait_until(
            "every subnet to be taken and the rest to report exhaustion",
            Duration::from_secs(60),
            || {
                let taken = leases(c, DEFAULT_PREFIX)?.len();
                let exhausted = hosts
                    .iter()
                    .filter(|h| h.log().contains("is exhausted"))
                    .count();
                // A lease is in etcd a moment before its holder writes the subnet file.
                let files = hosts
                    .iter()
                    .filter(|h| h.read_subnet_file().ok().flatten().is_some())
                    .count();
                Ok(taken == CAPACITY && exhausted == hosts.len() - CAPACITY && files == CAPACITY)
            },
        )?;
        let leases = leases(c, DEFAULT_PREFIX)?;
        let ips: HashSet<&String> = leases.values().collect();
        check!(
            ips.len() == CAPACITY,
            "one host holds two leases: {leases:?}"
        );
        let mut files = HashSet::new();
        for h in &hosts {
            h.check_alive()?;
            if let Some(env) = h.read_subnet_file()? {
                check!(
                    files.insert(env.subnet.trunc()),
                    "{} duplicated in subnet files",
                    env.subnet
                );
                let key = format!(
                    "{DEFAULT_PREFIX}/subnets/{}-{}",
                    env.subnet.trunc().network(),
                    env.subnet.prefix_len()
                );
                check!(
                    leases.get(&key) == Some(&h.underlay_ip().to_string()),
                    "{}: subnet file says {} but etcd says {:?}",
                    h.name(),
                    env.subnet,
                    leases.get(&key)
                );
            }
        }
        check!(
            files.len() == CAPACITY,
            "{} subnet files for {CAPACITY} leases",
            files.len()
        );
        let log = hosts
            .iter()
            .map(|h| h.log())
            .find(|l| l.contains("is exhausted"))
            .unwrap_or_default();
        check!(
            log.contains("network 10.5.0.0/24 is exhausted: all 15 subnets of /28"),
            "the exhaustion error should name the network and the counts"
        );
        Ok(())
    });
}

#[test]
fn hundred_concurrent_acquisitions_through_the_lease_module() {
    e2e(|c| {
        let prefix = "/lease-race";
        let endpoint = c.etcd_endpoint();
        let results = netns::run_in(c.underlay_ns(), move || {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let args = EtcdArgs {
                    etcd_endpoints: vec![endpoint],
                    etcd_prefix: prefix.into(),
                    etcd_keyfile: None,
                    etcd_certfile: None,
                    etcd_cafile: None,
                    etcd_username: None,
                    etcd_password: None,
                };
                let etcd = Etcd::connect(&args).await?;
                let config = NetworkConfig::parse(SMALL_NETWORK.as_bytes())?;
                let tasks = (0..100u8).map(|i| {
                    let mut leases = LeaseManager::new(
                        etcd.clone(),
                        prefix,
                        config.clone(),
                        Ipv4Addr::new(172, 31, 0, i + 1),
                        None,
                        Duration::from_secs(120),
                    );
                    tokio::spawn(async move { leases.acquire(None, None).await })
                });
                let mut out = Vec::new();
                for joined in futures::future::join_all(tasks).await {
                    out.push(joined?);
                }
                anyhow::Ok(out)
            })
        })?;
        let mut subnets = HashSet::new();
        let mut exhausted = 0;
        for result in &results {
            match result {
                Ok(lease) => check!(
                    subnets.insert(lease.subnet),
                    "{} handed out twice",
                    lease.subnet
                ),
                Err(AcquireError::Exhausted { .. }) => exhausted += 1,
                Err(e) => {
                    anyhow::bail!("acquisition failed with something other than exhaustion: {e}")
                }
            }
        }
        eprintln!(
            "100 concurrent acquisitions: {} subnets, {exhausted} exhausted",
            subnets.len()
        );
        check!(
            subnets.len() == CAPACITY && exhausted == 100 - CAPACITY,
            "{} ok, {exhausted} exhausted",
            subnets.len()
        );
        let in_etcd = leases(c, prefix)?;
        check!(
            in_etcd.len() == CAPACITY,
            "etcd holds {} leases",
            in_etcd.len()
        );
        let owners: HashSet<&String> = in_etcd.values().collect();
        check!(
            owners.len() == CAPACITY,
            "a public IP holds two leases: {in_etcd:?}"
        );
        Ok(())
    });
}

/// The same race on a dual-stack network whose IPv6 side is the scarcer: fc00::/123 in /126s
/// leaves 7 IPv6 subnets beside 15 IPv4 ones. No subnet of either family is handed out twice
/// (the IPv6 half cannot be guarded by the create transaction: the later creator yields).
#[test]
fn hundred_concurrent_dual_stack_acquisitions_share_no_subnet() {
    e2e(|c| {
        let prefix = "/lease-race-v6";
        let endpoint = c.etcd_endpoint();
        let results = netns::run_in(c.underlay_ns(), move || {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let args = EtcdArgs {
                    etcd_endpoints: vec![endpoint],
                    etcd_prefix: prefix.into(),
                    etcd_keyfile: None,
                    etcd_certfile: None,
                    etcd_cafile: None,
                    etcd_username: None,
                    etcd_password: None,
                };
                let etcd = Etcd::connect(&args).await?;
                let config = NetworkConfig::parse(
                    br#"{"Network":"10.5.0.0/24","SubnetLen":28,"EnableIPv6":true,"IPv6Network":"fc00::/123","IPv6SubnetLen":126}"#,
                )?;
                let tasks = (0..100u8).map(|i| {
                    let mut leases = LeaseManager::new(
                        etcd.clone(),
                        prefix,
                        config.clone(),
                        Ipv4Addr::new(172, 31, 0, i + 1),
                        Some(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i) + 1)),
                        Duration::from_secs(120),
                    );
                    tokio::spawn(async move { leases.acquire(None, None).await })
                });
                let mut out = Vec::new();
                for joined in futures::future::join_all(tasks).await {
                    out.push(joined?);
                }
                anyhow::Ok(out)
            })
        })?;
        let (mut v4s, mut v6s, mut exhausted) = (HashSet::new(), HashSet::new(), 0);
        for result in &results {
            match result {
                Ok(lease) => {
                    let v6 = lease
                        .ipv6_subnet
                        .ok_or_else(|| anyhow::anyhow!("no IPv6 half"))?;
                    check!(
                        v4s.insert(lease.subnet),
                        "{} handed out twice",
                        lease.subnet
                    );
                    check!(v6s.insert(v6), "{v6} handed out twice");
                }
                // IPv4 exhaustion is possible too while losers' keys briefly exist.
                Err(AcquireError::Ipv6Exhausted { .. } | AcquireError::Exhausted { .. }) => {
                    exhausted += 1
                }
                Err(e) => anyhow::bail!(
                    "acquisition failed with something other than IPv6 exhaustion: {e}"
                ),
            }
        }
        eprintln!(
            "100 concurrent dual-stack acquisitions: {} leases, {exhausted} IPv6-exhausted",
            v6s.len()
        );
        check!(
            v6s.len() == 7 && exhausted == 93,
            "{} ok, {exhausted} exhausted",
            v6s.len()
        );
        let in_etcd = leases(c, prefix)?;
        check!(
            in_etcd.len() == 7 && in_etcd.keys().all(|k| k.contains('&')),
            "etcd holds {in_etcd:?}"
        );
        Ok(())
    });
}
