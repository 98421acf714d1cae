//! Traffic helpers for IPv6 (dual stack), beside [`crate::traffic`]'s IPv4 ones: ping -6,
//! TCP with a content check, and UDP with a content check both ways (for either family).

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns;
use crate::traffic::{pattern, transfer, Transfer};
use crate::util::wait_until;

/// An IPv6 traffic endpoint: a namespace and an address in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint6 {
    pub ns: String,
    pub ip: Ipv6Addr,
}

/// One ICMPv6 echo from namespace `from_ns` to `to` (2 s timeout). Ok if a reply came back.
pub fn ping6(from_ns: &str, to: Ipv6Addr) -> Result<()> {
    crate::traffic::ping_once(from_ns, from_ns, to.into())
}

/// Pings (IPv6) until one succeeds or `timeout` passes.
pub fn wait_ping6(from: &Endpoint6, to: Ipv6Addr, timeout: Duration) -> Result<()> {
    wait_until(&format!("ping -6 {} -> {to}", from.ip), timeout, || {
        ping6(&from.ns, to).map(|_| true)
    })
}

/// Sends `bytes` bytes over TCP/IPv6 from `from` to a listener on `to` and checks that
/// exactly the same bytes arrived.
pub fn tcp_transfer6(from: &Endpoint6, to: &Endpoint6, bytes: usize) -> Result<Transfer> {
    let to_ip = to.ip;
    transfer(
        &from.ns,
        &from.ip.to_string(),
        &to.ns,
        SocketAddr::from((to.ip, 0)),
        |port| SocketAddr::from((to_ip, port)),
        bytes,
    )
}

/// What [`udp_echo`] and [`udp_blast`] saw.
#[derive(Clone, Copy, Debug)]
pub struct UdpResult {
    pub sent: usize,
    /// Datagrams that arrived with the right content.
    pub received: usize,
    pub size: usize,
    pub elapsed: Duration,
}

impl UdpResult {
    pub fn mbit_per_s(&self) -> f64 {
        (self.received * self.size) as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// A datagram's content: its sequence number, then the pattern for that number.
fn datagram(seq: u32, size: usize) -> Vec<u8> {
    let mut d = seq.to_be_bytes().to_vec();
    d.extend(pattern(size.saturating_sub(4), u64::from(seq) + 1));
    d
}

fn check_datagram(got: &[u8], size: usize) -> Option<u32> {
    let seq = u32::from_be_bytes(got.get(..4)?.try_into().ok()?);
    (got == datagram(seq, size).as_slice()).then_some(seq)
}

/// An echo server on `addr` (port 0: any) in `ns` that checks each datagram's content and
/// sends the good ones back, until `idle` passes without one. Returns its port and thread.
fn echo_server(
    ns: &str,
    addr: IpAddr,
    size: usize,
    idle: Duration,
) -> Result<(u16, std::thread::JoinHandle<Result<usize>>)> {
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let server = netns::spawn_in(ns, move || {
        let sock = UdpSocket::bind((addr, 0)).context("bind echo server")?;
        tx.send(sock.local_addr()?.port()).ok();
        sock.set_read_timeout(Some(idle))?;
        let mut buf = vec![0u8; 65536];
        let mut good = 0;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if check_datagram(&buf[..n], size).is_some() {
                        good += 1;
                        sock.send_to(&buf[..n], from)?;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(good)
                }
                Err(e) => return Err(e.into()),
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("UDP echo server in {ns} did not start"))?;
    Ok((port, server))
}

/// Sends `count` datagrams of `size` bytes from `from_ns` to an echo server on `to` in
/// `to_ns`, one at a time (each resent up to 3 times without an answer): the server checks
/// every datagram's content, the sender every echo's. Fails unless all came back intact.
pub fn udp_echo(from_ns: &str, to_ns: &str, to: IpAddr, count: u32, size: usize) -> Result<()> {
    let (port, server) = echo_server(to_ns, to, size, Duration::from_secs(5))?;
    let dst = SocketAddr::new(to, port);
    let client = netns::spawn_in(from_ns, move || {
        let any: IpAddr = if dst.is_ipv6() {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        let sock = UdpSocket::bind((any, 0))?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = vec![0u8; 65536];
        for seq in 0..count {
            let d = datagram(seq, size);
            let mut echoed = false;
            for _attempt in 0..3 {
                sock.send_to(&d, dst)?;
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) if buf[..n] == d[..] => {
                        echoed = true;
                        break;
                    }
                    Ok((n, _)) => {
                        bail!("UDP echo from {dst}: datagram {seq} came back different ({n} bytes)")
                    }
                    Err(_) => continue,
                }
            }
            if !echoed {
                bail!("UDP {dst}: no echo of datagram {seq} ({size} bytes) after 3 tries");
            }
        }
        Ok(())
    });
    client
        .join()
        .map_err(|_| anyhow!("UDP client panicked"))?
        .with_context(|| format!("UDP echo {from_ns} -> {dst}"))?;
    let good = server
        .join()
        .map_err(|_| anyhow!("UDP echo server panicked"))??;
    if good < count as usize {
        bail!("UDP echo server {dst} saw {good} good datagrams of {count}");
    }
    Ok(())
}

/// Sends `count` datagrams of `size` bytes as fast as the socket takes them from `from_ns`
/// to a receiver on `to` in `to_ns`; counts what arrives with the right content (a figure
/// to print: UDP may drop under load).
pub fn udp_blast(
    from_ns: &str,
    to_ns: &str,
    to: IpAddr,
    count: u32,
    size: usize,
) -> Result<UdpResult> {
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let receiver = netns::spawn_in(to_ns, move || {
        let sock = UdpSocket::bind((to, 0))?;
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
        tx.send(sock.local_addr()?.port()).ok();
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = vec![0u8; 65536];
        let mut good = 0usize;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            if check_datagram(&buf[..n], size).is_some() {
                good += 1;
            }
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        }
        Ok((good, first.map(|f| last - f)))
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("UDP receiver in {to_ns} did not start"))?;
    let dst = SocketAddr::new(to, port);
    let start = Instant::now();
    let sender = netns::spawn_in(from_ns, move || {
        let any: IpAddr = if dst.is_ipv6() {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        let sock = UdpSocket::bind((any, 0))?;
        for seq in 0..count {
            let d = datagram(seq, size);
            // A full queue (ENOBUFS) is loss like any other: keep sending.
            let _ = sock.send_to(&d, dst);
        }
        Ok(())
    });
    sender
        .join()
        .map_err(|_| anyhow!("UDP sender panicked"))??;
    let sent_in = start.elapsed();
    let (received, span) = receiver
        .join()
        .map_err(|_| anyhow!("UDP receiver panicked"))??;
    Ok(UdpResult {
        sent: count as usize,
        received,
        size,
        elapsed: span.unwrap_or(sent_in).max(sent_in),
    })
}
