//! Dual stack (issue 17), the control plane: a flannel dual-stack config is read unchanged,
//! each host leases an IPv4 and an IPv6 subnet under one flannel-style key with PublicIPv6,
//! writes both to its subnet file, sees the other hosts' IPv6 halves, and keeps both across
//! a restart and a lost lease. A flannel udp host's v4-only lease stays a peer without IPv6.
//! (No IPv6 traffic here: `dual_stack_traffic` carries it.)

use std::net::Ipv6Addr;
use std::time::Duration;

use anyhow::{anyhow, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use rudder_tests::{check, e2e, netns, unleased_subnets, wait_until, Cluster, Host, HostOpts};

const PREFIX: &str = "/coreos.com/network";
const DUAL: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"udp"}}"#;
/// What a flannel udp host writes: no IPv6 half, PublicIPv6 null.
const FLANNEL_V4_KEY: &str = "10.5.200.0-24";
const FLANNEL_V4_VALUE: &str = r#"{"PublicIP":"192.168.77.99","PublicIPv6":null}"#;
/// What an IPv6-only flannel host writes (flannel's empty IPv4 subnet and PublicIP).
const FLANNEL_V6_KEY: &str = "0.0.0.0-0&fc00:0:0:ff00::-64";
const FLANNEL_V6_VALUE: &str = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:77::99"}"#;

fn line<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The host's subnets from its subnet file: FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET.
fn file_subnets(h: &Host) -> Result<(Ipv4Net, Ipv6Net, String)> {
    let text = std::fs::read_to_string(h.subnet_file())?;
    let v4: Ipv4Net = line(&text, "FLANNEL_SUBNET")
        .ok_or_else(|| anyhow!("no FLANNEL_SUBNET: {text}"))?
        .parse()?;
    let v6: Ipv6Net = line(&text, "FLANNEL_IPV6_SUBNET")
        .ok_or_else(|| anyhow!("no FLANNEL_IPV6_SUBNET: {text}"))?
        .parse()?;
    check!(
        line(&text, "FLANNEL_IPV6_NETWORK") == Some("fc00::/48"),
        "FLANNEL_IPV6_NETWORK: {text}"
    );
    // The first address with the prefix, as FLANNEL_SUBNET.
    check!(
        v6.addr() == Ipv6Addr::from(u128::from(v6.network()) + 1),
        "FLANNEL_IPV6_SUBNET is not the subnet's first address: {text}"
    );
    Ok((v4.trunc(), v6.trunc(), text))
}

fn dual_key(v4: Ipv4Net, v6: Ipv6Net) -> String {
    format!(
        "{PREFIX}/subnets/{}-{}&{}-{}",
        v4.network(),
        v4.prefix_len(),
        v6.network(),
        v6.prefix_len()
    )
}

/// A host whose eth0 has `ipv6` (added before the daemon starts, as an operator's would be).
fn dual_host(c: &Cluster, ipv6: &str, extra_args: &[&str]) -> Result<Host> {
    let h = c.add_host_without_daemon(HostOpts {
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        ..HostOpts::default()
    })?;
    netns::exec_ok(
        h.netns(),
        "ip",
        &["-6", "addr", "add", ipv6, "dev", "eth0", "nodad"],
    )?;
    h.start()?;
    h.wait_ready(Duration::from_secs(30))?;
    Ok(h)
}

fn peer_entry(status: &serde_json::Value, subnet: Ipv4Net) -> Option<serde_json::Value> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["subnet"] == subnet.to_string())
        .cloned()
}

#[test]
fn dual_stack_leases_files_peers_and_restart() {
    e2e(|c| {
        c.put_config(DUAL)?;
        c.etcd_put(
            &format!("{PREFIX}/subnets/{FLANNEL_V4_KEY}"),
            FLANNEL_V4_VALUE,
        )?;
        c.etcd_put(
            &format!("{PREFIX}/subnets/{FLANNEL_V6_KEY}"),
            FLANNEL_V6_VALUE,
        )?;

        // a: PublicIPv6 from its interface; b: --public-ipv6 wins over its interface's.
        let a = dual_host(c, "fd00:77::10/64", &[])?;
        let b = dual_host(c, "fd00:77::11/64", &["--public-ipv6", "fd00:77::21"])?;
        let (a4, a6, a_file) = file_subnets(&a)?;
        let (b4, b6, _) = file_subnets(&b)?;
        eprintln!("a: {a4} {a6}; b: {b4} {b6}\n{a_file}");
        check!(
            a4 != b4 && a6 != b6,
            "subnets shared: {a4} {a6} / {b4} {b6}"
        );
        let range: Ipv6Net = "fc00::/48".parse()?;
        for v6 in [a6, b6] {
            check!(
                v6.prefix_len() == 64 && range.contains(&v6) && v6.network() != range.network(),
                "{v6} is not a /64 of fc00::/48 after the first"
            );
        }

        // etcd: one dual-stack key per host, values with PublicIPv6.
        for (v4, v6, public_ipv6) in [(a4, a6, "fd00:77::10"), (b4, b6, "fd00:77::21")] {
            let key = dual_key(v4, v6);
            let value = c
                .etcd_get(&key)?
                .ok_or_else(|| anyhow!("no {key}: {:?}", c.lease_keys(None)))?;
            let json: serde_json::Value = serde_json::from_str(&value)?;
            check!(
                json["PublicIPv6"] == public_ipv6 && json["BackendType"] == "udp",
                "{key} = {value}"
            );
        }
        let keys = c.lease_keys(None)?;
        check!(keys.len() == 4, "leases: {keys:?}");

        // Each daemon's view: its own IPv6 half, the other's, the flannel hosts'.
        for (me, me6, other4, other6, other_ipv6) in [
            (&a, a6, b4, b6, "fd00:77::21"),
            (&b, b6, a4, a6, "fd00:77::10"),
        ] {
            wait_until(
                "the peers' IPv6 halves in /status",
                Duration::from_secs(20),
                || {
                    let st = me.status()?;
                    Ok(peer_entry(&st, other4)
                        .is_some_and(|p| p["ipv6_subnet"] == other6.to_string())
                        && st["ipv6_peers"].as_array().is_some_and(|v| v.len() == 2))
                },
            )?;
            let st = me.status()?;
            check!(st["ipv6_subnet"] == me6.to_string(), "{st}");
            check!(st["ipv6_network"] == "fc00::/48", "{st}");
            let other = peer_entry(&st, other4).unwrap();
            check!(other["public_ipv6"] == other_ipv6, "{other}");
            let flannel = peer_entry(&st, FLANNEL_V4_KEY.replace('-', "/").parse()?)
                .ok_or_else(|| anyhow!("the flannel v4-only lease is no peer: {st}"))?;
            check!(
                flannel["ipv6_subnet"].is_null() && flannel["public_ipv6"].is_null(),
                "a v4-only lease got an IPv6 half: {flannel}"
            );
            let only6 = st["ipv6_peers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["ipv6_subnet"] == "fc00:0:0:ff00::/64")
                .cloned()
                .ok_or_else(|| anyhow!("the IPv6-only lease is missing: {st}"))?;
            check!(
                only6["subnet"].is_null() && only6["public_ipv6"] == "fd00:77::99",
                "{only6}"
            );
            check!(st["invalid_leases"] == 0, "{st}");
            let said = me
                .log()
                .matches("IPv6 is on (IPv6Network fc00::/48)")
                .count();
            check!(said == 1, "the IPv6 start line logged {said} times");
        }
        // `rudder status` (the table) names the IPv6 subnet and PublicIPv6.
        let socket = a.subnet_file().with_file_name("rudder.sock");
        let table = netns::exec_ok(
            a.netns(),
            rudder_tests::util::rudder_bin().to_str().unwrap(),
            &["status", "--status-socket", socket.to_str().unwrap()],
        )?;
        eprintln!("rudder status:\n{table}");
        check!(
            table.contains(&format!(
                "ipv6:       subnet {a6} of fc00::/48, public ipv6 fd00:77::10"
            )),
            "status table:\n{table}"
        );

        // Restart keeps both subnets (and the one key).
        a.kill9()?;
        a.restart()?;
        let (a4_again, a6_again, _) = file_subnets(&a)?;
        check!(
            (a4_again, a6_again) == (a4, a6),
            "restart moved a: {a4} {a6} -> {a4_again} {a6_again}"
        );
        check!(c.lease_keys(None)?.len() == 4, "{:?}", c.lease_keys(None)?);

        // A lost lease is taken again with both halves.
        let before = a.status()?["lease_acquisitions"].as_u64().unwrap_or(0);
        c.etcd_delete(&dual_key(a4, a6))?;
        wait_until("a to re-acquire its lease", Duration::from_secs(30), || {
            Ok(c.etcd_get(&dual_key(a4, a6))?.is_some()
                && a.status()?["lease_acquisitions"].as_u64().unwrap_or(0) > before)
        })?;
        check!(c.lease_keys(None)?.len() == 4, "{:?}", c.lease_keys(None)?);
        Ok(())
    });
}

/// Turning IPv6 on for a running IPv4 cluster: the v4-only lease of a host is replaced by a
/// dual-stack one that keeps the IPv4 subnet.
#[test]
fn enabling_ipv6_replaces_a_v4_only_lease_and_keeps_the_ipv4_subnet() {
    e2e(|c| {
        let h = c.add_host(HostOpts {
            cleanup_on_exit: false,
            ..HostOpts::default()
        })?;
        let v4 = h.subnet();
        let v4_key = h.lease_key();
        check!(c.etcd_get(&v4_key)?.is_some(), "no {v4_key}");
        h.stop()?;
        c.put_config(DUAL)?;
        h.start()?;
        // Up from the state file first, then rebuilt for the new config (the bridge goes and
        // comes back meanwhile: no container is attached here); the dual-stack lease follows.
        wait_until(
            "the IPv6 subnet in the subnet file and ready",
            Duration::from_secs(30),
            || {
                h.check_alive()?;
                Ok(file_subnets(&h).is_ok() && h.is_ready())
            },
        )?;
        let (v4_after, v6, _) = file_subnets(&h)?;
        check!(v4_after == v4, "IPv4 subnet moved: {v4} -> {v4_after}");
        let keys = c.lease_keys(None)?;
        check!(
            keys == vec![dual_key(v4, v6)],
            "expected only the dual-stack key, got {keys:?}"
        );
        Ok(())
    });
}

/// A lease whose IPv6 half overlaps a live host's IPv6 subnet (written by hand, or carved
/// with another IPv6SubnetLen): that half is refused and reported as an overlapping IPv4
/// subnet is, and its IPv4 half still becomes a peer.
#[test]
fn an_overlapping_ipv6_half_is_refused_and_its_ipv4_half_kept() {
    e2e(|c| {
        c.put_config(DUAL)?;
        let a = dual_host(c, "fd00:77::10/64", &[])?;
        let b = dual_host(c, "fd00:77::11/64", &[])?;
        let (_, a6, _) = file_subnets(&a)?;
        wait_until("b to see a's IPv6 half", Duration::from_secs(20), || {
            Ok(b.status()?["ipv6_peers"]
                .as_array()
                .is_some_and(|v| v.iter().any(|p| p["ipv6_subnet"] == a6.to_string())))
        })?;
        let invalid_before = b.status()?["invalid_leases"].as_u64().unwrap_or(0);
        let over_a6 = Ipv6Net::new(a6.network(), 60)?.trunc();
        let v4: Ipv4Net = unleased_subnets(&[&a, &b], 1)[0];
        c.etcd_put(
            &dual_key(v4, over_a6),
            r#"{"PublicIP":"192.168.77.98","PublicIPv6":"fd00:77::98"}"#,
        )?;
        wait_until(
            "b to refuse the overlapping IPv6 half",
            Duration::from_secs(20),
            || {
                Ok(b.log().contains(&format!(
                    "refusing lease {over_a6}: it overlaps the earlier lease {a6}"
                )))
            },
        )?;
        wait_until(
            "the IPv4 half to become a peer",
            Duration::from_secs(20),
            || Ok(peer_entry(&b.status()?, v4).is_some()),
        )?;
        let st = b.status()?;
        let ipv6_peers = st["ipv6_peers"].as_array().cloned().unwrap_or_default();
        check!(
            !ipv6_peers
                .iter()
                .any(|p| p["ipv6_subnet"] == over_a6.to_string()),
            "b made the overlapping IPv6 half a peer: {st}"
        );
        check!(
            ipv6_peers
                .iter()
                .any(|p| p["ipv6_subnet"] == a6.to_string()),
            "a's IPv6 half is gone: {st}"
        );
        check!(
            st["invalid_leases"].as_u64().unwrap_or(0) > invalid_before,
            "the refusal was not counted: {st}"
        );
        // The kernel's IPv6 table holds no route for the refused block on either plane.
        let routes = netns::exec_ok(b.netns(), "ip", &["-6", "route", "show"])?;
        check!(
            !routes.contains(&over_a6.to_string()),
            "a route for the refused block:\n{routes}"
        );
        Ok(())
    });
}

/// `--iface` given as an IPv6 address names the interface holding it, and that address is the
/// PublicIPv6 (as flanneld's), not the one the interface's ranking would pick.
#[test]
fn iface_as_an_ipv6_address_names_the_interface_and_the_public_ipv6() {
    e2e(|c| {
        c.put_config(DUAL)?;
        let h = c.add_host_without_daemon(HostOpts {
            extra_args: vec!["--iface".into(), "fd00:77::33".into()],
            ..HostOpts::default()
        })?;
        // The named address first: the kernel lists the newer one first, which is what the
        // ranking alone would pick.
        for address in ["fd00:77::33/64", "fd00:77::13/64"] {
            netns::exec_ok(
                h.netns(),
                "ip",
                &["-6", "addr", "add", address, "dev", "eth0", "nodad"],
            )?;
        }
        h.start()?;
        h.wait_ready(Duration::from_secs(30))?;
        let (v4, v6, _) = file_subnets(&h)?;
        let value = c
            .etcd_get(&dual_key(v4, v6))?
            .ok_or_else(|| anyhow!("no lease for {v4} {v6}: {:?}", c.lease_keys(None)))?;
        let json: serde_json::Value = serde_json::from_str(&value)?;
        check!(json["PublicIPv6"] == "fd00:77::33", "lease {value}");
        check!(
            json["PublicIP"] == h.underlay_ip().to_string(),
            "the IPv4 PublicIP is eth0's own: {value}"
        );
        check!(h.status()?["iface"] == "eth0", "{}", h.status()?);
        Ok(())
    });
}
