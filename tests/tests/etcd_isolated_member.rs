//! Fault: the etcd member a daemon's peer watch listens to is cut from the other two (nft in
//! its namespace), so it has no leader while the majority goes on. Each member is isolated
//! in turn (the watch is on one of them), and each time a lease written on the majority must
//! reach the daemon within seconds (printed). (Before: watches were opened without
//! `require_leader`, so the daemon kept listening to the isolated member and heard nothing.)
//! Then the daemon's own lease key is deleted on the majority: it must get its subnet back
//! while the member is still cut off. (Before: the isolated member answers "no leader" at
//! once, the client's balancer favours the fast answer, and the re-acquisition kept failing
//! there with growing back-off, 15 s and more.)

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rudder_tests::cluster::{DEFAULT_CONFIG, DEFAULT_PREFIX};
use rudder_tests::etcd_members::EtcdMembers;
use rudder_tests::util::run;
use rudder_tests::{check, e2e, netns, unleased_subnets, wait_mesh, wait_until, HostOpts};

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

/// `etcdctl ARGS` through the members other than `k` only.
fn on_majority(
    etcd: &EtcdMembers,
    c: &rudder_tests::Cluster,
    k: usize,
    args: &[&str],
) -> anyhow::Result<String> {
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
        .arg("--command-timeout=5s")
        .args(args))
}

fn subnet_key(subnet: ipnet::Ipv4Net) -> String {
    format!(
        "{DEFAULT_PREFIX}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
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

        // Leases of our own, on subnets neither daemon holds.
        let mut free = unleased_subnets(&[&a, &b], etcd.members.len()).into_iter();
        let own_key = subnet_key(a.subnet());
        let mut seconds = Vec::new();
        let mut reacquired = Vec::new();
        for k in 0..etcd.members.len() {
            isolate(&etcd, k)?;
            let isolated = Instant::now();
            let subnet = free.next().expect("one per member");
            let public = Ipv4Addr::new(192, 168, 77, 90 + k as u8);
            let key = subnet_key(subnet);
            let value = format!(r#"{{"PublicIP":"{public}","BackendType":"udp"}}"#);
            // Isolating the leader makes the other two elect one first.
            wait_until(
                "the majority to accept a write",
                Duration::from_secs(30),
                || Ok(on_majority(&etcd, c, k, &["put", &key, &value]).is_ok()),
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

            // Our lease lost while the member is still cut off: a must win it back.
            on_majority(&etcd, c, k, &["del", &own_key])?;
            let deleted = Instant::now();
            wait_until(
                &format!(
                    "a to re-acquire {} while member {} is isolated",
                    a.subnet(),
                    etcd.members[k].name
                ),
                Duration::from_secs(20),
                || {
                    let held = on_majority(&etcd, c, k, &["get", &own_key, "--print-value-only"]);
                    Ok(held.is_ok_and(|v| v.contains(&a.underlay_ip().to_string())))
                },
            )?;
            reacquired.push(deleted.elapsed().as_secs_f64());
            heal(&etcd, k)?;
            etcd.wait_healthy(3)?;
        }
        a.check_alive()?;
        b.check_alive()?;
        check!(a.sees_peer(&b)?, "a lost b");
        eprintln!(
            "seconds per isolated member: {seconds:.1?}; lease re-acquired after {reacquired:.1?}"
        );
        Ok(())
    });
}
