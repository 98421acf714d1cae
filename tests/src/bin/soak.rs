//! `rudder-soak --minutes N [--dataplane tun|ebpf] [--pause SECS]`: the churn soak
//! ([`rudder_tests::soak`]); prints its table, exits 1 when an invariant broke. Needs root.

use anyhow::{bail, Context, Result};
use rudder_tests::cleanup::install_signal_cleanup;
use rudder_tests::soak::{run_soak, SoakOpts};
use rudder_tests::Cluster;
use std::time::Duration;

fn parse_args() -> Result<SoakOpts> {
    let mut opts = SoakOpts::minutes(2.0);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => {
                let m: f64 = value()?.parse().context("--minutes takes a number")?;
                if !m.is_finite() || m <= 0.0 {
                    bail!("--minutes must be positive");
                }
                opts.duration = Duration::from_secs_f64(m * 60.0);
            }
            "--dataplane" => opts.dataplane = Some(value()?),
            "--pause" => {
                opts.pause =
                    Duration::from_secs_f64(value()?.parse().context("--pause takes seconds")?)
            }
            other => bail!("unknown argument {other:?} (--minutes N, --dataplane D, --pause S)"),
        }
    }
    Ok(opts)
}

fn real_main() -> Result<()> {
    let opts = parse_args()?;
    install_signal_cleanup()?;
    let cluster = Cluster::new()?;
    let report = match run_soak(&cluster, &opts) {
        Ok(r) => r,
        Err(e) => {
            cluster.dump_logs();
            return Err(e);
        }
    };
    println!("{}", report.table());
    if let Err(e) = report.check() {
        cluster.dump_logs();
        return Err(e);
    }
    Ok(())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("soak failed: {e:#}");
        std::process::exit(1);
    }
}
