//! (5) A host whose lease key is deleted from etcd acquires it again (same subnet, key back)
//! and traffic resumes.

use anyhow::Context;
use rudder_tests::{add_hosts, check, e2e, tcp_transfer, wait_mesh, wait_ping, wait_until};
use std::time::Duration;

#[test]
fn deleted_lease_is_reacquired_with_same_subnet() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let subnet = a.subnet();
        let key = a.lease_key();
        let before = a.status()?["lease_acquisitions"]
            .as_u64()
            .context("lease_acquisitions")?;

        check!(
            c.etcd_delete(&key)? == 1,
            "lease key {key} was not there to delete"
        );
        wait_until(
            &format!("lease {key} to be written again"),
            Duration::from_secs(60),
            || {
                let Some(v) = c.etcd_get(&key)? else {
                    return Ok(false);
                };
                let v: serde_json::Value = serde_json::from_str(&v)?;
                Ok(v["PublicIP"] == a.underlay_ip().to_string())
            },
        )?;
        a.check_alive()?;
        let st = a.status()?;
        check!(
            st["subnet"] == subnet.to_string(),
            "/status after re-acquire: {st}"
        );
        let after = st["lease_acquisitions"]
            .as_u64()
            .context("lease_acquisitions")?;
        check!(
            after > before,
            "lease_acquisitions did not grow: {before} -> {after}"
        );
        let env = a.read_subnet_file()?.context("subnet file gone")?;
        check!(
            env.subnet.trunc() == subnet,
            "subnet file now says {}",
            env.subnet
        );
        check!(
            c.lease_keys(None)?.len() == 2,
            "leases: {:?}",
            c.lease_keys(None)?
        );

        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(30))?;
        wait_ping(&b.container(), a.container_ip(), Duration::from_secs(30))?;
        tcp_transfer(&b.container(), &a.container(), 1 << 20)?;
        Ok(())
    });
}
