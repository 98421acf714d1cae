//! (3) A host stopped with SIGTERM and `--release-lease-on-exit` leaves: its lease key is
//! gone and the other hosts drop it from their peers; it removes its devices.

use rudder_tests::cluster::TUN;
use rudder_tests::util::ip;
use rudder_tests::{add_hosts, check, e2e, ping, wait_mesh, wait_until, HostOpts};
use std::time::Duration;

#[test]
fn stopped_host_releases_lease_and_disappears_from_peers() {
    e2e(|c| {
        let mut hosts = add_hosts(c, 2)?;
        let leaving = c.add_host(HostOpts {
            release_lease_on_exit: true,
            ..HostOpts::default()
        })?;
        hosts.push(leaving.clone());
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let key = leaving.lease_key();
        check!(
            c.etcd_get(&key)?.is_some(),
            "lease {key} missing before stop"
        );

        let status = leaving.stop()?;
        check!(
            status.success(),
            "daemon exit status after SIGTERM: {status}"
        );
        check!(
            c.etcd_get(&key)?.is_none(),
            "lease {key} still in etcd after a clean exit with --release-lease-on-exit"
        );
        check!(
            ip(&["-n", leaving.netns(), "link", "show", TUN]).is_err(),
            "{TUN} still exists in {} after the daemon exited",
            leaving.netns()
        );

        let (a, b) = (&hosts[0], &hosts[1]);
        for h in [a, b] {
            wait_until(
                &format!("{} to drop {} from its peers", h.name(), leaving.subnet()),
                Duration::from_secs(30),
                || Ok(!h.peers()?.iter().any(|(s, _)| *s == leaving.subnet())),
            )?;
        }
        // The others are unaffected.
        ping(&a.container(), b.container_ip())?;
        ping(&b.container(), a.container_ip())?;
        check!(
            c.lease_keys(None)?.len() == 2,
            "leases: {:?}",
            c.lease_keys(None)?
        );
        Ok(())
    });
}
