//! `cargo xtask bench`: setup, build (rudder in release), run the bench binary of the tests
//! crate with `RUDDER_BIN` pointing at the release daemon.

use crate::util::{build_workspace, cargo, run as run_ok, status, target_dir};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run(args: &[String]) -> Result<i32> {
    crate::setup::run()?;
    build_workspace()?;
    run_ok(cargo().args(["build", "--release", "-p", "rudder"]))?;
    let bin = target_dir().join("release/rudder");
    let bench = target_dir().join("debug/rudder-bench");
    if !bench.is_file() {
        bail!("{} was not built", bench.display());
    }
    status(Command::new(bench).env("RUDDER_BIN", &bin).args(args))
}
