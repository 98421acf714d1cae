//! `cargo xtask setup [--check]`: installs what is missing (idempotently, saying each step),
//! then proves every tool works; `--check` only proves.

mod checks;
mod install;

/// Installs what is missing, then runs every check.
pub fn run() -> anyhow::Result<()> {
    install::install()?;
    checks::run_all()?;
    eprintln!("setup: done");
    Ok(())
}

/// Only the checks: nothing is installed; an error when a tool is missing or does not work.
pub fn check() -> anyhow::Result<()> {
    checks::run_all()
}
