//! The systemd units in `dist/` pass `systemd-analyze verify` (Debian's systemd), the docker
//! drop-in included, loaded on top of the machine's own docker.service (docker.io).

use std::path::Path;
use std::process::Command;

use rudder_tests::util::{output, rudder_bin};

fn dist() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

/// Runs `systemd-analyze verify` with `dir` first on the unit path; returns its complaints.
fn verify(dir: &Path, units: &[&str]) -> (bool, String) {
    let out = output(
        Command::new("systemd-analyze")
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
            .arg("verify")
            .args(units),
    )
    .expect("running systemd-analyze (install systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.trim().is_empty(), text)
}

/// A unit directory with rudder.service and the docker drop-in. verify insists that every
/// ExecStart binary exists, so /usr/local/bin/rudder (where the unit expects an install) is
/// replaced by the binary under test; nothing else is changed.
fn unit_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(dist().join("rudder.service")).unwrap();
    assert!(unit.contains("/usr/local/bin/rudder"), "{unit}");
    std::fs::write(
        dir.path().join("rudder.service"),
        unit.replace("/usr/local/bin/rudder", &rudder_bin().display().to_string()),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("docker.service.d")).unwrap();
    std::fs::copy(
        dist().join("docker.service.d/rudder.conf"),
        dir.path().join("docker.service.d/rudder.conf"),
    )
    .unwrap();
    dir
}

#[test]
fn rudder_service_and_the_docker_drop_in_verify() {
    let dir = unit_dir();
    let (ok, text) = verify(dir.path(), &["rudder.service", "docker.service"]);
    assert!(ok, "systemd-analyze verify complained:\n{text}");

    // The drop-in is really loaded: a broken one makes verify fail.
    let drop_in = dir.path().join("docker.service.d/rudder.conf");
    let mut broken = std::fs::read_to_string(&drop_in).unwrap();
    broken.push_str("ExecStart=/usr/sbin/dockerd --second\n");
    std::fs::write(&drop_in, broken).unwrap();
    let (ok, text) = verify(dir.path(), &["docker.service"]);
    assert!(!ok, "a drop-in with two ExecStart= lines passed:\n{text}");
}

#[test]
fn the_drop_in_orders_docker_after_rudder_and_passes_docker_opts() {
    let conf = std::fs::read_to_string(dist().join("docker.service.d/rudder.conf")).unwrap();
    let lines: Vec<&str> = conf.lines().map(str::trim).collect();
    for expected in [
        "After=rudder.service",
        "Requires=rudder.service",
        "EnvironmentFile=/run/docker_opts.env",
    ] {
        assert!(lines.contains(&expected), "missing {expected}:\n{conf}");
    }
    let exec = lines
        .iter()
        .rfind(|l| l.starts_with("ExecStart=/"))
        .expect("an ExecStart");
    assert!(exec.ends_with("$DOCKER_OPTS"), "{exec}");
    // rudder.service writes that file before docker may start.
    let unit = std::fs::read_to_string(dist().join("rudder.service")).unwrap();
    assert!(unit.contains("rudder docker-opts"), "{unit}");
    assert!(unit.contains("Before=docker.service"), "{unit}");
}
