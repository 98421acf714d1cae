//! The socket path's ICMP errors, on real sockets in a private network namespace (root
//! needed, as for the TUN device tests): they go to the peer's overlay port, whatever port
//! the offending datagram came from, and a flood of them is rate-limited.
//!
//! Everything is on the namespace's loopback, where the socket path's own socket holds the
//! overlay port: an error sent to the peer's overlay port arrives back there (from 127.0.0.1,
//! which holds no lease: dropped as from an unknown sender), which is how these tests see
//! where the errors went.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::*;
use crate::dataplane::tun::device_tests::{in_private_netns, udp_packet};
use rudder_ebpf::Counter;

const OURS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const PORT: u16 = 8285;
/// Where an eBPF peer's datagrams come from: 49152 + flow hash.
const FLOW_HASH_PORT: u16 = 51234;

async fn start() -> anyhow::Result<Arc<SocketPath>> {
    let peers = [("10.5.2.0/24".parse()?, PEER)].into();
    let config = SocketPathConfig {
        local: std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
        local_subnet: "10.5.1.0/24".parse()?,
        network: "10.5.0.0/16".parse()?,
        ipv6: None,
        underlay_index: 1,
    };
    SocketPath::start(config, &peers).await
}

pub(super) async fn wait_for(path: &SocketPath, counter: Counter, expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = path.packets()[counter.index()];
        if now >= expected || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An eBPF peer's datagram comes from a flow-hash port: the time exceeded for it must go to
/// the peer's overlay port, where the peer listens.
#[test]
fn time_exceeded_goes_to_the_peers_overlay_port() {
    in_private_netns(|| async {
        let path = start().await?;
        let peer = UdpSocket::bind((PEER, FLOW_HASH_PORT)).await?;
        let expiring = udp_packet([10, 5, 2, 9], [10, 5, 1, 7], 1, (5555, 7777), b"x");
        peer.send_to(&expiring, (OURS, PORT)).await?;
        assert_eq!(wait_for(&path, Counter::DropTtlExceeded, 1).await, 1);
        // The error reached the overlay port, sent from 127.0.0.1 (no lease there).
        assert_eq!(
            wait_for(&path, Counter::DropUnknownSender, 1).await,
            1,
            "the ICMP error did not arrive at the peer's overlay port"
        );
        let mut buf = [0u8; 256];
        assert!(
            peer.try_recv_from(&mut buf).is_err(),
            "the ICMP error went to the datagram's source port"
        );
        path.stop();
        Ok(())
    });
}

#[test]
fn a_flood_of_expiring_packets_gets_a_bounded_number_of_errors() {
    in_private_netns(|| async {
        let path = start().await?;
        let peer = UdpSocket::bind((PEER, FLOW_HASH_PORT)).await?;
        let expiring = udp_packet([10, 5, 2, 9], [10, 5, 1, 7], 1, (5555, 7777), b"x");
        const FLOOD: u64 = 2000;
        let start = Instant::now();
        for _ in 0..FLOOD {
            peer.send_to(&expiring, (OURS, PORT)).await?;
        }
        let elapsed = start.elapsed();
        let expired = wait_for(&path, Counter::DropTtlExceeded, FLOOD).await;
        let limited = path.packets()[Counter::IcmpRateLimited.index()];
        // Settle: the errors sent arrive back at the overlay port.
        let sent = wait_for(&path, Counter::DropUnknownSender, FLOOD - limited).await;
        eprintln!(
            "{expired} expiring datagrams in {:.1} ms: {sent} errors sent, {limited} suppressed",
            elapsed.as_secs_f64() * 1e3
        );
        assert_eq!(expired, FLOOD, "every datagram reached the rules");
        assert!(limited > 0, "no error suppressed");
        assert_eq!(
            sent + limited,
            FLOOD,
            "each expiring datagram: an error or a count"
        );
        path.stop();
        Ok(())
    });
}
