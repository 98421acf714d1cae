//! `cargo xtask setup`: installs what is missing, says what it does, changes nothing else.

use crate::util::{run as run_cmd, stdout_of, succeeds};
use anyhow::{bail, Result};
use std::process::Command;

/// Debian packages the build and the tests need.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "llvm-22-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "nftables",
    "tcpdump",
    "ethtool",
];

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
    run_cmd(
        privileged("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
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
pub fn run() -> Result<()> {
    debian_packages()?;
    rust_src()?;
    bpf_linker()?;
    eprintln!("setup: done");
    Ok(())
}
