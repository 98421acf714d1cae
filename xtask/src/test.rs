//! `cargo xtask test`: setup, build, then the whole workspace's tests against the built daemon.
//!
//! Without extra arguments it runs the workspace's tests (end-to-end tests on the TUN data
//! plane), then the end-to-end tests once more with every host on the eBPF data plane, so
//! both data planes pass the same scenarios. With arguments, one `cargo test` with them.

use crate::util::{build_workspace, cargo, status};
use anyhow::Result;

/// The data plane the end-to-end harness gives hosts that do not choose one.
const DATAPLANE_ENV: &str = "RUDDER_TEST_DATAPLANE";

pub fn run(args: &[String]) -> Result<i32> {
    crate::setup::run()?;
    let bin = build_workspace()?;
    eprintln!("xtask: RUDDER_BIN={}", bin.display());
    let code = status(
        cargo()
            .env("RUDDER_BIN", &bin)
            .args(["test", "--workspace"])
            .args(args),
    )?;
    if code != 0 || !args.is_empty() || std::env::var_os(DATAPLANE_ENV).is_some() {
        return Ok(code);
    }
    eprintln!("xtask: end-to-end tests again with {DATAPLANE_ENV}=ebpf");
    status(
        cargo()
            .env("RUDDER_BIN", &bin)
            .env(DATAPLANE_ENV, "ebpf")
            .args(["test", "-p", "rudder-tests", "--tests"]),
    )
}
