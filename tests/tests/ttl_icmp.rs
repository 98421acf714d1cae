//! TTL and the ICMP errors of the overlay, end to end.
//!
//! One overlay hop costs what two routers cost, the sending and the receiving host: a
//! container's packet arrives at a remote container with its TTL less 2, on either data
//! plane and mixed. A TTL that runs out at the receiving host is answered with "time
//! exceeded", which must find its way back through the overlay to the sender's container
//! (an eBPF sender's datagrams leave from a flow-hash port nothing listens on). ICMP errors
//! the TUN path originates are rate-limited.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rudder_tests::traffic::Endpoint;
use rudder_tests::util::output;
use rudder_tests::{
    add_hosts, check, e2e, netns, unleased_subnets, wait_mesh, Cluster, Host, HostOpts,
};

fn host(c: &Cluster, dataplane: &str) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        dataplane: Some(dataplane.into()),
        ..HostOpts::default()
    })
}

/// `ping -c 1 -t <ttl>` output (stdout and stderr), whatever its exit status.
fn ping_with_ttl(from: &Endpoint, to: Ipv4Addr, ttl: u8) -> anyhow::Result<String> {
    let out = output(netns::exec(&from.ns, "ping").args([
        "-n",
        "-c",
        "1",
        "-W",
        "2",
        "-t",
        &ttl.to_string(),
        &to.to_string(),
    ]))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The TTL of the echo reply, as ping prints it (`ttl=62`). The reply crosses the same
/// hops as the request, in the other direction.
fn reply_ttl(from: &Endpoint, to: Ipv4Addr) -> anyhow::Result<u8> {
    let text = ping_with_ttl(from, to, 64)?;
    let ttl = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("ttl="))
        .with_context(|| format!("no reply ttl from {to} in {text:?}"))?;
    Ok(ttl.parse()?)
}

/// Checks that a container-to-container hop costs 2 TTL and that a TTL that runs out at
/// the receiver comes back as "time exceeded" from the receiver's subnet, `from` → `to`.
fn check_hop(from: &Host, to: &Host) -> anyhow::Result<()> {
    let what = format!(
        "{} ({}) -> {} ({})",
        from.name(),
        from.status()?["dataplane"],
        to.name(),
        to.status()?["dataplane"]
    );
    let ttl = reply_ttl(&from.container(), to.container_ip())?;
    eprintln!("{what}: echo reply arrives with ttl {ttl} (sent with 64)");
    check!(
        ttl == 62,
        "{what}: reply ttl {ttl}, want 62 (two router hops)"
    );
    // From the host itself only the receiving host is a router on the way.
    let ttl = reply_ttl(&from.host_endpoint(), to.container_ip())?;
    eprintln!("{what}: from the host, the echo reply arrives with ttl {ttl}");
    check!(
        ttl == 63,
        "{what}: host's reply ttl {ttl}, want 63 (one router hop)"
    );

    // TTL 2: the sending host makes it 1, the receiving host cannot forward it.
    let expired = ping_with_ttl(&from.container(), to.container_ip(), 2)?;
    eprintln!("{what}: ping -t 2: {}", expired.trim().replace('\n', " | "));
    let answer = expired
        .lines()
        .find(|line| line.contains("Time to live exceeded"))
        .with_context(|| format!("{what}: no time exceeded came back: {expired:?}"))?;
    let source: Ipv4Addr = answer
        .split_whitespace()
        .nth(1)
        .and_then(|word| word.parse().ok())
        .with_context(|| format!("{what}: no source address in {answer:?}"))?;
    check!(
        to.subnet().contains(&source),
        "{what}: time exceeded from {source}, outside the receiver's subnet {}",
        to.subnet()
    );
    Ok(())
}

#[test]
fn an_overlay_hop_costs_two_ttl_and_an_expiring_ttl_is_answered() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        wait_mesh(&hosts, Duration::from_secs(30))?;
        check_hop(&hosts[0], &hosts[1])?;
        check_hop(&hosts[1], &hosts[0])
    });
}

#[test]
fn mixed_ebpf_and_tun_hosts_agree_on_ttl_and_answer_an_expiring_ttl() {
    e2e(|c| {
        let hosts = vec![host(c, "ebpf")?, host(c, "tun")?];
        wait_mesh(&hosts, Duration::from_secs(30))?;
        check_hop(&hosts[0], &hosts[1])?;
        check_hop(&hosts[1], &hosts[0])
    });
}

/// A flood of packets to an address in the network that no host leases: each gets a "net
/// unreachable" from the TUN path, within the rate limit; the rest are counted.
#[test]
fn tun_icmp_errors_are_rate_limited() {
    e2e(|c| {
        let a = host(c, "tun")?;
        let unleased = unleased_subnets(&[&a], 1)[0].hosts().nth(6).unwrap();
        wait_ping_reaches_daemon(&a)?;
        const FLOOD: u64 = 5000;
        let no_route_before = a.counter("no_route")?;
        let limited_before = a.counter("icmp_rate_limited")?;
        let elapsed = netns::run_in(&a.container().ns, move || {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            let start = Instant::now();
            for _ in 0..FLOOD {
                // An ICMP error arriving on the unconnected socket may fail a send: retry.
                while socket
                    .send_to(b"flood", SocketAddrV4::new(unleased, 9))
                    .is_err()
                {}
            }
            Ok(start.elapsed())
        })?;
        // The TUN device queue may drop part of a flood: wait until the count settles.
        let mut no_route = 0;
        rudder_tests::wait_until("the flood counted", Duration::from_secs(10), || {
            let now = a.counter("no_route")? - no_route_before;
            let settled = now > 0 && now == no_route;
            no_route = now;
            std::thread::sleep(Duration::from_millis(300));
            Ok(settled)
        })?;
        let limited = a.counter("icmp_rate_limited")? - limited_before;
        let sent = no_route - limited;
        eprintln!(
            "{FLOOD} packets sent in {:.1} ms, {no_route} reached the rules: {sent} net \
             unreachable sent, {limited} suppressed",
            elapsed.as_secs_f64() * 1e3
        );
        check!(
            limited > 0,
            "no ICMP error suppressed in a flood of {FLOOD}"
        );
        check!(sent > 0, "every ICMP error suppressed");
        a.check_alive()
    });
}

/// The same over IPv6 (dual stack): a flood to an unleased IPv6 address gets ICMPv6
/// no-route errors from the TUN plane, rate-limited like IPv4's.
#[test]
fn tun_icmpv6_errors_are_rate_limited() {
    e2e(|c| {
        c.put_config(rudder_tests::dual_stack::DUAL_STACK_CONFIG)?;
        let a = rudder_tests::dual_stack::add_dual_stack_host(
            c,
            HostOpts {
                dataplane: Some("tun".into()),
                ..HostOpts::default()
            },
        )?;
        let unleased: Ipv6Addr = "fc00:0:0:fffe::7".parse()?;
        check!(!a.ipv6_subnet()?.contains(&unleased), "{unleased} is ours");
        let ping = output(netns::exec(a.container_netns(), "ping").args([
            "-6",
            "-n",
            "-c",
            "1",
            "-W",
            "2",
            &unleased.to_string(),
        ]))?;
        let text = String::from_utf8_lossy(&ping.stdout);
        check!(
            text.contains("Destination unreachable"),
            "no ICMPv6 unreachable for an unleased address: {text}"
        );
        const FLOOD: u64 = 5000;
        let no_route_before = a.counter("no_route")?;
        let limited_before = a.counter("icmp_rate_limited")?;
        netns::run_in(a.container_netns(), move || {
            let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
            for _ in 0..FLOOD {
                // An ICMPv6 error arriving on the unconnected socket may fail a send: retry.
                while socket
                    .send_to(b"flood", SocketAddrV6::new(unleased, 9, 0, 0))
                    .is_err()
                {}
            }
            Ok(())
        })?;
        let mut no_route = 0;
        rudder_tests::wait_until("the flood counted", Duration::from_secs(10), || {
            let now = a.counter("no_route")? - no_route_before;
            let settled = now > 0 && now == no_route;
            no_route = now;
            std::thread::sleep(Duration::from_millis(300));
            Ok(settled)
        })?;
        let limited = a.counter("icmp_rate_limited")? - limited_before;
        let sent = no_route - limited;
        eprintln!("{FLOOD} IPv6 packets sent, {no_route} reached the rules: {sent} ICMPv6 errors sent, {limited} suppressed");
        check!(
            limited > 0,
            "no ICMPv6 error suppressed in a flood of {FLOOD}"
        );
        check!(sent > 0, "every ICMPv6 error suppressed");
        a.check_alive()
    });
}

/// The host's container reaches the daemon's rules: one unreachable destination is
/// counted as `no_route`.
fn wait_ping_reaches_daemon(a: &Host) -> anyhow::Result<()> {
    let before = a.counter("no_route")?;
    let text = ping_with_ttl(&a.container(), Ipv4Addr::new(10, 5, 255, 7), 64)?;
    if !text.contains("Unreachable") {
        bail!("no net unreachable for an unleased address: {text:?}");
    }
    check!(a.counter("no_route")? > before, "no_route did not move");
    Ok(())
}
