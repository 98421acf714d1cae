//! Developer commands: `cargo xtask setup | fresh-check | build-ebpf | test | demo | bench | soak | fuzz`.
//!
//! Each subcommand lives in its own module; add new ones (e.g. `build-ebpf` in `ebpf.rs`) the
//! same way: a module, a variant of `Cmd`, one arm in `main`.

mod bench;
mod demo;
mod ebpf;
mod fresh_check;
mod fuzz;
mod setup;
mod soak;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "rudder developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (Debian packages, rust-src, bpf-linker), then
    /// prove each tool works; idempotent, installs only what is missing.
    Setup {
        /// Only run the checks (install nothing); exit non-zero when a tool is missing.
        #[arg(long)]
        check: bool,
    },
    /// Prove the set-up works from nothing: a minimal Debian root (debootstrap), this
    /// machine's Rust toolchain, then setup, setup --check and the build inside it. Slow.
    FreshCheck(fresh_check::FreshCheckArgs),
    /// Setup, build the workspace, then `cargo test --workspace` with RUDDER_BIN set.
    /// Extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run the three-host demo (reachability matrix, throughput).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run each cargo-fuzz target (packet rules, config and lease parsing) for a while and
    /// print the execution counts.
    Fuzz(fuzz::FuzzArgs),
    /// Setup, build, then run the data-plane benchmark (route/vxlan/rudder-ebpf/rudder-tun)
    /// and the control-plane benchmark (1k/10k leases); `--only data-plane|control-plane`.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, then the churn soak: 6 hosts, pings and TCP between the three that stay
    /// up while the others restart, leave, join, lose leases, churn containers and etcd
    /// members restart; prints a table. `--minutes N` (default 2), `--dataplane tun|ebpf`.
    Soak {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the BPF programs (rudder-ebpf) for bpfel-unknown-none and print the object path.
    BuildEbpf(ebpf::BuildEbpfArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Setup { check: false } => setup::run().map(|_| 0)?,
        Cmd::Setup { check: true } => setup::check().map(|_| 0)?,
        Cmd::FreshCheck(args) => fresh_check::run_check(&args)?,
        Cmd::Test { args } => test::run(&args)?,
        Cmd::Demo { args } => demo::run(&args)?,
        Cmd::Fuzz(args) => fuzz::run(&args)?,
        Cmd::Bench { args } => bench::run(&args)?,
        Cmd::Soak { args } => soak::run(&args)?,
        Cmd::BuildEbpf(args) => {
            let object = ebpf::build_ebpf(&args)?;
            println!("{}", object.display());
            0
        }
    };
    std::process::exit(code);
}
