//! Builds the BPF programs (`rudder-ebpf`) for the BPF target and leaves the object in
//! `OUT_DIR/rudder-ebpf`, which `dataplane::ebpf` embeds with `include_bytes_aligned!`.
//! Needs `bpf-linker` on PATH and the stable toolchain's `rust-src`.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../rudder-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("rudder-ebpf path is not UTF-8")?
        .to_owned();
    // Stable toolchain: aya-build passes `-Z build-std=core` only when this is set, and the
    // nested cargo inherits it. It affects that BPF build only, not this crate.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "rudder-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
    .context("building the BPF programs failed: is bpf-linker installed (`cargo install bpf-linker`) and rust-src present (`rustup component add rust-src`)?")
}
