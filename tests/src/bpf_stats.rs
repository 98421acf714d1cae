//! What rudder's eBPF programs cost per run: the kernel's BPF statistics (run time and run
//! count per program), switched on for as long as a [`StatsOn`] lives, read for the programs
//! the given daemons hold (summed per program name over those daemons; other rudder daemons on
//! the machine, a soak's say, are not counted).

use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

/// Run-time statistics are collected while this lives (`BPF_ENABLE_STATS`: no sysctl to
/// restore, the kernel stops counting when the last such fd closes).
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

pub fn enable() -> Result<StatsOn> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics (BPF_ENABLE_STATS)")?;
    Ok(StatsOn(fd))
}

/// Accumulated (run time ns, runs) per program name.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(BTreeMap<String, (u64, u64)>);

/// The programs held by the processes `pids` (their BPF program fds).
pub fn snapshot(pids: &[u32]) -> Result<Snapshot> {
    let mut ids = std::collections::HashSet::new();
    for pid in pids {
        ids.extend(program_ids_of(*pid)?);
    }
    let mut by_name = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if !ids.contains(&info.id()) {
            continue;
        }
        let Some(name) = info.name_as_str() else {
            continue;
        };
        let entry: &mut (u64, u64) = by_name.entry(name.to_string()).or_default();
        entry.0 += info.run_time().as_nanos() as u64;
        entry.1 += info.run_count();
    }
    Ok(Snapshot(by_name))
}

impl Snapshot {
    /// Nanoseconds per run of `program` between `earlier` and `self`; NaN if it did not run.
    pub fn ns_per_run_since(&self, earlier: &Snapshot, program: &str) -> f64 {
        let (t1, n1) = self.0.get(program).copied().unwrap_or_default();
        let (t0, n0) = earlier.0.get(program).copied().unwrap_or_default();
        match n1.saturating_sub(n0) {
            0 => f64::NAN,
            runs => t1.saturating_sub(t0) as f64 / runs as f64,
        }
    }

    /// Runs of `program` between `earlier` and `self`.
    pub fn runs_since(&self, earlier: &Snapshot, program: &str) -> u64 {
        let n1 = self.0.get(program).map_or(0, |v| v.1);
        let n0 = earlier.0.get(program).map_or(0, |v| v.1);
        n1.saturating_sub(n0)
    }
}

/// IDs of the BPF programs process `pid` has open (`prog_id:` in its fds' fdinfo).
fn program_ids_of(pid: u32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // An fd closed meanwhile is simply gone.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse::<u32>().ok()),
        );
    }
    Ok(ids)
}
