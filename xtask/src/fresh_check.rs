//! `cargo xtask fresh-check`: proves the set-up works on a machine that has nothing installed.
//!
//! Builds a minimal Debian root with debootstrap (only the packages a Rust toolchain itself
//! needs: a C linker and CA certificates), copies this machine's Rust toolchain in as a fresh
//! machine has it (rustup and its proxies; no rust-src, no bpf-linker, no registry cache),
//! copies the checkout, and runs `cargo xtask setup`, `cargo xtask setup --check` and
//! `cargo build --workspace` there. Everything runs in a private mount namespace, so its mounts
//! vanish with it, whatever happens; the root is deleted afterwards unless `--keep`.

use crate::util::{run, workspace_root};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args)]
pub struct FreshCheckArgs {
    /// Where to build the root (deleted first if it exists).
    #[arg(long, default_value = "/var/tmp/rudder-fresh-root")]
    root: PathBuf,
    /// Debian suite of the root (this machine kind's).
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Keep the root afterwards (for a look inside).
    #[arg(long)]
    keep: bool,
    /// Stop after the set-up and its checks (skip `cargo build --workspace`).
    #[arg(long)]
    no_build: bool,
}

/// What a machine with a rustup toolchain has at the least: the toolchain's linker and the CA
/// certificates its downloads need. Everything else is the set-up's job.
const BASE_PACKAGES: &str = "ca-certificates,gcc,libc6-dev";

pub fn run_check(args: &FreshCheckArgs) -> Result<i32> {
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let rustup_home = std::env::var_os("RUSTUP_HOME").map_or(home.join(".rustup"), PathBuf::from);
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map_or(home.join(".cargo"), PathBuf::from)
        .join("bin");
    if !rustup_home.is_dir() || !cargo_bin.join("cargo").exists() {
        bail!(
            "fresh-check copies this machine's rustup toolchain: {} or {} is missing",
            rustup_home.display(),
            cargo_bin.join("cargo").display()
        );
    }
    let root = &args.root;
    remove_root(root)?;
    let mirror = debian_mirror()?;
    eprintln!(
        "fresh-check: debootstrap {} into {}",
        args.suite,
        root.display()
    );
    run(Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={BASE_PACKAGES}")])
        .arg(&args.suite)
        .arg(root)
        .arg(&mirror))?;

    // What a fresh machine of this kind has besides the toolchain: its package sources, its
    // resolver and its local CA certificates (the registries are reached through them).
    copy_into(root, Path::new("/etc/apt/sources.list.d"))?;
    copy_into(root, Path::new("/usr/local/share/ca-certificates"))?;
    copy_into(root, Path::new("/etc/apt/sources.list"))?;
    copy_into(root, Path::new("/etc/resolv.conf"))?;
    let _ = std::fs::remove_file(root.join("usr/sbin/policy-rc.d"));
    copy_rustup_proxies(&cargo_bin, &root.join("root/.cargo/bin"))?;
    eprintln!(
        "fresh-check: copying the toolchain ({})",
        rustup_home.display()
    );
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&rustup_home)
        .arg(root.join("root/.rustup")))?;
    let checkout = root.join("work/rudder");
    copy_checkout(&checkout)?;

    let (build, built) = if args.no_build {
        ("", "")
    } else {
        (" && cargo build --workspace", ", cargo build --workspace")
    };
    let inside = format!(
        "update-ca-certificates >/dev/null \
         && {{ rustup component remove rust-src 2>/dev/null || true; }} && cd /work/rudder \
         && cargo xtask setup && cargo xtask setup --check{build} \
         && echo 'fresh-check: PASSED: cargo xtask setup, cargo xtask setup --check{built} on a fresh {suite} root'",
        suite = args.suite
    );
    let r = root.display();
    let script = format!(
        "set -e
         mount --make-rprivate /
         mount -t proc proc {r}/proc
         mount --rbind /sys {r}/sys
         mount --rbind /dev {r}/dev
         mount -t tmpfs tmpfs {r}/tmp
         exec chroot {r} /usr/bin/env -i HOME=/root TERM=dumb RUSTUP_AUTO_INSTALL=0 \
              PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
              sh -c \"$0\"",
    );
    eprintln!("fresh-check: in the root: {inside}");
    let status = Command::new("unshare")
        .args(["--mount", "--fork", "sh", "-c", &script, &inside])
        .status()
        .context("running unshare")?;
    if args.keep {
        eprintln!("fresh-check: root kept at {}", root.display());
    } else {
        remove_root(root)?;
    }
    if !status.success() {
        eprintln!("fresh-check: FAILED (see the output above)");
    }
    Ok(status.code().unwrap_or(1))
}

/// `rustup` and the proxies that point at it (cargo, rustc, …), nothing a session installed.
fn copy_rustup_proxies(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::copy(from.join("rustup"), to.join("rustup"))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if std::fs::read_link(entry.path()).is_ok_and(|t| t == Path::new("rustup")) {
            std::os::unix::fs::symlink("rustup", to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// The first Debian mirror this machine's apt uses (deb822 `URIs:` or a one-line `deb` entry).
fn debian_mirror() -> Result<String> {
    let mut texts = Vec::new();
    for path in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        if let Ok(t) = std::fs::read_to_string(path) {
            texts.push(t);
        }
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .find_map(|l| {
            let l = l.trim();
            if let Some(uris) = l.strip_prefix("URIs:") {
                return uris.split_whitespace().next();
            }
            l.strip_prefix("deb ")
                .and_then(|rest| rest.split_whitespace().find(|w| w.contains("://")))
        })
        .map(str::to_string)
        .context("no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list")
}

fn copy_into(root: &Path, path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let dest = root.join(path.strip_prefix("/")?);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&dest);
    run(Command::new("cp").args(["-aL", "-T"]).arg(path).arg(&dest))
}

/// The working tree as git sees it (tracked and new files, uncommitted changes included),
/// without build output.
fn copy_checkout(dest: &Path) -> Result<()> {
    let src = workspace_root();
    std::fs::create_dir_all(dest)?;
    let files = Command::new("git")
        .current_dir(&src)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .context("git ls-files")?;
    if !files.status.success() {
        bail!("git ls-files failed in {}", src.display());
    }
    for name in files.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let rel = Path::new(std::str::from_utf8(name)?);
        let from = src.join(rel);
        if !from.exists() {
            continue; // deleted in the working tree
        }
        let to = dest.join(rel);
        std::fs::create_dir_all(to.parent().expect("a file has a parent"))?;
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// Deletes the root, refusing while anything is mounted below it (never crosses into a bind
/// mount of this machine's files).
fn remove_root(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let prefix = root.to_string_lossy().into_owned();
    if let Some(line) = mounts.lines().find(|l| {
        l.split_whitespace()
            .nth(4)
            .is_some_and(|m| m.starts_with(&prefix))
    }) {
        bail!(
            "{} still has a mount below it ({line}); not deleting it",
            root.display()
        );
    }
    run(Command::new("rm")
        .args(["-rf", "--one-file-system"])
        .arg(root))
}
