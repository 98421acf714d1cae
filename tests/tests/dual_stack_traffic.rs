//! Dual stack (issue 17), the data plane: containers exchange IPv6 (and IPv4 at the same
//! time) across hosts on whichever plane `$RUDDER_TEST_DATAPLANE` picks; an IPv6 underlay
//! carries both inner families; a flannel udp host never gets IPv6; hostile IPv6 datagrams
//! are dropped and counted; a restart keeps both subnets.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rudder_tests::cluster::UDP_PORT;
use rudder_tests::dual_stack::{
    add_dual_stack_host, drop_ipv4_underlay_udp, dual_stack_cluster, ip6, ipv4_underlay_drops,
    wait_mesh6, DUAL_STACK_CONFIG,
};
use rudder_tests::packet::{ipv6, ipv6_udp};
use rudder_tests::traffic6::{ping6, tcp_transfer6, udp_blast, udp_echo, wait_ping6};
use rudder_tests::{check, e2e, netns, ping, tcp_transfer, wait_mesh, wait_until, Host, HostOpts};

const PROBE_PORT: u16 = 9999;

/// The harness's dual-stack hosts: IPv6 underlay between hosts, the bridge's IPv6 gateway
/// (rudder's `--bridge`), the container's address and route to it.
#[test]
fn harness_gives_hosts_and_containers_ipv6() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        ping6(a.netns(), b.underlay_ipv6())?;
        let a6 = a.ipv6_subnet()?;
        check!(a6.prefix_len() == 64, "{a6}");
        let bridge = ip6(a.netns(), &["addr", "show", "dev", "rbr0"])?;
        check!(
            bridge.contains(&format!("{}/64", a.gateway_ip6()?)),
            "bridge: {bridge}"
        );
        // The container reaches its gateway over the bridge (no overlay involved).
        ping6(a.container_netns(), a.gateway_ip6()?)?;
        let routes = ip6(a.container_netns(), &["route", "show", "default"])?;
        check!(
            routes.contains(&a.gateway_ip6()?.to_string()),
            "container routes: {routes}"
        );
        let fwd = netns::exec_ok(a.netns(), "sysctl", &["-n", "net.ipv6.conf.all.forwarding"])?;
        check!(fwd.trim() == "1", "IPv6 forwarding: {fwd}");
        if a.status()?["dataplane"] == "tun" {
            // The TUN device carries the IPv6 network but says nothing of its own: no
            // link-local address, so no router solicitations or MLD reports into the overlay.
            let tun = ip6(a.netns(), &["addr", "show", "dev", "rudder0"])?;
            check!(
                !tun.contains("fe80:"),
                "TUN device has a link-local address: {tun}"
            );
            check!(
                tun.contains(&format!("{}/128", a6.network())),
                "TUN device lacks its IPv6 address: {tun}"
            );
            let route = ip6(a.netns(), &["route", "show", "fc00::/48"])?;
            check!(
                route.contains("rudder0"),
                "IPv6 network not routed into the TUN: {route}"
            );
        }
        // Whichever the plane, an idle host puts nothing on the overlay.
        std::thread::sleep(Duration::from_secs(3));
        for h in &hosts {
            let st = h.status()?;
            let counters = &st["counters"];
            eprintln!("{} idle counters: {counters}", h.name());
            for reason in ["no_route", "not_ipv4", "malformed", "encapsulated"] {
                check!(
                    counters[reason] == 0,
                    "{}: {reason} counted while idle: {counters}",
                    h.name()
                );
            }
        }
        Ok(())
    });
}

/// Ping, TCP (content checked) and UDP (content checked both ways) over IPv6 between every
/// ordered pair of 3 hosts, with an IPv4 transfer running at the same time.
#[test]
fn ipv6_and_ipv4_flow_between_containers_both_ways() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 3)?;
        wait_mesh(&hosts, Duration::from_secs(30))?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        // Both ends announce a PublicIPv6: the outer header is IPv6.
        let peers = hosts[0].peers_json()?;
        check!(
            peers.iter().all(|p| p["public_ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("fd00:77::"))),
            "peers not reached over IPv6: {peers:?}"
        );
        for a in &hosts {
            for b in &hosts {
                if a.index() == b.index() {
                    continue;
                }
                let (a6, b6) = (a.container6()?, b.container6()?);
                ping6(&a6.ns, b6.ip)?;
                // IPv4 at the same time as IPv6.
                let (a4, b4) = (a.container(), b.container());
                let v4 = std::thread::spawn(move || tcp_transfer(&a4, &b4, 4 << 20));
                let t6 = tcp_transfer6(&a6, &b6, 10 << 20)
                    .with_context(|| format!("TCP/IPv6 {} -> {}", a.name(), b.name()))?;
                let t4 = v4
                    .join()
                    .map_err(|_| anyhow!("IPv4 transfer panicked"))?
                    .with_context(|| format!("TCP/IPv4 {} -> {}", a.name(), b.name()))?;
                eprintln!(
                    "{} -> {}: TCP/IPv6 10 MB {:.0} Mbit/s, TCP/IPv4 4 MB alongside {:.0} Mbit/s",
                    a.name(),
                    b.name(),
                    t6.mbit_per_s(),
                    t4.mbit_per_s()
                );
                for size in [1, 512, 1200] {
                    udp_echo(&a6.ns, &b6.ns, IpAddr::V6(b6.ip), 10, size)
                        .with_context(|| format!("UDP/IPv6 {} -> {}", a.name(), b.name()))?;
                }
                ping(&a.container(), b.container_ip())?;
            }
        }
        // An unleased destination in the IPv6 network: the sending host's plane answers
        // with an ICMPv6 no-route error (the kernel's ping prints it).
        let leased: Vec<_> = hosts
            .iter()
            .map(|h| h.ipv6_subnet())
            .collect::<Result<_>>()?;
        let unleased = ["fc00:0:0:fffe::2", "fc00:0:0:fffd::2"]
            .iter()
            .map(|a| a.parse::<Ipv6Addr>().unwrap())
            .find(|a| !leased.iter().any(|n| n.contains(a)))
            .unwrap();
        let out = netns::exec(hosts[0].container_netns(), "ping")
            .args(["-6", "-n", "-c", "1", "-W", "2", &unleased.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        check!(
            text.contains("Destination unreachable"),
            "ping -6 {unleased} (unleased): {text}"
        );
        let (a6, b6) = (hosts[0].container6()?, hosts[1].container6()?);
        let blast = udp_blast(&a6.ns, &b6.ns, IpAddr::V6(b6.ip), 20_000, 1200)?;
        eprintln!(
            "UDP/IPv6 blast h1 -> h2: {} of {} datagrams of {} bytes intact, {:.0} Mbit/s",
            blast.received,
            blast.sent,
            blast.size,
            blast.mbit_per_s()
        );
        check!(
            blast.received > 0,
            "no UDP/IPv6 datagram of the blast arrived"
        );
        Ok(())
    });
}

/// With IPv4 UDP between the hosts' underlay addresses dropped, IPv4 and IPv6 container
/// traffic still flows: both inner families travel under an IPv6 outer header.
#[test]
fn ipv6_underlay_carries_ipv4_and_ipv6_containers() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 2)?;
        for h in &hosts {
            drop_ipv4_underlay_udp(h)?;
        }
        wait_mesh(&hosts, Duration::from_secs(30))?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let (a, b) = (&hosts[0], &hosts[1]);
        for (from, to) in [(a, b), (b, a)] {
            ping(&from.container(), to.container_ip())?;
            ping6(from.container_netns(), to.container_ip6()?)?;
            let t4 = tcp_transfer(&from.container(), &to.container(), 4 << 20)?;
            let t6 = tcp_transfer6(&from.container6()?, &to.container6()?, 4 << 20)?;
            udp_echo(
                from.container_netns(),
                to.container_netns(),
                IpAddr::V4(to.container_ip()),
                10,
                1200,
            )?;
            udp_echo(
                from.container_netns(),
                to.container_netns(),
                IpAddr::V6(to.container_ip6()?),
                10,
                1200,
            )?;
            eprintln!(
                "{} -> {} over the IPv6 underlay: TCP/IPv4 {:.0} Mbit/s, TCP/IPv6 {:.0} Mbit/s",
                from.name(),
                to.name(),
                t4.mbit_per_s(),
                t6.mbit_per_s()
            );
        }
        for h in &hosts {
            let dropped = ipv4_underlay_drops(h)?;
            check!(
                dropped == 0,
                "{}: {dropped} IPv4 overlay datagrams tried the underlay",
                h.name()
            );
        }
        Ok(())
    });
}

/// A flannel udp host (a v4-only lease, PublicIP a namespace of ours with a UDP socket on
/// the overlay port) receives only IPv4 payloads while the containers exchange IPv6, and
/// IPv4 to it still works.
#[test]
fn a_flannel_udp_host_gets_no_ipv6() {
    e2e(|c| {
        c.put_config(DUAL_STACK_CONFIG)?;
        let flannel = c.add_host_without_daemon(HostOpts::default())?;
        let key = "/coreos.com/network/subnets/10.5.200.0-24";
        let value = format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null}}"#,
            flannel.underlay_ip()
        );
        c.etcd_put(key, &value)?;
        let bind = SocketAddr::from((flannel.underlay_ip(), UDP_PORT));
        let socket = netns::run_in(flannel.netns(), move || Ok(UdpSocket::bind(bind)?))?;
        let a = add_dual_stack_host(c, HostOpts::default())?;
        let b = add_dual_stack_host(c, HostOpts::default())?;
        let hosts = [a.clone(), b.clone()];
        wait_mesh(&hosts, Duration::from_secs(30))?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let (a6, b6) = (a.container6()?, b.container6()?);
        tcp_transfer6(&a6, &b6, 2 << 20)?;
        udp_echo(&b6.ns, &a6.ns, IpAddr::V6(a6.ip), 10, 1000)?;
        // An unleased IPv6 destination must not be sent to anyone either.
        let _ = ping6(&a6.ns, "fc00:0:0:ff::2".parse()?);
        // IPv4 to the flannel host: the ping's datagram arrives (no one answers it).
        let _ = ping(&a.container(), "10.5.200.2".parse()?);
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 65536];
        let mut versions = Vec::new();
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            versions.push((buf.first().map(|b| b >> 4), n, from));
        }
        eprintln!("the flannel host received {versions:?}");
        check!(
            versions.iter().any(|(v, _, _)| *v == Some(4)),
            "IPv4 to the flannel udp host did not arrive"
        );
        check!(
            versions
                .iter()
                .all(|(v, _, from)| *v == Some(4) && from.is_ipv4()),
            "the flannel udp host received something but IPv4 payloads over IPv4: {versions:?}"
        );
        Ok(())
    });
}

/// An IPv6 header with next header hop-by-hop whose 8 bytes the payload does not hold.
fn truncated_extension_header(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    ipv6(src, dst, 0, 64, &[17, 0, 0, 0])
}

/// A neighbour solicitation for `target` (ICMPv6 135), checksum left zero: it is dropped
/// for what it is before anyone looks at the checksum.
fn neighbour_solicitation(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    ipv6(src, dst, 58, 255, &icmp)
}

/// Hostile IPv6 datagrams from a peer's underlay address (IPv6 outer; one from its IPv4
/// address, which the peer is not reached at):
/// each is dropped and counted under its reason in `/status` and `/metrics`, none reaches
/// the container; a well-formed control packet does.
#[test]
fn hostile_ipv6_datagrams_are_dropped_and_counted() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 3)?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let (a, b, other) = (&hosts[0], &hosts[1], &hosts[2]);
        let to_b6 = SocketAddr::from((b.underlay_ipv6(), UDP_PORT));
        let to_b4 = SocketAddr::from((b.underlay_ip(), UDP_PORT));
        let b_ctr = b.container_ip6()?;
        let probe_addr = SocketAddr::from((b_ctr, PROBE_PORT));
        let probe = netns::run_in(b.container_netns(), move || {
            Ok(UdpSocket::bind(probe_addr)?)
        })?;
        probe.set_read_timeout(Some(Duration::from_secs(3)))?;
        let send = |to: SocketAddr, payload: Vec<u8>| -> Result<()> {
            let from: IpAddr = match to {
                SocketAddr::V6(_) => IpAddr::V6(a.underlay_ipv6()),
                SocketAddr::V4(_) => IpAddr::V4(a.underlay_ip()),
            };
            netns::run_in(a.netns(), move || {
                UdpSocket::bind((from, 0))?.send_to(&payload, to)?;
                Ok(())
            })
        };
        let received = |probe: &UdpSocket| -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Ok(n) = probe.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
            got
        };

        // Control: well-formed, from a's container address, over the IPv6 underlay a is
        // reached at.
        let a_ctr = a.container_ip6()?;
        let legit = ipv6_udp(a_ctr, b_ctr, 4000, PROBE_PORT, 64, b"legit");
        send(to_b6, legit)?;
        let got = received(&probe);
        check!(
            got.iter().any(|p| p == b"legit"),
            "control packet not delivered; got {got:?}"
        );

        let reasons = [
            "spoofed_source",
            "no_route",
            "not_our_subnet",
            "malformed",
            "unknown_sender",
        ];
        let before: Vec<u64> = reasons
            .iter()
            .map(|r| b.counter(r))
            .collect::<Result<_>>()?;
        // Forged source: other's subnet, and one outside the network, sent by a.
        let forged = Ipv6Addr::from(u128::from(other.container_ip6()?) + 7);
        send(to_b6, ipv6_udp(forged, b_ctr, 4000, PROBE_PORT, 64, b"f1"))?;
        let outside: Ipv6Addr = "2001:db8::5".parse()?;
        send(to_b6, ipv6_udp(outside, b_ctr, 4000, PROBE_PORT, 64, b"f2"))?;
        // a's own packet from its IPv4 address: a is reached (and vouched for) at its IPv6
        // underlay address only, both ends announcing a PublicIPv6.
        send(to_b4, ipv6_udp(a_ctr, b_ctr, 4000, PROBE_PORT, 64, b"v4"))?;
        // Neighbour discovery inside the tunnel, from a's own subnet.
        send(to_b6, neighbour_solicitation(a_ctr, b_ctr, b_ctr))?;
        // A link-local destination.
        let link_local: Ipv6Addr = "fe80::1".parse()?;
        send(
            to_b6,
            ipv6_udp(a_ctr, link_local, 4000, PROBE_PORT, 64, b"ll"),
        )?;
        // A truncated extension header.
        send(to_b6, truncated_extension_header(a_ctr, b_ctr))?;
        let want = [2, 1, 1, 1, 1];
        wait_until(
            "the hostile datagrams counted",
            Duration::from_secs(10),
            || {
                for ((reason, before), want) in reasons.iter().zip(&before).zip(want) {
                    if b.counter(reason)? < before + want {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )
        .with_context(|| {
            let now: Vec<_> = reasons.iter().map(|r| (r, b.counter(r))).collect();
            format!("before {before:?}, now {now:?}")
        })?;
        let got = received(&probe);
        check!(got.is_empty(), "hostile datagrams delivered: {got:?}");
        let (_, metrics) = b.http_get("/metrics")?;
        for reason in reasons {
            check!(
                metrics
                    .lines()
                    .any(|l| l.contains(&format!("result=\"{reason}\"")) && !l.ends_with(" 0")),
                "/metrics has no non-zero {reason} drop:\n{metrics}"
            );
        }
        b.check_alive()?;
        // Real traffic goes on.
        wait_ping6(&a.container6()?, b_ctr, Duration::from_secs(10))?;
        Ok(())
    });
}

/// kill -9 and restart: both subnets kept, IPv6 traffic resumes both ways.
#[test]
fn restart_keeps_both_subnets_and_ipv6_resumes() {
    e2e(|c| {
        let hosts = dual_stack_cluster(c, 2)?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let (a, b) = (&hosts[0], &hosts[1]);
        let (v4, v6) = (a.subnet(), a.ipv6_subnet()?);
        a.kill9()?;
        a.restart()?;
        a.ensure_container6()?;
        check!(
            (a.subnet(), a.ipv6_subnet()?) == (v4, v6),
            "restart moved a: {v4} {v6} -> {} {}",
            a.subnet(),
            a.ipv6_subnet()?
        );
        wait_ping6(
            &a.container6()?,
            b.container_ip6()?,
            Duration::from_secs(30),
        )?;
        wait_ping6(
            &b.container6()?,
            a.container_ip6()?,
            Duration::from_secs(30),
        )?;
        tcp_transfer6(&b.container6()?, &a.container6()?, 4 << 20)?;
        tcp_transfer6(&a.container6()?, &b.container6()?, 4 << 20)?;
        ping(&a.container(), b.container_ip())?;
        Ok(())
    });
}

trait PeersJson {
    fn peers_json(&self) -> Result<Vec<serde_json::Value>>;
}

impl PeersJson for Host {
    /// `/status`'s peers, as JSON.
    fn peers_json(&self) -> Result<Vec<serde_json::Value>> {
        let st = self.status()?;
        st["peers"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("/status has no peers: {st}"))
    }
}

/// Hosts whose underlay has only a link-local IPv6 address announce it as PublicIPv6 (as
/// flanneld picks it): the IPv6 socket binds it scoped to the underlay, peers are reached
/// over it, and IPv6 and IPv4 flow both ways.
#[test]
fn link_local_public_ipv6_carries_traffic() {
    e2e(|c| {
        c.put_config(DUAL_STACK_CONFIG)?;
        let mut hosts = Vec::new();
        for _ in 0..2 {
            let h = c.add_host_without_daemon(HostOpts::default())?;
            wait_until("eth0's link-local address", Duration::from_secs(10), || {
                let out = ip6(h.netns(), &["addr", "show", "dev", "eth0", "scope", "link"])?;
                Ok(out.contains("fe80:") && !out.contains("tentative"))
            })?;
            h.start()?;
            h.wait_ready_dual_stack(Duration::from_secs(30))?;
            hosts.push(h);
        }
        wait_mesh(&hosts, Duration::from_secs(30))?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        let peers = hosts[0].peers_json()?;
        eprintln!("h1's peers: {peers:?}");
        check!(
            peers.iter().all(|p| p["public_ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("fe80:"))),
            "peers not reached over their link-local PublicIPv6: {peers:?}"
        );
        let (a, b) = (&hosts[0], &hosts[1]);
        for (from, to) in [(a, b), (b, a)] {
            tcp_transfer6(&from.container6()?, &to.container6()?, 2 << 20)?;
            tcp_transfer(&from.container(), &to.container(), 2 << 20)?;
        }
        Ok(())
    });
}
