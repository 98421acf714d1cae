//! Network config changes under live leases. `SubnetLen` 24 → 20 while two hosts hold /24s:
//! a new host's /20 overlaps neither; a restarted host gives its /24 back (not left for 24 h)
//! and takes a /20; hosts on either length keep talking (the rolling change the README
//! describes). A lease written by hand over a live one is refused and reported, never routed.
//! (Before: only identical subnets were compared, so a /20 could be carved over live /24s.)

use anyhow::Context;
use ipnet::Ipv4Net;
use rudder_tests::{check, e2e, wait_ping, wait_until, HostOpts};
use std::time::Duration;

const SUBNET_LEN_20: &str = r#"{"Network":"10.5.0.0/16","SubnetLen":20,"Backend":{"Type":"udp"}}"#;

fn leases(c: &rudder_tests::Cluster) -> anyhow::Result<Vec<Ipv4Net>> {
    c.lease_keys(None)?
        .iter()
        .map(|k| {
            let suffix = k.rsplit('/').next().unwrap_or_default();
            let (addr, len) = suffix.split_once('-').context("lease key")?;
            Ok(format!("{addr}/{len}").parse()?)
        })
        .collect()
}

fn assert_no_overlap(all: &[Ipv4Net]) -> anyhow::Result<()> {
    for (i, x) in all.iter().enumerate() {
        for y in &all[i + 1..] {
            check!(
                !x.contains(y) && !y.contains(x),
                "leases {x} and {y} overlap: {all:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_subnet_len_change_never_overlaps_and_gives_old_leases_back() {
    e2e(|c| {
        let a = c.add_host(HostOpts::default())?;
        let b = c.add_host(HostOpts::default())?;
        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(30))?;
        let old_a = a.subnet();

        c.put_config(SUBNET_LEN_20)?;
        let d = c.add_host(HostOpts::default())?;
        check!(d.subnet().prefix_len() == 20, "new host got {}", d.subnet());
        assert_no_overlap(&leases(c)?)?;
        // Hosts on /24 and on /20 reach each other.
        wait_ping(&d.container(), b.container_ip(), Duration::from_secs(30))?;
        wait_ping(&b.container(), d.container_ip(), Duration::from_secs(30))?;

        // A restart under the new config: the /24 goes back, a /20 comes.
        a.restart()?;
        let all = leases(c)?;
        check!(
            !all.contains(&old_a) && all.len() == 3,
            "a's old lease {old_a} should be released: {all:?}"
        );
        check!(a.subnet().prefix_len() == 20, "a now has {}", a.subnet());
        assert_no_overlap(&all)?;
        check!(
            a.log()
                .contains("released our lease from an earlier network config"),
            "a did not say it released {old_a}"
        );
        wait_ping(&d.container(), a.gateway_ip(), Duration::from_secs(30))?;
        wait_ping(&b.container(), d.container_ip(), Duration::from_secs(30))?;
        Ok(())
    });
}

#[test]
fn a_lease_overlapping_a_live_one_is_refused_and_reported() {
    e2e(|c| {
        let a = c.add_host(HostOpts::default())?;
        let b = c.add_host(HostOpts::default())?;
        wait_ping(&b.container(), a.container_ip(), Duration::from_secs(30))?;
        let invalid_before = b.status()?["invalid_leases"].as_u64().unwrap_or(0);

        let over_a = Ipv4Net::new(a.subnet().network(), 20)?.trunc();
        let key = format!(
            "{}/subnets/{}-20",
            rudder_tests::cluster::DEFAULT_PREFIX,
            over_a.network()
        );
        c.etcd_put(&key, r#"{"PublicIP":"192.168.77.99","BackendType":"udp"}"#)?;
        wait_until(
            "b to refuse the overlapping lease",
            Duration::from_secs(20),
            || {
                Ok(b.log().contains(&format!(
                    "refusing lease {over_a}: it overlaps the earlier lease"
                )))
            },
        )?;
        check!(
            !b.peers()?.iter().any(|(s, _)| *s == over_a),
            "b made the overlapping lease a peer"
        );
        check!(
            b.status()?["invalid_leases"].as_u64().unwrap_or(0) > invalid_before,
            "the refusal was not counted"
        );
        wait_ping(&b.container(), a.container_ip(), Duration::from_secs(10))?;
        Ok(())
    });
}
