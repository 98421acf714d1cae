//! rudder's CNI plugin, driven exactly as a runtime drives it (CNI_COMMAND, CNI_CONTAINERID,
//! CNI_NETNS, CNI_IFNAME, CNI_PATH; config on stdin; inside the host's network namespace),
//! delegating to the real reference plugins of Debian's containernetworking-plugins.
//! Hosts run rudder without `--bridge` (the bridge plugin's `cni0` is adopted on eBPF).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Context;
use rudder_tests::cni::{chain_entry, endpoint, has_link, result_ip, sandbox_ip, CniHost, Sandbox};
use rudder_tests::containerd::Containerd;
use rudder_tests::{
    check, e2e, netns, ping, send_udp, tcp_transfer, wait_ping, wait_until, Cluster, Endpoint,
    HostOpts, UdpProbe,
};
use serde_json::{json, Value};

fn cni_host(c: &Cluster, dataplane: Option<&str>) -> anyhow::Result<CniHost> {
    let host = c.add_host(HostOpts {
        external_bridge: true,
        dataplane: dataplane.map(String::from),
        ..HostOpts::default()
    })?;
    CniHost::new(host, c.dir())
}

fn gateway(h: &CniHost) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(h.host.subnet().network()) + 1)
}

/// The attachment's address is host-local's: gone from its dataDir once released.
fn ip_reserved(h: &CniHost, name: &str, ip: Ipv4Addr) -> bool {
    h.state
        .join("ipam")
        .join(name)
        .join(ip.to_string())
        .exists()
}

fn saved(h: &CniHost, s: &Sandbox) -> std::path::PathBuf {
    h.state
        .join("rudder-data")
        .join(format!("{}-eth0.json", s.id))
}

#[test]
fn add_check_del_as_the_spec_says_with_the_reference_plugins() {
    e2e(|c| {
        let h = cni_host(c, None)?;
        let env = h.host.subnet_env();
        let gw = gateway(&h);
        let name = format!("rudder-{}", h.host.name());

        let v = h.invoke("rudder", "VERSION", b"", None, &[])?;
        v.expect_ok()?;
        let v = v.json()?;
        for want in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
            check!(
                v["supportedVersions"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(want)),
                "VERSION: {v}"
            );
        }

        // ADD: an address in the host's subnet, the overlay MTU, routes via the bridge.
        let conf = h.net_conf("1.0.0");
        let s = h.sandbox(c.resources(), "k1")?;
        let add = h.rudder("ADD", &conf, &s)?;
        add.expect_ok()?;
        let result = add.json()?;
        println!("ADD result: {result}");
        check!(result["cniVersion"] == "1.0.0", "{result}");
        let (ip, len) = result_ip(&result)?;
        check!(
            h.host.subnet().contains(&ip) && ip != gw && len == h.host.subnet().prefix_len(),
            "{ip}/{len} not a container address of {}",
            h.host.subnet()
        );
        check!(result["ips"][0]["gateway"] == gw.to_string(), "{result}");
        let addr = sandbox_ip(&s, &["-o", "-4", "addr", "show", "dev", "eth0"])?;
        check!(addr.contains(&format!("{ip}/{len}")), "eth0: {addr}");
        let link = sandbox_ip(&s, &["link", "show", "eth0"])?;
        check!(link.contains(&format!("mtu {} ", env.mtu)), "eth0: {link}");
        let routes = sandbox_ip(&s, &["-4", "route"])?;
        check!(
            routes.contains(&format!("{} via {gw}", env.network))
                && routes.contains(&format!("default via {gw}")),
            "container routes: {routes}"
        );
        let bridge = netns::exec_ok(h.host.netns(), "ip", &["-o", "-4", "addr", "show", "cni0"])?;
        check!(bridge.contains(&format!("{gw}/{len}")), "cni0: {bridge}");
        // rudder masquerades nothing here (IPMASQ=false), so the bridge plugin does.
        check!(!env.ipmasq, "test host runs without --ip-masq");
        let nat = netns::exec_ok(
            h.host.netns(),
            "iptables",
            &["-t", "nat", "-S", "POSTROUTING"],
        )?;
        check!(nat.contains("CNI-"), "no bridge plugin masquerade: {nat}");
        let me = endpoint(&s, &result)?;
        ping(&me, gw)?;
        ping(&h.host.host_endpoint(), ip)?;
        check!(ip_reserved(&h, &name, ip), "host-local holds no {ip}");
        let stored: Value = serde_json::from_slice(&std::fs::read(saved(&h, &s))?)?;
        check!(
            stored["delegate"]["mtu"] == env.mtu && stored["delegate"]["type"] == "bridge",
            "saved delegate: {stored}"
        );

        // CHECK passes, then fails once the interface is broken.
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = result.clone();
        h.rudder("CHECK", &with_prev, &s)?.expect_ok()?;
        sandbox_ip(&s, &["addr", "flush", "dev", "eth0"])?;
        let broken = h.rudder("CHECK", &with_prev, &s)?;
        check!(!broken.success, "CHECK passed on a broken interface");
        let e = broken.json()?;
        check!(
            e["code"].is_u64() && e["msg"].is_string(),
            "CHECK error: {e}"
        );
        println!("CHECK after breaking eth0: {e}");

        // DEL twice.
        h.rudder("DEL", &with_prev, &s)?.expect_ok()?;
        h.rudder("DEL", &with_prev, &s)?.expect_ok()?;
        check!(!has_link(&s, "eth0"), "eth0 left after DEL");
        check!(!ip_reserved(&h, &name, ip), "{ip} still reserved after DEL");
        check!(!saved(&h, &s).exists(), "saved attachment left after DEL");

        // Older runtimes' versions: 0.3.1 (no CHECK), 0.4.0.
        for version in ["0.3.1", "0.4.0"] {
            let conf = h.net_conf(version);
            let s = h.sandbox(c.resources(), &format!("v{}", version.replace('.', "")))?;
            let result = h.rudder("ADD", &conf, &s)?;
            result.expect_ok()?;
            let result = result.json()?;
            check!(result["cniVersion"] == version, "{result}");
            let (ip, _) = result_ip(&result)?;
            check!(h.host.subnet().contains(&ip), "{version}: {ip}");
            ping(&endpoint(&s, &result)?, gw)?;
            let mut with_prev = conf.clone();
            with_prev["prevResult"] = result.clone();
            if version == "0.4.0" {
                h.rudder("CHECK", &with_prev, &s)?.expect_ok()?;
            } else {
                h.rudder("CHECK", &with_prev, &s)?.expect_error(1)?;
            }
            h.rudder("DEL", &with_prev, &s)?.expect_ok()?;
            check!(
                !has_link(&s, "eth0") && !ip_reserved(&h, &name, ip),
                "{version} DEL"
            );
        }

        // Error cases, each the spec's error JSON on stdout with a non-zero exit.
        let s3 = h.sandbox(c.resources(), "k3")?;
        let e = h
            .invoke("rudder", "ADD", b"{not json", Some(&s3), &[])?
            .expect_error(6)?;
        println!("malformed config: {e}");
        let e = h
            .invoke(
                "rudder",
                "ADD",
                br#"{"name":"x","type":"rudder"}"#,
                Some(&s3),
                &[],
            )?
            .expect_error(7)?;
        println!("no cniVersion: {e}");
        let mut old = conf.clone();
        old["cniVersion"] = json!("0.2.0");
        h.rudder("ADD", &old, &s3)?.expect_error(1)?;
        let mut unknown = conf.clone();
        unknown["delegate"] = json!({"type": "nonesuch"});
        let e = h.rudder("ADD", &unknown, &s3)?.expect_error(7)?;
        check!(e["msg"].as_str().unwrap().contains("nonesuch"), "{e}");
        println!("unknown delegate: {e}");
        check!(!has_link(&s3, "eth0"), "a failed ADD left eth0");
        let c3 = conf.to_string();
        h.invoke(
            "rudder",
            "ADD",
            c3.as_bytes(),
            Some(&s3),
            &[("CNI_COMMAND", "")],
        )?
        .expect_error(4)?;
        h.invoke("rudder", "FROB", c3.as_bytes(), Some(&s3), &[])?
            .expect_error(4)?;
        h.invoke(
            "rudder",
            "ADD",
            c3.as_bytes(),
            Some(&s3),
            &[("CNI_NETNS", "")],
        )?
        .expect_error(4)?;
        h.invoke(
            "rudder",
            "ADD",
            c3.as_bytes(),
            Some(&s3),
            &[("CNI_CONTAINERID", "../etc")],
        )?
        .expect_error(4)?;
        let mut prev3 = conf.clone();
        prev3["prevResult"] = result.clone();
        h.rudder("CHECK", &prev3, &s3)?.expect_error(3)?;

        // DEL after the subnet file vanished (daemon stopped) still cleans up.
        let s4 = h.sandbox(c.resources(), "k4")?;
        let add = h.rudder("ADD", &conf, &s4)?;
        add.expect_ok()?;
        let result4 = add.json()?;
        let (ip4, _) = result_ip(&result4)?;
        h.host.stop()?;
        match std::fs::remove_file(h.host.subnet_file()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let e = h.rudder("ADD", &conf, &s3)?.expect_error(11)?;
        check!(e["msg"].as_str().unwrap().contains("daemon running"), "{e}");
        println!("no subnet file: {e}");
        let mut prev4 = conf.clone();
        prev4["prevResult"] = result4;
        h.rudder("DEL", &prev4, &s4)?.expect_ok()?;
        check!(
            !has_link(&s4, "eth0"),
            "eth0 left after DEL without subnet file"
        );
        check!(!ip_reserved(&h, &name, ip4), "{ip4} still reserved");
        let ports = netns::exec_ok(
            h.host.netns(),
            "ip",
            &["-o", "link", "show", "master", "cni0"],
        )?;
        check!(ports.trim().is_empty(), "veths left on cni0: {ports}");
        h.rudder("DEL", &prev4, &s4)?.expect_ok()?;
        Ok(())
    });
}

/// A published port: TCP from `from` to `dst` (a host's underlay address and host port),
/// received by a listener on `port` inside `to`, content checked.
fn published_transfer(
    from: &Endpoint,
    to: &Endpoint,
    port: u16,
    dst: SocketAddrV4,
) -> anyhow::Result<()> {
    rudder_tests::traffic::tcp_transfer_via(from, to, port, dst, 64 * 1024).map(|_| ())
}

/// Three hosts, one container each attached by the plugin (the third through the shipped
/// conflist with portmap): every pair both ways; full TCP/UDP unless `ping_only`.
fn three_hosts(c: &Cluster, dataplanes: [Option<&str>; 3], ping_only: bool) -> anyhow::Result<()> {
    let hosts: Vec<CniHost> = dataplanes
        .iter()
        .map(|d| cni_host(c, *d))
        .collect::<anyhow::Result<_>>()?;
    let mut eps = Vec::new();
    let mut attached = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let s = h.sandbox(c.resources(), "p1")?;
        let result = if i == 2 {
            let list = h.conflist()?;
            let runtime = json!({"portMappings": [
                {"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}
            ]});
            let r = h.add_list(&list, &s, &runtime)?;
            attached.push((s, Some((list, runtime, r.clone()))));
            r
        } else {
            let conf = h.net_conf("1.0.0");
            let out = h.rudder("ADD", &conf, &s)?;
            out.expect_ok()?;
            let r = out.json()?;
            attached.push((s, None));
            r
        };
        eps.push(endpoint(&attached[i].0, &result)?);
    }
    for a in &hosts {
        for b in &hosts {
            if a.host.index() != b.host.index() {
                wait_until("peers", Duration::from_secs(30), || {
                    a.host.sees_peer(&b.host)
                })?;
            }
        }
    }
    // Pings first: the bridge learns the containers (neighbour + FDB entries), which is how
    // the eBPF data plane finds its local endpoints.
    for (i, a) in eps.iter().enumerate() {
        for (j, b) in eps.iter().enumerate() {
            if i != j {
                wait_ping(a, b.ip, Duration::from_secs(20))?;
            }
        }
    }
    for h in &hosts {
        if h.host.status()?["dataplane"] == "ebpf" {
            wait_until("cni0 on the fast path", Duration::from_secs(15), || {
                let f = &h.host.status()?["fast_path"];
                Ok(f["bridge"] == "cni0" && f["local_endpoints"].as_u64() >= Some(1))
            })
            .with_context(|| {
                format!("{}: {}", h.host.name(), h.host.status().unwrap_or_default())
            })?;
            println!(
                "{}: fast path {}",
                h.host.name(),
                h.host.status()?["fast_path"]
            );
        }
    }
    for (i, a) in eps.iter().enumerate() {
        for (j, b) in eps.iter().enumerate() {
            if i == j {
                continue;
            }
            ping(a, b.ip)?;
            if !ping_only {
                let t = tcp_transfer(a, b, 512 * 1024)?;
                println!("{} -> {}: {:.0} Mbit/s", a.ip, b.ip, t.mbit_per_s());
                let probe = UdpProbe::bind(&b.ns, SocketAddrV4::new(b.ip, 9999))?;
                let payload = format!("udp {} -> {}", a.ip, b.ip);
                send_udp(&a.ns, SocketAddrV4::new(b.ip, 9999), payload.as_bytes())?;
                let got = probe.collect(Duration::from_secs(2))?;
                check!(
                    got.iter()
                        .any(|(p, from)| p == payload.as_bytes() && from.ip() == a.ip),
                    "UDP {} -> {}: {got:?}",
                    a.ip,
                    b.ip
                );
            }
        }
    }
    // The published port, from the underlay (host 1's own namespace) to host 3's address.
    let h3 = &hosts[2];
    let dst = SocketAddrV4::new(h3.host.underlay_ip(), 18080);
    published_transfer(&hosts[0].host.host_endpoint(), &eps[2], 8080, dst)?;
    println!(
        "portmap: {dst} -> {}:8080 reachable from the underlay",
        eps[2].ip
    );

    // Chain CHECK and DEL (portmap's rules go, then the bridge attachment).
    let (s, chained) = &attached[2];
    let (list, runtime, r) = chained.as_ref().unwrap();
    // CHECK of the plugin in the chain (with the chain's final result). portmap 1.1.1's own
    // CHECK fails on a host without IPv6 NAT chains ("could not check ipv6 dnat"), so the
    // list's CHECK is not run whole.
    let entry = chain_entry(list, &list["plugins"][0], Some(r), runtime);
    h3.rudder("CHECK", &entry, s)?.expect_ok()?;
    h3.run_list("DEL", list, s, runtime, r)?;
    check!(!has_link(s, "eth0"), "eth0 left after the chain's DEL");
    let nat = netns::exec_ok(h3.host.netns(), "iptables", &["-t", "nat", "-S"])?;
    check!(!nat.contains("18080"), "portmap rules left: {nat}");
    for (h, (s, _)) in hosts.iter().zip(&attached).take(2) {
        h.rudder("DEL", &h.net_conf("1.0.0"), s)?.expect_ok()?;
    }
    Ok(())
}

/// On whichever data plane the pass gives every host (TUN, then eBPF).
#[test]
fn cni_containers_on_three_hosts_talk_and_publish_a_port() {
    e2e(|c| three_hosts(c, [None, None, None], false));
}

/// eBPF and TUN hosts together, default offloads on the veth underlay: the same checks.
#[test]
fn cni_containers_on_a_mixed_cluster_talk_both_ways() {
    e2e(|c| three_hosts(c, [Some("ebpf"), Some("tun"), Some("ebpf")], false));
}

/// A real runtime: containerd 1.6 in host 1's namespace, `ctr run --cni` with the shipped
/// conflist attaches a busybox httpd through the plugin; host 2's container (attached by the
/// plugin directly) reaches it and back; when the task ends ctr's DEL releases everything.
#[test]
fn containerd_attaches_a_container_through_the_plugin() {
    e2e(|c| {
        let a = cni_host(c, None)?;
        let b = cni_host(c, None)?;
        let sb = b.sandbox(c.resources(), "p1")?;
        let out = b.rudder("ADD", &b.net_conf("1.0.0"), &sb)?;
        out.expect_ok()?;
        let eb = endpoint(&sb, &out.json()?)?;

        let conf_dir = a.state.join("net.d");
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::write(
            conf_dir.join("10-rudder.conflist"),
            serde_json::to_string_pretty(&a.conflist()?)?,
        )?;
        let ctrd = Containerd::start(
            a.host.netns(),
            &c.dir().join(format!("{}-containerd", a.host.name())),
            c.resources(),
        )?;
        println!("containerd: {}", ctrd.ctr(&["version"])?.replace('\n', " "));
        let rootfs = ctrd.rootfs("web", "hello from containerd\n")?;
        let web = ctrd.run_cni(
            "web",
            &rootfs,
            &conf_dir,
            &a.bin_dir,
            &["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
        )?;
        println!("ctr task ls:\n{}", ctrd.ctr(&["task", "ls"])?);
        let pid = ctrd.task_pid("web")?;
        let ns = format!("{}-ctrweb", a.host.netns());
        c.resources().add_netns(&ns);
        rudder_tests::util::ip(&["netns", "attach", &ns, &pid.to_string()])?;
        let addr = rudder_tests::util::ip(&["-n", &ns, "-o", "-4", "addr", "show", "dev", "eth0"])?;
        println!("container web (ctr): {}", addr.trim());
        let ip: Ipv4Addr = addr
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .context("no address on eth0")?
            .parse()?;
        check!(
            a.host.subnet().contains(&ip),
            "{ip} not in {}",
            a.host.subnet()
        );
        let saved_web = a.state.join("rudder-data").join("default-web-eth0.json");
        check!(saved_web.exists(), "no saved attachment for default-web");
        let ea = Endpoint { ns: ns.clone(), ip };

        wait_until("peers", Duration::from_secs(30), || {
            Ok(a.host.sees_peer(&b.host)? && b.host.sees_peer(&a.host)?)
        })?;
        wait_ping(&ea, eb.ip, Duration::from_secs(20))?;
        wait_ping(&eb, ea.ip, Duration::from_secs(20))?;
        tcp_transfer(&ea, &eb, 256 * 1024)?;
        tcp_transfer(&eb, &ea, 256 * 1024)?;
        let page = netns::exec_ok(
            &sb.ns,
            "busybox",
            &[
                "sh",
                "-c",
                &format!(
                    "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox timeout 10 busybox nc {ip} 80"
                ),
            ],
        )?;
        check!(page.contains("hello from containerd"), "HTTP: {page}");
        println!(
            "HTTP from host 2's container to the ctr container: {:?}",
            page.lines().next()
        );

        // The task ends: ctr runs DEL through the plugin (no netns any more: the saved delegate
        // config is what releases the address).
        rudder_tests::util::ip(&["netns", "del", &ns])?;
        let out = ctrd.stop_container(web)?;
        println!("ctr run output: {}", out.trim());
        check!(!saved_web.exists(), "saved attachment left after ctr's DEL");
        check!(
            !ip_reserved(&a, &format!("rudder-{}", a.host.name()), ip),
            "{ip} still reserved after ctr's DEL"
        );
        wait_until("the veth to go from cni0", Duration::from_secs(10), || {
            Ok(netns::exec_ok(
                a.host.netns(),
                "ip",
                &["-o", "link", "show", "master", "cni0"],
            )?
            .trim()
            .is_empty())
        })?;
        b.rudder("DEL", &b.net_conf("1.0.0"), &sb)?.expect_ok()?;
        Ok(())
    });
}
