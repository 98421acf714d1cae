//! Processes: stopping a child (SIGTERM, then SIGKILL), and what `/proc` says about one
//! (CPU time, peak RSS).

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

/// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if let Some(st) = child.try_wait()? {
        return Ok(st);
    }
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let st = child.wait()?;
    bail!("process {pid} did not exit within {grace:?} of SIGTERM; killed ({st})")
}

/// CPU time (user + system) of a process, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat: {stat}"))?
        .1;
    // After the command: field 3 (state) is index 0, so utime (14) is index 11, stime 12.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    clock_ticks(ticks)
}

/// A count of clock ticks (the unit of `/proc/<pid>/stat` and `/proc/stat`) as a duration.
pub fn clock_ticks(ticks: u64) -> Result<Duration> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// Peak resident set size (`VmHWM`) of a process in KiB, from `/proc/<pid>/status`.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))
}
