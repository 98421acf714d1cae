//! Traffic helpers: ping, TCP transfer with content check, raw UDP datagrams.

use crate::netns;
use crate::util::{output, wait_until};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// Somewhere traffic can start or end: a namespace and an address in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// One ICMP echo from `from` to `to` (2 s timeout). Ok if a reply came back.
pub fn ping(from: &Endpoint, to: Ipv4Addr) -> Result<()> {
    ping_once(&from.ns, &from.ip.to_string(), IpAddr::V4(to))
}

/// One ICMP or ICMPv6 echo from namespace `ns` (`label` names the sender in errors) to `to`.
pub(crate) fn ping_once(ns: &str, label: &str, to: IpAddr) -> Result<()> {
    let family = if to.is_ipv6() { "-6" } else { "-4" };
    let out = output(netns::exec(ns, "ping").args([
        family,
        "-n",
        "-q",
        "-c",
        "1",
        "-W",
        "2",
        &to.to_string(),
    ]))?;
    if !out.status.success() {
        bail!(
            "ping {label} -> {to} failed: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Median and 99th percentile of `count` echoes 10 ms apart from namespace `ns` to `to`.
pub fn rtt_percentiles(ns: &str, to: IpAddr, count: u32) -> Result<(f64, f64)> {
    let family = if to.is_ipv6() { "-6" } else { "-4" };
    let out = crate::util::run(netns::exec(ns, "ping").args([
        family,
        "-c",
        &count.to_string(),
        "-i",
        "0.01",
        "-n",
        &to.to_string(),
    ]))?;
    let v: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if v.is_empty() {
        bail!("no ping replies from {to}");
    }
    Ok((
        crate::util::percentile(&v, 50),
        crate::util::percentile(&v, 99),
    ))
}

/// Pings until one succeeds or `timeout` passes.
pub fn wait_ping(from: &Endpoint, to: Ipv4Addr, timeout: Duration) -> Result<()> {
    wait_until(&format!("ping {} -> {to}", from.ip), timeout, || {
        ping(from, to).map(|_| true)
    })
}

/// Sends `count` echo requests, one every `interval`, and returns (transmitted, received).
pub fn ping_series(
    from: &Endpoint,
    to: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<(u32, u32)> {
    ping_series_with(from, to, count, interval, &[])
}

/// [`ping_series`] with extra `ping` arguments (e.g. `-Q <tos>`).
pub fn ping_series_with(
    from: &Endpoint,
    to: Ipv4Addr,
    count: u32,
    interval: Duration,
    extra: &[&str],
) -> Result<(u32, u32)> {
    let out = output(
        netns::exec(&from.ns, "ping")
            .args([
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                &format!("{:.3}", interval.as_secs_f64()),
                "-W",
                "1",
            ])
            .args(extra)
            .arg(to.to_string()),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .ok_or_else(|| anyhow!("no ping summary in {text:?}"))?;
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    match nums.as_slice() {
        [tx, rx, ..] => Ok((*tx, *rx)),
        _ => bail!("cannot parse ping summary {line:?}"),
    }
}

/// Deterministic pseudo-random content (xorshift), so corruption or reordering is visible.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Result of a [`tcp_transfer`].
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: usize,
    pub elapsed: Duration,
}

impl Transfer {
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Sends `bytes` bytes over TCP from `from` to a listener on `to` (port 5201+random) and checks
/// that exactly the same bytes arrived. Each side runs on a thread inside its namespace.
pub fn tcp_transfer(from: &Endpoint, to: &Endpoint, bytes: usize) -> Result<Transfer> {
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

/// Like [`tcp_transfer`], but the listener is on `port` (any address) in `to`'s namespace and
/// the sender connects to `dst` (e.g. a published port on a host's address, DNATed to `to`).
pub fn tcp_transfer_via(
    from: &Endpoint,
    to: &Endpoint,
    port: u16,
    dst: SocketAddrV4,
    bytes: usize,
) -> Result<Transfer> {
    transfer(
        &from.ns,
        &from.ip.to_string(),
        &to.ns,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        |_| SocketAddr::V4(dst),
        bytes,
    )
}

/// The TCP transfer of [`tcp_transfer`] for any address family: the listener binds `bind`
/// in `to_ns`, the sender in `from_ns` (called `from` in errors) connects to `dst(port)`.
pub(crate) fn transfer(
    from_ns: &str,
    from: &str,
    to_ns: &str,
    bind: SocketAddr,
    dst: impl Fn(u16) -> SocketAddr,
    bytes: usize,
) -> Result<Transfer> {
    let seed: u64 = rand::random();
    let data = std::sync::Arc::new(pattern(bytes, seed));
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let receiver = netns::spawn_in(to_ns, move || {
        let l = TcpListener::bind(bind).context("bind listener")?;
        tx.send(l.local_addr()?.port()).ok();
        l.set_nonblocking(true)?;
        let start = Instant::now();
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > Duration::from_secs(15) {
                        bail!("no connection within 15 s");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut got = Vec::with_capacity(bytes);
        s.read_to_end(&mut got).context("receiving")?;
        Ok(got)
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("listener in {to_ns} did not start"))?;
    let dst = dst(port);
    let send_data = data.clone();
    let start = Instant::now();
    let sender = netns::spawn_in(from_ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
            .with_context(|| format!("connect to {dst}"))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&send_data).context("sending")?;
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let sent = sender.join().map_err(|_| anyhow!("sender panicked"))?;
    let got = receiver
        .join()
        .map_err(|_| anyhow!("receiver panicked"))?
        .with_context(|| format!("receiving on {dst}"))?;
    sent.with_context(|| format!("tcp {} -> {dst}", from))?;
    let elapsed = start.elapsed();
    if got.len() != data.len() {
        bail!(
            "tcp {} -> {dst}: sent {} bytes, received {}",
            from,
            data.len(),
            got.len()
        );
    }
    if let Some(pos) = got.iter().zip(data.iter()).position(|(a, b)| a != b) {
        bail!("tcp {} -> {dst}: content differs at byte {pos}", from);
    }
    Ok(Transfer { bytes, elapsed })
}

/// Connects from `from` to `dst` (e.g. a service address DNATed to `to`), sends `bytes` bytes
/// to a listener on `port` (any address) in `to`'s namespace, which sends them back; checks
/// the content that arrived at each end.
pub fn tcp_echo_via(
    from: &Endpoint,
    to: &Endpoint,
    port: u16,
    dst: SocketAddrV4,
    bytes: usize,
) -> Result<()> {
    tcp_echo_between(&from.ns, &to.ns, port, SocketAddr::V4(dst), bytes)
}

/// [`tcp_echo_via`] between namespaces, either family (the listener takes `dst`'s).
pub fn tcp_echo_between(
    from_ns: &str,
    to_ns: &str,
    port: u16,
    dst: SocketAddr,
    bytes: usize,
) -> Result<()> {
    let data = std::sync::Arc::new(pattern(bytes, rand::random()));
    let expected = data.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let any: IpAddr = if dst.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let server = netns::spawn_in(to_ns, move || {
        let l = TcpListener::bind((any, port)).context("bind listener")?;
        tx.send(()).ok();
        let mut s = accept_within(&l, Duration::from_secs(15))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut got = Vec::with_capacity(bytes);
        s.read_to_end(&mut got).context("server receiving")?;
        if got != *expected {
            bail!(
                "server received {} bytes, not the {} sent (or other content)",
                got.len(),
                expected.len()
            );
        }
        s.write_all(&got).context("server echoing")?;
        Ok(())
    });
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("listener in {to_ns} did not start"))?;
    let sent = data.clone();
    let client = netns::spawn_in(from_ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
            .with_context(|| format!("connect to {dst}"))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&sent).context("client sending")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut echo = Vec::with_capacity(sent.len());
        s.read_to_end(&mut echo)
            .context("client receiving the echo")?;
        if echo != *sent {
            bail!(
                "echo from {dst}: {} bytes back of {} sent (or other content)",
                echo.len(),
                sent.len()
            );
        }
        Ok(())
    });
    let client = client.join().map_err(|_| anyhow!("client panicked"))?;
    client.with_context(|| format!("tcp echo {from_ns} -> {dst}"))?;
    server
        .join()
        .map_err(|_| anyhow!("server panicked"))?
        .with_context(|| format!("tcp echo server in {to_ns}"))
}

/// One datagram from `client_ns` to `service` (DNATed to `backend_port` in `backend_ns`),
/// echoed by the backend: the answer must come back from the service address (un-NATed),
/// with the same bytes. Either family.
pub fn udp_echo_via(
    client_ns: &str,
    backend_ns: &str,
    backend_port: u16,
    service: SocketAddr,
) -> Result<()> {
    let any: IpAddr = if service.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let echo = netns::spawn_in(backend_ns, move || {
        let s = UdpSocket::bind((any, backend_port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        s.send_to(&buf[..n], from)?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let answer = netns::run_in(client_ns, move || {
        let s = UdpSocket::bind((any, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.send_to(b"service request", service)?;
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((buf[..n].to_vec(), from))
    })
    .with_context(|| format!("UDP answer through the service address {service}"))?;
    echo.join().map_err(|_| anyhow!("echo panicked"))??;
    if answer != (b"service request".to_vec(), service) {
        bail!("UDP answer {answer:?}, expected the request back from {service}");
    }
    Ok(())
}

/// The first connection on `l` within `limit`.
fn accept_within(l: &TcpListener, limit: Duration) -> Result<TcpStream> {
    l.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > limit {
                    bail!("no connection within {limit:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one UDP datagram with `payload` from `from` (an address of namespace `ns`) to `to`.
pub fn send_udp_from(ns: &str, from: Ipv4Addr, to: SocketAddrV4, payload: &[u8]) -> Result<()> {
    let payload = payload.to_vec();
    netns::run_in(ns, move || {
        let s = UdpSocket::bind((from, 0))?;
        s.send_to(&payload, to)?;
        Ok(())
    })
}

/// Sends one UDP datagram with `payload` from namespace `ns` (any source port) to `to`.
pub fn send_udp(ns: &str, to: SocketAddrV4, payload: &[u8]) -> Result<()> {
    let payload = payload.to_vec();
    netns::run_in(ns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.send_to(&payload, to)?;
        Ok(())
    })
}

/// A UDP socket bound inside a namespace, to check what arrives.
pub struct UdpProbe {
    sock: UdpSocket,
}

impl UdpProbe {
    /// Binds `addr` inside namespace `ns`.
    pub fn bind(ns: &str, addr: SocketAddrV4) -> Result<Self> {
        let sock = netns::run_in(ns, move || Ok(UdpSocket::bind(addr)?))?;
        Ok(Self { sock })
    }

    /// Every datagram that arrives within `window` (payload, sender).
    pub fn collect(&self, window: Duration) -> Result<Vec<(Vec<u8>, SocketAddr)>> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(out);
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => out.push((buf[..n].to_vec(), from)),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(out)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Runs an iperf3 server in `to` (one test, on `port`) and a client in `from` for `secs`
/// seconds with `extra` client arguments; returns iperf3's JSON report.
pub fn iperf3(
    from: &Endpoint,
    to: &Endpoint,
    port: u16,
    secs: u32,
    extra: &[&str],
) -> Result<serde_json::Value> {
    iperf3_between(&from.ns, &to.ns, to.ip.into(), port, secs, extra)
}

/// [`iperf3`] between namespaces, to an address of either family in `to_ns`.
pub fn iperf3_between(
    from_ns: &str,
    to_ns: &str,
    to_ip: std::net::IpAddr,
    port: u16,
    secs: u32,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let mut server = netns::exec(to_ns, "iperf3")
        .args([
            "-s",
            "-1",
            "-B",
            &to_ip.to_string(),
            "-p",
            &port.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 server")?;
    let listening = format!("sport = :{port}");
    let res = wait_until("iperf3 server", Duration::from_secs(10), || {
        let out = output(netns::exec(to_ns, "ss").args(["-ltnH", &listening]))?;
        Ok(!String::from_utf8_lossy(&out.stdout).trim().is_empty())
    })
    .and_then(|_| {
        let out = output(
            netns::exec(from_ns, "iperf3")
                .args([
                    "-c",
                    &to_ip.to_string(),
                    "-p",
                    &port.to_string(),
                    "-t",
                    &secs.to_string(),
                    "-J",
                ])
                .args(extra),
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
        if let Some(e) = v["error"].as_str() {
            bail!("iperf3: {e}");
        }
        Ok(v)
    });
    let _ = server.kill();
    let _ = server.wait();
    res
}
