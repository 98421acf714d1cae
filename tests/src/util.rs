//! Small helpers: running commands, waiting for conditions, locating the daemon binary,
//! checking prerequisites.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// An error that ends a [`wait_until`] at once instead of being retried (e.g. the daemon
/// exited: waiting longer cannot help).
#[derive(Debug)]
pub struct Abort(pub String);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Abort {}

/// Polls `cond` until it returns `Ok(true)` or `timeout` passes; an [`Abort`] error (anywhere
/// in the chain) ends the wait at once. The poll interval starts at
/// 50 ms and grows to 500 ms. On timeout the error names `what` and the last error returned by
/// `cond` (if any), so a failing wait says why.
pub fn wait_until<F>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let start = Instant::now();
    let mut interval = Duration::from_millis(50);
    let mut last_err: Option<anyhow::Error>;
    loop {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => last_err = None,
            Err(e) if e.chain().any(|c| c.is::<Abort>()) => {
                return Err(e.context(format!("gave up waiting for {what}")))
            }
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            return Err(match last_err {
                Some(e) => {
                    anyhow!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(500));
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; fails (with its stderr) unless it exits 0. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command to completion and returns its output whatever the exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))
}

/// `ip <args>` in the root namespace's view (used only with `-n <ns>` or `netns ...`).
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// A random lowercase hex string of `len` characters.
pub fn rand_suffix(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap())
        .collect()
}

/// The workspace root, found from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

/// The rudder binary under test: `$RUDDER_BIN`, else `$CARGO_TARGET_DIR/debug/rudder` when
/// that exists, else `<workspace>/target/debug/rudder`.
pub fn rudder_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RUDDER_BIN") {
        return PathBuf::from(p);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let p = PathBuf::from(t).join("debug/rudder");
        if p.exists() {
            return p;
        }
    }
    workspace_root().join("target/debug/rudder")
}

/// The data plane the tests ask for: `$RUDDER_TEST_DATAPLANE`, default `tun`.
pub fn test_dataplane() -> String {
    std::env::var("RUDDER_TEST_DATAPLANE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tun".to_string())
}

/// Finds `tool` on `$PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Fails with a message saying exactly what is missing: root, or one of `tools`.
/// Tests never skip silently; `cargo xtask setup` installs the tools.
pub fn require(tools: &[&str]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("end-to-end tests need root (network namespaces, veth, bridges); run them as root, e.g. `sudo -E cargo xtask test`");
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools on PATH: {}; run `cargo xtask setup` to install them",
            missing.join(", ")
        );
    }
    if !Path::new("/run/netns").exists() {
        std::fs::create_dir_all("/run/netns").context("creating /run/netns")?;
    }
    Ok(())
}

/// Like [`require`], plus the rudder binary must exist.
pub fn require_daemon(tools: &[&str]) -> Result<PathBuf> {
    require(tools)?;
    let bin = rudder_bin();
    if !bin.is_file() {
        bail!(
            "rudder binary not found at {} (set RUDDER_BIN or run `cargo build -p rudder`; `cargo xtask test` does both)",
            bin.display()
        );
    }
    Ok(bin)
}

/// One line describing the machine, printed with benchmark figures: CPUs, CPU model, kernel.
pub fn machine() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("nproc {nproc}, CPU {cpu}, kernel {}", kernel.trim())
}

/// The `p`-th percentile of `v` (nearest rank below; NaN when empty): `p` 50 is the median.
pub fn percentile(v: &[f64], p: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[(s.len() * p / 100).min(s.len() - 1)]
}
