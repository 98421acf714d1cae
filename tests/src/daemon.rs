//! A host's daemon process: starting it in the host namespace, waiting until it is ready,
//! stopping, killing and restarting it.

use std::fs::File;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crate::host::Host;
use crate::process::{cpu_time_of, stop_child};
use crate::util::wait_until;

/// How long `add_host` and `restart` wait for a daemon to become ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Host {
    /// PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.0.daemon.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// Whether the daemon process is still running (reaps it if it exited).
    pub fn is_running(&self) -> bool {
        match self.0.daemon.lock().unwrap().as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the daemon (`ip netns exec <ns> rudder run ...`), logging to [`Host::log_path`].
    /// Does not wait; see [`Host::wait_ready`].
    pub fn start(&self) -> Result<()> {
        let mut guard = self.0.daemon.lock().unwrap();
        if let Some(c) = guard.as_mut() {
            if c.try_wait()?.is_none() {
                bail!("daemon of {} is already running", self.0.name);
            }
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.0.log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0.ns])
            .args(&self.0.command_prefix);
        if self.0.flanneld_style.load(Ordering::SeqCst) {
            let (argv, env) = self.flanneld_command_line();
            cmd.arg(self.flanneld_symlink()?).args(argv).envs(env);
        } else {
            cmd.arg(&self.0.bin).args(&self.0.args);
        }
        cmd.envs(self.0.extra_env.lock().unwrap().iter().cloned())
            .env_remove("RUDDER_BIN")
            .env_remove("RUDDER_TEST_DATAPLANE")
            .env_remove("RUDDER_TEST_SHOW_LOGS")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting rudder in {}", self.0.ns))?;
        self.0.res.add_pid(child.id());
        *guard = Some(child);
        Ok(())
    }

    /// From the next start on, start the daemon as a flanneld unit would: through a symlink
    /// named `flanneld`, with [`Host::flanneld_command_line`]'s argv and environment.
    pub fn set_flanneld_style(&self, on: bool) {
        self.0.flanneld_style.store(on, Ordering::SeqCst);
    }

    /// Environment variables added to the daemon's from the next start on.
    pub fn set_env(&self, env: &[(&str, &str)]) {
        *self.0.extra_env.lock().unwrap() = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// The flanneld-style argv (after the program name) and environment for this host's
    /// arguments: see [`crate::flanneld::flanneld_command_line`].
    pub fn flanneld_command_line(&self) -> (Vec<String>, Vec<(String, String)>) {
        crate::flanneld::flanneld_command_line(&self.0.args)
    }

    /// `<host dir>/bin/flanneld`, a symlink to the daemon binary.
    pub fn flanneld_symlink(&self) -> Result<PathBuf> {
        let dir = self.0.log.with_file_name("bin");
        std::fs::create_dir_all(&dir)?;
        let link = dir.join("flanneld");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&self.0.bin, &link).with_context(|| {
                format!("linking {} to {}", link.display(), self.0.bin.display())
            })?;
        }
        Ok(link)
    }

    /// Waits for the subnet file and `/readyz` 200, then (unless the bridge is external) makes
    /// sure the container namespace exists and is attached to the daemon's bridge.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        wait_until(
            &format!("{} to write its subnet file and be ready", self.0.name),
            timeout,
            || {
                self.check_alive()?;
                let Some(env) = self.read_subnet_file()? else {
                    return Ok(false);
                };
                let (code, body) = self.http_get("/readyz")?;
                if code != 200 {
                    bail!("/readyz answered {code}: {}", body.trim());
                }
                *self.0.subnet.lock().unwrap() = Some(env);
                Ok(true)
            },
        )
        .map_err(|e| anyhow!("{e:#}\nlog of {}:\n{}", self.0.name, self.log()))?;
        if self.0.external_bridge {
            return Ok(());
        }
        self.ensure_container()
    }

    /// Fails if the daemon has exited (with its exit status).
    /// The error is an [`Abort`](crate::util::Abort), so a [`wait_until`] using this stops.
    pub fn check_alive(&self) -> Result<()> {
        use crate::util::Abort;
        match self.0.daemon.lock().unwrap().as_mut() {
            None => Err(Abort(format!("daemon of {} is not running", self.0.name)).into()),
            Some(c) => match c.try_wait()? {
                None => Ok(()),
                Some(st) => Err(Abort(format!("daemon of {} exited: {st}", self.0.name)).into()),
            },
        }
    }

    /// Stops the daemon with SIGTERM and waits (up to 10 s) for it to exit.
    pub fn stop(&self) -> Result<ExitStatus> {
        let mut child = self
            .0
            .daemon
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| anyhow!("daemon of {} is not running", self.0.name))?;
        let r = stop_child(&mut child, Duration::from_secs(10));
        self.0.res.remove_pid(child.id());
        r
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill9(&self) -> Result<()> {
        let mut child = self
            .0
            .daemon
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| anyhow!("daemon of {} is not running", self.0.name))?;
        child.kill()?;
        child.wait()?;
        self.0.res.remove_pid(child.id());
        Ok(())
    }

    /// Starts the daemon again (stopping it first with SIGTERM if it runs) with the same
    /// arguments and subnet file, and waits until it is ready.
    pub fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        self.start()?;
        self.wait_ready(READY_TIMEOUT)
    }

    /// CPU time (user + system) the daemon has used so far, from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("daemon of {} is not running", self.0.name))?;
        cpu_time_of(pid)
    }
}
