//! ECN across the overlay (RFC 6040, normal mode), end to end: the sender copies the inner
//! packet's ECN field into the outer header, and a congestion mark (CE) the underlay puts
//! on the outer header reaches the receiving container when the inner packet is
//! ECN-capable; around a Not-ECT packet it cannot, and the receiver drops and counts it.
//!
//! The "congested underlay" is an nft rule on the underlay's veth towards the receiver
//! (netdev egress hook), which counts the outer ECT(0) datagrams and marks them CE.

use std::time::Duration;

use rudder_tests::{add_hosts, check, e2e, netns, wait_mesh, Cluster, Host, HostOpts};

/// nft counter `name`'s packets in namespace `ns` (table `ip rte_ecn` or `netdev rte_ecn`).
fn nft_counter(ns: &str, family: &str, name: &str) -> anyhow::Result<u64> {
    let text = netns::exec_ok(ns, "nft", &["list", "counter", family, "rte_ecn", name])?;
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no packet count in {text:?}"))
}

fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    let path = std::env::temp_dir().join(format!("rte-ecn-{}-{ns}.nft", std::process::id()));
    std::fs::write(&path, script)?;
    let result = netns::exec_ok(ns, "nft", &["-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    result.map(|_| ())
}

/// `ping -c <count> -Q <tos>` from `from`'s container to `to`'s; returns the replies.
fn ping_with_tos(from: &Host, to: &Host, tos: u8, count: u32) -> anyhow::Result<u32> {
    let (_, received) = rudder_tests::traffic::ping_series_with(
        &from.container(),
        to.container_ip(),
        count,
        Duration::from_millis(200),
        &["-Q", &tos.to_string()],
    )?;
    Ok(received)
}

#[test]
fn congestion_marks_on_the_underlay_reach_ecn_capable_containers() {
    e2e(|c| {
        let hosts = add_hosts(c, 2)?;
        congestion_from_to(c, &hosts[0], &hosts[1])
    });
}

#[test]
fn mixed_tun_sender_and_ebpf_receiver_follow_the_same_ecn_rules() {
    e2e(|c| congestion_from_to(c, &host(c, "tun")?, &host(c, "ebpf")?));
}

#[test]
fn mixed_ebpf_sender_and_tun_receiver_follow_the_same_ecn_rules() {
    e2e(|c| congestion_from_to(c, &host(c, "ebpf")?, &host(c, "tun")?));
}

fn host(c: &Cluster, dataplane: &str) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        dataplane: Some(dataplane.into()),
        ..HostOpts::default()
    })
}

/// Pings `a` → `b` over an underlay that marks every datagram towards `b` CE.
fn congestion_from_to(c: &Cluster, a: &Host, b: &Host) -> anyhow::Result<()> {
    {
        wait_mesh(&[a.clone(), b.clone()], Duration::from_secs(30))?;
        let port = rudder_tests::cluster::UDP_PORT;
        nft(
            c.underlay_ns(),
            &format!(
                "table netdev rte_ecn {{
                   counter outer_ect0 {{}}
                   chain congest {{
                     type filter hook egress device u{to} priority 0;
                     udp dport {port} ip ecn ect0 counter name outer_ect0
                     udp dport {port} ip ecn set ce
                   }}
                 }}",
                to = b.name()
            ),
        )?;
        nft(
            &b.container().ns,
            "table ip rte_ecn {
               counter ce {}
               counter ect0 {}
               chain input {
                 type filter hook input priority 0;
                 icmp type echo-request ip ecn ce counter name ce
                 icmp type echo-request ip ecn ect0 counter name ect0
               }
             }",
        )?;

        // ECT(0) inside: the outer header carries ECT(0) on the wire, the underlay marks it
        // CE, the receiver copies CE inside; the echo is delivered.
        let replies = ping_with_tos(a, b, 0x02, 5)?;
        let outer_ect0 = nft_counter(c.underlay_ns(), "netdev", "outer_ect0")?;
        let ce = nft_counter(&b.container().ns, "ip", "ce")?;
        let ect0 = nft_counter(&b.container().ns, "ip", "ect0")?;
        eprintln!(
            "ECT(0) pings: {replies}/5 replies, {outer_ect0} outer ECT(0) datagrams, inner \
             arrived {ce} CE, {ect0} ECT(0)"
        );
        check!(
            outer_ect0 >= 5,
            "outer ECN not copied from the inner packet: {outer_ect0}"
        );
        check!(
            ce >= 5 && ect0 == 0,
            "CE not copied inside: {ce} CE, {ect0} ECT(0)"
        );
        check!(replies == 5, "ECN-capable echoes lost: {replies}/5");

        // Not-ECT inside with CE outside: dropped and counted (RFC 6040), nothing delivered.
        let drops_before = b.counter("ce_not_ect")?;
        nft(
            c.underlay_ns(),
            &format!(
                "add rule netdev rte_ecn congest udp dport {port} ip ecn not-ect ip ecn set ce"
            ),
        )?;
        let replies = ping_with_tos(a, b, 0x00, 3)?;
        let drops = b.counter("ce_not_ect")? - drops_before;
        eprintln!("Not-ECT pings marked CE: {replies}/3 replies, {drops} counted ce_not_ect");
        check!(replies == 0, "Not-ECT packets marked CE were delivered");
        check!(drops >= 3, "ce_not_ect counted {drops}");
        b.check_alive()
    }
}
