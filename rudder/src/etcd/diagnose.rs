//! One line for an etcd failure that a person can act on: which endpoint, what failed
//! (connection refused, timed out, TLS handshake, authentication), and which flags to pass.
//! The client's own errors are nested gRPC/transport dumps; this turns them into a sentence.

use std::time::Duration;

use tonic::Code;

/// How long a diagnosis waits for a TCP connection to each endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong, in the terms of the flags that fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// etcd answered and refused the credentials (or their lack).
    Auth(String),
    /// The TLS handshake failed (unknown CA, bad client certificate, name mismatch).
    Tls(String),
    /// No endpoint accepts TCP connections: each endpoint with its reason.
    Unreachable(Vec<(String, String)>),
    /// Some endpoint accepts TCP connections but gRPC over it failed.
    NoAnswer(String),
    /// An answer we cannot classify (kept as etcd said it).
    Other(String),
}

/// Describes `err` from a request to `endpoints` in one line.
pub async fn describe(endpoints: &[String], err: &etcd_client::Error) -> String {
    render(endpoints, &classify(endpoints, err).await)
}

/// Like [`describe`] for an `anyhow` error that may wrap an etcd error (else unchanged).
pub async fn describe_any(endpoints: &[String], err: anyhow::Error) -> anyhow::Error {
    match err.downcast_ref::<etcd_client::Error>() {
        Some(etcd) => anyhow::anyhow!(describe(endpoints, etcd).await),
        None => err,
    }
}

async fn classify(endpoints: &[String], err: &etcd_client::Error) -> Failure {
    let chain = chain_text(err);
    let innermost = innermost(err);
    if let etcd_client::Error::GRpcStatus(status) = err {
        let message = status
            .message()
            .trim_start_matches("etcdserver: ")
            .to_string();
        let auth_words = ["auth", "user name", "password", "permission denied"];
        let is_auth = matches!(
            status.code(),
            Code::Unauthenticated | Code::PermissionDenied
        ) || (status.code() == Code::InvalidArgument
            && auth_words.iter().any(|w| message.contains(w)));
        if is_auth {
            return Failure::Auth(message);
        }
    }
    let lower = chain.to_lowercase();
    if ["certificate", "tls", "handshake", "unknownissuer", "ssl"]
        .iter()
        .any(|w| lower.contains(w))
    {
        return Failure::Tls(innermost);
    }
    let mut reasons = Vec::new();
    for endpoint in endpoints {
        match probe(endpoint, PROBE_TIMEOUT).await {
            Ok(()) => return Failure::NoAnswer(innermost),
            Err(reason) => reasons.push((endpoint.clone(), reason)),
        }
    }
    if reasons.is_empty() {
        Failure::Other(innermost)
    } else {
        Failure::Unreachable(reasons)
    }
}

fn render(endpoints: &[String], failure: &Failure) -> String {
    let at = endpoints.join(",");
    match failure {
        Failure::Auth(msg) => format!(
            "etcd at {at} refused the request: authentication failed ({msg}); pass \
             --etcd-username and --etcd-password of a user with access to the prefix"
        ),
        Failure::Tls(msg) => format!(
            "TLS handshake with etcd at {at} failed ({msg}); check --etcd-cafile (the CA that \
             signed etcd's certificate), --etcd-certfile and --etcd-keyfile"
        ),
        Failure::Unreachable(reasons) => {
            let each: Vec<String> = reasons.iter().map(|(e, r)| format!("{e}: {r}")).collect();
            format!(
                "cannot reach etcd ({}); start etcd there or pass --etcd-endpoints",
                each.join("; ")
            )
        }
        Failure::NoAnswer(msg) => {
            let hint = if endpoints.iter().any(|e| !e.starts_with("https://")) {
                "; if etcd serves TLS, use https:// endpoints and --etcd-cafile"
            } else {
                ""
            };
            format!("etcd at {at} accepts connections but the request failed ({msg}){hint}")
        }
        Failure::Other(msg) => format!("etcd at {at}: {msg}"),
    }
}

/// A TCP connection to the endpoint's host:port: `Ok` if accepted, else why not, in words.
pub(super) async fn probe(endpoint: &str, timeout: Duration) -> Result<(), String> {
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/');
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(authority)).await {
        Err(_) => Err(format!("timed out after {} s", timeout.as_secs_f32())),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            std::io::ErrorKind::TimedOut => "timed out".to_string(),
            _ => e.to_string(),
        }),
    }
}

/// Every error in the source chain, outermost first.
fn chain_text(err: &etcd_client::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = status_source(err);
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    parts.join(": ")
}

/// The innermost message: the root cause without the layers' prefixes.
fn innermost(err: &etcd_client::Error) -> String {
    let mut last = match err {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    };
    let mut source = status_source(err);
    while let Some(e) = source {
        let text = e.to_string();
        if !text.is_empty() {
            last = text;
        }
        source = e.source();
    }
    last
}

/// etcd-client's Error has no `source`; what it wraps (a gRPC status, a transport or I/O
/// error) does.
fn status_source(err: &etcd_client::Error) -> Option<&(dyn std::error::Error + 'static)> {
    match err {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(e) => Some(e),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_endpoint() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    #[tokio::test]
    async fn a_closed_port_is_connection_refused_naming_the_endpoint() {
        let endpoint = closed_endpoint();
        let mut client = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .unwrap();
        let err = client.get("k", None).await.unwrap_err();
        let line = describe(std::slice::from_ref(&endpoint), &err).await;
        assert_eq!(
            line,
            format!(
                "cannot reach etcd ({endpoint}: connection refused); start etcd there or pass \
                 --etcd-endpoints"
            )
        );
    }

    #[tokio::test]
    async fn a_server_that_does_not_speak_grpc_is_named_with_the_tls_hint() {
        // Accepts TCP, answers garbage: what a plain-text client sees of a TLS-only etcd.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"\x15\x03\x01\x00\x02\x02\x46").await;
            }
        });
        let mut client = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .unwrap();
        let err = client.get("k", None).await.unwrap_err();
        let line = describe(std::slice::from_ref(&endpoint), &err).await;
        assert!(
            line.starts_with(&format!(
                "etcd at {endpoint} accepts connections but the request failed ("
            )),
            "{line}"
        );
        assert!(
            line.ends_with("use https:// endpoints and --etcd-cafile"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn each_failure_is_one_line_naming_its_flags() {
        let eps = vec!["https://10.0.0.1:2379".to_string()];
        let auth = render(
            &eps,
            &Failure::Auth("authentication failed, invalid user ID or password".into()),
        );
        assert!(
            auth.contains("--etcd-username and --etcd-password"),
            "{auth}"
        );
        let tls = render(
            &eps,
            &Failure::Tls("invalid peer certificate: UnknownIssuer".into()),
        );
        assert!(
            tls.starts_with("TLS handshake with etcd at https://10.0.0.1:2379 failed"),
            "{tls}"
        );
        assert!(tls.contains("--etcd-cafile"), "{tls}");
        let timed_out = render(
            &eps,
            &Failure::Unreachable(vec![(eps[0].clone(), "timed out after 2 s".into())]),
        );
        assert_eq!(
            timed_out,
            "cannot reach etcd (https://10.0.0.1:2379: timed out after 2 s); start etcd there or \
             pass --etcd-endpoints"
        );
        // TLS endpoints get no "use https://" hint.
        assert!(!render(&eps, &Failure::NoAnswer("x".into())).contains("use https://"));
    }

    #[tokio::test]
    async fn auth_statuses_are_classified_as_auth() {
        let eps = vec![closed_endpoint()];
        for (code, msg) in [
            (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            (Code::Unauthenticated, "etcdserver: invalid auth token"),
            (Code::PermissionDenied, "etcdserver: permission denied"),
            (Code::InvalidArgument, "etcdserver: user name is empty"),
        ] {
            let err = etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
            let failure = classify(&eps, &err).await;
            assert_eq!(
                failure,
                Failure::Auth(msg.trim_start_matches("etcdserver: ").into()),
                "{msg}"
            );
        }
    }
}
