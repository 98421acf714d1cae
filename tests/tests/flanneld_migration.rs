//! Migrating a flannel cluster to rudder one host at a time. The "flannel hosts" are TUN hosts
//! with `--tun-offload false`, which behave as flanneld's udp backend on the wire (flannel's
//! etcd layout, lease value and IP-in-UDP on 8285). Each host in turn stops its daemon and
//! starts rudder as its flanneld unit would (symlink `flanneld`, Go syntax, `FLANNELD_*`),
//! with the same flags, its subnet file gone (a flanneld unit's file is elsewhere), so the
//! lease is found by PublicIP. It keeps its subnet, its peers never drop it from their peer
//! table, and traffic between the other two hosts loses nothing; the migrating host's own
//! gap is printed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rudder_tests::{check, e2e, full_mesh_traffic, ping_series, wait_mesh, Host, HostOpts};

const INTERVAL: Duration = Duration::from_millis(50);
const COUNT: u32 = 200;

#[test]
fn hosts_move_from_flannel_to_rudder_one_at_a_time() {
    e2e(|c| {
        let opts = HostOpts {
            dataplane: Some("tun".into()),
            extra_args: [
                "--iface",
                "eth0",
                "--tun-offload",
                "false",
                "--iptables-resync",
                "5",
                "--subnet-lease-renew-margin",
                "60",
            ]
            .map(String::from)
            .to_vec(),
            ..HostOpts::default()
        };
        let hosts: Vec<Host> = (0..3)
            .map(|_| c.add_host(opts.clone()))
            .collect::<anyhow::Result<_>>()?;
        wait_mesh(&hosts, Duration::from_secs(30))?;

        for (i, m) in hosts.iter().enumerate() {
            let others: Vec<&Host> = hosts.iter().filter(|h| h.index() != m.index()).collect();
            let (a, b) = (others[0].clone(), others[1].clone());
            let subnet = m.subnet();
            let key = m.lease_key();

            // Traffic between the others, and to the migrating host, all through the migration.
            let between = {
                let (a, b) = (a.clone(), b.clone());
                std::thread::spawn(move || {
                    ping_series(&a.container(), b.container_ip(), COUNT, INTERVAL)
                })
            };
            let to_migrating = {
                let (a, m) = (a.clone(), m.clone());
                std::thread::spawn(move || {
                    ping_series(&a.container(), m.container_ip(), COUNT, INTERVAL)
                })
            };
            // The others' peer tables, polled for the migrating host all the while.
            let done = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (a, b, m, done) = (a.clone(), b.clone(), m.clone(), done.clone());
                std::thread::spawn(move || -> Vec<String> {
                    let mut missing = Vec::new();
                    while !done.load(Ordering::SeqCst) {
                        for peer in [&a, &b] {
                            match peer.sees_peer(&m) {
                                Ok(true) => {}
                                Ok(false) => {
                                    missing.push(format!("{} lost {}", peer.name(), m.name()))
                                }
                                Err(e) => missing.push(format!("{}: {e:#}", peer.name())),
                            }
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    missing
                })
            };

            let began = Instant::now();
            m.stop()?;
            std::fs::remove_file(m.subnet_file())?;
            m.set_flanneld_style(true);
            m.start()?;
            m.wait_ready(Duration::from_secs(60))?;
            let ready_after = began.elapsed();
            check!(
                m.subnet() == subnet,
                "{} came back with {} instead of {subnet}",
                m.name(),
                m.subnet()
            );
            check!(c.etcd_get(&key)?.is_some(), "lease {key} is gone");

            let (tx, rx) = between.join().expect("ping thread")?;
            let (mtx, mrx) = to_migrating.join().expect("ping thread")?;
            done.store(true, Ordering::SeqCst);
            let missing = watcher.join().expect("watcher thread");
            let (argv, env) = m.flanneld_command_line();
            eprintln!(
                "migration {}: {} -> flanneld {} (env {env:?}): ready after {:.2} s; \
                 {} <-> {}: {rx}/{tx}; to {}: {mrx}/{mtx} answered, gap {:.2} s",
                i + 1,
                m.name(),
                argv.join(" "),
                ready_after.as_secs_f64(),
                a.name(),
                b.name(),
                m.name(),
                f64::from(mtx - mrx) * INTERVAL.as_secs_f64(),
            );
            check!(
                tx == COUNT && rx == tx,
                "{} -> {} lost {} of {tx} during the migration of {}",
                a.name(),
                b.name(),
                tx - rx,
                m.name()
            );
            check!(
                missing.is_empty(),
                "peers lost {} during its migration: {missing:?}",
                m.name()
            );
            check!(
                m.log().contains("reusing the lease already held by"),
                "{} did not find its lease by PublicIP:\n{}",
                m.name(),
                m.log()
            );
        }
        wait_mesh(&hosts, Duration::from_secs(30))?;
        full_mesh_traffic(&hosts, 1 << 20)?;
        check!(
            c.lease_keys(None)?.len() == 3,
            "leases: {:?}",
            c.lease_keys(None)?
        );
        Ok(())
    });
}
