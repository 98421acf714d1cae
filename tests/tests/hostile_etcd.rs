//! Hostile and malformed etcd content while the cluster runs: junk lease keys and values, a
//! lease outside the network, another backend, a huge value, a changed network config. Each
//! is skipped or reported with a line naming the key; the daemons keep running and traffic
//! keeps flowing.

use std::time::Duration;

use rudder_tests::cluster::DEFAULT_PREFIX;
use rudder_tests::{
    add_hosts, check, e2e, ping, tcp_transfer, unleased_subnets, wait_mesh, wait_until,
};

#[test]
fn junk_in_etcd_is_skipped_and_named_while_traffic_flows() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let subnets = format!("{DEFAULT_PREFIX}/subnets/");
        // Junk on keys the daemons' own leases do not use.
        let keys: Vec<String> = unleased_subnets(&[a, b], 4)
            .iter()
            .map(|s| format!("{subnets}{}-24", s.network()))
            .collect();
        let huge = format!(
            r#"{{"PublicIP":"192.168.77.50","Pad":"{}"}}"#,
            "x".repeat(100_000)
        );
        let junk: Vec<(String, String)> = vec![
            (
                format!("{subnets}garbage"),
                r#"{"PublicIP":"192.168.77.51"}"#.into(),
            ),
            (keys[0].clone(), "not json at all".into()),
            (keys[1].clone(), r#"{"PublicIP":5}"#.into()),
            (
                format!("{subnets}10.9.1.0-24"),
                r#"{"PublicIP":"192.168.77.52"}"#.into(),
            ),
            (keys[2].clone(), huge),
        ];
        for (key, value) in &junk {
            c.etcd_put(key, value)?;
        }
        let vxlan_key = keys[3].clone();
        c.etcd_put(
            &vxlan_key,
            r#"{"PublicIP":"192.168.77.53","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
        )?;
        c.put_config(r#"{"Network":"10.6.0.0/16"}"#)?;

        for h in [a, b] {
            wait_until(
                &format!("{} to report every junk key", h.name()),
                Duration::from_secs(10),
                || {
                    let log = h.log();
                    Ok(junk
                        .iter()
                        .all(|(key, _)| log.contains(&format!("key={key}"))))
                },
            )?;
            let log = h.log();
            check!(
                log.contains("network config changed (Network 10.5.0.0/16"),
                "{}: the config change was not reported",
                h.name()
            );
            check!(
                log.matches("ignoring a \"vxlan\" backend lease").count() == 1,
                "{}: the vxlan lease should be logged exactly once",
                h.name()
            );
            h.check_alive()?;
            let st = h.status()?;
            check!(st["ready"] == true, "{}: not ready: {st}", h.name());
            check!(
                st["invalid_leases"].as_u64() >= Some(junk.len() as u64),
                "{}: invalid_leases {}",
                h.name(),
                st["invalid_leases"]
            );
            let peers = h.peers()?;
            check!(peers.len() == 1, "{}: peers {peers:?}", h.name());
        }
        ping(&a.container(), b.container_ip())?;
        tcp_transfer(&a.container(), &b.container(), 1 << 20)?;
        tcp_transfer(&b.container(), &a.container(), 1 << 20)?;
        Ok(())
    });
}
