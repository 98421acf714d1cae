//! Tests of the harness itself; they need root, etcd and ping, but no rudder daemon.

use rudder_tests::cluster::{DEFAULT_CONFIG, DEFAULT_PREFIX};
use rudder_tests::{netns, ping, send_udp, tcp_transfer, Cluster, HostOpts, UdpProbe};
use std::net::SocketAddrV4;
use std::time::Duration;

fn namespaces_of(id: &str) -> Vec<String> {
    let out = rudder_tests::util::ip(&["netns", "list"]).unwrap();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.contains(id))
        .map(String::from)
        .collect()
}

#[test]
fn etcd_answers_from_a_host_namespace_and_survives_restart() {
    let c = Cluster::new().unwrap();
    let h = c.add_host_without_daemon(HostOpts::default()).unwrap();
    assert_eq!(
        c.etcd_get(&format!("{DEFAULT_PREFIX}/config"))
            .unwrap()
            .as_deref(),
        Some(DEFAULT_CONFIG)
    );
    // A client in the host namespace reaches etcd over the underlay.
    let ep = c.etcd_endpoint();
    netns::run_in(h.netns(), || Ok(())).unwrap();
    let put = rudder_tests::util::run(
        netns::exec(h.netns(), "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &ep, "put", "/e2e/from-host", "hello"]),
    )
    .unwrap();
    assert!(put.contains("OK"), "{put}");
    assert_eq!(
        c.etcd_get("/e2e/from-host").unwrap().as_deref(),
        Some("hello")
    );
    assert_eq!(c.etcd_get("/e2e/missing").unwrap(), None);

    // stop/start keeps the data; while stopped, requests fail.
    c.stop_etcd().unwrap();
    assert!(c.etcd_get("/e2e/from-host").is_err());
    c.start_etcd().unwrap();
    assert_eq!(
        c.etcd_get("/e2e/from-host").unwrap().as_deref(),
        Some("hello")
    );
    c.etcd_put("/e2e/a/1", "x").unwrap();
    c.etcd_put("/e2e/a/2", "{\"y\":1}").unwrap();
    assert_eq!(
        c.etcd_get_prefix("/e2e/a/").unwrap(),
        vec![
            ("/e2e/a/1".to_string(), "x".to_string()),
            ("/e2e/a/2".to_string(), "{\"y\":1}".to_string())
        ]
    );
    assert_eq!(c.etcd_delete("/e2e/a/1").unwrap(), 1);
    assert_eq!(c.etcd_get("/e2e/a/1").unwrap(), None);
}

#[test]
fn hosts_reach_each_other_over_the_underlay_and_teardown_removes_everything() {
    let id;
    {
        let c = Cluster::new().unwrap();
        id = c.id().to_string();
        let a = c.add_host_without_daemon(HostOpts::default()).unwrap();
        let b = c.add_host_without_daemon(HostOpts::default()).unwrap();
        assert_ne!(a.underlay_ip(), b.underlay_ip());
        ping(&a.host_endpoint(), b.underlay_ip()).unwrap();
        ping(&b.host_endpoint(), a.underlay_ip()).unwrap();
        // A host reaches the underlay gateway, and nothing beyond it.
        ping(&a.host_endpoint(), rudder_tests::cluster::UNDERLAY_GW).unwrap();
        assert!(ping(&a.host_endpoint(), "192.168.78.1".parse().unwrap()).is_err());

        let t = tcp_transfer(&a.host_endpoint(), &b.host_endpoint(), 4 << 20).unwrap();
        assert_eq!(t.bytes, 4 << 20);

        let probe = UdpProbe::bind(b.netns(), SocketAddrV4::new(b.underlay_ip(), 9999)).unwrap();
        send_udp(
            a.netns(),
            SocketAddrV4::new(b.underlay_ip(), 9999),
            b"probe",
        )
        .unwrap();
        let got = probe.collect(Duration::from_millis(500)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, b"probe");

        // ip_forward is on in the host namespaces only, never changed in the root namespace.
        let fwd = netns::exec_ok(a.netns(), "cat", &["/proc/sys/net/ipv4/ip_forward"]).unwrap();
        assert_eq!(fwd.trim(), "1");

        assert_eq!(namespaces_of(&id).len(), 3, "{:?}", namespaces_of(&id));
    }
    assert!(
        namespaces_of(&id).is_empty(),
        "left behind: {:?}",
        namespaces_of(&id)
    );
}

#[test]
fn teardown_happens_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let c = Cluster::new().unwrap();
        c.add_host_without_daemon(HostOpts::default()).unwrap();
        tx.send(c.id().to_string()).unwrap();
        panic!("deliberate failure");
    });
    assert!(r.is_err());
    let id = rx.recv().unwrap();
    assert!(
        namespaces_of(&id).is_empty(),
        "left behind: {:?}",
        namespaces_of(&id)
    );
}

#[test]
fn wait_until_reports_the_condition_on_timeout() {
    let e = rudder_tests::wait_until("the impossible", Duration::from_millis(200), || {
        anyhow::bail!("still no")
    })
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("the impossible") && msg.contains("still no"),
        "{msg}"
    );
}

#[test]
fn wait_until_stops_at_once_on_abort() {
    let start = std::time::Instant::now();
    let e = rudder_tests::wait_until("anything", Duration::from_secs(30), || {
        Err(rudder_tests::util::Abort("the daemon exited".into()).into())
    })
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(format!("{e:#}").contains("the daemon exited"), "{e:#}");
}

#[test]
fn namespaces_of_a_dead_run_are_removed() {
    rudder_tests::util::require(&["ip"]).unwrap();
    // No process can have a PID above the kernel's maximum (4194304 at most).
    let stale = format!(
        "{}4194305-{}-u",
        rudder_tests::cleanup::NS_PREFIX,
        rudder_tests::util::rand_suffix(6)
    );
    netns::create(&stale).unwrap();
    assert!(netns::exists(&stale));
    rudder_tests::cleanup::remove_stale_namespaces();
    assert!(!netns::exists(&stale), "{stale} was not removed");
}
