//! Listings of `<prefix>/subnets/` are paged, all pages at one revision: more leases than one
//! gRPC answer may carry (tonic's 4 MiB decode limit) are all listed by the peer registry and
//! the lease acquisition, and a change made between two pages is seen by the watch that
//! starts after the listing instead of being half in the listing or lost.

use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use ipnet::Ipv4Net;
use rudder::cli::EtcdArgs;
use rudder::config::NetworkConfig;
use rudder::etcd::listing::{list_prefix, Pages};
use rudder::etcd::Etcd;
use rudder::lease::{subnets_prefix, LeaseManager};
use rudder::peers::{PeerEvent, PeerRegistry};
use rudder::status::State;
use rudder::subnet::subnet_to_key;
use rudder_tests::{check, e2e, etcd_json, netns, Cluster};

const NETWORK: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24}"#;
/// tonic's default decode limit for one gRPC answer.
const GRPC_DEFAULT_DECODE_LIMIT: usize = 4 * 1024 * 1024;

fn etcd_args(cluster: &Cluster, prefix: &str) -> EtcdArgs {
    EtcdArgs {
        etcd_endpoints: vec![cluster.etcd_endpoint()],
        etcd_prefix: prefix.into(),
        etcd_keyfile: None,
        etcd_certfile: None,
        etcd_cafile: None,
        etcd_username: None,
        etcd_password: None,
    }
}

/// Subnet `i`: 10.(1 + i/256).(i%256).0/24.
fn subnet(i: usize) -> Ipv4Net {
    let i = u32::try_from(i).expect("small index");
    Ipv4Net::new(Ipv4Addr::from(0x0a01_0000 + (i << 8)), 24).unwrap()
}

/// `count` udp leases whose values carry `padding` bytes of an extra field (still parsed as
/// leases: unknown fields are ignored).
fn write_leases(
    cluster: &Cluster,
    prefix: &str,
    count: usize,
    padding: usize,
) -> anyhow::Result<()> {
    let pad = "x".repeat(padding);
    let kvs: Vec<(String, String)> = (0..count)
        .map(|i| {
            let ip = Ipv4Addr::from(0xac10_0000 + u32::try_from(i).unwrap() + 1);
            (
                format!("{}{}", subnets_prefix(prefix), subnet_to_key(subnet(i))),
                format!(r#"{{"PublicIP":"{ip}","BackendType":"udp","Padding":"{pad}"}}"#),
            )
        })
        .collect();
    etcd_json::put_many(cluster, &kvs)
}

#[test]
fn leases_beyond_the_grpc_decode_limit_are_all_listed() {
    e2e(|c| {
        let prefix = "/paging-big";
        // 1200 leases of ~3.9 KB: ~4.7 MB, more than one unpaged answer may carry.
        const COUNT: usize = 1200;
        write_leases(c, prefix, COUNT, 3800)?;
        let args = etcd_args(c, prefix);
        let (unpaged, paged, small_pages, snapshot, acquired) =
            netns::run_in(c.underlay_ns(), move || {
                let runtime = tokio::runtime::Runtime::new()?;
                runtime.block_on(async move {
                    let etcd = Etcd::connect(&args).await?;
                    let listed_prefix = subnets_prefix(prefix);
                    // What the daemon did before paging: one range of the whole prefix.
                    let unpaged = etcd
                        .client()
                        .get(
                            listed_prefix.as_str(),
                            Some(GetOptions::new().with_prefix()),
                        )
                        .await
                        .map(|r| r.kvs().len())
                        .map_err(|e| e.to_string());
                    let (kvs, _) = list_prefix(etcd.client(), &listed_prefix).await?;
                    // A decode limit below one page: the pages shrink until they fit.
                    let mut pages =
                        Pages::with_limits(etcd.client(), &listed_prefix, 1000, 256 << 10);
                    let mut small_pages = 0;
                    while let Some(page) = pages.next().await? {
                        small_pages += page.len();
                    }

                    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
                    let registry = PeerRegistry::new(
                        etcd.clone(),
                        listed_prefix.clone(),
                        "10.0.0.0/8".parse()?,
                        None,
                        tx,
                        State::default(),
                    );
                    let task = tokio::spawn(registry.run());
                    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await?;
                    task.abort();
                    let snapshot = match first {
                        Some(PeerEvent::Snapshot(peers)) => peers.len(),
                        other => anyhow::bail!("expected a snapshot first, got {other:?}"),
                    };

                    let mut leases = LeaseManager::new(
                        etcd.clone(),
                        prefix,
                        NetworkConfig::parse(NETWORK.as_bytes())?,
                        Ipv4Addr::new(172, 31, 0, 1),
                        None,
                        Duration::from_secs(60),
                    );
                    let acquired = leases.acquire(None, None).await.map(|l| l.subnet);
                    anyhow::Ok((unpaged, kvs.len(), small_pages, snapshot, acquired))
                })
            })?;
        eprintln!("unpaged listing: {unpaged:?}");
        check!(
            unpaged.as_ref().is_err_and(|e| e.contains("too large")),
            "the leases should be more than {GRPC_DEFAULT_DECODE_LIMIT} bytes in one answer: {unpaged:?}"
        );
        check!(paged == COUNT, "paged listing: {paged} of {COUNT} keys");
        check!(
            small_pages == COUNT,
            "listing with shrunk pages: {small_pages} of {COUNT} keys"
        );
        check!(
            snapshot == COUNT,
            "peer registry snapshot: {snapshot} of {COUNT} peers"
        );
        let subnet = acquired.map_err(|e| anyhow::anyhow!("acquisition failed: {e}"))?;
        check!(
            !(0..COUNT).any(|i| self::subnet(i) == subnet),
            "acquired {subnet}, which is already leased"
        );
        Ok(())
    });
}

#[test]
fn a_change_between_pages_is_seen_by_the_watch_from_the_listing_revision() {
    e2e(|c| {
        let prefix = "/paging-revision";
        const COUNT: usize = 2500;
        write_leases(c, prefix, COUNT, 0)?;
        let args = etcd_args(c, prefix);
        let listed_prefix = subnets_prefix(prefix);
        // Both in the last page's part of the key space (keys sort as strings): read at the
        // newest revision, the last page would already show both changes.
        let mut keys: Vec<String> = (0..COUNT)
            .map(|i| format!("{listed_prefix}{}", subnet_to_key(subnet(i))))
            .collect();
        keys.sort();
        let deleted = keys[COUNT - 1].clone();
        let added = format!("{listed_prefix}10.99.0.0-24");
        check!(added > deleted, "{added} should sort last");
        let (added_key, deleted_key) = (added.clone(), deleted.clone());
        let cluster_ns = c.underlay_ns().to_string();
        let (listed, events) = netns::run_in(&cluster_ns, move || {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let etcd = Etcd::connect(&args).await?;
                let mut client = etcd.client();
                let mut pages = Pages::with_limits(client.clone(), &listed_prefix, 1000, 4 << 20);
                let mut listed: Vec<String> = Vec::new();
                let mut changed = false;
                while let Some(page) = pages.next().await? {
                    listed.extend(
                        page.iter()
                            .map(|kv| String::from_utf8_lossy(kv.key()).into()),
                    );
                    if !changed {
                        client
                            .put(added.as_str(), r#"{"PublicIP":"172.30.0.1"}"#, None)
                            .await?;
                        client.delete(deleted.as_str(), None).await?;
                        changed = true;
                    }
                }
                let revision = pages.revision().unwrap_or(0);
                let mut stream = client
                    .watch(
                        listed_prefix.as_str(),
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(revision + 1),
                        ),
                    )
                    .await?;
                let mut events = Vec::new();
                while events.len() < 2 {
                    let Some(resp) =
                        tokio::time::timeout(Duration::from_secs(10), stream.message()).await??
                    else {
                        break;
                    };
                    for e in resp.events() {
                        if let Some(kv) = e.kv() {
                            let kind = match e.event_type() {
                                EventType::Put => "put",
                                EventType::Delete => "delete",
                            };
                            events.push((kind, String::from_utf8_lossy(kv.key()).to_string()));
                        }
                    }
                }
                anyhow::Ok((listed, events))
            })
        })?;
        let (added, deleted) = (added_key, deleted_key);
        check!(
            listed.len() == COUNT,
            "{} keys listed, {COUNT} existed at the listing's revision",
            listed.len()
        );
        check!(
            listed.contains(&deleted) && !listed.contains(&added),
            "the listing mixes revisions: deleted key listed {}, added key listed {}",
            listed.contains(&deleted),
            listed.contains(&added)
        );
        check!(
            events == vec![("put", added.clone()), ("delete", deleted.clone())],
            "the watch from the listing's revision saw {events:?}"
        );
        Ok(())
    });
}
