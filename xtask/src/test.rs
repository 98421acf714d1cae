//! `cargo xtask test`: setup, build, then the whole workspace's tests against the built daemon.

use crate::util::{build_workspace, cargo, status};
use anyhow::Result;

pub fn run(args: &[String]) -> Result<i32> {
    crate::setup::run()?;
    let bin = build_workspace()?;
    eprintln!("xtask: RUDDER_BIN={}", bin.display());
    status(
        cargo()
            .env("RUDDER_BIN", &bin)
            .args(["test", "--workspace"])
            .args(args),
    )
}
