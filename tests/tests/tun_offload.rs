//! The TUN data plane's offloads (TSO/USO on the device, UDP GSO/GRO on the socket) do not
//! change the wire: a batching host and a host moving one packet per system call
//! (`--tun-offload false`, as flannel's udp backend) exchange TCP both ways, content
//! checked, and the plain host receives one datagram per inner packet.

use std::time::Duration;

use rudder_tests::dual_stack::{add_dual_stack_host, wait_mesh6, DUAL_STACK_CONFIG};
use rudder_tests::traffic6::tcp_transfer6;
use rudder_tests::{check, e2e, tcp_transfer, wait_mesh, Cluster, Host, HostOpts};

fn tun_host(c: &Cluster, offload: bool) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        dataplane: Some("tun".into()),
        extra_args: vec!["--tun-offload".into(), offload.to_string()],
        ..HostOpts::default()
    })
}

fn dataplane_reason(h: &Host) -> anyhow::Result<String> {
    Ok(h.status()?["dataplane_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn batching_and_plain_tun_hosts_interoperate() {
    e2e(|c| {
        let fast = tun_host(c, true)?;
        let plain = tun_host(c, false)?;
        wait_mesh(&[fast.clone(), plain.clone()], Duration::from_secs(30))?;

        let fast_reason = dataplane_reason(&fast)?;
        check!(
            fast_reason.contains("offloads (TSO/USO) on") && fast_reason.contains("UDP GSO on"),
            "batching host: {fast_reason}"
        );
        let plain_reason = dataplane_reason(&plain)?;
        check!(
            plain_reason.contains("offloads (TSO/USO) off")
                && plain_reason.contains("UDP GSO off")
                && plain_reason.contains("UDP GRO off"),
            "plain host: {plain_reason}"
        );

        const BYTES: usize = 20 << 20;
        let before = plain.counter("decapsulated")?;
        tcp_transfer(&fast.container(), &plain.container(), BYTES)?;
        tcp_transfer(&plain.container(), &fast.container(), BYTES)?;

        // Whatever the batching host sent in one system call arrived as datagrams of at most
        // the overlay MTU: the plain host counted at least one per MTU of payload.
        let overlay_mtu = fast.subnet_env().mtu as usize;
        let datagrams = plain.counter("decapsulated")? - before;
        check!(
            datagrams as usize >= BYTES / overlay_mtu,
            "plain host decapsulated {datagrams} packets for {BYTES} bytes (MTU {overlay_mtu})"
        );
        for h in [&fast, &plain] {
            for reason in ["malformed", "truncated", "not_ipv4", "io_error"] {
                let drops = h.counter(reason)?;
                check!(drops == 0, "{}: {drops} {reason} drops", h.name());
            }
        }
        Ok(())
    });
}

/// The same over IPv6 (dual stack, IPv6 outer header): two batching hosts and a plain one
/// exchange TCP/IPv6 and TCP/IPv4 both ways, content checked; the rates with and without
/// the offloads are printed.
#[test]
fn batching_and_plain_tun_hosts_interoperate_over_ipv6() {
    e2e(|c| {
        c.put_config(DUAL_STACK_CONFIG)?;
        let host = |offload: bool| {
            add_dual_stack_host(
                c,
                HostOpts {
                    dataplane: Some("tun".into()),
                    extra_args: vec!["--tun-offload".into(), offload.to_string()],
                    ..HostOpts::default()
                },
            )
        };
        let (fast1, fast2, plain) = (host(true)?, host(true)?, host(false)?);
        let hosts = [fast1.clone(), fast2.clone(), plain.clone()];
        wait_mesh(&hosts, Duration::from_secs(30))?;
        wait_mesh6(&hosts, Duration::from_secs(30))?;
        const BYTES: usize = 20 << 20;
        let before = plain.counter("decapsulated")?;
        for (from, to, what) in [
            (&fast1, &fast2, "offloads on at both ends"),
            (&fast2, &fast1, "offloads on at both ends"),
            (&fast1, &plain, "batching sender, plain receiver"),
            (&plain, &fast1, "plain sender, batching receiver"),
        ] {
            let t6 = tcp_transfer6(&from.container6()?, &to.container6()?, BYTES)?;
            let t4 = tcp_transfer(&from.container(), &to.container(), BYTES)?;
            eprintln!(
                "{} -> {} ({what}): TCP/IPv6 {:.0} Mbit/s, TCP/IPv4 {:.0} Mbit/s",
                from.name(),
                to.name(),
                t6.mbit_per_s(),
                t4.mbit_per_s()
            );
        }
        let overlay_mtu = fast1.subnet_env().mtu as usize;
        let datagrams = plain.counter("decapsulated")? - before;
        check!(
            datagrams as usize >= 2 * BYTES / overlay_mtu,
            "plain host decapsulated {datagrams} packets for 2 x {BYTES} bytes (MTU {overlay_mtu})"
        );
        for h in &hosts {
            for reason in ["malformed", "truncated", "not_ipv4", "io_error", "no_route"] {
                let drops = h.counter(reason)?;
                check!(drops == 0, "{}: {drops} {reason} drops", h.name());
            }
        }
        Ok(())
    });
}

/// Without `model_wire` on the sender, a veth hands the eBPF host the batching host's
/// `UDP_SEGMENT` trains whole; its ingress program passes them to the daemon's socket,
/// which splits them (counted `to_daemon`), so TCP still flows. (The eBPF host's own veth
/// finishes checksums as a NIC would: a userspace receiver cannot complete the partial
/// checksums a veth passes along, see `Host::model_wire`.)
#[test]
fn batching_tun_host_reaches_ebpf_host_over_veth() {
    e2e(|c| {
        let fast = tun_host(c, true)?;
        let ebpf = c.add_host(HostOpts {
            dataplane: Some("ebpf".into()),
            ..HostOpts::default()
        })?;
        ebpf.model_wire()?;
        wait_mesh(&[fast.clone(), ebpf.clone()], Duration::from_secs(30))?;
        const BYTES: usize = 20 << 20;
        tcp_transfer(&fast.container(), &ebpf.container(), BYTES)?;
        tcp_transfer(&ebpf.container(), &fast.container(), BYTES)?;
        let trains = ebpf.counter("to_daemon")?;
        check!(trains > 0, "no train reached the eBPF host's socket path");
        for reason in ["malformed", "truncated", "not_ipv4", "io_error"] {
            let drops = ebpf.counter(reason)?;
            check!(drops == 0, "eBPF host: {drops} {reason} drops");
        }
        Ok(())
    });
}

/// An eBPF host and a plain TUN host (`--tun-offload false`, flannel's udp behaviour) on a veth
/// underlay with default offloads: the eBPF sender's whole TSO packets arrive unsegmented in
/// one datagram, partial checksums and all, and the plain host, whose device takes nothing
/// larger than its MTU, cuts them into segments itself. TCP both ways, content checked.
#[test]
fn plain_tun_host_and_ebpf_host_exchange_tcp_with_default_offloads() {
    e2e(|c| {
        let plain = tun_host(c, false)?;
        let ebpf = c.add_host(HostOpts {
            dataplane: Some("ebpf".into()),
            ..HostOpts::default()
        })?;
        wait_mesh(&[plain.clone(), ebpf.clone()], Duration::from_secs(30))?;
        const BYTES: usize = 20 << 20;
        for (from, to) in [(&ebpf, &plain), (&plain, &ebpf)] {
            let t = tcp_transfer(&from.container(), &to.container(), BYTES)?;
            eprintln!(
                "{} -> {}: {:.0} Mbit/s",
                from.name(),
                to.name(),
                t.mbit_per_s()
            );
        }
        for reason in ["malformed", "truncated", "io_error"] {
            let drops = plain.counter(reason)?;
            check!(drops == 0, "plain host: {drops} {reason} drops");
        }
        Ok(())
    });
}
