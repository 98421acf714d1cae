//! Fault: etcd's data is wiped (a fresh etcd on the same endpoint). Every daemon re-creates
//! its own lease with the same subnet, and traffic between containers never stops.

use std::time::{Duration, Instant};

use rudder_tests::traffic::ping_series;
use rudder_tests::{add_hosts, check, e2e, wait_mesh, wait_until};

#[test]
fn wiped_etcd_gets_every_lease_back_without_losing_traffic() {
    e2e(|c| {
        let hosts = add_hosts(c, 3)?;
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let expected: Vec<(String, String)> = hosts
            .iter()
            .map(|h| (h.lease_key(), h.underlay_ip().to_string()))
            .collect();

        // A paced ping stream (sequence numbers) across the whole fault.
        let (from, to) = (hosts[0].container(), hosts[1].container_ip());
        let pings =
            std::thread::spawn(move || ping_series(&from, to, 100, Duration::from_millis(100)));

        std::thread::sleep(Duration::from_secs(2));
        c.stop_etcd()?;
        std::fs::remove_dir_all(c.dir().join("etcd-data"))?;
        c.start_etcd()?;
        let wiped_at = Instant::now();
        // No check that it came up empty: the daemons may re-register before we look.

        wait_until(
            "every daemon to re-create its lease",
            Duration::from_secs(60),
            || {
                for (key, ip) in &expected {
                    match c.etcd_get(key)? {
                        Some(v) if v.contains(ip.as_str()) => {}
                        _ => return Ok(false),
                    }
                }
                Ok(true)
            },
        )?;
        let recovered = wiped_at.elapsed();
        check!(
            c.lease_keys(None)?.len() == hosts.len(),
            "extra leases appeared: {:?}",
            c.lease_keys(None)?
        );
        for h in &hosts {
            check!(
                h.read_subnet_file()?.map(|env| env.subnet.trunc()) == Some(h.subnet()),
                "{}: subnet file changed",
                h.name()
            );
        }

        let (sent, received) = pings
            .join()
            .map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
        eprintln!(
            "etcd wiped: all {} leases back after {:.1} s; pings {received}/{sent} answered during the fault",
            hosts.len(),
            recovered.as_secs_f64()
        );
        check!(
            received == sent,
            "{} pings lost while etcd was wiped",
            sent - received
        );
        Ok(())
    });
}
