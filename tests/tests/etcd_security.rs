//! etcd TLS (CA verification, client certificates) and username/password auth against a
//! real etcd; partial TLS flags are a startup error, never a plain-text fall-back.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rudder_tests::cluster::{DEFAULT_CONFIG, DEFAULT_PREFIX, UNDERLAY_GW};
use rudder_tests::extra_etcd::{ExtraEtcd, RUDDER_PASSWORD};
use rudder_tests::util::{output, rudder_bin};
use rudder_tests::{check, e2e, netns, ping, wait_until, Cluster, Host, HostOpts};

const TLS_PORT: u16 = 2479;
const AUTH_PORT: u16 = 2579;

struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// A CA, a server certificate for the underlay gateway's address, a client certificate.
fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rudder test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(UNDERLAY_GW)));
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &ca)?;

    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client.distinguished_name.push(DnType::CommonName, "rudder");
    let client_key = KeyPair::generate()?;
    let client_cert = client.signed_by(&client_key, &ca)?;

    let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    Ok(Pki {
        ca: write("ca.pem", ca.pem())?,
        server_cert: write("server.pem", server_cert.pem())?,
        server_key: write("server-key.pem", server_key.serialize_pem())?,
        client_cert: write("client.pem", client_cert.pem())?,
        client_key: write("client-key.pem", client_key.serialize_pem())?,
    })
}

fn secured_host(
    c: &Cluster,
    endpoint: &str,
    extra_args: Vec<String>,
    wait_ready: bool,
) -> anyhow::Result<Host> {
    c.add_host(HostOpts {
        etcd_endpoints: Some(endpoint.to_string()),
        extra_args,
        wait_ready,
        ..HostOpts::default()
    })
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn tls_with_client_certificates() {
    e2e(|c| {
        let pki = make_pki(c.dir())?;
        let etcd = ExtraEtcd::start(
            c,
            "tls",
            "https",
            TLS_PORT,
            &[
                "--cert-file".into(),
                path(&pki.server_cert),
                "--key-file".into(),
                path(&pki.server_key),
                "--trusted-ca-file".into(),
                path(&pki.ca),
                "--client-cert-auth".into(),
            ],
        )?;
        let tls = [
            format!("--cacert={}", path(&pki.ca)),
            format!("--cert={}", path(&pki.client_cert)),
            format!("--key={}", path(&pki.client_key)),
        ];
        let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        etcd.wait_healthy(&tls)?;
        etcd.etcdctl(
            &tls,
            &["put", &format!("{DEFAULT_PREFIX}/config"), DEFAULT_CONFIG],
        )?;
        let endpoint = etcd.endpoint().to_string();

        let flags = vec![
            "--etcd-cafile".into(),
            path(&pki.ca),
            "--etcd-certfile".into(),
            path(&pki.client_cert),
            "--etcd-keyfile".into(),
            path(&pki.client_key),
        ];
        let a = secured_host(c, &endpoint, flags.clone(), true)?;
        let b = secured_host(c, &endpoint, flags, true)?;
        wait_until("a sees b over TLS etcd", Duration::from_secs(20), || {
            a.sees_peer(&b)
        })?;
        ping(&a.container(), b.container_ip())?;

        // Only the CA, no client certificate: etcd refuses it; the daemon stays up, unready.
        let no_cert = secured_host(
            c,
            &endpoint,
            vec!["--etcd-cafile".into(), path(&pki.ca)],
            false,
        )?;
        // The CLI with a CA that did not sign etcd's certificate: one line naming the handshake.
        let other_dir = c.dir().join("other-pki");
        std::fs::create_dir_all(&other_dir)?;
        let other_ca = make_pki(&other_dir)?;
        let line = cli_error(
            c,
            &[
                "leases".into(),
                format!("--etcd-endpoints={endpoint}"),
                format!("--etcd-cafile={}", path(&other_ca.ca)),
                format!("--etcd-certfile={}", path(&pki.client_cert)),
                format!("--etcd-keyfile={}", path(&pki.client_key)),
            ],
        )?;
        check!(
            line.contains(&format!("TLS handshake with etcd at {endpoint} failed"))
                && line.contains("--etcd-cafile"),
            "wrong CA: {line}"
        );

        std::thread::sleep(Duration::from_secs(5));
        no_cert.check_alive()?;
        check!(
            no_cert.read_subnet_file()?.is_none(),
            "a client without a certificate got a lease"
        );
        check!(
            !no_cert.is_ready(),
            "a client without a certificate is ready"
        );
        Ok(())
    });
}

#[test]
fn username_and_password() {
    e2e(|c| {
        let etcd = ExtraEtcd::start(c, "auth", "http", AUTH_PORT, &[])?;
        etcd.wait_healthy(&[])?;
        etcd.enable_auth()?;
        let endpoint = etcd.endpoint().to_string();

        let creds = |password: &str| -> Vec<String> {
            vec![
                "--etcd-username".into(),
                "rudder".into(),
                "--etcd-password".into(),
                password.into(),
            ]
        };
        let a = secured_host(c, &endpoint, creds(RUDDER_PASSWORD), true)?;
        check!(
            a.status()?["subnet"].is_string(),
            "no subnet with the right password"
        );

        let wrong = secured_host(c, &endpoint, creds("wrong"), false)?;
        wait_until(
            "the wrong password to be reported",
            Duration::from_secs(20),
            || Ok(wrong.log().contains("authentication failed")),
        )?;
        let cpu = wrong.cpu_time()?;
        std::thread::sleep(Duration::from_secs(5));
        wrong.check_alive()?;
        let used = wrong.cpu_time()? - cpu;
        check!(
            used < Duration::from_millis(500),
            "retrying a wrong password used {used:?} CPU in 5 s"
        );
        check!(
            wrong.read_subnet_file()?.is_none(),
            "wrong password got a lease"
        );
        for command in ["leases", "network show"] {
            let mut args: Vec<String> = command.split(' ').map(String::from).collect();
            args.extend([
                format!("--etcd-endpoints={endpoint}"),
                "--etcd-username=rudder".into(),
                "--etcd-password=wrong".into(),
            ]);
            let line = cli_error(c, &args)?;
            check!(
                line.contains(&format!(
                    "etcd at {endpoint} refused the request: authentication failed"
                )) && line.contains("--etcd-username and --etcd-password"),
                "rudder {command} with a wrong password: {line}"
            );
        }
        Ok(())
    });
}

#[test]
fn partial_tls_flags_are_startup_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = make_pki(dir.path()).expect("certificates");
    let cases: [(Vec<String>, &str); 3] = [
        (
            vec![
                "--etcd-endpoints=https://127.0.0.1:1".into(),
                format!("--etcd-certfile={}", path(&pki.client_cert)),
            ],
            "--etcd-certfile and --etcd-keyfile must be given together",
        ),
        (
            vec![
                "--etcd-endpoints=http://127.0.0.1:1".into(),
                format!("--etcd-cafile={}", path(&pki.ca)),
            ],
            "is not https://",
        ),
        (
            vec![
                "--etcd-endpoints=http://127.0.0.1:1".into(),
                "--etcd-username=rudder".into(),
            ],
            "--etcd-username and --etcd-password must be given together",
        ),
    ];
    for (args, expected) in cases {
        // The flags are checked before anything touches the network: run where it is.
        let out = output(
            std::process::Command::new(rudder_bin())
                .arg("run")
                .args(&args)
                .arg("--iface=lo")
                .arg(format!(
                    "--subnet-file={}",
                    path(&dir.path().join("subnet.env"))
                ))
                .arg(format!(
                    "--status-socket={}",
                    path(&dir.path().join("rudder.sock"))
                ))
                .arg("--dataplane=tun"),
        )
        .expect("running rudder");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{stderr}"
        );
        assert_eq!(
            stderr.lines().filter(|l| l.contains("ERROR")).count(),
            1,
            "{args:?}: one error line expected:\n{stderr}"
        );
    }
}

/// Runs the rudder CLI in the underlay namespace, expects it to fail, and returns its one
/// error line (failing if it printed more than one line or a raw gRPC dump).
fn cli_error(c: &Cluster, args: &[String]) -> anyhow::Result<String> {
    let out = output(netns::exec(c.underlay_ns(), &rudder_bin().display().to_string()).args(args))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    check!(!out.status.success(), "rudder {args:?} succeeded");
    check!(
        stderr.lines().count() == 1,
        "rudder {args:?}: one line expected:\n{stderr}"
    );
    check!(
        !stderr.contains("grpc request error") && !stderr.contains("tonic::"),
        "rudder {args:?}: raw client error:\n{stderr}"
    );
    Ok(stderr)
}

/// Unreachable etcd, from the CLI and from the daemon: which endpoint, refused or timed out.
#[test]
fn unreachable_etcd_is_one_line_naming_endpoint_and_reason() {
    e2e(|c| {
        // A closed port: connection refused.
        let refused = format!("http://{UNDERLAY_GW}:2999");
        for command in [
            "leases",
            "network show",
            "network init --network 10.6.0.0/16",
        ] {
            let mut args: Vec<String> = command.split(' ').map(String::from).collect();
            args.push(format!("--etcd-endpoints={refused}"));
            let line = cli_error(c, &args)?;
            check!(
                line.contains(&format!(
                    "cannot reach etcd ({refused}: connection refused); start etcd there or pass --etcd-endpoints"
                )),
                "rudder {command}: {line}"
            );
        }
        // SYNs dropped: timed out.
        netns::exec_ok(
            c.underlay_ns(),
            "nft",
            &["add table inet cli_test; add chain inet cli_test input { type filter hook input priority 0; }; \
               add rule inet cli_test input tcp dport 2998 drop"],
        )?;
        let dropped = format!("http://{UNDERLAY_GW}:2998");
        let line = cli_error(c, &["leases".into(), format!("--etcd-endpoints={dropped}")])?;
        check!(
            line.contains(&format!(
                "cannot reach etcd ({dropped}: timed out after 2 s)"
            )),
            "dropped: {line}"
        );

        // The daemon's first connection says the same, and keeps retrying.
        let host = c.add_host(HostOpts {
            etcd_endpoints: Some(refused.clone()),
            wait_ready: false,
            ..HostOpts::default()
        })?;
        wait_until(
            "the daemon to explain etcd is unreachable",
            Duration::from_secs(20),
            || {
                Ok(host.log().contains(&format!(
                    "cannot reach etcd ({refused}: connection refused)"
                )))
            },
        )?;
        host.check_alive()?;
        Ok(())
    });
}
