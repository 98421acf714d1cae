//! (2) A fourth host joins a running cluster and is reachable from all, and reaches all.

use rudder_tests::{add_hosts, check, e2e, tcp_transfer, wait_mesh, HostOpts};
use std::time::Duration;

#[test]
fn fourth_host_joins_later_and_is_reachable() {
    e2e(|c| {
        let mut hosts = add_hosts(c, 3)?;
        wait_mesh(&hosts, Duration::from_secs(30))?;

        let d = c.add_host(HostOpts::default())?;
        check!(
            hosts.iter().all(|h| h.subnet() != d.subnet()),
            "new host got a subnet already in use: {}",
            d.subnet()
        );
        hosts.push(d.clone());
        check!(
            c.lease_keys(None)?.len() == 4,
            "leases: {:?}",
            c.lease_keys(None)?
        );
        // Everyone learns the new peer, and the new host learns everyone.
        wait_mesh(&hosts, Duration::from_secs(30))?;
        for h in &hosts[..3] {
            tcp_transfer(&h.container(), &d.container(), 1 << 20)?;
            tcp_transfer(&d.container(), &h.container(), 1 << 20)?;
        }
        Ok(())
    });
}
