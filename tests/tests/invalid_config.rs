//! (6) An invalid network config in etcd is reported in the log (naming the problem), the
//! daemon stays alive and not ready; once a valid config is written it becomes ready.

use rudder_tests::cluster::{Cluster, Host, DEFAULT_CONFIG};
use rudder_tests::{check, e2e, ping, wait_until, HostOpts};
use std::time::Duration;

/// The first log line that satisfies `pred` (lowercased), waiting for it.
fn wait_log_line(h: &Host, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let mut found = String::new();
    wait_until(what, Duration::from_secs(30), || {
        h.check_alive()?;
        if let Some(l) = h.log().lines().find(|l| pred(&l.to_lowercase())) {
            found = l.to_string();
            return Ok(true);
        }
        Ok(false)
    })?;
    Ok(found)
}

/// Not ready (503), alive, no subnet file, no lease; then a valid config makes it ready.
fn stays_unready_then_recovers(c: &Cluster, h: &Host) -> anyhow::Result<()> {
    wait_until("/readyz to answer", Duration::from_secs(30), || {
        Ok(h.http_get("/readyz")?.0 == 503)
    })?;
    let (code, _) = h.http_get("/healthz")?;
    check!(
        code == 200,
        "/healthz answered {code} while waiting for a valid config"
    );
    // Still retrying, not giving up: alive and not ready a while later too.
    let log_len = h.log().len();
    wait_until(
        "the daemon to retry (log grows)",
        Duration::from_secs(30),
        || {
            h.check_alive()?;
            Ok(h.log().len() > log_len)
        },
    )?;
    check!(
        h.http_get("/readyz")?.0 == 503,
        "ready with an invalid config"
    );
    check!(
        h.read_subnet_file()?.is_none(),
        "subnet file written with an invalid config"
    );
    check!(
        c.lease_keys(None)?.is_empty(),
        "lease taken with an invalid config: {:?}",
        c.lease_keys(None)?
    );

    c.put_config(DEFAULT_CONFIG)?;
    h.wait_ready(Duration::from_secs(60))?;
    check!(
        c.lease_keys(None)?.len() == 1,
        "leases: {:?}",
        c.lease_keys(None)?
    );
    ping(&h.container(), h.gateway_ip())?;
    Ok(())
}

#[test]
fn too_small_network_is_reported_then_fixed() {
    e2e(|c| {
        c.put_config(r#"{"Network":"10.5.0.0/30","Backend":{"Type":"udp"}}"#)?;
        let h = c.add_host(HostOpts {
            wait_ready: false,
            ..HostOpts::default()
        })?;
        let line = wait_log_line(&h, "a log line naming the too-small network", |l| {
            l.contains("network")
                && (l.contains("/30")
                    || l.contains("too small")
                    || l.contains("prefix")
                    || l.contains("28"))
        })?;
        eprintln!("daemon said: {line}");
        stays_unready_then_recovers(c, &h)
    });
}

#[test]
fn malformed_json_is_reported_then_fixed() {
    e2e(|c| {
        c.put_config(r#"{"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}"#)?;
        let h = c.add_host(HostOpts {
            wait_ready: false,
            ..HostOpts::default()
        })?;
        let line = wait_log_line(&h, "a log line naming the malformed JSON config", |l| {
            l.contains("config")
                && [
                    "json",
                    "pars",
                    "eof",
                    "syntax",
                    "malformed",
                    "invalid",
                    "expected",
                ]
                .iter()
                .any(|w| l.contains(w))
        })?;
        eprintln!("daemon said: {line}");
        stays_unready_then_recovers(c, &h)
    });
}
