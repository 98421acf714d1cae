//! Fault: one host loses its path to etcd for longer than its lease TTL (nftables drops its
//! etcd traffic; the overlay itself keeps working). Its peers stay programmed meanwhile (no
//! flushing on watch loss). On heal it keeps its subnet when nobody took it; when another
//! host took it, it moves to a new subnet, rewrites the subnet file and says so.

use std::time::Duration;

use rudder_tests::cluster::ETCD_CLIENT_PORT;
use rudder_tests::{check, e2e, netns, ping, wait_until, Cluster, Host, HostOpts};

/// Short lease: it expires during the partition.
const TTL: &str = "6s";

fn cut_from_etcd(h: &Host) -> anyhow::Result<()> {
    let rules = format!(
        "table ip partition {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  tcp dport {ETCD_CLIENT_PORT} drop\n }}\n}}"
    );
    netns::exec_ok(h.netns(), "nft", &[rules.as_str()])?;
    Ok(())
}

fn heal(h: &Host) -> anyhow::Result<()> {
    netns::exec_ok(h.netns(), "nft", &["delete", "table", "ip", "partition"])?;
    Ok(())
}

fn short_lease_host(c: &Cluster) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        extra_args: vec!["--subnet-lease-ttl".into(), TTL.into()],
        ..HostOpts::default()
    })
}

/// Cuts `h` off until etcd has expired its lease, checking the overlay meanwhile.
fn partition_past_ttl(c: &Cluster, h: &Host, peer: &Host) -> anyhow::Result<()> {
    cut_from_etcd(h)?;
    wait_until(
        &format!("{}'s lease to expire in etcd", h.name()),
        Duration::from_secs(30),
        || Ok(c.etcd_get(&h.lease_key())?.is_none()),
    )?;
    // Cut off from etcd, the host keeps its peers programmed. (The peers, which saw its
    // lease expire, no longer accept it: traffic resumes after the heal.)
    check!(
        h.sees_peer(peer)?,
        "{} flushed its peers when it lost etcd",
        h.name()
    );
    Ok(())
}

#[test]
fn partitioned_host_keeps_its_subnet_when_nobody_took_it() {
    e2e(|c| {
        let a = short_lease_host(c)?;
        let b = short_lease_host(c)?;
        wait_until("a sees b", Duration::from_secs(10), || a.sees_peer(&b))?;
        let subnet = a.subnet();

        partition_past_ttl(c, &a, &b)?;
        heal(&a)?;
        wait_until(
            "a to hold its old subnet again",
            Duration::from_secs(60),
            || Ok(c.etcd_get(&a.lease_key())?.is_some()),
        )?;
        check!(
            a.subnet() == subnet,
            "subnet file changed to {}",
            a.subnet()
        );
        wait_until("b sees a again", Duration::from_secs(30), || {
            b.sees_peer(&a)
        })?;
        ping(&b.container(), a.container_ip())?;
        ping(&a.container(), b.container_ip())
    });
}

#[test]
fn partitioned_host_moves_when_its_subnet_was_taken() {
    e2e(|c| {
        let a = short_lease_host(c)?;
        let b = short_lease_host(c)?;
        wait_until("a sees b", Duration::from_secs(10), || a.sees_peer(&b))?;
        let old = a.subnet();
        let old_key = a.lease_key();

        partition_past_ttl(c, &a, &b)?;
        // Meanwhile another host takes the free subnet.
        let squatter = r#"{"PublicIP":"192.168.77.99","PublicIPv6":null,"BackendType":"udp"}"#;
        c.etcd_put(&old_key, squatter)?;
        heal(&a)?;

        wait_until("a to move to a new subnet", Duration::from_secs(60), || {
            Ok(a.read_subnet_file()?
                .is_some_and(|env| env.subnet.trunc() != old))
        })?;
        let new = a.read_subnet_file()?.map(|env| env.subnet.trunc());
        let st = a.status()?;
        check!(
            Some(st["subnet"].as_str().unwrap_or_default().to_string())
                == new.map(|n| n.to_string()),
            "/status {st} disagrees with the subnet file {new:?}"
        );
        check!(
            c.etcd_get(&old_key)?.as_deref() == Some(squatter),
            "the other host's lease was touched"
        );
        let log = a.log();
        check!(
            log.contains("our subnet was taken by another host"),
            "no error explaining the move in the log"
        );
        eprintln!("{old} was taken during the partition; a moved to {new:?}");
        Ok(())
    });
}
