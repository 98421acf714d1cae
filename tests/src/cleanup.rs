//! Process-wide registry of what the harness created, so that everything can be removed even
//! on Ctrl-C (demo) and so that namespaces left by a killed test run are found and removed.
//!
//! Namespace names are `rte-<owner pid>-<random>-<role>`: when the owner process is gone,
//! its namespaces are stale and any later run removes them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Prefix of every namespace the harness creates.
pub const NS_PREFIX: &str = "rte-";

/// Things one cluster created, in creation order.
#[derive(Default, Debug)]
pub struct Resources {
    inner: Mutex<Vec<Resource>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Resource {
    Pid(i32),
    Netns(String),
    /// A bpffs the harness mounted (the daemons' pin directory).
    Mount(std::path::PathBuf),
}

static REGISTRY: Mutex<Vec<Arc<Resources>>> = Mutex::new(Vec::new());

impl Resources {
    /// A new, registered, empty set.
    pub fn new() -> Arc<Self> {
        let r = Arc::new(Self::default());
        REGISTRY.lock().unwrap().push(r.clone());
        r
    }

    pub fn add_pid(&self, pid: u32) {
        self.inner.lock().unwrap().push(Resource::Pid(pid as i32));
    }

    pub fn remove_pid(&self, pid: u32) {
        self.inner
            .lock()
            .unwrap()
            .retain(|r| *r != Resource::Pid(pid as i32));
    }

    pub fn add_netns(&self, name: &str) {
        self.inner
            .lock()
            .unwrap()
            .push(Resource::Netns(name.to_string()));
    }

    pub fn add_mount(&self, path: &std::path::Path) {
        self.inner
            .lock()
            .unwrap()
            .push(Resource::Mount(path.to_path_buf()));
    }

    /// Kills remaining processes (SIGTERM, then SIGKILL after `grace`), deletes namespaces in
    /// reverse creation order, and unregisters this set.
    pub fn teardown(self: &Arc<Self>, grace: Duration) {
        let items: Vec<Resource> = std::mem::take(&mut *self.inner.lock().unwrap());
        let pids: Vec<i32> = items
            .iter()
            .filter_map(|r| match r {
                Resource::Pid(p) => Some(*p),
                _ => None,
            })
            .collect();
        kill_all(&pids, grace);
        for r in items.iter().rev() {
            match r {
                Resource::Netns(n) => crate::netns::delete(n),
                Resource::Mount(path) => {
                    let _ = std::process::Command::new("umount")
                        .arg("-l")
                        .arg(path)
                        .status();
                }
                Resource::Pid(_) => {}
            }
        }
        REGISTRY.lock().unwrap().retain(|r| !Arc::ptr_eq(r, self));
    }
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}

/// SIGTERM to each PID, wait up to `grace` for all to exit, SIGKILL the rest.
pub fn kill_all(pids: &[i32], grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for &p in pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
    }
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &p in pids {
        if alive(p) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// Tears down every registered cluster (used by the Ctrl-C handler).
pub fn teardown_all() {
    let all: Vec<Arc<Resources>> = REGISTRY.lock().unwrap().clone();
    for r in all {
        r.teardown(Duration::from_secs(3));
    }
}

/// Removes namespaces left behind by harness processes that no longer exist (a test run that
/// was killed before its `Drop` ran). Namespaces of live processes are never touched.
pub fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{owner}")).exists() {
            eprintln!("removing stale namespace {name} (owner process {owner} is gone)");
            crate::netns::delete(&name);
        }
    }
}

/// On SIGINT/SIGTERM a thread tears everything down and exits with status 130. Call first
/// thing in `main`. A handler, not a blocked signal mask: children inherit a mask across exec
/// (a daemon with SIGTERM blocked never stops gracefully), while handlers are reset.
pub fn install_signal_cleanup() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    use std::io::{Read, Write};
    let (mut received, notify) = std::os::unix::net::UnixStream::pair()?;
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let notify = notify.try_clone()?;
        // SAFETY: the action only calls write(2), which is async-signal-safe.
        unsafe {
            signal_hook_registry::register(sig as i32, move || {
                let _ = (&notify).write(&[sig as i32 as u8]);
            })
        }?;
    }
    std::thread::spawn(move || {
        let mut sig = [0u8];
        if received.read_exact(&mut sig).is_ok() {
            let name = Signal::try_from(i32::from(sig[0])).map_or("a signal", |s| s.as_str());
            eprintln!("\n{name} received: cleaning up namespaces and processes...");
            teardown_all();
            std::process::exit(130);
        }
    });
    Ok(())
}
