//! An underlay that is not Ethernet: tinc's tun device (`tinc0`, link type none) between
//! two hosts. The eBPF programs parse a 14-byte Ethernet header, so `--dataplane auto` must
//! pick TUN and say why in `rudder status`; an explicit `--dataplane ebpf` fails with one
//! clear line. The overlay works both ways over it (ping, TCP with content check).

use std::time::Duration;

use rudder_tests::tinc::{start_tinc_mesh, tinc_ip, TINC_DEVICE, TINC_MTU};
use rudder_tests::traffic::tcp_transfer;
use rudder_tests::util::{output, rudder_bin};
use rudder_tests::{check, e2e, netns, wait_ping, wait_until, Cluster, Host, HostOpts};

const REASON: &str = "underlay tinc0 is not an Ethernet device (link type none)";

fn tinc_host(c: &Cluster) -> anyhow::Result<Host> {
    c.add_host_without_daemon(HostOpts {
        dataplane: Some("auto".into()),
        iface: Some(TINC_DEVICE.into()),
        ..HostOpts::default()
    })
}

fn start_on_tinc(h: &Host) -> anyhow::Result<()> {
    h.start()?;
    h.wait_ready(Duration::from_secs(30))
}

#[test]
fn auto_picks_tun_on_an_l3_underlay_and_the_overlay_works_over_it() {
    e2e(|c| {
        let a = tinc_host(c)?;
        let b = tinc_host(c)?;
        start_tinc_mesh(c, &[&a, &b])?;
        start_on_tinc(&a)?;
        start_on_tinc(&b)?;
        for h in [&a, &b] {
            let st = h.status()?;
            check!(st["dataplane"] == "tun", "{}: /status {st}", h.name());
            let reason = st["dataplane_reason"].as_str().unwrap_or_default();
            check!(
                reason.starts_with("auto: eBPF unavailable") && reason.contains(REASON),
                "{}: reason {reason:?}",
                h.name()
            );
            check!(
                st["public_ip"] == tinc_ip(h).to_string(),
                "{}: {st}",
                h.name()
            );
            check!(st["mtu"] == TINC_MTU - 28, "{}: {st}", h.name());
            let socket = h.subnet_file().with_file_name("rudder.sock");
            let text = output(
                netns::exec(h.netns(), rudder_bin().to_str().unwrap_or("rudder"))
                    .args(["status", "--status-socket"])
                    .arg(&socket),
            )?;
            let text = String::from_utf8_lossy(&text.stdout).into_owned();
            check!(
                text.contains(REASON),
                "{}: rudder status:\n{text}",
                h.name()
            );
        }
        for (h, other) in [(&a, &b), (&b, &a)] {
            wait_until(
                &format!("{} to list {} at its tinc address", h.name(), other.name()),
                Duration::from_secs(20),
                || Ok(h.peers()?.contains(&(other.subnet(), tinc_ip(other)))),
            )?;
        }
        for (from, to) in [(&a, &b), (&b, &a)] {
            wait_ping(
                &from.container(),
                to.container_ip(),
                Duration::from_secs(20),
            )?;
            let t = tcp_transfer(&from.container(), &to.container(), 4 << 20)?;
            eprintln!(
                "{} -> {} over tinc: {:.0} Mbit/s",
                from.name(),
                to.name(),
                t.mbit_per_s()
            );
        }

        // Explicit eBPF on the same underlay: the daemon refuses with the reason.
        a.stop()?;
        let mut args: Vec<String> = a.args().to_vec();
        let at = args.iter().position(|x| x == "--dataplane").unwrap_or(0) + 1;
        args[at] = "ebpf".into();
        let out = output(
            netns::exec(a.netns(), rudder_bin().to_str().unwrap_or("rudder"))
                .args(&args)
                .env("RUST_LOG", "warn"),
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        check!(
            !out.status.success(),
            "--dataplane ebpf on tinc0 started:\n{stderr}"
        );
        let last = stderr.lines().last().unwrap_or_default();
        eprintln!("--dataplane ebpf on tinc0: {last}");
        check!(
            last.contains("--dataplane ebpf") && last.contains(REASON),
            "last line: {last:?}\n{stderr}"
        );
        Ok(())
    });
}
