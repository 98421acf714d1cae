//! Fault: a host's underlay link goes down and up. The kernel flushes every route through
//! it (the eBPF data plane's peer routes included); the daemon puts its own back and the
//! overlay works again without any change in etcd.

use std::time::{Duration, Instant};

use rudder_tests::{add_hosts, e2e, netns, wait_mesh, wait_ping};

#[test]
fn overlay_recovers_after_the_underlay_link_flaps() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        wait_mesh(&hosts, Duration::from_secs(30))?;

        netns::exec_ok(a.netns(), "ip", &["link", "set", "eth0", "down"])?;
        netns::exec_ok(a.netns(), "ip", &["link", "set", "eth0", "up"])?;
        let up = Instant::now();
        // From the host itself: this traffic needs the routes (containers' traffic may take
        // the eBPF bridge fast path, which resolves the underlay on its own).
        wait_ping(
            &a.host_endpoint(),
            b.container_ip(),
            Duration::from_secs(20),
        )?;
        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(20))?;
        wait_ping(&b.container(), a.container_ip(), Duration::from_secs(20))?;
        eprintln!(
            "underlay link flap: overlay back {:.1} s after the link came up",
            up.elapsed().as_secs_f64()
        );
        // The eBPF plane's peer routes went with the link: its log says so.
        if a.status()?["dataplane"] == "ebpf" {
            let want = "data plane routes were removed: the underlay link eth0 went down";
            rudder_tests::wait_until(
                "the restored routes explained",
                Duration::from_secs(10),
                || Ok(a.log().contains(want)),
            )?;
        }
        a.check_alive()
    });
}
