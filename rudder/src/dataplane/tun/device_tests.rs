//! Tests of the real device and socket. They need root (CAP_NET_ADMIN) and fail, never
//! skip, without it.
//!
//! Isolation: each test runs in a dedicated thread that `unshare`s a network namespace of
//! its own. Nothing in the root namespace is touched, names cannot collide between
//! parallel runs, and the namespace is removed by the kernel when the thread ends,
//! whether the test passed, failed or panicked — no cleanup step that could be skipped.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;
use nix::sched::CloneFlags;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use rudder_ebpf::Counter;
use tokio::net::UdpSocket;

use super::device::netlink_connect;
use super::*;
use crate::dataplane::Dataplane;
use crate::packet::{internet_checksum, parse_ipv4};

const DEVICE: &str = "rudder-t0";
const LOCAL_SUBNET: &str = "10.5.1.0/24";
const NETWORK: &str = "10.5.0.0/16";
const PEER_SUBNET: &str = "10.5.2.0/24";
/// Underlay addresses, all on the namespace's loopback.
const OURS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const PORT: u16 = 8285;
const WAIT: Duration = Duration::from_secs(5);

fn require_root() {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user id.
    let euid = std::fs::metadata("/proc/self").map(|m| m.uid());
    assert!(
        matches!(euid, Ok(0)),
        "this test creates a TUN device in a private network namespace and needs root \
         (CAP_NET_ADMIN); run the tests as root, e.g. `sudo -E cargo test -p rudder`"
    );
}

/// Runs `test` on a fresh thread inside a new, private network namespace, on a
/// single-threaded tokio runtime of that thread. Panics propagate to the caller.
pub(crate) fn in_private_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    require_root();
    let outcome = std::thread::spawn(move || -> anyhow::Result<()> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET) failed: cannot make a private network namespace")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the test runtime failed")?;
        runtime.block_on(async move {
            let handle = netlink_connect()?;
            // A new namespace's loopback is down; the underlay addresses live on it.
            handle
                .link()
                .set(LinkUnspec::new_with_index(1).up().build())
                .execute()
                .await
                .context("bringing lo up in the test namespace failed")?;
            test().await
        })
    })
    .join();
    match outcome {
        Ok(result) => result.expect("device test failed"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn options() -> TunOptions {
    let mut options = TunOptions::new(net(LOCAL_SUBNET), net(NETWORK), 1500);
    options.device_name = DEVICE.to_owned();
    options.bind = SocketAddrV4::new(OURS, PORT);
    options
}

/// IPv4/UDP packet with a valid header checksum and no UDP checksum (0 is allowed).
pub(crate) fn udp_packet(
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let total = (28 + payload.len()) as u16;
    let mut p = vec![0x45, 0, 0, 0, 0x43, 0x21, 0x40, 0, ttl, 17, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&ports.0.to_be_bytes());
    p.extend_from_slice(&ports.1.to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let checksum = internet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p
}

/// UDP checksum over the pseudo-header, computed from scratch: 0 when correct.
fn udp_checksum_residue(packet: &[u8]) -> u16 {
    let udp = &packet[20..];
    let mut data = Vec::new();
    data.extend_from_slice(&packet[12..20]);
    data.extend_from_slice(&[0, 17]);
    data.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    data.extend_from_slice(udp);
    internet_checksum(&data)
}

async fn recv_within(socket: &UdpSocket, buf: &mut [u8]) -> anyhow::Result<(usize, SocketAddr)> {
    tokio::time::timeout(WAIT, socket.recv_from(buf))
        .await
        .context("nothing arrived within 5 s")?
        .context("receive failed")
}

/// Polls until counter `which` reaches `expected` (packets cross tasks asynchronously).
async fn wait_for_counter(dp: &TunDataplane, which: Counter, expected: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = dp.counters()[which.index()];
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counter {} is {now}, expected {expected}; all: {:?}",
            which.name(),
            dp.counters()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The host layout of flannel/docker: a container bridge holding our gateway address
/// (10.5.1.1/24). It matters for the ICMP errors written into the device, whose source
/// must not be a local address.
async fn add_container_bridge(handle: &Handle) -> anyhow::Result<()> {
    const BRIDGE: &str = "rudder-tbr";
    handle
        .link()
        .add(LinkBridge::new(BRIDGE).up().build())
        .execute()
        .await
        .context("creating the container bridge failed")?;
    let index = link_index(handle, BRIDGE)
        .await?
        .context("the bridge just created is missing")?;
    handle
        .address()
        .add(index, Ipv4Addr::new(10, 5, 1, 1).into(), 24)
        .execute()
        .await
        .context("adding the gateway address to the bridge failed")?;
    Ok(())
}

/// A UDP socket that hears about ICMP errors for its traffic: Linux reports soft errors
/// (net unreachable, time exceeded) only to sockets with IP_RECVERR.
async fn error_reporting_socket() -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvErr, &true)?;
    Ok(socket)
}

async fn expect_socket_error(socket: &UdpSocket, errno: nix::errno::Errno) -> anyhow::Result<()> {
    let mut buf = [0u8; 64];
    let error = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .context("no ICMP error reached the application within 5 s")?
        .expect_err("a connected UDP socket reports the ICMP error");
    assert_eq!(error.raw_os_error(), Some(errno as i32), "{error}");
    Ok(())
}

#[test]
fn device_forwards_both_ways_and_counts_drops() {
    in_private_netns(|| async {
        // A leftover link of our name (here a bridge) must be replaced, not fail the start.
        let handle = netlink_connect()?;
        handle
            .link()
            .add(LinkBridge::new(DEVICE).build())
            .execute()
            .await
            .context("creating the stale bridge link failed")?;
        add_container_bridge(&handle).await?;

        let dp = TunDataplane::start(options()).await?;
        dp.upsert_peer(net(PEER_SUBNET), PEER.into())?;
        let peer = UdpSocket::bind((PEER, PORT)).await?;
        let stranger = UdpSocket::bind((STRANGER, PORT)).await?;
        let mut buf = vec![0u8; 2048];

        // Overlay → underlay: an application's datagram to a peer's container arrives at
        // the peer as IP-in-UDP, unchanged (sent here, so no router hop yet), checksums
        // intact.
        let app = UdpSocket::bind("0.0.0.0:0").await?;
        app.send_to(b"hello overlay", "10.5.2.7:9999").await?;
        let (n, from) = recv_within(&peer, &mut buf).await?;
        assert_eq!(from, SocketAddr::from((OURS, PORT)));
        let inner = &buf[..n];
        let view = parse_ipv4(inner).expect("the datagram carries a valid IPv4 packet");
        assert_eq!(view.total_len, n, "no extra header, nothing trailing");
        assert_eq!(
            view.src,
            Ipv4Addr::new(10, 5, 1, 0),
            "source is the device address"
        );
        assert_eq!(view.dst, Ipv4Addr::new(10, 5, 2, 7));
        assert_eq!((view.ttl, view.protocol), (64, 17));
        assert_eq!(&inner[22..24], &9999u16.to_be_bytes());
        assert_eq!(&inner[28..], b"hello overlay");
        assert_eq!(udp_checksum_residue(inner), 0);
        wait_for_counter(&dp, Counter::Encapsulated, 1).await;

        // Underlay → overlay: a peer's datagram is delivered to a socket in our subnet.
        let local = UdpSocket::bind("10.5.1.0:7777").await?;
        let packet = udp_packet([10, 5, 2, 9], [10, 5, 1, 0], 64, (5555, 7777), b"from peer");
        peer.send_to(&packet, (OURS, PORT)).await?;
        let (n, from) = recv_within(&local, &mut buf).await?;
        assert_eq!(&buf[..n], b"from peer");
        assert_eq!(from, "10.5.2.9:5555".parse::<SocketAddr>()?);
        wait_for_counter(&dp, Counter::Decapsulated, 1).await;
        // Bytes are the inner packets'; the peer's entry saw both directions.
        let bytes = dp.byte_counters();
        let outbound_len = 28 + b"hello overlay".len() as u64;
        assert_eq!(bytes[Counter::Encapsulated.index()], outbound_len);
        assert_eq!(bytes[Counter::Decapsulated.index()], packet.len() as u64);
        let stats = dp.peer_stats();
        assert_eq!(stats.len(), 1);
        assert_eq!(
            (stats[0].subnet, stats[0].public_ip),
            (net(PEER_SUBNET).into(), PEER.into())
        );
        assert_eq!(
            stats[0].traffic,
            crate::dataplane::PeerTraffic {
                tx_packets: 1,
                tx_bytes: outbound_len,
                rx_packets: 1,
                rx_bytes: packet.len() as u64,
            }
        );
        // The same place again keeps the counters; a new place starts them over.
        dp.upsert_peer(net(PEER_SUBNET), PEER.into())?;
        assert_eq!(dp.peer_stats()[0].traffic.tx_packets, 1);
        dp.upsert_peer(net(PEER_SUBNET), STRANGER.into())?;
        assert_eq!(dp.peer_stats()[0].traffic.tx_packets, 0);
        dp.upsert_peer(net(PEER_SUBNET), PEER.into())?;

        // Bad datagrams: each counted under its reason, none delivered.
        let good = |src: [u8; 4], dst: [u8; 4]| udp_packet(src, dst, 64, (1, 7777), b"x");
        peer.send_to(b"garbage", (OURS, PORT)).await?;
        peer.send_to(&good([10, 5, 3, 9], [10, 5, 1, 0]), (OURS, PORT))
            .await?;
        peer.send_to(&good([10, 5, 2, 9], [10, 5, 9, 1]), (OURS, PORT))
            .await?;
        stranger
            .send_to(&good([10, 5, 2, 9], [10, 5, 1, 0]), (OURS, PORT))
            .await?;
        let mut bad_checksum = good([10, 5, 2, 9], [10, 5, 1, 0]);
        bad_checksum[10] ^= 0xff;
        peer.send_to(&bad_checksum, (OURS, PORT)).await?;
        let truncated = good([10, 5, 2, 9], [10, 5, 1, 0]);
        peer.send_to(&truncated[..25], (OURS, PORT)).await?;
        for (counter, expected) in [
            (Counter::DropNotIpv4, 1),
            (Counter::DropSpoofedSource, 1),
            (Counter::DropNotOurSubnet, 1),
            (Counter::DropUnknownSender, 1),
            (Counter::DropMalformed, 1),
            (Counter::DropTruncated, 1),
        ] {
            wait_for_counter(&dp, counter, expected).await;
        }
        assert_eq!(dp.counters()[Counter::Decapsulated.index()], 1);

        // TTL 1 from the underlay for a container behind the bridge: written into the
        // device as it came, the kernel's forwarding cannot pass it on and sends "time
        // exceeded" back into the device, which goes to the peer's overlay port.
        crate::host::enable_ip_forwarding()?;
        let expiring = udp_packet([10, 5, 2, 9], [10, 5, 1, 5], 1, (5555, 7777), b"x");
        peer.send_to(&expiring, (OURS, PORT)).await?;
        let (n, from) = recv_within(&peer, &mut buf).await?;
        assert_eq!(from, SocketAddr::from((OURS, PORT)));
        let error = parse_ipv4(&buf[..n]).expect("an ICMP error packet");
        assert!(
            net("10.5.1.0/24").contains(&error.src) && error.dst == Ipv4Addr::new(10, 5, 2, 9),
            "{error:?}"
        );
        assert_eq!((buf[20], buf[21]), (11, 0));
        assert_eq!(
            &buf[28..28 + 28],
            &expiring[..28],
            "the packet quoted as received"
        );
        wait_for_counter(&dp, Counter::Decapsulated, 2).await;
        wait_for_counter(&dp, Counter::Encapsulated, 2).await;

        // An overlay destination no lease holds: the application hears "network
        // unreachable" from the ICMP error we wrote back into the device.
        let app = error_reporting_socket().await?;
        app.connect("10.5.77.1:9999").await?;
        app.send(b"anyone?").await?;
        expect_socket_error(&app, nix::errno::Errno::ENETUNREACH).await?;
        wait_for_counter(&dp, Counter::DropNoRoute, 1).await;

        // TTL 1 sent from here: goes to the peer as it is; the receiving host makes the
        // router hop (and answers), as over a plain routed link.
        let app = UdpSocket::bind("0.0.0.0:0").await?;
        nix::sys::socket::setsockopt(&app, nix::sys::socket::sockopt::Ipv4Ttl, &1)?;
        app.send_to(b"short-lived", "10.5.2.7:9999").await?;
        let (n, _) = recv_within(&peer, &mut buf).await?;
        assert_eq!(parse_ipv4(&buf[..n]).map(|v| v.ttl), Ok(1));
        assert_eq!(&buf[28..n], b"short-lived");
        wait_for_counter(&dp, Counter::Encapsulated, 3).await;
        assert_eq!(dp.counters()[Counter::DropTtlExceeded.index()], 0);

        // A removed peer is a stranger.
        dp.remove_peer(net(PEER_SUBNET))?;
        peer.send_to(&good([10, 5, 2, 9], [10, 5, 1, 0]), (OURS, PORT))
            .await?;
        wait_for_counter(&dp, Counter::DropUnknownSender, 2).await;

        // Shutdown removes the device, and with it its address and route.
        dp.shutdown()?;
        assert_eq!(link_index(&handle, DEVICE).await?, None);
        dp.shutdown().context("a second shutdown is a no-op")?;
        Ok(())
    });
}

#[test]
fn local_subnet_change_moves_the_device_address() {
    in_private_netns(|| async {
        let dp = TunDataplane::start(options()).await?;
        dp.upsert_peer(net(PEER_SUBNET), PEER.into())?;
        dp.set_local_subnet(net("10.5.3.0/24"))?;
        // The new address is local now (binding succeeds), the old one is gone.
        let local = UdpSocket::bind("10.5.3.0:7777").await?;
        assert!(UdpSocket::bind("10.5.1.0:7777").await.is_err());

        let peer = UdpSocket::bind((PEER, PORT)).await?;
        let packet = udp_packet([10, 5, 2, 9], [10, 5, 3, 0], 64, (5555, 7777), b"moved");
        peer.send_to(&packet, (OURS, PORT)).await?;
        let mut buf = [0u8; 64];
        let (n, _) = recv_within(&local, &mut buf).await?;
        assert_eq!(&buf[..n], b"moved");
        // The old subnet is no longer ours.
        let stale = udp_packet([10, 5, 2, 9], [10, 5, 1, 0], 64, (5555, 7777), b"old");
        peer.send_to(&stale, (OURS, PORT)).await?;
        wait_for_counter(&dp, Counter::DropNotOurSubnet, 1).await;
        assert!(dp.set_local_subnet(net("10.9.0.0/24")).is_err());
        dp.shutdown()
    });
}

#[test]
fn busy_port_fails_the_start_without_a_device() {
    in_private_netns(|| async {
        let _squatter = UdpSocket::bind((OURS, PORT)).await?;
        let error = match TunDataplane::start(options()).await {
            Ok(_) => anyhow::bail!("start succeeded although the UDP port is taken"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains("binding the overlay UDP socket"), "{error}");
        let handle = netlink_connect()?;
        assert_eq!(link_index(&handle, DEVICE).await?, None);
        Ok(())
    });
}
