//! The TUN plane carrying IPv6, on a real device in a private network namespace (root, as
//! `device_tests`): the kernel answers echo requests to the device's own IPv6 address, so a
//! request sent in by a fake peer over the underlay comes back to that peer through both
//! forwarding loops, byte for byte.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use rudder_ebpf::Counter;
use tokio::net::UdpSocket;

use super::device::netlink_connect;
use super::device_tests::in_private_netns;
use super::*;
use crate::dataplane::Dataplane;
use crate::packet6::{l4_checksum6, parse_ipv6, PROTO_ICMPV6};

const DEVICE: &str = "rudder-t6";
const PORT: u16 = 8285;
/// Underlay addresses on the namespace's loopback.
const OURS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const PEER4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn net6(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// An ICMPv6 echo request (or reply, type 129) with a correct checksum.
fn echo6(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(payload);
    let checksum = l4_checksum6(src, dst, PROTO_ICMPV6, &icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.extend_from_slice(&[PROTO_ICMPV6, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&icmp);
    p
}

/// An IPv4 ICMP echo request with correct checksums.
fn echo4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    use crate::packet::internet_checksum;
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
    let checksum = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0x43, 0x21, 0x40, 0, 64, 1, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let checksum = internet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p.extend_from_slice(&icmp);
    p
}

async fn recv_within(socket: &UdpSocket, buf: &mut [u8]) -> anyhow::Result<(usize, SocketAddr)> {
    use anyhow::Context as _;
    tokio::time::timeout(Duration::from_secs(5), socket.recv_from(buf))
        .await
        .context("nothing arrived within 5 s")?
        .context("receive failed")
}

fn proc_conf(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{DEVICE}/{key}"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn ipv6_echo_through_both_loops_over_either_outer_family() {
    in_private_netns(|| async {
        let handle = netlink_connect()?;
        for address in [OURS6, PEER6] {
            crate::host_ipv6::add_ipv6_address(&handle, 1, address, 128).await?;
        }
        let local6 = net6("fc00:0:0:1::/64");
        let mut options = TunOptions::new(
            "10.5.1.0/24".parse::<Ipv4Net>()?,
            "10.5.0.0/16".parse()?,
            1500,
        );
        options.device_name = DEVICE.to_owned();
        options.bind = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
        options.ipv6 = Some(TunIpv6 {
            network: net6("fc00::/48"),
            local_subnet: local6,
            bind: Some(SocketAddrV6::new(OURS6, PORT, 0, 0)),
        });
        let dp = TunDataplane::start(options).await?;

        // Quiet: no link-local address, no MLD; the /128 and the network's route are there.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let index = link_index(&handle, DEVICE).await?.unwrap();
        let addresses = crate::host_ipv6::global_ipv6_addresses(&handle, index).await?;
        assert_eq!(addresses, vec![net6("fc00:0:0:1::/128")]);
        assert_eq!(proc_conf("addr_gen_mode"), "1");
        assert_eq!(proc_conf("forwarding"), "0");
        assert_eq!(dp.counters()[Counter::DropNoRoute.index()], 0);

        // A peer over IPv6 (both families' subnets) and one over IPv4 (its IPv6 subnet).
        dp.upsert_peer6(net6("fc00:0:0:2::/64"), IpAddr::V6(PEER6))?;
        dp.upsert_peer("10.5.2.0/24".parse()?, IpAddr::V6(PEER6))?;
        dp.upsert_peer6(net6("fc00:0:0:3::/64"), IpAddr::V4(PEER4))?;
        let peer6 = UdpSocket::bind(SocketAddrV6::new(PEER6, PORT, 0, 0)).await?;
        let peer4 = UdpSocket::bind(SocketAddrV4::new(PEER4, PORT)).await?;
        let to_us6 = SocketAddr::from((OURS6, PORT));
        let to_us4 = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT));
        let device_address = local6.network();
        let mut buf = vec![0u8; 2048];

        for (peer, to_us, src) in [
            (&peer6, to_us6, ip6("fc00:0:0:2::5")),
            (&peer4, to_us4, ip6("fc00:0:0:3::5")),
        ] {
            let request = echo6(src, device_address, 128, b"ping over the overlay");
            peer.send_to(&request, to_us).await?;
            let (n, from) = recv_within(peer, &mut buf).await?;
            assert_eq!(from, to_us, "the reply comes from our bound socket");
            let reply = &buf[..n];
            let view = parse_ipv6(reply).unwrap();
            assert_eq!((view.src, view.dst), (device_address, src));
            // The kernel's echo reply, unchanged by the plane (the kernel chose its flow
            // label and hop limit).
            let mut expected = echo6(device_address, src, 129, b"ping over the overlay");
            expected[1] |= reply[1] & 0x0f;
            expected[2..4].copy_from_slice(&reply[2..4]);
            expected[7] = reply[7];
            assert_eq!(reply, &expected[..]);
        }

        // Spoofed: the IPv6 peer sends a source of the IPv4-reached peer's subnet.
        let spoofed = echo6(ip6("fc00:0:0:3::9"), device_address, 128, b"x");
        peer6.send_to(&spoofed, to_us6).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while dp.counters()[Counter::DropSpoofedSource.index()] == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                dp.counters()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(dp.counters()[Counter::DropSpoofedSource.index()], 1);

        // IPv4 inner over the IPv6 outer: an echo to the device's IPv4 address.
        let request = echo4([10, 5, 2, 5], [10, 5, 1, 0]);
        peer6.send_to(&request, to_us6).await?;
        let (n, _) = recv_within(&peer6, &mut buf).await?;
        let reply = crate::packet::parse_ipv4(&buf[..n]).unwrap();
        assert_eq!(
            (reply.src, reply.dst),
            (Ipv4Addr::new(10, 5, 1, 0), Ipv4Addr::new(10, 5, 2, 5))
        );

        dp.remove_peer6(net6("fc00:0:0:2::/64"))?;
        dp.shutdown()?;
        Ok(())
    });
}

#[test]
fn an_ipv6_underlay_peer_needs_our_ipv6_socket() {
    in_private_netns(|| async {
        let mut options = TunOptions::new("10.5.1.0/24".parse()?, "10.5.0.0/16".parse()?, 1500);
        options.device_name = DEVICE.to_owned();
        options.bind = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
        options.ipv6 = Some(TunIpv6 {
            network: net6("fc00::/48"),
            local_subnet: net6("fc00:0:0:1::/64"),
            bind: None,
        });
        let dp = TunDataplane::start(options).await?;
        let error = dp
            .upsert_peer6(net6("fc00:0:0:2::/64"), IpAddr::V6(PEER6))
            .unwrap_err();
        assert!(error.to_string().contains("no PublicIPv6"), "{error}");
        dp.upsert_peer6(net6("fc00:0:0:2::/64"), IpAddr::V4(PEER4))?;
        // The IPv6 subnet moves: the device address follows.
        dp.set_local_subnet6(net6("fc00:0:0:9::/64"))?;
        let handle = netlink_connect()?;
        let index = link_index(&handle, DEVICE).await?.unwrap();
        let addresses = crate::host_ipv6::global_ipv6_addresses(&handle, index).await?;
        assert_eq!(addresses, vec![net6("fc00:0:0:9::/128")]);
        assert!(dp.set_local_subnet6(net6("fd99::/64")).is_err());
        dp.shutdown()?;
        Ok(())
    });
}
