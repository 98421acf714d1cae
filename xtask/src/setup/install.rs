//! Installing what is missing: Debian packages, the rust-src component, bpf-linker.

use crate::util::{run as run_cmd, stdout_of, succeeds};
use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;

/// Debian packages the build, the tests, the demo and the benchmarks need; `checks.rs` proves
/// each one works.
pub const DEBIAN_PACKAGES: &[&str] = &[
    // etcd-client's build script runs protoc; the well-known includes (descriptor.proto) are
    // in libprotobuf-dev, only a recommended package of protobuf-compiler.
    "protobuf-compiler",
    "libprotobuf-dev",
    // bpf-linker links against LLVM 22.
    "llvm-22-dev",
    "etcd-server",
    "etcd-client",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "nftables",
    "iptables",
    "tcpdump",
    "ethtool",
    // setpriv, nsenter, unshare (essential on Debian, named for minimal roots).
    "util-linux",
    // Docker hosts in the end-to-end tests; images are made from busybox-static.
    "docker.io",
    "containerd",
    "runc",
    "busybox-static",
    // CNI reference plugins (bridge, host-local, portmap) the CNI tests drive.
    "containernetworking-plugins",
    // The userspace overlay the benchmark compares the TUN path with.
    "tinc",
    // `cargo xtask fresh-check` builds a minimal Debian root.
    "debootstrap",
    // systemd-analyze verifies the unit files in dist/.
    "systemd",
];

/// Debian's hook that keeps package scripts from starting services: installing docker.io or
/// containerd must not start daemons in the root network namespace (they would add bridges and
/// firewall rules there). Tests start their own daemons inside test namespaces.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

fn is_root() -> bool {
    stdout_of(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn deb_installed(pkg: &str) -> bool {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Prefixes `sudo` when not root.
fn privileged(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

fn debian_packages() -> Result<()> {
    if !succeeds(Command::new("dpkg-query").arg("--version")) {
        bail!("dpkg-query not found: setup knows only Debian-like systems; install by hand: {DEBIAN_PACKAGES:?}");
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!(
            "setup: Debian packages present: {}",
            DEBIAN_PACKAGES.join(" ")
        );
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run_cmd(privileged("apt-get").arg("update"))?;
    let own_policy = !Path::new(POLICY_RC_D).exists();
    if own_policy {
        eprintln!("setup: writing {POLICY_RC_D} (exit 101) while installing, so no service starts");
        write_policy_rc_d()?;
    }
    let installed = run_cmd(
        privileged("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    );
    if own_policy {
        run_cmd(privileged("rm").args(["-f", POLICY_RC_D]))?;
    }
    installed
}

fn write_policy_rc_d() -> Result<()> {
    run_cmd(privileged("sh").args([
        "-c",
        &format!("printf '#!/bin/sh\\nexit 101\\n' > {POLICY_RC_D} && chmod 755 {POLICY_RC_D}"),
    ]))
}

fn rust_src() -> Result<()> {
    if !succeeds(Command::new("rustup").arg("--version")) {
        eprintln!("setup: rustup not found; skipping the rust-src component (install it by hand if the eBPF build needs it)");
        return Ok(());
    }
    let installed = stdout_of(Command::new("rustup").args(["component", "list", "--installed"]))
        .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: rustup component rust-src present");
        return Ok(());
    }
    eprintln!("setup: adding rustup component rust-src");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        eprintln!("setup: bpf-linker present");
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker (built against LLVM 22)");
    run_cmd(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
}

/// Everything, in order: Debian packages first (bpf-linker needs LLVM).
pub fn install() -> Result<()> {
    debian_packages()?;
    rust_src()?;
    bpf_linker()
}
