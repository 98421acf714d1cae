//! A restart of rudder under traffic (issue 15 item 1): on the eBPF plane the programs, maps
//! and routes stay in the kernel across the restart (pinned) and are adopted by the new
//! process, so no packet is lost; the TUN plane's gap is printed. Covered: SIGTERM + start
//! under a 100/s ping stream and TCP transfers, SIGKILL + start, and a restart while etcd is
//! down (traffic to known peers continues; the daemon reconciles once etcd is back).

use rudder_tests::{
    add_hosts, check, e2e, ping_series, tcp_transfer, wait_mesh, wait_until, Cluster, Host,
    HostOpts,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PINGS: u32 = 600;
const INTERVAL: Duration = Duration::from_millis(10);

fn ebpf() -> bool {
    rudder_tests::util::test_dataplane() == "ebpf"
}

/// Two hosts whose stops leave the kernel state in place (no `--cleanup-on-exit`).
fn keeping_hosts(c: &Cluster) -> anyhow::Result<Vec<Host>> {
    let opts = HostOpts {
        cleanup_on_exit: false,
        ..HostOpts::default()
    };
    let hosts = vec![c.add_host(opts.clone())?, c.add_host(opts)?];
    wait_mesh(&hosts, Duration::from_secs(30))?;
    Ok(hosts)
}

/// Runs `disrupt` on `a` while `b`'s container pings `a`'s 100 times a second and TCP
/// transfers (content checked) run back to back between them; returns pings lost.
fn under_traffic(
    a: &Host,
    b: &Host,
    what: &str,
    disrupt: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<u32> {
    let done = AtomicBool::new(false);
    let (pings, transfers, disrupted) = std::thread::scope(|s| {
        let pinger = s.spawn(|| {
            let r = ping_series(&b.container(), a.container_ip(), PINGS, INTERVAL);
            done.store(true, Ordering::SeqCst);
            r
        });
        let mover = s.spawn(|| -> anyhow::Result<u32> {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                tcp_transfer(&b.container(), &a.container(), 4 << 20)?;
                n += 1;
            }
            Ok(n)
        });
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        let disrupted = disrupt().and_then(|()| {
            // Otherwise the stream would not have crossed the whole restart.
            check!(
                !done.load(Ordering::SeqCst),
                "the ping stream ended before the restart was over"
            );
            eprintln!(
                "{what}: ready again {:.2} s after it began",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        });
        (pinger.join(), mover.join(), disrupted)
    });
    disrupted?;
    let (tx, rx) = pings.expect("ping thread panicked")?;
    let transfers = transfers.expect("transfer thread panicked")?;
    let lost = tx - rx;
    eprintln!(
        "{what} ({} plane): {lost} of {tx} pings lost (gap about {} ms), {transfers} TCP \
         transfers of 4 MiB completed across it",
        rudder_tests::util::test_dataplane(),
        lost as u128 * INTERVAL.as_millis()
    );
    check!(tx == PINGS, "ping sent {tx} of {PINGS}");
    check!(transfers > 0, "no TCP transfer completed");
    if ebpf() {
        check!(
            lost == 0,
            "{what}: {lost} of {tx} pings lost on the eBPF plane"
        );
    }
    Ok(lost)
}

fn check_adopted(a: &Host) -> anyhow::Result<()> {
    if ebpf() {
        let log = a.log();
        check!(
            log.contains("adopted the BPF programs' links, maps and routes"),
            "the new process did not adopt the pinned state:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn sigterm_restart_under_traffic_loses_nothing_on_ebpf() {
    e2e(|c| {
        let hosts = keeping_hosts(c)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        let subnet = a.subnet();
        under_traffic(a, b, "SIGTERM + start", || a.restart())?;
        check_adopted(a)?;
        check!(a.subnet() == subnet, "subnet changed across the restart");
        check!(a.sees_peer(b)?, "{} lost its peer {}", a.name(), b.name());
        Ok(())
    });
}

#[test]
fn sigkill_and_start_adopts_what_the_dead_process_left() {
    e2e(|c| {
        let hosts = keeping_hosts(c)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        under_traffic(a, b, "SIGKILL + start", || {
            a.kill9()?;
            a.start()?;
            a.wait_ready(Duration::from_secs(60))
        })?;
        check_adopted(a)?;
        tcp_transfer(&a.container(), &b.container(), 2 << 20)?;
        Ok(())
    });
}

#[test]
fn restart_during_an_etcd_outage_keeps_known_peers() {
    e2e(|c| {
        let hosts = keeping_hosts(c)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        c.stop_etcd()?;
        under_traffic(a, b, "restart while etcd is down", || {
            a.stop()?;
            a.start()?;
            // Ready from the state file alone: subnet and known peers, no etcd needed.
            a.wait_ready(Duration::from_secs(30))
        })?;
        check!(
            a.sees_peer(b)?,
            "{} lost its peer during the outage",
            a.name()
        );
        check!(
            a.log().contains("before etcd answered"),
            "the restart did not come up from the state file:\n{}",
            a.log()
        );
        // Reconciles when etcd is back: a new host becomes a peer.
        c.start_etcd()?;
        let new = c.add_host(HostOpts::default())?;
        let since = Instant::now();
        wait_until(
            &format!("{} to learn {} after etcd returned", a.name(), new.name()),
            Duration::from_secs(60),
            || a.sees_peer(&new),
        )?;
        eprintln!(
            "after etcd returned: new peer learnt in {:.2} s",
            since.elapsed().as_secs_f64()
        );
        tcp_transfer(&new.container(), &a.container(), 2 << 20)?;
        Ok(())
    });
}

#[test]
fn cleanup_on_exit_still_removes_everything() {
    e2e(|c| {
        let a = &add_hosts(c, 1)?[0];
        a.stop()?;
        let links = rudder_tests::netns::exec_ok(a.netns(), "ip", &["-o", "link", "show"])?;
        check!(
            !links.contains(": rbr0"),
            "bridge left after --cleanup-on-exit:\n{links}"
        );
        let routes =
            rudder_tests::netns::exec_ok(a.netns(), "ip", &["route", "show", "proto", "211"])?;
        check!(routes.trim().is_empty(), "routes left: {routes}");
        let pins = a.log_path().with_file_name("bpf");
        // bpffs lists its own maps.debug and progs.debug.
        let left: Vec<_> = std::fs::read_dir(&pins)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_none_or(|x| x != "debug"))
            .collect();
        check!(
            left.is_empty(),
            "BPF pins left in {}: {left:?}",
            pins.display()
        );
        Ok(())
    });
}
