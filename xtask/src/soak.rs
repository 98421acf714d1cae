//! `cargo xtask soak [--minutes N] [--dataplane tun|ebpf] [--pause S]`: setup, build, then the
//! churn soak (`rudder-soak` of the tests crate) against the built daemon; prints its table.

use crate::util::{build_workspace, status, target_dir};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run(args: &[String]) -> Result<i32> {
    crate::setup::run()?;
    let bin = build_workspace()?;
    let soak = target_dir().join("debug/rudder-soak");
    if !soak.is_file() {
        bail!("{} was not built", soak.display());
    }
    status(Command::new(soak).env("RUDDER_BIN", &bin).args(args))
}
