//! A flanneld unit's command line and environment run rudder unchanged: the binary started
//! through a symlink named `flanneld`, no subcommand, Go flag syntax (`-flag=value`,
//! `-flag value`, `--flag=value`, `-bool=true`), `FLANNELD_*` variables; `--iface` given
//! twice (the first names no interface), `--iface-regex`, `--iface-can-reach` next to a decoy
//! interface; `--ip-masq-fully-random-disable` and `--ip-blackhole-route` in effect;
//! RUDDER_* wins over FLANNELD_*; flanneld's Kubernetes flags and a malformed
//! `--public-ipv6` fail with one line.

use std::time::Duration;

use rudder_tests::{check, e2e, full_mesh_traffic, netns, wait_mesh, Cluster, Host, HostOpts};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A host started as a flanneld unit with these flags (besides the harness's own).
fn flanneld_host(c: &Cluster, flags: &[&str], decoy: bool) -> anyhow::Result<Host> {
    let h = c.add_host_without_daemon(HostOpts {
        wait_ready: false,
        extra_args: s(flags),
        ..HostOpts::default()
    })?;
    if decoy {
        // An interface made before the daemon starts, with an address nobody routes to.
        for cmd in [
            &[
                "link", "add", "decoy0", "type", "veth", "peer", "name", "decoy1",
            ][..],
            &["addr", "add", "192.168.99.5/24", "dev", "decoy0"],
            &["link", "set", "decoy1", "up"],
            &["link", "set", "decoy0", "up"],
        ] {
            netns::exec_ok(h.netns(), "ip", cmd)?;
        }
    }
    h.set_flanneld_style(true);
    // RUDDER_DATAPLANE (from the drop-in) must win over this.
    h.set_env(&[("FLANNELD_DATAPLANE", "no-such-dataplane")]);
    let (argv, env) = h.flanneld_command_line();
    eprintln!(
        "{}: {} {}\n    environment: {env:?}",
        h.name(),
        h.flanneld_symlink()?.display(),
        argv.join(" ")
    );
    h.start()?;
    h.wait_ready(Duration::from_secs(60))?;
    // Really the symlink, really no subcommand.
    let pid = h.pid().expect("running");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmdline: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    check!(
        cmdline[0].ends_with("/flanneld") && cmdline[1..] == argv[..],
        "{}: daemon runs as {cmdline:?}",
        h.name()
    );
    Ok(h)
}

fn check_underlay(h: &Host) -> anyhow::Result<()> {
    let st = h.status()?;
    check!(
        st["iface"] == "eth0" && st["public_ip"] == h.underlay_ip().to_string(),
        "{}: underlay {} {}",
        h.name(),
        st["iface"],
        st["public_ip"]
    );
    Ok(())
}

#[test]
fn flanneld_command_line_and_environment_run_unchanged() {
    e2e(|c| {
        let plain = c.add_host(HostOpts::default())?;
        let unit = flanneld_host(
            c,
            &[
                "--iface",
                "no-such0",
                "--iface",
                "eth0",
                "--ip-masq",
                "--ip-masq-fully-random-disable",
                "--ip-blackhole-route",
                "--iptables-forward-rules",
                "true",
                "--iptables-resync",
                "2",
                "--subnet-lease-renew-margin",
                "60",
                "--v",
                "2",
            ],
            false,
        )?;
        check_underlay(&unit)?;
        let log = unit.log();
        check!(
            log.contains("--iface no-such0: no interface"),
            "the missing first --iface is not logged:\n{log}"
        );
        let nft = netns::exec_ok(unit.netns(), "nft", &["list", "table", "ip", "rudder"])?;
        check!(
            nft.contains("masquerade") && !nft.contains("fully-random"),
            "--ip-masq-fully-random-disable: {nft}"
        );
        let subnet = unit.subnet();
        let blackholes =
            netns::exec_ok(unit.netns(), "ip", &["route", "show", "type", "blackhole"])?;
        check!(
            blackholes.contains(&subnet.to_string()),
            "--ip-blackhole-route: no blackhole for {subnet}: {blackholes:?}"
        );

        let regex = flanneld_host(
            c,
            &["--iface", "no-such0", "--iface-regex", r"^192\.168\.77\."],
            true,
        )?;
        check_underlay(&regex)?;
        let reach = flanneld_host(c, &["--iface-can-reach", "192.168.77.1"], true)?;
        check_underlay(&reach)?;

        let hosts = [plain.clone(), unit.clone(), regex, reach];
        wait_mesh(&hosts, Duration::from_secs(30))?;
        full_mesh_traffic(&hosts, 256 << 10)?;

        // A clean stop takes the blackhole route away.
        unit.stop()?;
        let blackholes =
            netns::exec_ok(unit.netns(), "ip", &["route", "show", "type", "blackhole"])?;
        check!(
            !blackholes.contains(&subnet.to_string()),
            "after stop: {blackholes:?}"
        );

        // What rudder cannot do fails at once, with one line saying what to do instead. The
        // plain binary name without a subcommand reaches the daemon's own checks.
        let endpoint = format!("-etcd-endpoints={}", c.etcd_endpoint());
        let bin = rudder_tests::util::rudder_bin();
        let bin = bin.to_str().unwrap();
        for (argv, env, expect) in [
            (
                vec![bin, &endpoint, "-kube-subnet-mgr"],
                None,
                "--kube-subnet-mgr is not supported",
            ),
            (
                vec![
                    bin,
                    &endpoint,
                    "--net-config-path=/etc/kube-flannel/net-conf.json",
                ],
                None,
                "rudder network init",
            ),
            (
                vec![bin, &endpoint],
                Some(("FLANNELD_KUBE_SUBNET_MGR", "true")),
                "FLANNELD_KUBE_SUBNET_MGR",
            ),
            (
                vec![bin, &endpoint, "-public-ipv6=fd00::5::1"],
                None,
                "--public-ipv6 \"fd00::5::1\" is not an IPv6 address",
            ),
        ] {
            let mut cmd = netns::exec(plain.netns(), argv[0]);
            cmd.args(&argv[1..]);
            if let Some((k, v)) = env {
                cmd.env(k, v);
            }
            let out = cmd.output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            check!(
                !out.status.success() && lines.len() == 1 && lines[0].contains(expect),
                "{argv:?} {env:?}: exit {}, stderr {err:?}",
                out.status
            );
            eprintln!("{:?} -> {}", &argv[1..], lines[0]);
        }
        Ok(())
    });
}
