//! `--public-ip` that is not the interface's primary address: a host behind a 1:1 NAT (a
//! cloud's elastic IP, the host owns only its private address) and a host whose public IP
//! is a secondary address. Both data planes must send from an address the host owns, and
//! peers must accept what arrives from the sender's PublicIP. (Before: eBPF wrote the NAT
//! address as the outer source and the NAT box dropped it as a martian; TUN sent from the
//! primary address and peers dropped it as `unknown_sender`.)

use anyhow::Context;
use rudder_tests::cleanup::NS_PREFIX;
use rudder_tests::underlay::UNDERLAY_GW;
use rudder_tests::util::ip;
use rudder_tests::{check, e2e, netns, ping, tcp_transfer, wait_ping, wait_until, Host, HostOpts};
use std::net::Ipv4Addr;
use std::time::Duration;

const NAT_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 201);
const NAT_INSIDE: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const BEHIND_NAT: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);

/// Traffic both ways between the containers of `a` and `b` (ping, 1 MB TCP content-checked),
/// and neither host counted the other's datagrams as coming from an unknown sender.
fn talk_both_ways(a: &Host, b: &Host) -> anyhow::Result<()> {
    wait_ping(&a.container(), b.container_ip(), Duration::from_secs(30))?;
    wait_ping(&b.container(), a.container_ip(), Duration::from_secs(30))?;
    ping(&a.container(), b.container_ip())?;
    tcp_transfer(&a.container(), &b.container(), 1 << 20).context("TCP a -> b")?;
    tcp_transfer(&b.container(), &a.container(), 1 << 20).context("TCP b -> a")?;
    for h in [a, b] {
        let unknown = h.counter("unknown_sender")?;
        check!(
            unknown == 0,
            "{} dropped {unknown} datagrams as unknown_sender",
            h.name()
        );
    }
    Ok(())
}

/// Moves host `h`'s underlay link behind a new NAT namespace that owns `NAT_PUBLIC` on the
/// underlay bridge and translates it 1:1 to the host's private address `BEHIND_NAT`.
fn put_behind_one_to_one_nat(c: &rudder_tests::Cluster, h: &Host) -> anyhow::Result<String> {
    let nat = format!("{NS_PREFIX}{}-nat", c.id());
    c.resources().add_netns(&nat);
    netns::create(&nat)?;
    let u = c.underlay_ns();
    let uveth = format!("u{}", h.name());
    ip(&["-n", u, "link", "set", &uveth, "nomaster"])?;
    ip(&["-n", u, "link", "set", &uveth, "netns", &nat])?;
    ip(&[
        "-n",
        &nat,
        "addr",
        "add",
        &format!("{NAT_INSIDE}/24"),
        "dev",
        &uveth,
    ])?;
    ip(&["-n", &nat, "link", "set", &uveth, "up"])?;
    ip(&[
        "-n", u, "link", "add", "natwan", "type", "veth", "peer", "name", "wan", "netns", &nat,
    ])?;
    ip(&["-n", u, "link", "set", "natwan", "master", "ubr0", "up"])?;
    ip(&[
        "-n",
        &nat,
        "addr",
        "add",
        &format!("{NAT_PUBLIC}/24"),
        "dev",
        "wan",
    ])?;
    ip(&["-n", &nat, "link", "set", "wan", "up"])?;
    ip(&[
        "-n",
        &nat,
        "route",
        "add",
        "default",
        "via",
        &UNDERLAY_GW.to_string(),
    ])?;
    netns::run_in(&nat, || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n").context("enabling ip_forward")
    })?;
    let rules = format!(
        "table ip onetoone {{
           chain pre {{ type nat hook prerouting priority dstnat; ip daddr {NAT_PUBLIC} dnat to {BEHIND_NAT}; }}
           chain post {{ type nat hook postrouting priority srcnat; ip saddr {BEHIND_NAT} snat to {NAT_PUBLIC}; }}
         }}"
    );
    netns::exec_ok(&nat, "nft", &[&rules])?;

    let ns = h.netns();
    ip(&["-n", ns, "addr", "flush", "dev", "eth0"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{BEHIND_NAT}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&[
        "-n",
        ns,
        "route",
        "replace",
        "default",
        "via",
        &NAT_INSIDE.to_string(),
    ])?;
    Ok(nat)
}

#[test]
fn host_behind_a_one_to_one_nat_talks_both_ways() {
    e2e(|c| {
        let a = c.add_host(HostOpts::default())?;
        let b = c.add_host_without_daemon(HostOpts {
            extra_args: vec!["--public-ip".into(), NAT_PUBLIC.to_string()],
            ..HostOpts::default()
        })?;
        put_behind_one_to_one_nat(c, &b)?;
        b.start()?;
        b.wait_ready(Duration::from_secs(60))?;

        let st = b.status()?;
        check!(
            st["public_ip"] == NAT_PUBLIC.to_string() && st["local_ip"] == BEHIND_NAT.to_string(),
            "b's status should name the NAT address as public and its own as local: {st}"
        );
        wait_until(
            "a to list b at its NAT address",
            Duration::from_secs(30),
            || Ok(a.peers()?.contains(&(b.subnet(), NAT_PUBLIC))),
        )?;
        talk_both_ways(&a, &b)
    });
}

#[test]
fn public_ip_on_a_secondary_address_is_the_source() {
    e2e(|c| {
        let secondary = Ipv4Addr::new(192, 168, 77, 150);
        let a = c.add_host_without_daemon(HostOpts {
            extra_args: vec!["--public-ip".into(), secondary.to_string()],
            ..HostOpts::default()
        })?;
        ip(&[
            "-n",
            a.netns(),
            "addr",
            "add",
            &format!("{secondary}/24"),
            "dev",
            "eth0",
        ])?;
        a.start()?;
        a.wait_ready(Duration::from_secs(60))?;
        let b = c.add_host(HostOpts::default())?;

        let st = a.status()?;
        check!(
            st["public_ip"] == secondary.to_string() && st["local_ip"] == secondary.to_string(),
            "a owns its public IP, so it is also the source: {st}"
        );
        wait_until(
            "b to list a at its secondary address",
            Duration::from_secs(30),
            || Ok(b.peers()?.contains(&(a.subnet(), secondary))),
        )?;
        talk_both_ways(&a, &b)
    });
}
