//! (4) A daemon killed with SIGKILL and started again gets the same subnet back and traffic
//! resumes.

use rudder_tests::{add_hosts, check, e2e, netns, tcp_transfer, wait_mesh, wait_ping};
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[test]
fn kill9_and_restart_keeps_subnet_and_traffic_resumes() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let subnet = a.subnet();
        let key = a.lease_key();
        let old_pid = a.pid();

        a.kill9()?;
        check!(!a.is_running(), "daemon still running after SIGKILL");
        // The lease outlives the process (it was not released).
        check!(
            c.etcd_get(&key)?.is_some(),
            "lease {key} vanished after kill -9"
        );

        let restarted = Instant::now();
        a.restart()?;
        wait_ping(&b.container(), a.container_ip(), Duration::from_secs(30))?;
        eprintln!(
            "kill -9 + restart: traffic resumed {:.2} s after the restart began",
            restarted.elapsed().as_secs_f64()
        );
        check!(a.pid() != old_pid, "restart did not start a new process");
        check!(
            a.subnet() == subnet,
            "subnet changed across restart: {subnet} -> {}",
            a.subnet()
        );
        let st = a.status()?;
        check!(
            st["subnet"] == subnet.to_string(),
            "/status after restart: {st}"
        );
        check!(
            c.lease_keys(None)?.len() == 2,
            "leases: {:?}",
            c.lease_keys(None)?
        );

        // Nothing doubled by the crash and the restart.
        let routes = netns::exec_ok(a.netns(), "ip", &["-4", "route", "show", "table", "all"])?;
        let mut seen = HashSet::new();
        for line in routes.lines() {
            check!(
                seen.insert(line),
                "route listed twice after restart: {line}\n{routes}"
            );
        }
        let tables = netns::exec_ok(a.netns(), "nft", &["list", "tables"])?;
        check!(
            tables.matches("table ip rudder").count() <= 1,
            "nftables: {tables}"
        );
        let links = netns::exec_ok(a.netns(), "ip", &["-o", "link", "show"])?;
        check!(
            links.matches(": rudder0").count() <= 1 && links.matches(": rbr0").count() == 1,
            "links after restart:\n{links}"
        );

        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(30))?;
        tcp_transfer(&a.container(), &b.container(), 2 << 20)?;
        tcp_transfer(&b.container(), &a.container(), 2 << 20)?;
        Ok(())
    });
}
