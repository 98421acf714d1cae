//! `cargo xtask demo`: setup, build, run the demo binary of the tests crate.

use crate::util::{build_workspace, status, target_dir};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run(args: &[String]) -> Result<i32> {
    crate::setup::run()?;
    let bin = build_workspace()?;
    let demo = target_dir().join("debug/rudder-demo");
    if !demo.is_file() {
        bail!("{} was not built", demo.display());
    }
    status(Command::new(demo).env("RUDDER_BIN", &bin).args(args))
}
