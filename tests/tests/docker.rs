//! Docker hosts over rudder, set up as a flannel-docker user does: docker ran first (so its
//! firewall has FORWARD policy DROP), rudder leases a subnet, `rudder docker-opts` writes
//! `--bip`/`--mtu`, docker restarts with them and owns docker0; rudder gets no `--bridge`.
//! Real dockerd (Debian's docker.io), real containers from a busybox image made on the spot.
//! Runs on whichever data plane the pass gives every host (TUN, then eBPF).

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::Context;
use rudder_tests::cluster::UNDERLAY_GW;
use rudder_tests::docker::{docker_host, fetch_md5_script, DockerHost};
use rudder_tests::{
    check, e2e, netns, ping, ping_series, send_udp, tcp_transfer, wait_ping, wait_until, Endpoint,
    Host, HostOpts, UdpProbe,
};

const WEB_FILE_KB: usize = 270;

/// A container serving a random file over HTTP, attached as a harness endpoint.
fn web(d: &DockerHost, name: &str, extra: &[&str]) -> anyhow::Result<(Endpoint, String)> {
    d.dockerd.run_server(name, extra)?;
    let md5 = d.dockerd.make_file(name, "f", WEB_FILE_KB * 1024)?;
    let ep = d
        .dockerd
        .endpoint(name, &format!("{}-{name}", d.host.netns()))?;
    check!(
        d.host.subnet().contains(&ep.ip),
        "container {name} got {} outside the host's subnet {}",
        ep.ip,
        d.host.subnet()
    );
    Ok((ep, md5))
}

/// Ping, TCP with content check, UDP and an HTTP fetch between two containers, one way.
fn talk(
    from: (&DockerHost, &str, &Endpoint),
    to: (&DockerHost, &str, &Endpoint, &str),
) -> anyhow::Result<()> {
    let (fd, fname, fep) = from;
    let (_td, tname, tep, tmd5) = to;
    wait_ping(fep, tep.ip, Duration::from_secs(10))
        .with_context(|| format!("ping {fname} -> {tname}"))?;
    let t = tcp_transfer(fep, tep, 1 << 20).with_context(|| format!("TCP {fname} -> {tname}"))?;
    println!(
        "TCP {fname} -> {tname}: 1 MiB, {:.0} Mbit/s",
        t.mbit_per_s()
    );
    let probe = UdpProbe::bind(&tep.ns, SocketAddrV4::new(tep.ip, 5353))?;
    send_udp(&fep.ns, SocketAddrV4::new(tep.ip, 5353), b"rudder-udp")?;
    let got = probe.collect(Duration::from_secs(2))?;
    check!(
        got.iter()
            .any(|(p, src)| p == b"rudder-udp" && src.ip() == fep.ip),
        "UDP {fname} -> {tname}: {got:?} (the container's own source expected)"
    );
    let md5 = fd.dockerd.fetch_md5(fname, tep.ip, 80, "f")?;
    check!(md5 == tmd5, "HTTP {fname} -> {tname}: md5 {md5} != {tmd5}");
    Ok(())
}

/// On eBPF, docker0 is adopted (the fast paths are attached to it) and the containers are
/// local endpoints; the status says so.
fn check_fast_path(host: &Host) -> anyhow::Result<()> {
    let status = host.status()?;
    if status["dataplane"] != "ebpf" {
        check!(
            status["fast_path"].is_null(),
            "TUN has no fast path: {status}"
        );
        return Ok(());
    }
    wait_until(
        "docker0's containers on the fast path",
        Duration::from_secs(5),
        || {
            let fast = &host.status()?["fast_path"];
            Ok(fast["bridge"] == "docker0" && fast["local_endpoints"].as_u64() >= Some(1))
        },
    )?;
    let fast = &host.status()?["fast_path"];
    println!(
        "{}: fast path on {} with {} local containers",
        host.name(),
        fast["bridge"],
        fast["local_endpoints"]
    );
    Ok(())
}

fn rules_of(host: &Host) -> anyhow::Result<(String, String)> {
    Ok((
        netns::exec_ok(host.netns(), "iptables", &["-S"])?,
        netns::exec_ok(host.netns(), "iptables", &["-t", "nat", "-S"])?,
    ))
}

/// Docker's masquerade on (rudder's off): items 1, 2, 4 and 7 of the docker issue.
#[test]
fn docker_containers_talk_across_hosts_with_dockers_masquerade() {
    e2e(|c| {
        let a = docker_host(c, HostOpts::default())?;
        let b = docker_host(c, HostOpts::default())?;
        let (wa, ma) = web(&a, "web-a", &["--restart", "always"])?;
        let (wb, mb) = web(&b, "web-b", &["--restart", "always"])?;
        wait_until("a and b to see each other", Duration::from_secs(20), || {
            Ok(a.host.sees_peer(&b.host)? && b.host.sees_peer(&a.host)?)
        })?;
        talk((&a, "web-a", &wa), (&b, "web-b", &wb, &mb))?;
        talk((&b, "web-b", &wb), (&a, "web-a", &wa, &ma))?;
        // The host to a remote container and back.
        ping(&a.host.host_endpoint(), wb.ip)?;
        ping(&b.host.host_endpoint(), wa.ip)?;
        check_fast_path(&a.host)?;
        check_fast_path(&b.host)?;

        // A container started now is reachable from the other host at once.
        let started = Instant::now();
        let (late, _) = web(&b, "late-b", &[])?;
        wait_ping(&wa, late.ip, Duration::from_secs(10))?;
        println!(
            "a container started after rudder answered a remote ping {:.2} s after docker run",
            started.elapsed().as_secs_f64()
        );

        // dockerd stopped and started (docker0 re-created, its chains rewritten).
        let restart = Instant::now();
        b.dockerd.restart()?;
        let wb = b
            .dockerd
            .endpoint("web-b", &format!("{}-web-b2", b.host.netns()))?;
        wait_ping(&wa, wb.ip, Duration::from_secs(30))?;
        check_fast_path(&b.host)?;
        println!(
            "after a dockerd restart cross-host traffic worked again in {:.2} s",
            restart.elapsed().as_secs_f64()
        );
        // docker's restart put its MASQUERADE first again; rudder's resync (every 5 s)
        // restores its order.
        wait_until(
            "rudder's rules to be re-asserted after the docker restart",
            Duration::from_secs(15),
            || {
                let (filter, nat) = rules_of(&b.host)?;
                let first_nat = nat.lines().find(|l| l.starts_with("-A POSTROUTING"));
                Ok(filter
                    .contains("-A FORWARD -m comment --comment \"rudder overlay\" -j RUDDER-FWD")
                    && first_nat.is_some_and(|l| l.ends_with("-j RUDDER-POSTRTG")))
            },
        )?;
        println!(
            "rudder's iptables rules were in order again {:.2} s after the dockerd restart began",
            restart.elapsed().as_secs_f64()
        );
        tcp_transfer(&wa, &wb, 1 << 20)?;

        // rudder stops: exactly its rules go, docker's stay, local containers still talk.
        let (filter_before, nat_before) = rules_of(&a.host)?;
        a.host.stop()?;
        let (filter, nat) = rules_of(&a.host)?;
        check!(
            !filter.contains("RUDDER") && !nat.contains("RUDDER"),
            "left behind:\n{filter}{nat}"
        );
        let without_rudder = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.contains("RUDDER"))
                .map(String::from)
                .collect()
        };
        check!(
            without_rudder(&filter) == without_rudder(&filter_before)
                && without_rudder(&nat) == without_rudder(&nat_before),
            "docker's rules changed when rudder stopped:\nbefore\n{filter_before}{nat_before}\nafter\n{filter}{nat}"
        );
        let (local, _) = web(&a, "local-a", &[])?;
        ping(&local, wa.ip)?;
        Ok(())
    });
}

/// rudder's masquerade on (docker started with --ip-masq=false): items 1, 5 and 6.
#[test]
fn docker_with_rudders_masquerade_published_ports_and_rudder_restarts() {
    e2e(|c| {
        let a = docker_host(
            c,
            HostOpts {
                ip_masq: true,
                ..HostOpts::default()
            },
        )?;
        let b = docker_host(
            c,
            HostOpts {
                ip_masq: true,
                ..HostOpts::default()
            },
        )?;
        let (wa, ma) = web(&a, "web-a", &["-p", "8080:80"])?;
        let (wb, mb) = web(&b, "web-b", &[])?;
        wait_until("a and b to see each other", Duration::from_secs(20), || {
            Ok(a.host.sees_peer(&b.host)? && b.host.sees_peer(&a.host)?)
        })?;
        talk((&a, "web-a", &wa), (&b, "web-b", &wb, &mb))?;
        talk((&b, "web-b", &wb), (&a, "web-a", &wa, &ma))?;

        // Outside the overlay: the underlay gateway has no route to 10.5/16, so only a
        // masqueraded ping gets its answer.
        ping(&wa, UNDERLAY_GW).context("a container reaching outside the overlay")?;
        // A published port, from the underlay (busybox's nc and md5sum run there too).
        let script = fetch_md5_script(a.host.underlay_ip(), 8080, "f");
        let out = netns::exec_ok(c.underlay_ns(), "/bin/busybox", &["sh", "-c", &script])?;
        let md5 = out.split_whitespace().next().unwrap_or_default();
        check!(
            md5 == ma,
            "published port 8080 from the underlay: md5 {md5} != {ma}"
        );

        // rudder restarted under running containers, gracefully and with SIGKILL.
        let subnet = b.host.subnet();
        for graceful in [true, false] {
            let started = Instant::now();
            if graceful {
                b.host.stop()?;
            } else {
                b.host.kill9()?;
            }
            b.host.start()?;
            b.host.wait_ready(Duration::from_secs(60))?;
            check!(b.host.subnet() == subnet, "the subnet moved on restart");
            wait_ping(&wa, wb.ip, Duration::from_secs(30))?;
            tcp_transfer(&wa, &wb, 1 << 20)?;
            println!(
                "rudder {} on b: traffic resumed {:.2} s after the stop",
                if graceful {
                    "SIGTERM + start"
                } else {
                    "SIGKILL + start"
                },
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    });
}

/// An eBPF docker host and a TUN docker host, default offloads on the veth underlay.
#[test]
fn docker_containers_talk_across_a_mixed_ebpf_and_tun_cluster() {
    e2e(|c| {
        let dataplane = |d: &str| HostOpts {
            dataplane: Some(d.into()),
            ..HostOpts::default()
        };
        let a = docker_host(c, dataplane("ebpf"))?;
        let b = docker_host(c, dataplane("tun"))?;
        let (wa, ma) = web(&a, "web-a", &[])?;
        let (wb, mb) = web(&b, "web-b", &[])?;
        wait_until("a and b to see each other", Duration::from_secs(20), || {
            Ok(a.host.sees_peer(&b.host)? && b.host.sees_peer(&a.host)?)
        })?;
        check!(a.host.status()?["dataplane"] == "ebpf", "a is not on eBPF");
        check!(b.host.status()?["dataplane"] == "tun", "b is not on TUN");
        talk((&a, "web-a", &wa), (&b, "web-b", &wb, &mb))?;
        talk((&b, "web-b", &wb), (&a, "web-a", &wa, &ma))?;
        ping(&a.host.host_endpoint(), wb.ip)?;
        ping(&b.host.host_endpoint(), wa.ip)?;
        Ok(())
    });
}

/// 20 containers started and stopped on one host while two others talk: no loss between
/// those two, every new container reachable.
#[test]
fn container_churn_on_one_host_loses_nothing_between_the_others() {
    e2e(|c| {
        let a = docker_host(c, HostOpts::default())?;
        let b = docker_host(c, HostOpts::default())?;
        let churn = docker_host(c, HostOpts::default())?;
        let (wa, _) = web(&a, "web-a", &[])?;
        let (wb, _) = web(&b, "web-b", &[])?;
        wait_until(
            "every host to see every other",
            Duration::from_secs(20),
            || {
                Ok(a.host.sees_peer(&b.host)?
                    && a.host.sees_peer(&churn.host)?
                    && b.host.sees_peer(&a.host)?)
            },
        )?;
        wait_ping(&wa, wb.ip, Duration::from_secs(10))?;
        let (wa2, wb_ip) = (wa.clone(), wb.ip);
        let pings =
            std::thread::spawn(move || ping_series(&wa2, wb_ip, 300, Duration::from_millis(50)));
        for i in 0..20 {
            let name = format!("churn-{i}");
            let (ep, _) = web(&churn, &name, &[])?;
            wait_ping(&wa, ep.ip, Duration::from_secs(10))
                .with_context(|| format!("new container {name} unreachable"))?;
            churn.dockerd.docker(&["rm", "-f", &name])?;
        }
        let (sent, received) = pings.join().expect("ping thread")?;
        println!("pings between the other hosts during the churn: {received}/{sent}");
        check!(
            received == sent,
            "pings between the other hosts lost: {received}/{sent}"
        );
        Ok(())
    });
}
