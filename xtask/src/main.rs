//! Developer tasks: `cargo xtask <command>`.

mod ebpf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "rudder developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the BPF programs (rudder-ebpf) for bpfel-unknown-none and print the object path.
    BuildEbpf(ebpf::BuildEbpfArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(args) => {
            let object = ebpf::build_ebpf(&args)?;
            println!("{}", object.display());
        }
    }
    Ok(())
}
