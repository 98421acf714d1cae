//! `cargo xtask bench [--only data-plane|control-plane]`: setup, build (rudder in release),
//! run the bench binaries of the tests crate (`rudder-bench`, then `rudder-cpbench`) with
//! `RUDDER_BIN` pointing at the release daemon. `--peers`, `--dataplanes`, `--changes` and `--join` go
//! to the control-plane bench, the other flags to the data-plane bench; with both, `--json F`
//! writes F and `F.control-plane.json`.

use crate::util::{build_workspace, cargo, run as run_ok, status, target_dir};
use anyhow::{bail, Result};
use std::process::Command;

const CONTROL_PLANE_FLAGS: [&str; 4] = ["--peers", "--dataplanes", "--changes", "--join"];

pub fn run(args: &[String]) -> Result<i32> {
    let (mut data, mut control, mut only, mut json) = (vec![], vec![], None, None);
    let mut it = args.iter().cloned();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => only = it.next(),
            "--json" => json = it.next(),
            f if CONTROL_PLANE_FLAGS.contains(&f) => {
                control.extend([a].into_iter().chain(it.next()))
            }
            // The data-plane bench's flags and their values.
            _ => data.push(a),
        }
    }
    let (run_data, run_control) = match only.as_deref() {
        None => (true, true),
        Some("data-plane") => (true, false),
        Some("control-plane") => (false, true),
        Some(other) => bail!("--only takes data-plane or control-plane, not {other:?}"),
    };
    if let Some(f) = &json {
        data.extend(["--json".into(), f.clone()]);
        let cp = if run_data {
            format!("{f}.control-plane.json")
        } else {
            f.clone()
        };
        control.extend(["--json".into(), cp]);
    }

    crate::setup::run()?;
    build_workspace()?;
    run_ok(cargo().args(["build", "--release", "-p", "rudder"]))?;
    let bin = target_dir().join("release/rudder");
    let mut code = 0;
    for (wanted, name, args) in [
        (run_data, "rudder-bench", &data),
        (run_control, "rudder-cpbench", &control),
    ] {
        if !wanted {
            continue;
        }
        let bench = target_dir().join("debug").join(name);
        if !bench.is_file() {
            bail!("{} was not built", bench.display());
        }
        code = code.max(status(
            Command::new(bench).env("RUDDER_BIN", &bin).args(args),
        )?);
    }
    Ok(code)
}
