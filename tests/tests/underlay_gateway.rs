//! The underlay's default gateway changes while running. Hosts a and b are on different
//! underlay segments (192.168.77.0/24 and 192.168.78.0/24) joined by two routers; a's
//! default route goes through router 1, so its peer route to b (eBPF: `<b's subnet> via
//! <router 1> dev eth0 onlink`) names it. The default route moves to router 2 and router 1
//! dies: the daemon re-resolves the next hop on the route change and the overlay resumes.
//!
//! Host a also has a "VPN" table (100) whose default route, with a better metric, points out
//! of another interface: the underlay must still come from the main table.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rudder_tests::router::MAIN_SEGMENT;
use rudder_tests::traffic::Endpoint;
use rudder_tests::util::output;
use rudder_tests::{check, e2e, netns, wait_ping, wait_until, Host, HostOpts};

const SEGMENT_2: &str = "ubr1";
const ROUTER_1: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 201);
const ROUTER_2: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 202);
const ROUTER_2_ON_SEGMENT_2: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 202);

/// Pings every 50 ms (200 ms reply timeout) until one is answered; the time that took.
fn time_to_reply(from: &Endpoint, to: Ipv4Addr, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let out = output(netns::exec(&from.ns, "ping").args([
            "-n",
            "-q",
            "-c",
            "1",
            "-W",
            "0.2",
            &to.to_string(),
        ]))?;
        if out.status.success() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("no reply from {to} to {} within {limit:?}", from.ip)
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    netns::exec_ok(ns, "ip", args)
}

fn wait_peer(h: &Host, other: &Host, other_ip: Ipv4Addr) -> anyhow::Result<()> {
    wait_until(
        &format!("{} to list {} at {other_ip}", h.name(), other.name()),
        Duration::from_secs(20),
        || Ok(h.peers()?.contains(&(other.subnet(), other_ip))),
    )
}

#[test]
fn peers_behind_a_changed_default_gateway_stay_reachable() {
    e2e(|c| {
        c.add_segment(SEGMENT_2)?;
        let r1 = c.add_router(&[
            (MAIN_SEGMENT, ROUTER_1),
            (SEGMENT_2, Ipv4Addr::new(192, 168, 78, 201)),
        ])?;
        // Kept until the end: the cluster tears it down.
        let _r2 = c.add_router(&[(MAIN_SEGMENT, ROUTER_2), (SEGMENT_2, ROUTER_2_ON_SEGMENT_2)])?;
        // etcd's answers to segment 2.
        in_ns(
            c.underlay_ns(),
            &[
                "route",
                "add",
                "192.168.78.0/24",
                "via",
                &ROUTER_2.to_string(),
            ],
        )?;

        let a = c.add_host_without_daemon(HostOpts::default())?;
        let ns = a.netns().to_string();
        in_ns(
            &ns,
            &["route", "replace", "default", "via", &ROUTER_1.to_string()],
        )?;
        // The VPN: an interface with an address and a default route in table 100.
        in_ns(
            &ns,
            &[
                "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn1",
            ],
        )?;
        in_ns(&ns, &["addr", "add", "172.31.0.1/30", "dev", "vpn0"])?;
        in_ns(&ns, &["link", "set", "vpn0", "up"])?;
        in_ns(&ns, &["link", "set", "vpn1", "up"])?;
        in_ns(
            &ns,
            &[
                "route",
                "add",
                "default",
                "via",
                "172.31.0.2",
                "dev",
                "vpn0",
                "table",
                "100",
                "metric",
                "1",
            ],
        )?;
        a.start()?;
        a.wait_ready(Duration::from_secs(30))?;
        let st = a.status()?;
        check!(
            st["iface"] == "eth0",
            "the underlay came from another table: {st}"
        );

        let b = c.add_host_without_daemon(HostOpts::default())?;
        let b_ip = Ipv4Addr::new(192, 168, 78, 10 + b.index() as u8);
        c.move_host_to_segment(&b, SEGMENT_2, b_ip, ROUTER_2_ON_SEGMENT_2)?;
        b.start()?;
        b.wait_ready(Duration::from_secs(30))?;
        wait_peer(&a, &b, b_ip)?;
        wait_peer(&b, &a, a.underlay_ip())?;
        let ebpf = st["dataplane"] == "ebpf";
        let b_subnet = b.subnet().to_string();
        if ebpf {
            let route = in_ns(&ns, &["route", "show", &b_subnet])?;
            check!(
                route.contains(&format!("via {ROUTER_1}")),
                "peer route: {route}"
            );
        }
        wait_ping(
            &a.host_endpoint(),
            b.container_ip(),
            Duration::from_secs(10),
        )?;
        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(10))?;

        in_ns(
            &ns,
            &["route", "replace", "default", "via", &ROUTER_2.to_string()],
        )?;
        r1.set_links(false, 2)?;
        // From the host: its traffic takes the peer route (containers' may take the eBPF
        // bridge fast path, which looks the gateway up per packet).
        let gap = time_to_reply(
            &a.host_endpoint(),
            b.container_ip(),
            Duration::from_secs(10),
        )?;
        eprintln!(
            "gateway change: host a reached b's container again {:.2} s after the switch",
            gap.as_secs_f64()
        );
        wait_ping(&a.container(), b.container_ip(), Duration::from_secs(10))?;
        wait_ping(&b.container(), a.container_ip(), Duration::from_secs(10))?;
        if ebpf {
            let route = in_ns(&ns, &["route", "show", &b_subnet])?;
            check!(
                route.contains(&format!("via {ROUTER_2}")),
                "peer route: {route}"
            );
            check!(
                a.log().contains("peer route: next hop changed"),
                "no next-hop change in a's log"
            );
        }
        a.check_alive()?;
        b.check_alive()
    });
}
