//! Fault: a three-member etcd cluster (`--etcd-endpoints` lists all). One member down:
//! nothing changes for the overlay (a host can still join). Two down (no quorum): traffic
//! keeps flowing and the daemons wait quietly. Both back: normal again.

use std::time::{Duration, Instant};

use rudder_tests::cluster::{DEFAULT_CONFIG, DEFAULT_PREFIX};
use rudder_tests::etcd_members::EtcdMembers;
use rudder_tests::traffic::ping_series;
use rudder_tests::{check, e2e, wait_mesh, wait_until, Cluster, Host, HostOpts};

fn host(c: &Cluster, endpoints: &str) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        etcd_endpoints: Some(endpoints.to_string()),
        ..HostOpts::default()
    })
}

#[test]
fn losing_members_and_quorum_does_not_disturb_the_overlay() {
    e2e(|c| {
        let etcd = EtcdMembers::start(c, 3)?;
        let endpoints = etcd.endpoints();
        etcd.etcdctl(&["put", &format!("{DEFAULT_PREFIX}/config"), DEFAULT_CONFIG])?;
        let a = host(c, &endpoints)?;
        let b = host(c, &endpoints)?;
        wait_mesh(&[a.clone(), b.clone()], Duration::from_secs(30))?;

        // Five pings a second for the whole test.
        let (from, to) = (a.container(), b.container_ip());
        let pings =
            std::thread::spawn(move || ping_series(&from, to, 150, Duration::from_millis(200)));

        // One member down: a new host still joins and everybody sees it.
        etcd.stop(0)?;
        let joined = host(c, &endpoints)?;
        wait_mesh(&[a.clone(), joined.clone()], Duration::from_secs(30))?;

        // Two down: no quorum. The daemons keep the overlay and use little CPU.
        etcd.stop(1)?;
        let cpu_before = a.cpu_time()? + b.cpu_time()?;
        let quiet = Instant::now();
        std::thread::sleep(Duration::from_secs(10));
        let cpu = a.cpu_time()? + b.cpu_time()? - cpu_before;
        for h in [&a, &b, &joined] {
            h.check_alive()?;
            check!(
                h.sees_peer(&b)? || h.name() == b.name(),
                "{} lost its peers",
                h.name()
            );
        }
        eprintln!(
            "without quorum for {:.0} s: both daemons used {cpu:?} CPU",
            quiet.elapsed().as_secs_f64()
        );
        check!(
            cpu < Duration::from_secs(1),
            "daemons used {cpu:?} CPU without quorum"
        );

        // Both back: normal again, leases intact, a fourth host joins.
        etcd.restart(0)?;
        etcd.restart(1)?;
        etcd.wait_healthy(3)?;
        let late = host(c, &endpoints)?;
        wait_mesh(
            &[a.clone(), b.clone(), late.clone()],
            Duration::from_secs(60),
        )?;
        let leases = etcd.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{DEFAULT_PREFIX}/subnets/"),
        ])?;
        for h in [&a, &b, &joined, &late] {
            check!(
                leases.contains(&h.lease_key()),
                "lease of {} missing:\n{leases}",
                h.name()
            );
        }

        let (sent, received) = pings
            .join()
            .map_err(|_| anyhow::anyhow!("ping thread panicked"))??;
        eprintln!("pings across member loss and quorum loss: {received}/{sent}");
        check!(received == sent, "{} pings lost", sent - received);
        wait_until("a sees the late host", Duration::from_secs(10), || {
            a.sees_peer(&late)
        })
    });
}
