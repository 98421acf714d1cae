//! `cargo xtask build-ebpf`: builds the BPF object from `rudder-ebpf` on its own, for
//! inspection (`llvm-objdump -d`, `bpftool prog load`) or CI. `cargo build -p rudder`
//! does the same through `rudder/build.rs` (aya-build) and embeds the result.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// Options of `build-ebpf`.
#[derive(Debug, clap::Args)]
pub struct BuildEbpfArgs {
    /// Cargo target directory of the BPF build (default: `<target dir>/bpf`).
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
}

const BPF_TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "rudder-ebpf";

/// Builds `rudder-ebpf` for the BPF target with the stable toolchain and returns the
/// object's path.
pub fn build_ebpf(args: &BuildEbpfArgs) -> anyhow::Result<PathBuf> {
    let workspace = workspace_root();
    let target_dir = match &args.target_dir {
        Some(dir) => dir.clone(),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| workspace.join("target"), PathBuf::from)
            .join("bpf"),
    };
    if which_bpf_linker().is_none() {
        bail!("bpf-linker is not on PATH: install it with `cargo install bpf-linker`");
    }

    // Same flags as aya-build: BTF for CO-RE and the map/program metadata aya reads.
    let mut rustflags = OsString::new();
    for (i, flag) in [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            rustflags.push("\x1f");
        }
        rustflags.push(flag);
    }

    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&workspace)
        .args(["build", "--package", PACKAGE, "--bins", "--release"])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // Stable toolchain: `-Z build-std` needs the bootstrap escape hatch.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .context("failed to run cargo for the BPF build")?;
    if !status.success() {
        bail!("BPF build of {PACKAGE} failed ({status}); see the compiler output above");
    }
    let object = target_dir.join(BPF_TARGET).join("release").join(PACKAGE);
    if !object.is_file() {
        bail!("BPF build succeeded but {} is missing", object.display());
    }
    Ok(object)
}

fn workspace_root() -> PathBuf {
    // xtask lives in <workspace>/xtask.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
