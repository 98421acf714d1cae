//! The health, status and metrics HTTP server (`--healthz-ip`/`--healthz-port`).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::status::State;

fn router(state: State) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves on `--healthz-ip:--healthz-port`.
pub async fn serve(addr: SocketAddr, state: State) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the health server to {addr} (--healthz-ip/--healthz-port)")
    })?;
    tracing::info!(%addr, "serving /healthz /readyz /status /metrics");
    let app = router(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("health server stopped: {e}");
        }
    });
    Ok(())
}

/// Serves the same endpoints on a Unix socket for `rudder status` (mode 0660).
pub async fn serve_unix(
    path: &Path,
    state: State,
) -> anyhow::Result<crate::status_socket::ClaimedSocket> {
    let (listener, claimed) = crate::status_socket::claim(path)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let app = router(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("status socket stopped: {e}");
        }
    });
    Ok(claimed)
}

/// `GET path` over the daemon's Unix socket; returns the body of a 200 answer.
pub async fn get_unix(socket: &Path, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to {}: is `rudder run` running (and is this its --status-socket)?",
                socket.display()
            )
        })?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: rudder\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("the daemon's answer has no HTTP header")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        anyhow::bail!("{path}: {status_line}: {}", body.trim());
    }
    Ok(body.to_string())
}

/// The human view of `/status`.
pub fn status_table(status: &serde_json::Value) -> String {
    let text = |k: &str| match &status[k] {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    out += &format!("ready:      {}\n", text("ready"));
    out += &format!("network:    {}\n", text("network"));
    out += &format!("subnet:     {}\n", text("subnet"));
    let nat = match status["local_ip"].as_str() {
        Some(local) if status["local_ip"] != status["public_ip"] => {
            format!(", sent from {local} through a 1:1 NAT")
        }
        _ => String::new(),
    };
    out += &format!(
        "public ip:  {} on {}{nat} (overlay MTU {})\n",
        text("public_ip"),
        text("iface"),
        text("mtu")
    );
    if !status["ipv6_network"].is_null() {
        out += &format!(
            "ipv6:       subnet {} of {}, public ipv6 {}\n",
            text("ipv6_subnet"),
            text("ipv6_network"),
            text("public_ipv6")
        );
    }
    out += &format!(
        "data plane: {} ({})\n",
        text("dataplane"),
        text("dataplane_reason")
    );
    if status["fast_path"].is_object() {
        let fast = &status["fast_path"];
        out += &format!(
            "fast path:  bridge {}, {} local containers ({} by IPv6)\n",
            fast["bridge"]
                .as_str()
                .unwrap_or("none (no bridge holds the gateway address)"),
            fast["local_endpoints"],
            fast["local_endpoints6"]
        );
    }
    if let Some(expires) = status["lease_expires_unix"].as_u64() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let left = std::time::Duration::from_secs(expires.saturating_sub(now));
        out += &format!(
            "lease:      expires in {}\n",
            humantime::format_duration(left)
        );
    }
    if status["config_error"].is_string() {
        out += &format!("config:     {}\n", text("config_error"));
    }
    out += "counters:  ";
    if let Some(counters) = status["counters"].as_object() {
        for (name, v) in counters.iter().filter(|(_, v)| v.as_u64() != Some(0)) {
            out += &format!(" {name}={v}");
        }
    }
    out += "\n";
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    // The IPv6 subnets the data plane carries, in the same table.
    let peers6: Vec<_> = status["ipv6_peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["tx_packets"].is_u64())
        .cloned()
        .collect();
    out += &format!(
        "peers ({}):\n  {:<18} {:<15} {:>10} {:>10} {:>10} {:>10}  {}\n",
        peers.len(),
        "SUBNET",
        "PUBLIC IP",
        "TX PKTS",
        "TX BYTES",
        "RX PKTS",
        "RX BYTES",
        "CHANGED"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let number = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    let rows = peers
        .iter()
        .map(|p| (p, &p["subnet"]))
        .chain(peers6.iter().map(|p| (p, &p["ipv6_subnet"])));
    for (p, subnet) in rows {
        let changed = p["changed_unix"].as_u64().map_or("-".to_string(), |at| {
            let ago = std::time::Duration::from_secs(now.saturating_sub(at));
            format!("{} ago", humantime::format_duration(ago))
        });
        out += &format!(
            "  {:<18} {:<15} {:>10} {:>10} {:>10} {:>10}  {}\n",
            subnet.as_str().unwrap_or("-"),
            p["public_ip"].as_str().unwrap_or("-"),
            number(&p["tx_packets"]),
            number(&p["tx_bytes"]),
            number(&p["rx_packets"]),
            number(&p["rx_bytes"]),
            changed
        );
    }
    out
}

async fn readyz(AxumState(state): AxumState<State>) -> impl IntoResponse {
    if state.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let why = state
            .snapshot()
            .config_error
            .unwrap_or_else(|| "no lease or no data plane yet".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    }
}

/// Everything `rudder status` shows, as JSON.
pub fn status_json(state: &State) -> serde_json::Value {
    let info = state.snapshot();
    let stats = state.dataplane().map(|dataplane| dataplane.peer_stats());
    let stats_of = |subnet: ipnet::IpNet| {
        stats
            .as_ref()
            .and_then(|all| all.iter().find(|p| p.subnet == subnet))
    };
    // Other hosts' IPv6 halves; a peer without one (a flannel udp host) gets nulls. With a
    // data plane, each also gets its traffic (where its datagrams go: `public_ip`).
    let ipv6_peers: Vec<_> = info
        .ipv6_peers
        .iter()
        .filter(|(subnet6, _)| Some(**subnet6) != info.ipv6_subnet)
        .map(|(subnet6, p)| {
            let mut entry = json!({
                "ipv6_subnet": subnet6.to_string(),
                "subnet": p.ipv4_subnet.map(|s| s.to_string()),
                "public_ipv6": p.public_ipv6.map(|ip| ip.to_string()),
            });
            if let Some(stats) = stats_of((*subnet6).into()) {
                add_traffic(&mut entry, stats);
            }
            entry
        })
        .collect();
    let ipv6_of = |subnet: ipnet::Ipv4Net| {
        info.ipv6_peers
            .iter()
            .find(|(_, p)| p.ipv4_subnet == Some(subnet))
            .map(|(subnet6, p)| (subnet6.to_string(), p.public_ipv6.map(|ip| ip.to_string())))
    };
    let peers: Vec<_> = match &stats {
        Some(stats) => stats
            .iter()
            .filter_map(|p| {
                // IPv6 subnets are listed in `ipv6_peers`, with their traffic.
                let ipnet::IpNet::V4(subnet) = p.subnet else {
                    return None;
                };
                let (ipv6_subnet, public_ipv6) = ipv6_of(subnet).unzip();
                let mut entry = json!({
                    "subnet": subnet.to_string(),
                    "ipv6_subnet": ipv6_subnet,
                    "public_ipv6": public_ipv6.flatten(),
                });
                add_traffic(&mut entry, p);
                Some(entry)
            })
            .collect(),
        // No data plane yet: what the control plane knows.
        None => info
            .peers
            .iter()
            .map(|(subnet, ip)| {
                let (ipv6_subnet, public_ipv6) = ipv6_of(*subnet).unzip();
                json!({"subnet": subnet.to_string(), "public_ip": ip.to_string(),
                       "ipv6_subnet": ipv6_subnet, "public_ipv6": public_ipv6.flatten()})
            })
            .collect(),
    };
    let bytes: serde_json::Map<String, serde_json::Value> = state
        .byte_counters()
        .into_iter()
        .map(|(name, v)| (name.to_string(), v.into()))
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = state
        .packet_counters()
        .into_iter()
        .map(|(name, v)| (name.to_string(), v.into()))
        .collect();
    let fast_path = state.dataplane().and_then(|dp| dp.fast_path()).map(|f| {
        json!({
            "bridge": f.bridge,
            "local_endpoints": f.local_endpoints,
            "local_endpoints6": f.local_endpoints6,
        })
    });
    let m = &state.metrics;
    json!({
        "ready": state.is_ready(),
        "pid": std::process::id(),
        "network": info.network.map(|n| n.to_string()),
        "subnet": info.subnet.map(|n| n.to_string()),
        "ipv6_network": info.ipv6_network.map(|n| n.to_string()),
        "ipv6_subnet": info.ipv6_subnet.map(|n| n.to_string()),
        "public_ip": info.public_ip.map(|ip| ip.to_string()),
        "public_ipv6": info.public_ipv6.map(|ip| ip.to_string()),
        "local_ip": info.local_ip.map(|ip| ip.to_string()),
        "iface": info.iface,
        "mtu": info.mtu,
        "dataplane": info.dataplane,
        "dataplane_reason": info.dataplane_reason,
        "fast_path": fast_path,
        "lease_expires_unix": info.lease_expires_unix,
        "config_error": info.config_error,
        "peers": peers,
        "ipv6_peers": ipv6_peers,
        "counters": counters,
        "bytes": bytes,
        "lease_acquisitions": m.lease_acquisitions.get(),
        "lease_renewals": m.lease_renewals.get(),
        "etcd_reconnects": m.etcd_reconnects.get(),
        "invalid_leases": m.invalid_leases.get(),
    })
}

/// A data plane entry's place and traffic, as the `peers` and `ipv6_peers` rows show them.
fn add_traffic(entry: &mut serde_json::Value, p: &crate::dataplane::PeerStats) {
    let changed = p
        .changed
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (key, value) in [
        ("public_ip", json!(p.public_ip.to_string())),
        ("changed_unix", json!(changed)),
        ("tx_packets", json!(p.traffic.tx_packets)),
        ("tx_bytes", json!(p.traffic.tx_bytes)),
        ("rx_packets", json!(p.traffic.rx_packets)),
        ("rx_bytes", json!(p.traffic.rx_bytes)),
    ] {
        entry[key] = value;
    }
}

async fn status(AxumState(state): AxumState<State>) -> impl IntoResponse {
    axum::Json(status_json(&state))
}

async fn metrics(AxumState(state): AxumState<State>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry()) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("encoding metrics failed: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn status_is_served_on_the_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("rudder.sock");
        let state = State::default();
        state.update(|s| {
            s.subnet = Some("10.5.7.0/24".parse().unwrap());
            s.peers.insert(
                "10.5.8.0/24".parse().unwrap(),
                "192.168.77.12".parse().unwrap(),
            );
        });
        let _claimed = serve_unix(&socket, state.clone()).await.unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);

        let body = get_unix(&socket, "/status").await.unwrap();
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["subnet"], "10.5.7.0/24");
        assert_eq!(status["peers"][0]["public_ip"], "192.168.77.12");
        assert_eq!(status["counters"]["spoofed_source"], 0);
        let table = status_table(&status);
        assert!(table.contains("10.5.8.0/24"), "{table}");

        // No data plane yet: not ready, and the answer says why.
        let err = get_unix(&socket, "/readyz").await.unwrap_err().to_string();
        assert!(err.contains("503"), "{err}");

        let metrics = get_unix(&socket, "/metrics").await.unwrap();
        assert!(metrics.contains("rudder_peers 1"), "{metrics}");
        assert!(
            metrics.contains("rudder_packets_total{dataplane=\"\",result=\"spoofed_source\"} 0"),
            "{metrics}"
        );
    }

    /// A data plane that only reports fixed per-peer traffic.
    struct FixedStats(Vec<crate::dataplane::PeerStats>);

    impl crate::dataplane::Dataplane for FixedStats {
        fn kind(&self) -> crate::dataplane::DataplaneKind {
            crate::dataplane::DataplaneKind::Tun
        }
        fn set_local_subnet(&self, _: ipnet::Ipv4Net) -> anyhow::Result<()> {
            Ok(())
        }
        fn set_overlay_mtu(&self, _: u16) -> anyhow::Result<()> {
            Ok(())
        }
        fn upsert_peer(&self, _: ipnet::Ipv4Net, _: std::net::IpAddr) -> anyhow::Result<()> {
            Ok(())
        }
        fn remove_peer(&self, _: ipnet::Ipv4Net) -> anyhow::Result<()> {
            Ok(())
        }
        fn set_local_subnet6(&self, _: ipnet::Ipv6Net) -> anyhow::Result<()> {
            Ok(())
        }
        fn upsert_peer6(&self, _: ipnet::Ipv6Net, _: std::net::IpAddr) -> anyhow::Result<()> {
            Ok(())
        }
        fn remove_peer6(&self, _: ipnet::Ipv6Net) -> anyhow::Result<()> {
            Ok(())
        }
        fn counters(&self) -> crate::dataplane::CounterSnapshot {
            [0; rudder_ebpf::Counter::COUNT]
        }
        fn byte_counters(&self) -> crate::dataplane::CounterSnapshot {
            [0; rudder_ebpf::Counter::COUNT]
        }
        fn peer_stats(&self) -> Vec<crate::dataplane::PeerStats> {
            self.0.clone()
        }
        fn shutdown(&self) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn ipv6_peer_subnets_show_their_traffic_in_status_and_metrics() {
        use crate::dataplane::{PeerStats, PeerTraffic};
        let traffic = |tx_packets, rx_packets| PeerTraffic {
            tx_packets,
            tx_bytes: tx_packets * 100,
            rx_packets,
            rx_bytes: rx_packets * 100,
        };
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let subnet6: ipnet::Ipv6Net = "fc00:0:0:8::/64".parse().unwrap();
        let state = State::default();
        state.update(|s| {
            s.subnet = Some("10.5.7.0/24".parse().unwrap());
            s.peers.insert(
                "10.5.8.0/24".parse().unwrap(),
                "192.168.77.12".parse().unwrap(),
            );
            s.ipv6_peers.insert(
                subnet6,
                crate::peers::Ipv6Peer {
                    ipv4_subnet: Some("10.5.8.0/24".parse().unwrap()),
                    public_ip: "192.168.77.12".parse().unwrap(),
                    public_ipv6: Some("fd00:77::12".parse().unwrap()),
                },
            );
        });
        let stats = vec![
            PeerStats {
                subnet: "10.5.8.0/24".parse().unwrap(),
                public_ip: "192.168.77.12".parse().unwrap(),
                changed: at,
                traffic: traffic(3, 4),
            },
            PeerStats {
                subnet: ipnet::IpNet::V6(subnet6),
                public_ip: "fd00:77::12".parse().unwrap(),
                changed: at,
                traffic: traffic(5, 6),
            },
            PeerStats {
                subnet: "10.5.9.0/24".parse().unwrap(),
                public_ip: "192.168.77.13".parse().unwrap(),
                changed: at,
                traffic: traffic(0, 0),
            },
        ];
        *state.dataplane.write().unwrap() = Some(std::sync::Arc::new(FixedStats(stats)));

        let status = status_json(&state);
        // /status lists idle peers too.
        assert_eq!(status["peers"].as_array().unwrap().len(), 2, "{status}");
        assert_eq!(status["peers"][0]["tx_packets"], 3);
        let peer6 = &status["ipv6_peers"][0];
        assert_eq!(peer6["ipv6_subnet"], "fc00:0:0:8::/64");
        assert_eq!(peer6["public_ip"], "fd00:77::12");
        assert_eq!(
            (
                &peer6["tx_packets"],
                &peer6["rx_packets"],
                &peer6["rx_bytes"]
            ),
            (&json!(5), &json!(6), &json!(600)),
            "{peer6}"
        );
        let table = status_table(&status);
        let row6 = table
            .lines()
            .find(|l| l.trim_start().starts_with("fc00:0:0:8::/64"))
            .unwrap_or_else(|| panic!("no IPv6 peer row in\n{table}"));
        let columns: Vec<&str> = row6.split_whitespace().collect();
        assert_eq!(
            columns[1..6],
            ["fd00:77::12", "5", "500", "6", "600"],
            "{row6}"
        );

        let mut metrics = String::new();
        prometheus_client::encoding::text::encode(&mut metrics, &state.registry()).unwrap();
        for line in [
            "rudder_peer_packets_total{dataplane=\"\",subnet=\"10.5.8.0/24\",direction=\"tx\"} 3",
            "rudder_peer_packets_total{dataplane=\"\",subnet=\"fc00:0:0:8::/64\",direction=\"tx\"} 5",
            "rudder_peer_packets_total{dataplane=\"\",subnet=\"fc00:0:0:8::/64\",direction=\"rx\"} 6",
            "rudder_peer_bytes_total{dataplane=\"\",subnet=\"fc00:0:0:8::/64\",direction=\"rx\"} 600",
        ] {
            assert!(metrics.contains(line), "no {line} in\n{metrics}");
        }
        // An idle peer: no lines (65,536 of them made every scrape ~25 MB).
        assert!(
            !metrics.contains("10.5.9.0/24"),
            "idle peer exported:\n{metrics}"
        );
    }

    #[tokio::test]
    async fn status_without_a_daemon_says_what_to_do() {
        let err = get_unix(Path::new("/nonexistent/rudder.sock"), "/status")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is `rudder run` running"), "{err}");
    }
}
