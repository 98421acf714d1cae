//! The eBPF data plane end to end: an all-eBPF cluster, a mixed eBPF/TUN cluster, exact
//! counter movement, a leaving peer, and `--dataplane auto` falling back to TUN.
//!
//! Mixed clusters run with the underlay's default offloads, as users have them: a veth hands
//! a TUN host the eBPF sender's packets with their L4 checksums unfinished, and the TUN path
//! completes them. One test also runs the same mix over a wire that finishes checksums
//! itself (`Host::model_wire`, what a physical NIC does).

use std::time::Duration;

use rudder_tests::netns;
use rudder_tests::traffic::ping_series;
use rudder_tests::{check, e2e, ping, wait_mesh, wait_until, Cluster, Host, HostOpts};

fn host(c: &Cluster, dataplane: &str) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        dataplane: Some(dataplane.into()),
        ..HostOpts::default()
    })
}

fn expect_dataplane(h: &Host, want: &str) -> anyhow::Result<()> {
    let st = h.status()?;
    check!(st["dataplane"] == want, "{}: /status {st}", h.name());
    Ok(())
}

/// Ping and a 10 MB transfer with content check in both directions of every pair.
fn full_mesh_traffic(hosts: &[Host]) -> anyhow::Result<()> {
    for h in hosts {
        eprintln!("{}: data plane {}", h.name(), h.status()?["dataplane"]);
    }
    rudder_tests::full_mesh_traffic(hosts, 10 << 20)
}

#[test]
fn three_ebpf_hosts_carry_ping_and_tcp_between_all_pairs() {
    e2e(|c| {
        let hosts: Vec<Host> = (0..3).map(|_| host(c, "ebpf")).collect::<Result<_, _>>()?;
        for h in &hosts {
            expect_dataplane(h, "ebpf")?;
        }
        full_mesh_traffic(&hosts)?;
        for h in &hosts {
            let st = h.status()?;
            let counters = &st["counters"];
            check!(
                counters["encapsulated"].as_u64() > Some(0)
                    && counters["decapsulated"].as_u64() > Some(0),
                "{}: counters {counters}",
                h.name()
            );
            for reason in ["spoofed_source", "not_our_subnet", "malformed", "truncated"] {
                check!(
                    counters[reason] == 0,
                    "{}: {reason} drops: {counters}",
                    h.name()
                );
            }
        }
        Ok(())
    });
}

#[test]
fn mixed_ebpf_and_tun_hosts_talk_both_ways_with_default_offloads() {
    e2e(|c| {
        let hosts = vec![host(c, "ebpf")?, host(c, "ebpf")?, host(c, "tun")?];
        expect_dataplane(&hosts[0], "ebpf")?;
        expect_dataplane(&hosts[1], "ebpf")?;
        expect_dataplane(&hosts[2], "tun")?;
        full_mesh_traffic(&hosts)
    });
}

#[test]
fn mixed_ebpf_and_tun_hosts_talk_both_ways_over_a_checksumming_wire() {
    e2e(|c| {
        let hosts = vec![host(c, "ebpf")?, host(c, "ebpf")?, host(c, "tun")?];
        for h in &hosts {
            h.model_wire()?;
        }
        expect_dataplane(&hosts[0], "ebpf")?;
        expect_dataplane(&hosts[1], "ebpf")?;
        expect_dataplane(&hosts[2], "tun")?;
        full_mesh_traffic(&hosts)
    });
}

#[test]
fn counters_move_by_the_packets_sent() {
    e2e(|c| {
        let a = host(c, "ebpf")?;
        let b = host(c, "ebpf")?;
        wait_mesh(&[a.clone(), b.clone()], Duration::from_secs(30))?;
        let (a_enc, a_dec) = (a.counter("encapsulated")?, a.counter("decapsulated")?);
        let (b_enc, b_dec) = (b.counter("encapsulated")?, b.counter("decapsulated")?);

        const N: u32 = 25;
        let (sent, received) = ping_series(
            &a.container(),
            b.container_ip(),
            N,
            Duration::from_millis(20),
        )?;
        check!(sent == N && received == N, "ping {received}/{sent}");

        // Requests go A -> B, replies B -> A; nothing else crosses the overlay meanwhile.
        let moved = [
            ("A encapsulated", a.counter("encapsulated")? - a_enc),
            ("B decapsulated", b.counter("decapsulated")? - b_dec),
            ("B encapsulated", b.counter("encapsulated")? - b_enc),
            ("A decapsulated", a.counter("decapsulated")? - a_dec),
        ];
        for (what, delta) in moved {
            check!(
                delta == u64::from(N),
                "{what} moved by {delta}, expected {N}: {moved:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn a_leaving_peer_is_removed_from_routes_and_maps() {
    e2e(|c| {
        let a = host(c, "ebpf")?;
        let b = host(c, "ebpf")?;
        let leaving = c.add_host(HostOpts {
            dataplane: Some("ebpf".into()),
            release_lease_on_exit: true,
            ..HostOpts::default()
        })?;
        wait_mesh(
            &[a.clone(), b.clone(), leaving.clone()],
            Duration::from_secs(30),
        )?;
        let gone = leaving.subnet();
        let peer_route = |h: &Host| -> anyhow::Result<bool> {
            let routes = netns::exec_ok(h.netns(), "ip", &["route", "show", "proto", "211"])?;
            Ok(routes.contains(&gone.to_string()))
        };
        check!(
            peer_route(&a)?,
            "{}: no proto 211 route to {gone}",
            a.name()
        );

        let status = leaving.stop()?;
        check!(status.success(), "{} exited with {status}", leaving.name());
        for h in [&a, &b] {
            wait_until(
                &format!("{} forgets {gone}", h.name()),
                Duration::from_secs(10),
                || Ok(!h.sees_peer(&leaving)? && !peer_route(h)?),
            )?;
            // The LPM entry is gone too: the overlay answers "unreachable" rather than
            // encapsulating towards the departed host.
            let before = h.counter("encapsulated")?;
            let (_, received) = ping_series(
                &h.container(),
                leaving.container_ip(),
                3,
                Duration::from_millis(50),
            )?;
            check!(
                received == 0,
                "{}: the departed host still answers",
                h.name()
            );
            let after = h.counter("encapsulated")?;
            check!(
                after == before,
                "{}: {} packets encapsulated towards a departed peer",
                h.name(),
                after - before
            );
        }
        ping(&a.container(), b.container_ip())
    });
}

#[test]
fn auto_falls_back_to_tun_when_ebpf_cannot_load() {
    e2e(|c| {
        let ebpf = host(c, "ebpf")?;
        let fallback = c.add_host(HostOpts {
            dataplane: Some("auto".into()),
            extra_args: vec!["--ebpf-force-fail".into()],
            ..HostOpts::default()
        })?;
        let st = fallback.status()?;
        check!(st["dataplane"] == "tun", "fallback host: /status {st}");
        let reason = st["dataplane_reason"].as_str().unwrap_or_default();
        check!(
            reason.contains("eBPF unavailable") && reason.contains("force_fail"),
            "the reason should say why eBPF was not used: {reason:?}"
        );
        check!(
            fallback
                .log()
                .lines()
                .filter(|l| l.contains("falling back to the TUN data plane"))
                .count()
                == 1,
            "expected one log line about the fall-back"
        );
        // Without the hook, auto picks eBPF.
        let auto = host(c, "auto")?;
        expect_dataplane(&auto, "ebpf")?;
        full_mesh_traffic(&[ebpf, fallback, auto])
    });
}

#[test]
fn auto_falls_back_to_tun_without_cap_bpf() {
    e2e(|c| {
        let ebpf = host(c, "ebpf")?;
        // Root without CAP_BPF and CAP_SYS_ADMIN: it keeps CAP_NET_ADMIN, so TUN works.
        let unprivileged = c.add_host(HostOpts {
            dataplane: Some("auto".into()),
            command_prefix: vec![
                "setpriv".into(),
                "--bounding-set".into(),
                "-bpf,-sys_admin".into(),
            ],
            ..HostOpts::default()
        })?;
        let st = unprivileged.status()?;
        check!(st["dataplane"] == "tun", "/status {st}");
        let reason = st["dataplane_reason"].as_str().unwrap_or_default();
        check!(
            reason.contains("missing CAP_BPF"),
            "the reason should name the capability: {reason:?}"
        );
        full_mesh_traffic(&[ebpf, unprivileged])
    });
}

#[test]
fn auto_falls_back_to_tun_without_cap_net_raw() {
    e2e(|c| {
        let ebpf = host(c, "ebpf")?;
        // The eBPF socket path's raw IP socket needs CAP_NET_RAW; TUN does not.
        let unprivileged = c.add_host(HostOpts {
            dataplane: Some("auto".into()),
            command_prefix: vec!["setpriv".into(), "--bounding-set".into(), "-net_raw".into()],
            ..HostOpts::default()
        })?;
        let st = unprivileged.status()?;
        check!(st["dataplane"] == "tun", "/status {st}");
        let reason = st["dataplane_reason"].as_str().unwrap_or_default();
        check!(
            reason.contains("missing CAP_NET_RAW"),
            "the reason should name the capability: {reason:?}"
        );
        full_mesh_traffic(&[ebpf, unprivileged])
    });
}

#[test]
fn without_cap_net_admin_the_daemon_says_so_and_exits() {
    e2e(|c| {
        let h = c.add_host(HostOpts {
            wait_ready: false,
            command_prefix: vec![
                "setpriv".into(),
                "--bounding-set".into(),
                "-net_admin".into(),
            ],
            ..HostOpts::default()
        })?;
        wait_until("the daemon to exit", Duration::from_secs(10), || {
            Ok(!h.is_running())
        })?;
        let log = h.log();
        check!(
            log.contains("missing CAP_NET_ADMIN"),
            "the error should name the capability:\n{log}"
        );
        Ok(())
    });
}

/// Re-addressing the bridge (its gateway address removed and added again) makes the kernel
/// delete the peer routes sourced from that address; the daemon puts them back and its
/// log says what happened, naming the address, the bridge and the routes.
#[test]
fn re_addressing_the_bridge_restores_the_routes_and_the_log_says_why() {
    e2e(|c| {
        let hosts = vec![host(c, "ebpf")?, host(c, "ebpf")?];
        let (a, b) = (&hosts[0], &hosts[1]);
        wait_mesh(&hosts, Duration::from_secs(30))?;
        let gateway = format!("{}/{}", a.gateway_ip(), a.subnet().prefix_len());
        // One `ip -batch`: both changes land between two of the daemon's bridge checks.
        let batch = format!(
            "address del {gateway} dev {bridge}\naddress add {gateway} dev {bridge}\n",
            bridge = rudder_tests::cluster::BRIDGE
        );
        let script = c.dir().join("readdress.batch");
        std::fs::write(&script, batch)?;
        netns::exec_ok(a.netns(), "ip", &["-batch", &script.to_string_lossy()])?;
        let want = format!(
            "the gateway address {} on {} was removed and added again (the bridge was \
             re-addressed)",
            a.gateway_ip(),
            rudder_tests::cluster::BRIDGE
        );
        let mut line = String::new();
        wait_until(
            "the routes restored and explained",
            Duration::from_secs(10),
            || {
                line = a
                    .log()
                    .lines()
                    .find(|l| l.contains("data plane routes were removed"))
                    .unwrap_or_default()
                    .to_string();
                Ok(!line.is_empty())
            },
        )?;
        eprintln!("{line}");
        check!(
            line.contains(&want),
            "log line does not say {want:?}: {line}"
        );
        check!(
            line.contains(&b.subnet().to_string()) && line.contains("via eth0"),
            "log line does not name the restored route: {line}"
        );
        ping(&a.host_endpoint(), b.container_ip())?;
        ping(&b.container(), a.container_ip())
    });
}
