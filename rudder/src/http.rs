//! The health, status and metrics HTTP server (`--healthz-ip`/`--healthz-port`).

use std::net::SocketAddr;

use anyhow::Context;
use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::metrics::State;

pub async fn serve(addr: SocketAddr, state: State) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the health server to {addr} (--healthz-ip/--healthz-port)")
    })?;
    tracing::info!(%addr, "serving /healthz /readyz /status /metrics");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("health server stopped: {e}");
        }
    });
    Ok(())
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
    let peers: Vec<_> = info
        .peers
        .iter()
        .map(|(subnet, ip)| json!({"subnet": subnet.to_string(), "public_ip": ip.to_string()}))
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = state
        .packet_counters()
        .into_iter()
        .map(|(name, v)| (name.to_string(), v.into()))
        .collect();
    let m = &state.metrics;
    json!({
        "ready": state.is_ready(),
        "network": info.network.map(|n| n.to_string()),
        "subnet": info.subnet.map(|n| n.to_string()),
        "public_ip": info.public_ip.map(|ip| ip.to_string()),
        "iface": info.iface,
        "mtu": info.mtu,
        "dataplane": info.dataplane,
        "dataplane_reason": info.dataplane_reason,
        "lease_expires_unix": info.lease_expires_unix,
        "config_error": info.config_error,
        "peers": peers,
        "counters": counters,
        "lease_acquisitions": m.lease_acquisitions.get(),
        "lease_renewals": m.lease_renewals.get(),
        "etcd_reconnects": m.etcd_reconnects.get(),
        "invalid_leases": m.invalid_leases.get(),
    })
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
