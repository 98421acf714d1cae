//! (8) etcd is down for 60 s: traffic keeps flowing (none of 300 pings lost), the daemons stay nearly idle (no hot
//! reconnect loop), and after etcd returns they pick up changes again.

use rudder_tests::{
    add_hosts, check, e2e, ping_series, tcp_transfer, wait_mesh, wait_ping, wait_until, HostOpts,
};
use std::time::{Duration, Instant};

const OUTAGE: Duration = Duration::from_secs(60);
const MAX_CPU: Duration = Duration::from_secs(1);

#[test]
fn etcd_outage_keeps_traffic_and_costs_little_cpu() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let cpu_a = a.cpu_time()?;
        let cpu_b = b.cpu_time()?;

        c.stop_etcd()?;
        let start = Instant::now();
        // Five pings a second across the whole outage, from a's container to b's.
        let (tx, rx) = ping_series(
            &a.container(),
            b.container_ip(),
            300,
            Duration::from_millis(200),
        )?;
        if start.elapsed() < OUTAGE {
            // Fill the rest of the window (ping can finish a little early).
            let rest = OUTAGE - start.elapsed();
            std::thread::sleep(rest);
        }
        let used_a = a.cpu_time()? - cpu_a;
        let used_b = b.cpu_time()? - cpu_b;
        let ready_during = a.is_ready();
        a.check_alive()?;
        b.check_alive()?;
        c.start_etcd()?;

        eprintln!(
            "during a {:?} etcd outage: ping {rx}/{tx}, cpu a={used_a:?} b={used_b:?}, a ready={ready_during}",
            start.elapsed()
        );
        check!(
            rx == tx && tx == 300,
            "{} of {tx} pings lost during the outage",
            tx - rx
        );
        check!(
            used_a < MAX_CPU,
            "{} used {used_a:?} CPU during the outage",
            a.name()
        );
        check!(
            used_b < MAX_CPU,
            "{} used {used_b:?} CPU during the outage",
            b.name()
        );

        // After etcd is back: the leases are still there, and a new host is seen by both.
        check!(
            c.etcd_get(&a.lease_key())?.is_some(),
            "lease of {} gone",
            a.name()
        );
        check!(
            c.etcd_get(&b.lease_key())?.is_some(),
            "lease of {} gone",
            b.name()
        );
        let n = c.add_host(HostOpts::default())?;
        for h in [a, b] {
            wait_until(
                &format!(
                    "{} to see the new host {} after etcd returned",
                    h.name(),
                    n.subnet()
                ),
                Duration::from_secs(60),
                || h.sees_peer(&n),
            )?;
            wait_ping(&h.container(), n.container_ip(), Duration::from_secs(30))?;
        }
        eprintln!(
            "etcd_reconnects: a={} b={}",
            a.status()?["etcd_reconnects"],
            b.status()?["etcd_reconnects"]
        );
        tcp_transfer(&a.container(), &b.container(), 1 << 20)?;
        Ok(())
    });
}
