//! Fault: the etcd member a daemon's peer watch listens to is cut from the other two (nft in
//! its namespace), so it has no leader while the majority goes on. Each member is isolated
//! in turn (the watch is on one of them), and each time a lease written on the majority must
//! reach the daemon within seconds (printed). (Before: watches were opened without
//! `require_leader`, so the daemon kept listening to the isolated member and heard nothing.)

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rudder_tests::cluster::{DEFAULT_CONFIG, DEFAULT_PREFIX};
use rudder_tests::etcd_members::EtcdMembers;
use rudder_tests::util::run;
use rudder_tests::{check, e2e, netns, wait_mesh, wait_until, HostOpts};

fn isolate(etcd: &EtcdMembers, k: usize) -> anyhow::Result<()> {
    let others: Vec<String> = etcd
        .members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != k)
        .map(|(_, m)| m.ip.to_string())
        .collect();
    let set = others.join(", ");
    let rules = format!(
        "table ip isolate {{
           chain input {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}
           chain output {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}
         }}"
    );
    netns::exec_ok(&etcd.members[k].ns, "nft", &[&rules])?;
    Ok(())
}

fn heal(etcd: &EtcdMembers, k: usize) -> anyhow::Result<()> {
    netns::exec_ok(
        &etcd.members[k].ns,
        "nft",
        &["delete", "table", "ip", "isolate"],
    )?;
    Ok(())
}

/// `etcdctl put` through the members other than `k` only.
fn put_on_majority(
    etcd: &EtcdMembers,
    c: &rudder_tests::Cluster,
    k: usize,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    let endpoints: Vec<String> = etcd
        .members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != k)
        .map(|(_, m)| format!("http://{}:2379", m.ip))
        .collect();
    run(netns::exec(c.underlay_ns(), "etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["--command-timeout=5s", "put", key, value]))?;
    Ok(())
}

#[test]
fn a_lease_written_on_the_majority_reaches_a_daemon_whose_member_is_isolated() {
    e2e(|c| {
        let etcd = EtcdMembers::start(c, 3)?;
        etcd.etcdctl(&["put", &format!("{DEFAULT_PREFIX}/config"), DEFAULT_CONFIG])?;
        let opts = HostOpts {
            etcd_endpoints: Some(etcd.endpoints()),
            ..HostOpts::default()
        };
        let a = c.add_host(opts.clone())?;
        let b = c.add_host(opts)?;
        wait_mesh(&[a.clone(), b.clone()], Duration::from_secs(30))?;

        let mut seconds = Vec::new();
        for k in 0..etcd.members.len() {
            isolate(&etcd, k)?;
            let isolated = Instant::now();
            let subnet: ipnet::Ipv4Net = format!("10.5.{}.0/24", 240 + k).parse()?;
            let public = Ipv4Addr::new(192, 168, 77, 90 + k as u8);
            let key = format!("{DEFAULT_PREFIX}/subnets/10.5.{}.0-24", 240 + k);
            let value = format!(r#"{{"PublicIP":"{public}","BackendType":"udp"}}"#);
            // Isolating the leader makes the other two elect one first.
            wait_until(
                "the majority to accept a write",
                Duration::from_secs(30),
                || Ok(put_on_majority(&etcd, c, k, &key, &value).is_ok()),
            )?;
            let written = Instant::now();
            wait_until(
                &format!(
                    "a to hear of {subnet} while member {} is isolated",
                    etcd.members[k].name
                ),
                Duration::from_secs(30),
                || Ok(a.peers()?.contains(&(subnet, public))),
            )?;
            let took = written.elapsed().as_secs_f64();
            eprintln!(
                "member {} isolated: the lease reached the daemon {took:.1} s after it was written, {:.1} s after the isolation",
                etcd.members[k].name,
                isolated.elapsed().as_secs_f64()
            );
            seconds.push(took);
            heal(&etcd, k)?;
            etcd.wait_healthy(3)?;
        }
        a.check_alive()?;
        b.check_alive()?;
        check!(a.sees_peer(&b)?, "a lost b");
        eprintln!("seconds per isolated member: {seconds:.1?}");
        Ok(())
    });
}
