//! A real runtime driving rudder's CNI plugin: Debian's containerd (1.6) started inside a
//! host's network namespace with directories of its own, and its `ctr` client running
//! containers with `--cni` from a rootfs made on the spot from busybox-static (no registry is
//! reachable).
//!
//! containerd is entered with `nsenter --net=` (not `ip netns exec`, which remounts /sys and
//! loses the cgroup mounts). `ctr run --cni` runs the CNI plugins itself, from the fixed
//! places libcni's defaults name (`/etc/cni/net.d`, `/opt/cni/bin`): it runs in a private mount
//! namespace where overlays put this host's conflist and plugin directory there, so nothing
//! changes on the machine's own file system.

use crate::cleanup::Resources;
use crate::util::{run, wait_until};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Applets the container uses (linked to busybox in the rootfs).
const APPLETS: &[&str] = &["sh", "httpd", "sleep", "ip", "cat", "echo", "ping"];

/// One containerd inside a host's network namespace.
pub struct Containerd {
    netns: String,
    dir: PathBuf,
    child: Option<Child>,
    res: Arc<Resources>,
}

/// A container `ctr run` keeps in the foreground (it runs the CNI DEL when the task ends).
pub struct CtrContainer {
    pub id: String,
    ctr: Child,
    log: PathBuf,
}

impl Containerd {
    pub fn start(netns: &str, dir: &Path, res: &Arc<Resources>) -> Result<Containerd> {
        if crate::util::which("containerd").is_none() || crate::util::which("ctr").is_none() {
            bail!("containerd or ctr not found: install containerd (cargo xtask setup does)");
        }
        std::fs::create_dir_all(dir)?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = dir.join("containerd.sock").display(),
                opt = dir.join("opt").display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        res.add_pid(child.id());
        let mut d = Containerd {
            netns: netns.to_string(),
            dir: dir.to_path_buf(),
            child: Some(child),
            res: res.clone(),
        };
        wait_until("containerd to answer", Duration::from_secs(30), || {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(crate::util::Abort(format!(
                    "containerd exited ({status}): {}",
                    d.log_tail()
                ))
                .into());
            }
            Ok(d.ctr(&["version"]).is_ok())
        })?;
        Ok(d)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// The ctr client against this containerd (from the root namespace: it only talks to the
    /// socket); stdout on success.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(args))
    }

    /// A busybox rootfs with `/www/index.html` = `page`.
    pub fn rootfs(&self, name: &str, page: &str) -> Result<PathBuf> {
        let rootfs = self.dir.join(format!("rootfs-{name}"));
        for sub in ["bin", "tmp", "www", "etc", "proc", "sys", "dev", "run"] {
            std::fs::create_dir_all(rootfs.join(sub))?;
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .context("copying /bin/busybox (install busybox-static)")?;
        for applet in APPLETS {
            let link = rootfs.join("bin").join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", link)?;
            }
        }
        std::fs::write(rootfs.join("www/index.html"), page)?;
        Ok(rootfs)
    }

    /// `ctr run --cni --rm --rootfs` in the host's network namespace, with `cni_conf_dir` and
    /// `cni_bin_dir` overlaid on `/etc/cni/net.d` and `/opt/cni/bin` in a private mount
    /// namespace. ctr stays in the foreground until the task ends (then runs the CNI DEL).
    pub fn run_cni(
        &self,
        id: &str,
        rootfs: &Path,
        cni_conf_dir: &Path,
        cni_bin_dir: &Path,
        cmd: &[&str],
    ) -> Result<CtrContainer> {
        let ov = self.dir.join(format!("overlay-{id}"));
        let mut script = String::from("set -e\n");
        for (lower, target, content) in [
            ("/etc", "/etc/cni/net.d", cni_conf_dir),
            ("/opt", "/opt/cni/bin", cni_bin_dir),
        ] {
            let name = lower.trim_start_matches('/');
            let (up, work) = (
                ov.join(format!("{name}-up")),
                ov.join(format!("{name}-work")),
            );
            std::fs::create_dir_all(&work)?;
            std::fs::create_dir_all(up.join(target.trim_start_matches(&format!("{lower}/"))))?;
            script.push_str(&format!(
                "mount -t overlay overlay -o lowerdir={lower},upperdir={},workdir={} {lower}\n\
                 mount --bind {} {target}\n",
                up.display(),
                work.display(),
                content.display()
            ));
        }
        script.push_str(&format!(
            "exec nsenter --net=/run/netns/{} ctr --address {} run --cni --rm --rootfs {} {id}",
            self.netns,
            self.socket().display(),
            rootfs.display()
        ));
        for a in cmd {
            script.push_str(&format!(" '{a}'"));
        }
        let log = self.dir.join(format!("ctr-{id}.log"));
        let f = std::fs::File::create(&log)?;
        let ctr = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .context("running ctr")?;
        self.res.add_pid(ctr.id());
        let mut c = CtrContainer {
            id: id.to_string(),
            ctr,
            log,
        };
        wait_until(
            &format!("container {id} running"),
            Duration::from_secs(60),
            || {
                if let Some(status) = c.ctr.try_wait()? {
                    return Err(crate::util::Abort(format!(
                        "ctr run exited ({status}): {}",
                        c.log_text()
                    ))
                    .into());
                }
                Ok(self
                    .ctr(&["task", "ls"])?
                    .lines()
                    .any(|l| l.starts_with(id) && l.contains("RUNNING")))
            },
        )?;
        Ok(c)
    }

    /// The task's PID (to name its network namespace).
    pub fn task_pid(&self, id: &str) -> Result<u32> {
        let ls = self.ctr(&["task", "ls"])?;
        let line = ls
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .with_context(|| format!("no task {id}: {ls}"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("task ls without a PID")?
            .parse()?)
    }

    /// Kills the task and waits for `ctr run` to end (it runs the CNI DEL and removes the
    /// container); returns ctr's output.
    pub fn stop_container(&self, mut c: CtrContainer) -> Result<String> {
        self.ctr(&["task", "kill", "-s", "SIGKILL", &c.id])?;
        let start = Instant::now();
        loop {
            if let Some(status) = c.ctr.try_wait()? {
                self.res.remove_pid(c.ctr.id());
                let text = c.log_text();
                if !status.success() && !text.is_empty() && !text.contains("exit") {
                    bail!("ctr run ended with {status}: {text}");
                }
                return Ok(text);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "ctr run did not end after its task was killed: {}",
                    c.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            self.res.remove_pid(pid);
        }
    }
}

impl CtrContainer {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(tasks) = self.ctr(&["task", "ls", "-q"]) {
            for id in tasks.split_whitespace() {
                let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        if let Ok(ids) = self.ctr(&["container", "ls", "-q"]) {
            for id in ids.split_whitespace() {
                let _ = self.ctr(&["task", "delete", "-f", id]);
                let _ = self.ctr(&["container", "rm", id]);
            }
        }
        self.stop();
    }
}
