//! The underlay's MTU changes at run time (`ip link set eth0 mtu 1400`): the daemon follows
//! it without a restart: the subnet file's FLANNEL_MTU, the data plane's MTU (eBPF: the peer
//! routes' `mtu`; TUN: the device's MTU) and its "fragmentation needed" limit, logged once.

use std::time::Duration;

use rudder_tests::traffic::{tcp_transfer, Endpoint};
use rudder_tests::util::output;
use rudder_tests::{add_hosts, check, e2e, netns, wait_mesh, wait_until, Host};

const NEW_UNDERLAY_MTU: u32 = 1400;
/// 1400 less the 28 bytes of outer IPv4 and UDP headers.
const NEW_OVERLAY_MTU: u32 = 1372;

/// One ping of `payload` bytes with DF set; whether a reply came back.
fn ping_df(from: &Endpoint, to: std::net::Ipv4Addr, payload: u32) -> anyhow::Result<bool> {
    let out = output(netns::exec(&from.ns, "ping").args([
        "-n",
        "-q",
        "-c",
        "1",
        "-W",
        "2",
        "-M",
        "do",
        "-s",
        &payload.to_string(),
        &to.to_string(),
    ]))?;
    Ok(out.status.success())
}

fn set_underlay_mtu(c: &rudder_tests::Cluster, h: &Host, mtu: u32) -> anyhow::Result<()> {
    let mtu = mtu.to_string();
    // Both ends of the veth: the bridge side must pass what the host now sends.
    netns::exec_ok(
        c.underlay_ns(),
        "ip",
        &["link", "set", &format!("u{}", h.name()), "mtu", &mtu],
    )?;
    netns::exec_ok(h.netns(), "ip", &["link", "set", "eth0", "mtu", &mtu])?;
    Ok(())
}

/// What carries the MTU in this host's data plane, as `ip` shows it.
fn data_plane_mtu_line(h: &Host, peer: &Host) -> anyhow::Result<String> {
    let st = h.status()?;
    Ok(if st["dataplane"] == "ebpf" {
        netns::exec_ok(
            h.netns(),
            "ip",
            &["route", "show", &peer.subnet().to_string()],
        )?
    } else {
        netns::exec_ok(h.netns(), "ip", &["link", "show", "rudder0"])?
    })
}

#[test]
fn an_underlay_mtu_change_is_followed_without_a_restart() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        let (a, b) = (&hosts[0], &hosts[1]);
        wait_mesh(&hosts, Duration::from_secs(30))?;
        check!(a.subnet_env().mtu == 1472, "{:?}", a.subnet_env());

        for h in [a, b] {
            set_underlay_mtu(c, h, NEW_UNDERLAY_MTU)?;
        }
        for (h, peer) in [(a, b), (b, a)] {
            wait_until(
                &format!(
                    "{}: subnet file with FLANNEL_MTU={NEW_OVERLAY_MTU}",
                    h.name()
                ),
                Duration::from_secs(10),
                || Ok(h.read_subnet_file()?.map(|e| e.mtu) == Some(NEW_OVERLAY_MTU)),
            )?;
            let line = data_plane_mtu_line(h, peer)?;
            check!(
                line.contains(&format!("mtu {NEW_OVERLAY_MTU}")),
                "{}: data plane MTU not followed: {line}",
                h.name()
            );
            let st = h.status()?;
            check!(st["mtu"] == NEW_OVERLAY_MTU, "{}: /status {st}", h.name());
            let log = h.log();
            check!(
                log.contains("underlay eth0 MTU 1500 → 1400: overlay MTU 1372"),
                "{}: no MTU change line in the log",
                h.name()
            );
        }

        // From the host: the largest packet that fits the new MTU passes with DF, one byte
        // more is refused at once (the route's or device's MTU).
        let largest = NEW_OVERLAY_MTU - 28;
        check!(
            ping_df(&a.host_endpoint(), b.container_ip(), largest)?,
            "a DF ping of {largest} bytes from host a to b's container failed"
        );
        check!(
            !ping_df(&a.host_endpoint(), b.container_ip(), largest + 1)?,
            "a DF ping of {} bytes went through over a {NEW_OVERLAY_MTU} overlay",
            largest + 1
        );
        // Containers still have the old MTU (1472): path MTU discovery must bring TCP
        // down to the new one, both ways.
        for (from, to) in [(a, b), (b, a)] {
            check!(
                ping_df(&from.container(), to.container_ip(), largest)?,
                "DF ping of {largest} bytes {} -> {} failed",
                from.name(),
                to.name()
            );
            let t = tcp_transfer(&from.container(), &to.container(), 4 << 20)?;
            eprintln!(
                "{} -> {} after the MTU change: {:.0} Mbit/s",
                from.name(),
                to.name(),
                t.mbit_per_s()
            );
        }

        // And back up: the larger MTU is taken too (the TUN path's read buffers grow).
        for h in [a, b] {
            set_underlay_mtu(c, h, 1500)?;
        }
        for h in [a, b] {
            wait_until(
                &format!("{}: subnet file with FLANNEL_MTU=1472 again", h.name()),
                Duration::from_secs(10),
                || Ok(h.read_subnet_file()?.map(|e| e.mtu) == Some(1472)),
            )?;
        }
        for (from, to) in [(a, b), (b, a)] {
            check!(
                ping_df(&from.host_endpoint(), to.container_ip(), 1472 - 28)?,
                "a DF ping of 1444 bytes {} -> {} failed after the MTU went back to 1500",
                from.name(),
                to.name()
            );
            tcp_transfer(&from.container(), &to.container(), 4 << 20)?;
        }
        a.check_alive()?;
        b.check_alive()
    });
}
