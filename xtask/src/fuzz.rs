//! `cargo xtask fuzz`: runs every cargo-fuzz target for a while and prints exec counts.
//!
//! cargo-fuzz needs unstable compiler flags (sanitizers); on the stable toolchain this sets
//! `RUSTC_BOOTSTRAP=1` for those builds only, as the BPF build does.

use crate::util::{cargo, run as run_cmd, succeeds, workspace_root};
use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// The targets in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "packet_rules",
    "packet6_rules",
    "network_config",
    "lease_parsing",
];

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (default: all).
    pub targets: Vec<String>,
}

fn cargo_fuzz() -> Result<()> {
    if succeeds(cargo().args(["fuzz", "--version"])) {
        eprintln!("fuzz: cargo-fuzz present");
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz");
    run_cmd(cargo().args(["install", "cargo-fuzz"]))
}

/// libFuzzer's closing line: `Done 1234567 runs in 60 second(s)`.
pub fn runs_from(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

pub fn run(args: &FuzzArgs) -> Result<i32> {
    cargo_fuzz()?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let mut results = Vec::new();
    for target in targets {
        eprintln!("fuzz: {target} for {} s", args.seconds);
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace_root().join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={}", args.seconds))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{log}");
            bail!("fuzz target {target} failed (crash input saved under fuzz/artifacts/{target})");
        }
        let runs = runs_from(&log).context("libFuzzer printed no `Done N runs` line")?;
        results.push((target, runs));
    }
    println!("{:<16} {:>14} {:>12}", "target", "executions", "per second");
    for (target, runs) in results {
        println!("{target:<16} {runs:>14} {:>12}", runs / args.seconds.max(1));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_closing_line() {
        let log = "#1048576 pulse cov: 10\nDone 2371443 runs in 61 second(s)\n";
        assert_eq!(runs_from(log), Some(2_371_443));
        assert_eq!(runs_from("crashed"), None);
    }
}
