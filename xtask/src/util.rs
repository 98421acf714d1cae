//! Shared bits: workspace paths, running commands with echo.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The cargo that runs us (`$CARGO`), else `cargo`.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints the command, runs it with inherited stdio, returns its exit code.
pub fn status(cmd: &mut Command) -> Result<i32> {
    eprintln!("xtask: $ {}", describe(cmd));
    let st = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    Ok(st.code().unwrap_or(1))
}

/// Like [`status`] but fails unless the command exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let code = status(cmd)?;
    if code != 0 {
        bail!("`{}` failed with exit code {code}", describe(cmd));
    }
    Ok(())
}

/// Runs quietly; true if it exited 0.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .stdin(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs quietly; stdout if it exited 0.
pub fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo build --workspace`, then the path of the built daemon.
pub fn build_workspace() -> Result<PathBuf> {
    run(cargo().args(["build", "--workspace"]))?;
    let bin = target_dir().join("debug/rudder");
    if !bin.is_file() {
        bail!("build finished but {} does not exist", bin.display());
    }
    // The CNI plugin the CNI tests install as `rudder` (found beside the daemon binary).
    let cni = target_dir().join("debug/rudder-cni");
    if !cni.is_file() {
        bail!("build finished but {} does not exist", cni.display());
    }
    Ok(bin)
}
