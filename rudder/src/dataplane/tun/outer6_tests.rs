//! The outer IPv6 header the TUN plane sends, captured (AF_PACKET) in a private network
//! namespace (root, as `device_tests`): two inner flows get two flow labels, each packet
//! of a flow the same one, and the outer traffic class is the inner one.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use tokio::net::UdpSocket;

use super::device::netlink_connect;
use super::device_tests::in_private_netns;
use super::*;
use crate::dataplane::Dataplane;

const PORT: u16 = 8285;
const OURS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// (inner source port, inner traffic class) of the two flows.
const FLOWS: [(u16, u8); 2] = [(40001, 0xb8), (40002, 0x29)];
const PACKETS_PER_FLOW: usize = 20;

fn net6(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

/// A capture of every IPv6 packet in the namespace, from the network header on.
fn capture_ipv6() -> anyhow::Result<OwnedFd> {
    let protocol = libc::c_int::from((libc::ETH_P_IPV6 as u16).to_be());
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    anyhow::ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Per inner source port: the distinct (outer traffic class, flow label) pairs seen, and
/// how many datagrams there were.
type Seen = BTreeMap<u16, (Vec<(u8, u32)>, usize)>;

/// Adds the overlay datagrams to the peer captured so far to `seen`.
fn outer_headers(capture: &OwnedFd, seen: &mut Seen) {
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: a valid descriptor and buffer.
        let n = unsafe { libc::recv(capture.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return;
        }
        let p = &buf[..n as usize];
        let to_peer_port = p.len() >= 48 + 42
            && p[6] == 17
            && p[24..40] == PEER6.octets()
            && u16::from_be_bytes([p[42], p[43]]) == PORT;
        if !to_peer_port {
            continue;
        }
        let first = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
        let class = (first >> 20) as u8;
        let label = first & 0x000f_ffff;
        // The inner IPv6 packet starts after the outer UDP header; its UDP source port at 40.
        let inner_port = u16::from_be_bytes([p[48 + 40], p[48 + 41]]);
        let entry = seen.entry(inner_port).or_default();
        if !entry.0.contains(&(class, label)) {
            entry.0.push((class, label));
        }
        entry.1 += 1;
    }
}

#[test]
fn each_inner_flow_gets_its_flow_label_and_its_traffic_class() {
    in_private_netns(|| async {
        let handle = netlink_connect()?;
        for address in [OURS6, PEER6] {
            crate::host_ipv6::add_ipv6_address(&handle, 1, address, 128).await?;
        }
        let mut options = TunOptions::new("10.5.1.0/24".parse()?, "10.5.0.0/16".parse()?, 1500);
        options.device_name = "rudder-t7".to_owned();
        options.bind = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
        options.ipv6 = Some(TunIpv6 {
            network: net6("fc00::/48"),
            local_subnet: net6("fc00:0:0:1::/64"),
            bind: Some(SocketAddrV6::new(OURS6, PORT, 0, 0)),
        });
        let dp = TunDataplane::start(options).await?;
        dp.upsert_peer6(net6("fc00:0:0:2::/64"), IpAddr::V6(PEER6))?;
        let _peer = UdpSocket::bind(SocketAddrV6::new(PEER6, PORT, 0, 0)).await?;
        let capture = capture_ipv6()?;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let container: Ipv6Addr = "fc00:0:0:2::5".parse()?;
        let mut senders = Vec::new();
        for (port, class) in FLOWS {
            let socket = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))?;
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::Ipv6TClass,
                &i32::from(class),
            )?;
            senders.push(socket);
        }
        // Interleaved, so one batch of the device's reads holds both flows.
        for _ in 0..PACKETS_PER_FLOW {
            for socket in &senders {
                socket.send_to(&[7; 200], (container, 9000))?;
            }
        }
        let mut seen = Seen::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            outer_headers(&capture, &mut seen);
            let all = FLOWS
                .iter()
                .all(|(port, _)| seen.get(port).is_some_and(|e| e.1 >= PACKETS_PER_FLOW));
            if all || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("outer (traffic class, flow label) by inner source port: {seen:?}");
        let mut labels = Vec::new();
        for (port, class) in FLOWS {
            let (headers, count) = seen.get(&port).cloned().unwrap_or_default();
            assert!(
                count >= PACKETS_PER_FLOW,
                "flow {port}: {count} packets captured"
            );
            assert_eq!(
                headers.len(),
                1,
                "flow {port}: one outer header for all: {headers:?}"
            );
            let (outer_class, label) = headers[0];
            assert_eq!(outer_class, class, "flow {port}: the inner traffic class");
            assert_ne!(label, 0, "flow {port}: labelled");
            labels.push(label);
        }
        assert_ne!(labels[0], labels[1], "two flows, two labels");
        dp.shutdown()?;
        Ok(())
    });
}
