//! flannel's order of preference when acquiring, and two hosts behind one public IP.
//! (1) A subnet file (hint) that disagrees with the lease naming our PublicIP: the lease wins,
//! as in flannel, and the log says so. (2) A second host starting with the first one's
//! PublicIP takes over its lease (it cannot be told from a restart of the first); the first
//! then says, in one error line, that another host announces its address, and does not take
//! the lease back: no silent tug of war. (Before: the two moved the key back and forth.)

use std::time::Duration;

use rudder_tests::cluster::DEFAULT_PREFIX;
use rudder_tests::{check, e2e, wait_until, HostOpts};

const SHARED: &str = "192.168.77.150";

/// The etcd lease id the key `key` is attached to.
fn etcd_lease_of(c: &rudder_tests::Cluster, key: &str) -> anyhow::Result<i64> {
    let out = c.etcdctl(&["get", key, "-w", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["kvs"][0]["lease"].as_i64().unwrap_or(0))
}

#[test]
fn the_lease_naming_our_public_ip_wins_over_the_subnet_file() {
    e2e(|c| {
        let h = c.add_host_without_daemon(HostOpts::default())?;
        std::fs::write(
            h.subnet_file(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.99.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
        )?;
        c.etcd_put(
            &format!("{DEFAULT_PREFIX}/subnets/10.5.77.0-24"),
            &format!(
                r#"{{"PublicIP":"{}","BackendType":"udp"}}"#,
                h.underlay_ip()
            ),
        )?;
        h.start()?;
        h.wait_ready(Duration::from_secs(60))?;
        check!(
            h.subnet().to_string() == "10.5.77.0/24",
            "got {}, not the lease naming our public IP",
            h.subnet()
        );
        check!(
            h.log()
                .contains("the subnet file says 10.5.99.0/24 but the lease naming our public IP"),
            "the disagreement was not logged"
        );
        Ok(())
    });
}

#[test]
fn two_hosts_behind_one_public_ip_do_not_fight_silently() {
    e2e(|c| {
        let opts = || HostOpts {
            extra_args: vec!["--public-ip".into(), SHARED.into()],
            ..HostOpts::default()
        };
        let a = c.add_host(opts())?;
        let key = a.lease_key();
        let first = etcd_lease_of(c, &key)?;
        let b = c.add_host(opts())?;
        check!(
            b.subnet() == a.subnet(),
            "b did not reuse the lease naming {SHARED}"
        );
        wait_until(
            "a to report the shared public IP",
            Duration::from_secs(20),
            || {
                Ok(a.log()
                    .contains(&format!("another host announces our public IP {SHARED}")))
            },
        )?;
        let taken = etcd_lease_of(c, &key)?;
        check!(taken != first, "the key should be on b's etcd lease now");
        // No tug of war: the key stays where b put it.
        for _ in 0..5 {
            std::thread::sleep(Duration::from_secs(1));
            check!(
                etcd_lease_of(c, &key)? == taken,
                "the key moved again: a took it back"
            );
        }
        a.check_alive()?;
        b.check_alive()?;
        Ok(())
    });
}
