//! The socket path with IPv6 (root needed, in a private network namespace): each inner
//! family over each outer family reaches its destination, re-injected through the raw
//! socket of its family with a partial checksum completed; an IPv6 packet whose hop limit
//! runs out gets its ICMPv6 error at the peer's overlay port; bad senders are counted.
//!
//! Underlay and "container" addresses all sit on the namespace's loopback: a re-injected
//! packet is delivered locally, to a UDP socket bound to its destination.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use tokio::net::UdpSocket;

use super::tests::wait_for;
use super::*;
use crate::dataplane::tun::device_tests::{in_private_netns, udp_packet};
use crate::packet6::pseudo_header_sum6;
use crate::packet6::tests::{ipv6_packet, udp6};
use rudder_ebpf::Counter;

const OURS4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const PEER4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const OURS6: &str = "fd00:77::1";
const PEER6: &str = "fd00:77::2";
const STRANGER6: &str = "fd00:77::3";
const PORT: u16 = 8285;
/// Where an eBPF peer's datagrams come from: 49152 + flow hash.
const FLOW_HASH_PORT: u16 = 51234;
/// Local "containers": the destinations of the inner packets.
const CONTAINER6: &str = "fc00:0:0:1::7";
const CONTAINER4: Ipv4Addr = Ipv4Addr::new(10, 5, 1, 7);

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn ip(args: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .context("running ip")?;
    anyhow::ensure!(status.success(), "ip {args} failed");
    Ok(())
}

/// Our IPv4 and IPv6 underlay addresses on lo; peers: 10.5.2.0/24 and fc00:0:0:2::/64 at
/// 127.0.0.2, 10.5.3.0/24 and fc00:0:0:3::/64 at fd00:77::2.
async fn start() -> anyhow::Result<Arc<SocketPath>> {
    for address in [OURS6, PEER6, STRANGER6, CONTAINER6] {
        ip(&format!("-6 addr add {address}/128 dev lo nodad"))?;
    }
    ip(&format!("addr add {CONTAINER4}/32 dev lo"))?;
    let peers = [("10.5.2.0/24".parse()?, PEER4)].into();
    let config = SocketPathConfig {
        local: std::net::SocketAddrV4::new(OURS4, PORT),
        local_subnet: "10.5.1.0/24".parse()?,
        network: "10.5.0.0/16".parse()?,
        ipv6: Some(Ipv6Plane {
            network: "fc00::/48".parse()?,
            local_subnet: "fc00:0:0:1::/64".parse()?,
            public_ipv6: Some(ip6(OURS6)),
        }),
        underlay_index: 1,
    };
    let path = SocketPath::start(config, &peers).await?;
    path.upsert_peer6("fc00:0:0:2::/64".parse()?, PEER4.into(), None);
    path.upsert_peer6("fc00:0:0:3::/64".parse()?, ip6(PEER6).into(), None);
    path.upsert_peer("10.5.3.0/24".parse()?, ip6(PEER6).into(), None);
    Ok(path)
}

/// An IPv6 UDP packet to port 8080 whose checksum holds only the pseudo-header sum, as a
/// sender's kernel with checksum offload leaves it.
fn partial_udp6(src: &str, dst: &str, hop_limit: u8, data: &[u8]) -> Vec<u8> {
    let mut packet = udp6(src, dst, hop_limit, data);
    let sum = pseudo_header_sum6(ip6(src), ip6(dst), 17, 8 + data.len());
    packet[46..48].copy_from_slice(&sum.to_be_bytes());
    packet
}

async fn recv_within(socket: &UdpSocket, buf: &mut [u8]) -> anyhow::Result<(usize, SocketAddr)> {
    tokio::time::timeout(Duration::from_secs(5), socket.recv_from(buf))
        .await
        .context("nothing arrived within 5 s")?
        .context("receive failed")
}

#[test]
fn either_inner_family_over_either_outer_family_reaches_its_destination() {
    in_private_netns(|| async {
        let path = start().await?;
        let peer4 = UdpSocket::bind((PEER4, FLOW_HASH_PORT)).await?;
        let peer6 = UdpSocket::bind((ip6(PEER6), FLOW_HASH_PORT)).await?;
        let container6 = UdpSocket::bind((ip6(CONTAINER6), 8080)).await?;
        let container4 = UdpSocket::bind((CONTAINER4, 7777)).await?;
        let mut buf = [0u8; 2048];

        // IPv6 inner over IPv4 outer, checksum partial: the container socket only takes
        // it once the socket path completed the checksum.
        let inner = partial_udp6("fc00:0:0:2::9", CONTAINER6, 64, b"six over four");
        peer4.send_to(&inner, (OURS4, PORT)).await?;
        let (n, from) = recv_within(&container6, &mut buf).await?;
        assert_eq!(&buf[..n], b"six over four");
        assert_eq!(from.ip(), "fc00:0:0:2::9".parse::<IpAddr>()?);

        // IPv6 inner over IPv6 outer.
        let inner = partial_udp6("fc00:0:0:3::9", CONTAINER6, 64, b"six over six");
        peer6.send_to(&inner, (ip6(OURS6), PORT)).await?;
        let (n, _) = recv_within(&container6, &mut buf).await?;
        assert_eq!(&buf[..n], b"six over six");

        // IPv4 inner over IPv6 outer.
        let inner = udp_packet(
            [10, 5, 3, 9],
            CONTAINER4.octets(),
            64,
            (5555, 7777),
            b"four",
        );
        peer6.send_to(&inner, (ip6(OURS6), PORT)).await?;
        let (n, from) = recv_within(&container4, &mut buf).await?;
        assert_eq!(&buf[..n], b"four");
        assert_eq!(from.ip(), IpAddr::from([10, 5, 3, 9]));

        assert_eq!(wait_for(&path, Counter::Decapsulated, 3).await, 3);
        path.stop();
        Ok(())
    });
}

#[test]
fn ipv6_drops_are_counted_by_reason() {
    in_private_netns(|| async {
        let path = start().await?;
        let peer6 = UdpSocket::bind((ip6(PEER6), FLOW_HASH_PORT)).await?;
        let stranger = UdpSocket::bind((ip6(STRANGER6), FLOW_HASH_PORT)).await?;
        let to = (ip6(OURS6), PORT);
        // fc00:0:0:2::/64 is 127.0.0.2's: from fd00:77::2 it is spoofed.
        let spoofed = udp6("fc00:0:0:2::9", CONTAINER6, 64, b"x");
        peer6.send_to(&spoofed, to).await?;
        assert_eq!(wait_for(&path, Counter::DropSpoofedSource, 1).await, 1);
        let unknown = udp6("fc00:0:0:3::9", CONTAINER6, 64, b"x");
        stranger.send_to(&unknown, to).await?;
        assert_eq!(wait_for(&path, Counter::DropUnknownSender, 1).await, 1);
        let not_ours = udp6("fc00:0:0:3::9", "fc00:0:0:9::1", 64, b"x");
        peer6.send_to(&not_ours, to).await?;
        assert_eq!(wait_for(&path, Counter::DropNotOurSubnet, 1).await, 1);
        // A jumbogram's zero payload length.
        let mut malformed = ipv6_packet("fc00:0:0:3::9", CONTAINER6, 64, 17, &[0; 8]);
        malformed[4..6].fill(0);
        peer6.send_to(&malformed, to).await?;
        assert_eq!(wait_for(&path, Counter::DropMalformed, 1).await, 1);
        assert_eq!(path.packets()[Counter::Decapsulated.index()], 0);
        path.stop();
        Ok(())
    });
}

/// The hop limit runs out here: the ICMPv6 error goes back encapsulated, from our subnet's
/// first address, to the peer's overlay port (not the datagram's flow-hash source port).
#[test]
fn hop_limit_exceeded_goes_to_the_peers_overlay_port_as_icmpv6() {
    in_private_netns(|| async {
        let path = start().await?;
        let peer6 = UdpSocket::bind((ip6(PEER6), FLOW_HASH_PORT)).await?;
        let overlay_port = UdpSocket::bind((ip6(PEER6), PORT)).await?;
        let expiring = udp6("fc00:0:0:3::9", CONTAINER6, 1, b"x");
        peer6.send_to(&expiring, (ip6(OURS6), PORT)).await?;
        let mut buf = [0u8; 2048];
        let (n, from) = recv_within(&overlay_port, &mut buf).await?;
        assert_eq!(from, SocketAddr::from((ip6(OURS6), PORT)));
        let error = &buf[..n];
        assert_eq!(error[0] >> 4, 6, "an IPv6 packet");
        assert_eq!(error[6], 58, "ICMPv6");
        assert_eq!(
            &error[8..24],
            &ip6("fc00:0:0:1::1").octets(),
            "from our gateway"
        );
        assert_eq!(
            &error[24..40],
            &ip6("fc00:0:0:3::9").octets(),
            "to the sender"
        );
        assert_eq!((error[40], error[41]), (3, 0), "time exceeded in transit");
        assert_eq!(path.packets()[Counter::DropTtlExceeded.index()], 1);
        assert!(
            peer6.try_recv_from(&mut buf).is_err(),
            "the error went to the source port"
        );
        path.stop();
        Ok(())
    });
}
