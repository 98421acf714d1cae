//! The operator's commands against a running cluster: `rudder status`, `rudder leases`,
//! `rudder network init|show`, `rudder docker-opts`, `/metrics`, and `--ip-masq`.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use anyhow::Context;
use rudder_tests::util::{output, rudder_bin};
use rudder_tests::{check, e2e, netns, ping, wait_until, Cluster, Host, HostOpts};

/// Runs `rudder args..` inside `ns` (where etcd is reachable).
fn rudder_in(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    output(netns::exec(ns, rudder_bin().to_str().context("binary path")?).args(args))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn etcd_flag(c: &Cluster) -> String {
    format!("--etcd-endpoints={}", c.etcd_endpoint())
}

fn status_socket(h: &Host) -> String {
    h.subnet_file()
        .with_file_name("rudder.sock")
        .display()
        .to_string()
}

#[test]
fn status_and_leases_describe_the_running_cluster() {
    e2e(|c| {
        let a = c.add_host(HostOpts::default())?;
        let b = c.add_host(HostOpts::default())?;
        wait_until("a sees b", Duration::from_secs(10), || a.sees_peer(&b))?;
        ping(&a.container(), b.container_ip())?;

        let json = rudder_in(
            a.netns(),
            &["status", "--json", "--status-socket", &status_socket(&a)],
        )?;
        check!(
            json.status.success(),
            "rudder status --json: {}",
            stderr(&json)
        );
        let st: serde_json::Value = serde_json::from_str(&stdout(&json))?;
        check!(st["subnet"] == a.subnet().to_string(), "status: {st}");
        check!(st["ready"] == true, "status: {st}");
        check!(
            st["peers"][0]["subnet"] == b.subnet().to_string(),
            "status: {st}"
        );
        check!(st["lease_expires_unix"].as_u64().is_some(), "status: {st}");
        // The ping went to b and its replies came from b: the peer row counted both.
        let peer = &st["peers"][0];
        for (field, at_least) in [
            ("tx_packets", 1),
            ("rx_packets", 1),
            ("tx_bytes", 84),
            ("rx_bytes", 84),
        ] {
            check!(
                peer[field].as_u64().unwrap_or(0) >= at_least,
                "{field} of the peer row: {peer}"
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let changed = peer["changed_unix"].as_u64().unwrap_or(0);
        check!(
            changed <= now && now - changed < 120,
            "peer changed_unix {changed} vs now {now}"
        );

        let table = rudder_in(
            a.netns(),
            &["status", "--status-socket", &status_socket(&a)],
        )?;
        let text = stdout(&table);
        for want in [
            a.subnet().to_string(),
            b.subnet().to_string(),
            "expires in".into(),
            "RX BYTES".into(),
            " ago".into(),
        ] {
            check!(text.contains(&want), "status table lacks {want:?}:\n{text}");
        }

        let leases = rudder_in(a.netns(), &["leases", "--json", &etcd_flag(c)])?;
        check!(
            leases.status.success(),
            "rudder leases: {}",
            stderr(&leases)
        );
        let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&leases))?;
        check!(rows.len() == 2, "leases: {rows:?}");
        for h in [&a, &b] {
            let row = rows
                .iter()
                .find(|r| r["subnet"] == h.subnet().to_string())
                .with_context(|| format!("no lease row for {}", h.subnet()))?;
            check!(row["public_ip"] == h.underlay_ip().to_string(), "row {row}");
            let ttl = row["ttl_seconds"].as_i64().unwrap_or(0);
            check!(
                ttl > 86_000 && ttl <= 86_400,
                "TTL of a fresh 24h lease: {ttl}"
            );
        }

        // Without a daemon the command says what to check.
        let missing = rudder_in(
            a.netns(),
            &["status", "--status-socket", "/nonexistent.sock"],
        )?;
        check!(
            !missing.status.success(),
            "status without a daemon succeeded"
        );
        check!(
            stderr(&missing).contains("is `rudder run` running"),
            "{}",
            stderr(&missing)
        );
        Ok(())
    });
}

#[test]
fn metrics_are_prometheus_text_with_counters_by_reason() {
    e2e(|c| {
        let a = c.add_host(HostOpts::default())?;
        let b = c.add_host(HostOpts::default())?;
        wait_until("a sees b", Duration::from_secs(10), || a.sees_peer(&b))?;
        ping(&a.container(), b.container_ip())?;

        let (code, body) = a.http_get("/metrics")?;
        check!(code == 200, "/metrics answered {code}");
        // name{labels} value, one sample a line; comments start with '#'.
        let mut samples = BTreeMap::new();
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("unparsable sample {line:?}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("unparsable value in {line:?}"))?;
            samples.insert(name.to_string(), value);
        }
        let dp = a.status()?["dataplane"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let get = |k: &str| samples.get(k).copied();
        check!(
            get("rudder_peers") == Some(1.0),
            "rudder_peers in {samples:?}"
        );
        check!(
            get("rudder_lease_acquisitions_total") == Some(1.0),
            "{samples:?}"
        );
        let encapsulated =
            format!("rudder_packets_total{{dataplane=\"{dp}\",result=\"encapsulated\"}}");
        check!(
            get(&encapsulated).unwrap_or(0.0) >= 1.0,
            "{encapsulated} in {samples:?}"
        );
        for reason in ["spoofed_source", "not_ipv4", "ttl_exceeded", "no_route"] {
            let key = format!("rudder_packets_total{{dataplane=\"{dp}\",result=\"{reason}\"}}");
            check!(get(&key).is_some(), "{key} missing from {samples:?}");
        }
        // Bytes of the inner packets: a default ping is 84 bytes of IPv4.
        for result in ["encapsulated", "decapsulated"] {
            let packets = format!("rudder_packets_total{{dataplane=\"{dp}\",result=\"{result}\"}}");
            let bytes = format!("rudder_bytes_total{{dataplane=\"{dp}\",result=\"{result}\"}}");
            let (packets, bytes) = (get(&packets).unwrap_or(0.0), get(&bytes).unwrap_or(0.0));
            check!(
                packets >= 1.0 && bytes >= 84.0 * packets,
                "{result}: {packets} packets, {bytes} bytes in {samples:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn network_init_validates_like_the_daemon_and_show_prints_defaults() {
    let cluster = Cluster::bare().expect("cluster");
    let result = (|| -> anyhow::Result<()> {
        let c = &cluster;
        let ns = c.underlay_ns().to_string();

        let bad = rudder_in(
            &ns,
            &["network", "init", &etcd_flag(c), "--network", "10.5.0.0/29"],
        )?;
        check!(!bad.status.success(), "a /29 network was accepted");
        // The daemon's own validation text (see config.rs).
        check!(
            stderr(&bad).contains("Network 10.5.0.0/29 is too small: it must be /28 or larger"),
            "{}",
            stderr(&bad)
        );
        check!(
            c.etcd_get("/coreos.com/network/config")?.is_none(),
            "bad config was written"
        );

        let ok = rudder_in(
            &ns,
            &[
                "network",
                "init",
                &etcd_flag(c),
                "--network",
                "10.7.0.0/16",
                "--subnet-len",
                "26",
            ],
        )?;
        check!(ok.status.success(), "network init: {}", stderr(&ok));
        let stored = c
            .etcd_get("/coreos.com/network/config")?
            .context("config not written")?;
        let v: serde_json::Value = serde_json::from_str(&stored)?;
        check!(
            v["Network"] == "10.7.0.0/16" && v["SubnetLen"] == 26,
            "stored {stored}"
        );

        let again = rudder_in(
            &ns,
            &["network", "init", &etcd_flag(c), "--network", "10.8.0.0/16"],
        )?;
        check!(
            !again.status.success(),
            "init overwrote a config without --force"
        );
        check!(stderr(&again).contains("--force"), "{}", stderr(&again));

        let show = rudder_in(&ns, &["network", "show", &etcd_flag(c)])?;
        let text = stdout(&show);
        for want in [
            "10.7.0.0/16",
            "SubnetMin  10.7.0.64",
            "SubnetMax  10.7.255.192",
            "udp port 8285",
        ] {
            check!(text.contains(want), "network show lacks {want:?}:\n{text}");
        }

        // A daemon started now uses it.
        let h = c.add_host(HostOpts::default())?;
        check!(h.subnet().prefix_len() == 26, "daemon got {}", h.subnet());
        Ok(())
    })();
    if let Err(e) = result {
        cluster.dump_logs();
        panic!("{e:#}");
    }
}

#[test]
fn docker_opts_follow_the_subnet_file() {
    e2e(|c| {
        let h = c.add_host(HostOpts {
            ip_masq: true,
            ..HostOpts::default()
        })?;
        let out_file = h.subnet_file().with_file_name("docker_opts.env");
        let run = rudder_in(
            h.netns(),
            &[
                "docker-opts",
                "--subnet-file",
                h.subnet_file().to_str().unwrap_or_default(),
                "--output",
                out_file.to_str().unwrap_or_default(),
            ],
        )?;
        check!(run.status.success(), "docker-opts: {}", stderr(&run));
        let text = std::fs::read_to_string(&out_file)?;
        let bip = format!("{}/{}", h.gateway_ip(), h.subnet().prefix_len());
        let expected = [
            format!("DOCKER_OPT_BIP=\"--bip={bip}\""),
            "DOCKER_OPT_IPMASQ=\"--ip-masq=false\"".to_string(),
            "DOCKER_OPT_MTU=\"--mtu=1472\"".to_string(),
            format!("DOCKER_OPTS=\" --bip={bip} --ip-masq=false --mtu=1472\""),
        ];
        let lines: Vec<&str> = text.lines().collect();
        check!(
            lines == expected,
            "docker opts:\n{text}\nexpected:\n{}",
            expected.join("\n")
        );
        Ok(())
    });
}

#[test]
fn ip_masq_lets_containers_reach_outside_the_overlay_and_is_removed_on_exit() {
    e2e(|c| {
        let plain = c.add_host(HostOpts::default())?;
        let masq = c.add_host(HostOpts {
            ip_masq: true,
            ..HostOpts::default()
        })?;
        let underlay_gw = rudder_tests::cluster::UNDERLAY_GW;
        // The underlay has no route back to the overlay: only a masqueraded packet returns.
        ping(&masq.container(), underlay_gw).context("masqueraded container -> underlay")?;
        check!(
            ping(&plain.container(), underlay_gw).is_err(),
            "a container without --ip-masq reached the underlay: nothing should route back"
        );
        // Overlay to overlay is not masqueraded: the peer sees the container's own address.
        ping(&masq.container(), plain.container_ip())?;
        let rules = netns::exec_ok(masq.netns(), "nft", &["list", "table", "ip", "rudder"])?;
        check!(rules.contains("masquerade"), "rules:\n{rules}");

        let status = masq.stop()?;
        check!(status.success(), "exit status {status}");
        let after =
            output(netns::exec(masq.netns(), "nft").args(["list", "table", "ip", "rudder"]))?;
        check!(
            !after.status.success(),
            "table ip rudder left behind after SIGTERM"
        );
        Ok(())
    });
}
