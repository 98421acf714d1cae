//! etcd auth tokens that expire (`--auth-token-ttl=5`: simple tokens die after 5 s idle) and
//! vanish (etcd restarted, which also breaks every watch): the daemons keep renewing their
//! leases, follow peers that join afterwards, and re-acquire a deleted lease. (Before: after
//! the first expiry every request failed with "invalid auth token" for good.)

use anyhow::Context;
use rudder_tests::cluster::DEFAULT_PREFIX;
use rudder_tests::extra_etcd::{ExtraEtcd, RUDDER_PASSWORD, RUDDER_USER};
use rudder_tests::{check, e2e, tcp_transfer, wait_ping, wait_until, Cluster, Host, HostOpts};
use std::time::Duration;

const PORT: u16 = 2679;

fn host(c: &Cluster, etcd: &ExtraEtcd) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        etcd_endpoints: Some(etcd.endpoint().to_string()),
        extra_args: vec![
            "--etcd-username".into(),
            RUDDER_USER.into(),
            "--etcd-password".into(),
            RUDDER_PASSWORD.into(),
            // Renewed every 10 s: the token expires between two renewals.
            "--subnet-lease-ttl".into(),
            "20s".into(),
        ],
        ..HostOpts::default()
    })
}

fn metric(h: &Host, name: &str) -> anyhow::Result<u64> {
    let st = h.status()?;
    st[name].as_u64().with_context(|| format!("{name} in {st}"))
}

#[test]
fn expired_and_vanished_auth_tokens_are_renewed() {
    e2e(|c| {
        let etcd = ExtraEtcd::start(c, "tokens", "http", PORT, &["--auth-token-ttl=5".into()])?;
        etcd.wait_healthy(&[])?;
        etcd.enable_auth()?;
        let a = host(c, &etcd)?;
        let b = host(c, &etcd)?;
        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(30))?;

        // Idle past the token TTL: the next renewals must log in again.
        let renewals = metric(&a, "lease_renewals")?;
        wait_until(
            "a to renew its lease twice after its token expired",
            Duration::from_secs(40),
            || Ok(metric(&a, "lease_renewals")? >= renewals + 2),
        )?;

        // etcd restarted: every token is gone and the watches break.
        etcd.restart()?;
        etcd.wait_healthy(&["--user=root:rootpw"])?;
        let d = host(c, &etcd)?;
        for h in [&a, &b] {
            wait_until(
                &format!(
                    "{} to follow the host that joined after the restart",
                    h.name()
                ),
                Duration::from_secs(30),
                || h.sees_peer(&d),
            )?;
        }
        wait_ping(&a.container(), d.container_ip(), Duration::from_secs(30))?;

        // A deleted lease is re-acquired with a fresh token, same subnet.
        let acquisitions = metric(&a, "lease_acquisitions")?;
        let key = a.lease_key();
        etcd.etcdctl_root(&["del", &key])?;
        wait_until(
            "a to re-acquire its deleted lease",
            Duration::from_secs(60),
            || {
                Ok(etcd
                    .etcdctl_root(&["get", &key, "--print-value-only"])?
                    .contains(&a.underlay_ip().to_string()))
            },
        )?;
        check!(
            metric(&a, "lease_acquisitions")? > acquisitions,
            "lease_acquisitions did not grow"
        );
        check!(
            a.status()?["subnet"] == a.subnet().to_string(),
            "a moved to another subnet"
        );
        let renewals = metric(&b, "lease_renewals")?;
        wait_until(
            "b to renew after the restart",
            Duration::from_secs(40),
            || Ok(metric(&b, "lease_renewals")? > renewals),
        )?;
        tcp_transfer(&d.container(), &a.container(), 1 << 20)?;
        for h in [&a, &b, &d] {
            h.check_alive()?;
            let invalid = h.log().matches("invalid auth token").count();
            eprintln!(
                "{}: {invalid} log lines name an invalid auth token",
                h.name()
            );
        }
        check!(
            etcd.etcdctl_root(&[
                "get",
                "--prefix",
                "--keys-only",
                &format!("{DEFAULT_PREFIX}/subnets/")
            ])?
            .lines()
            .filter(|l| !l.is_empty())
            .count()
                == 3,
            "expected 3 leases"
        );
        Ok(())
    });
}
