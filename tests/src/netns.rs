//! Network namespaces: create, delete (killing what still runs inside), run code inside one.

use crate::util::{ip, output, run};
use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};
use std::process::Command;

/// Creates the named network namespace (`ip netns add`) and brings its loopback up.
pub fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Whether the named namespace exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Kills every process still running in the namespace (by PID) and deletes it. Errors are
/// reported on stderr, never returned: this runs during teardown.
pub fn delete(name: &str) {
    if !exists(name) {
        return;
    }
    if let Ok(out) = output(Command::new("ip").args(["netns", "pids", name])) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    if let Err(e) = ip(&["netns", "del", name]) {
        eprintln!("teardown: {e:#}");
    }
}

/// A `Command` that runs `program` inside the namespace (`ip netns exec`).
pub fn exec(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// Runs `program args..` inside the namespace; fails unless it exits 0; returns stdout.
pub fn exec_ok(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run(exec(ns, program).args(args))
}

/// Moves the calling thread into the namespace. Only call on a thread you own and throw away.
fn enter(ns: &str) -> Result<()> {
    let path = std::path::Path::new("/run/netns").join(ns);
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    setns(&f, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {ns}"))?;
    Ok(())
}

/// Starts `f` on a new thread that lives inside network namespace `ns` (sockets it opens
/// belong to that namespace).
pub fn spawn_in<T, F>(ns: &str, f: F) -> std::thread::JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
}

/// Runs `f` inside network namespace `ns` on a helper thread and returns its result.
pub fn run_in<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match spawn_in(ns, f).join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}
