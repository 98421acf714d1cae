//! (4) A daemon killed with SIGKILL and started again gets the same subnet back and traffic
//! resumes.

use rudder_tests::{add_hosts, check, e2e, tcp_transfer, wait_mesh, wait_ping};
use std::time::Duration;

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

        a.restart()?;
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

        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(30))?;
        wait_ping(&b.container(), a.container_ip(), Duration::from_secs(30))?;
        tcp_transfer(&a.container(), &b.container(), 2 << 20)?;
        tcp_transfer(&b.container(), &a.container(), 2 << 20)?;
        Ok(())
    });
}
