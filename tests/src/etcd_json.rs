//! etcd's JSON gateway (`POST /v3/kv/...` on the client URL): writes without starting one
//! `etcdctl` process per key, so thousands of keys go in within a second and one put's
//! round trip is not dominated by a process start.

use crate::netns;
use crate::Cluster;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// Standard base64 with padding: the gateway's encoding of keys and values.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One gateway call (`path` like `/v3/kv/put`) from inside the underlay namespace; returns
/// the JSON answer. HTTP/1.0, so the answer is never chunked and ends at close.
pub fn call(cluster: &Cluster, path: &str, body: &Value) -> Result<Value> {
    let addr = (
        crate::underlay::UNDERLAY_GW,
        crate::underlay::ETCD_CLIENT_PORT,
    )
        .into();
    // A socket keeps the namespace it was created in.
    let mut s = netns::run_in(cluster.underlay_ns(), move || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?)
    })
    .context("connecting to etcd")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, answer) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer from etcd: {text:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path} answered {head:?}: {answer}");
    }
    serde_json::from_str(answer)
        .with_context(|| format!("etcd {path} answered non-JSON {answer:?}"))
}

/// Puts `key` = `value` (no etcd lease).
pub fn put(cluster: &Cluster, key: &str, value: &str) -> Result<()> {
    let body = json!({"key": base64(key.as_bytes()), "value": base64(value.as_bytes())});
    call(cluster, "/v3/kv/put", &body).map(|_| ())
}

/// Deletes `key`.
pub fn delete(cluster: &Cluster, key: &str) -> Result<()> {
    call(
        cluster,
        "/v3/kv/deleterange",
        &json!({"key": base64(key.as_bytes())}),
    )
    .map(|_| ())
}

/// Puts every pair, [`MAX_TXN_OPS`] per transaction.
pub fn put_many(cluster: &Cluster, kvs: &[(String, String)]) -> Result<()> {
    for batch in kvs.chunks(MAX_TXN_OPS) {
        let ops: Vec<Value> = batch
            .iter()
            .map(|(k, v)| {
                json!({"requestPut": {"key": base64(k.as_bytes()), "value": base64(v.as_bytes())}})
            })
            .collect();
        let answer = call(cluster, "/v3/kv/txn", &json!({"success": ops}))?;
        if answer["succeeded"] != Value::Bool(true) {
            bail!("etcd transaction failed: {answer}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(plain.as_bytes()), enc);
        }
    }
}
