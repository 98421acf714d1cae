//! Real docker daemons on test hosts: Debian's `dockerd` (docker.io 20.10) started inside a host's
//! network namespace with directories of its own, an image made on the spot from busybox-static
//! (no registry is reachable), containers run and exec'd with Debian's `docker` client.
//!
//! dockerd is entered with `nsenter --net=` (not `ip netns exec`, which remounts /sys: the
//! cgroup mounts vanish and dockerd exits "Devices cgroup isn't mounted"). It runs with its own
//! default firewall (iptables on, FORWARD policy DROP once it turns forwarding on).

use crate::cleanup::Resources;
use crate::util::{output, run, wait_until};
use crate::{check, Cluster, Host, HostOpts};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Debian's docker client (a newer one may sit earlier on PATH).
pub const DOCKER: &str = "/usr/bin/docker";
/// The image every test container runs.
pub const IMAGE: &str = "rudder-test/busybox:1";
/// Applets the containers use (linked to busybox in the image).
const APPLETS: &[&str] = &[
    "sh", "ping", "nc", "ip", "sleep", "httpd", "cat", "echo", "ls", "mkdir", "dd", "head",
    "md5sum", "ifconfig", "hostname", "true", "wc", "timeout", "seq", "sed", "tail",
];

/// One dockerd inside a host's network namespace.
pub struct Dockerd {
    netns: String,
    dir: PathBuf,
    args: Vec<String>,
    child: Mutex<Option<Child>>,
    res: Arc<Resources>,
}

impl Dockerd {
    /// Starts dockerd in network namespace `netns` with its state under `dir` and the given
    /// extra flags (e.g. the options `rudder docker-opts` wrote), waits until it answers, and
    /// loads the test image.
    pub fn start(netns: &str, dir: &Path, res: &Arc<Resources>, args: &[String]) -> Result<Self> {
        if !Path::new(DOCKER).is_file() || crate::util::which("dockerd").is_none() {
            bail!("{DOCKER} or dockerd not found: install docker.io (cargo xtask setup does)");
        }
        std::fs::create_dir_all(dir)?;
        let d = Dockerd {
            netns: netns.to_string(),
            dir: dir.to_path_buf(),
            args: args.to_vec(),
            child: Mutex::new(None),
            res: res.clone(),
        };
        d.spawn()?;
        d.load_image()?;
        Ok(d)
    }

    fn spawn(&self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("dockerd")
            .arg("--data-root")
            .arg(self.dir.join("root"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            // vfs: no overlay mounts left behind if a test dies mid-way.
            .args(["--storage-driver", "vfs"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (install docker.io)")?;
        self.res.add_pid(child.id());
        *self.child.lock().unwrap() = Some(child);
        wait_until("dockerd to answer", Duration::from_secs(60), || {
            if let Some(child) = self.child.lock().unwrap().as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(crate::util::Abort(format!(
                        "dockerd exited ({status}): {}",
                        self.log_tail()
                    ))
                    .into());
                }
            }
            Ok(self
                .docker(&["version", "--format", "{{.Server.Version}}"])
                .is_ok())
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs the docker client against this daemon; stdout on success.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        run(Command::new(DOCKER)
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args))
    }

    /// The busybox image, built from Debian's static busybox and imported.
    fn load_image(&self) -> Result<()> {
        if self.docker(&["image", "inspect", IMAGE]).is_ok() {
            return Ok(());
        }
        let rootfs = self.dir.join("image-rootfs");
        let _ = std::fs::remove_dir_all(&rootfs);
        for sub in ["bin", "tmp", "www", "etc", "proc", "sys", "dev"] {
            std::fs::create_dir_all(rootfs.join(sub))?;
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .context("copying /bin/busybox (install busybox-static)")?;
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = Command::new(DOCKER)
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["import", "-", IMAGE])
            .stdin(tar.stdout.context("tar stdout")?)
            .output()?;
        if !out.status.success() {
            bail!("docker import: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// `docker run -d` of the test image with `extra` flags before the image and `cmd` after.
    /// Returns the container id.
    pub fn run_container(&self, name: &str, extra: &[&str], cmd: &[&str]) -> Result<String> {
        let mut args = vec!["run", "-d", "--name", name];
        args.extend(extra);
        args.push(IMAGE);
        args.extend(cmd);
        Ok(self.docker(&args)?.trim().to_string())
    }

    /// A long-running container that serves `/www` over HTTP on port 80 (busybox httpd).
    pub fn run_server(&self, name: &str, extra: &[&str]) -> Result<String> {
        self.run_container(name, extra, &["httpd", "-f", "-p", "80", "-h", "/www"])
    }

    /// The container's address on docker's default bridge network.
    pub fn container_ip(&self, name: &str) -> Result<Ipv4Addr> {
        let text = self.docker(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            name,
        ])?;
        text.trim()
            .parse()
            .with_context(|| format!("container {name} has no address: {text:?}"))
    }

    /// The container's network namespace as a named one (`ip netns attach`), so the harness's
    /// traffic helpers (TCP with content check, UDP, ping) run from inside the container.
    /// `ns` must carry the cluster's prefix (it is deleted with the cluster).
    pub fn endpoint(&self, container: &str, ns: &str) -> Result<crate::Endpoint> {
        let pid = self.docker(&["inspect", "--format", "{{.State.Pid}}", container])?;
        let pid = pid.trim();
        self.res.add_netns(ns);
        run(Command::new("ip").args(["netns", "attach", ns, pid]))?;
        Ok(crate::Endpoint {
            ns: ns.to_string(),
            ip: self.container_ip(container)?,
        })
    }

    /// Replaces dockerd's flags (used at the next [`Dockerd::restart`]).
    pub fn set_args(&mut self, args: &[String]) {
        self.args = args.to_vec();
    }

    /// `docker exec` in a container; stdout on success.
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend(cmd);
        self.docker(&args)
    }

    /// Like [`Dockerd::exec`] but returns the output whatever the exit status.
    pub fn exec_output(&self, name: &str, cmd: &[&str]) -> Result<std::process::Output> {
        output(
            Command::new(DOCKER)
                .arg("-H")
                .arg(format!("unix://{}", self.socket().display()))
                .arg("exec")
                .arg(name)
                .args(cmd),
        )
    }

    /// Writes `bytes` of pseudo-random content to `/www/<file>` in the container and returns
    /// its md5 as busybox prints it.
    pub fn make_file(&self, name: &str, file: &str, bytes: usize) -> Result<String> {
        let path = format!("/www/{file}");
        self.exec(
            name,
            &[
                "sh",
                "-c",
                &format!(
                    "dd if=/dev/urandom of={path} bs=1024 count={} 2>/dev/null",
                    bytes / 1024
                ),
            ],
        )?;
        let sum = self.exec(name, &["md5sum", &path])?;
        Ok(sum
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// Fetches `http://<ip>:<port>/<file>` from inside container `from` with busybox nc (its
    /// wget crashes in such images) and returns the md5 of the body.
    pub fn fetch_md5(&self, from: &str, ip: Ipv4Addr, port: u16, file: &str) -> Result<String> {
        let out = self.exec(from, &["sh", "-c", &fetch_md5_script(ip, port, file)])?;
        Ok(out
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// Pings `to` from container `from`: true if `count` replies came back.
    pub fn ping(&self, from: &str, to: Ipv4Addr, count: u32) -> Result<bool> {
        let out = self.exec_output(
            from,
            &["ping", "-c", &count.to_string(), "-W", "2", &to.to_string()],
        )?;
        Ok(out.status.success())
    }

    /// Stops dockerd (SIGTERM; it stops its containers) and waits for it.
    pub fn stop(&self) -> Result<()> {
        let Some(mut child) = self.child.lock().unwrap().take() else {
            return Ok(());
        };
        let pid = child.id();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.res.remove_pid(pid);
        Ok(())
    }

    /// Starts dockerd again with the same flags (containers with a restart policy come back).
    pub fn restart(&self) -> Result<Duration> {
        let start = Instant::now();
        self.stop()?;
        self.spawn()?;
        Ok(start.elapsed())
    }

    /// Removes every container and stops dockerd.
    pub fn shutdown(&self) {
        if self.child.lock().unwrap().is_some() {
            if let Ok(ids) = self.docker(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = self.docker(&args);
                }
            }
        }
        let _ = self.stop();
    }
}

/// A test host as a docker user has it: rudder plus a dockerd started with its options.
pub struct DockerHost {
    pub host: Host,
    pub dockerd: Dockerd,
}

/// A host as a docker user has it: docker first (forwarding off until docker turns it on,
/// hence FORWARD policy DROP), then rudder, then docker restarted with rudder's options.
/// `opts.ip_masq` picks who masquerades (rudder, else docker); the bridge is docker's.
pub fn docker_host(c: &Cluster, opts: HostOpts) -> Result<DockerHost> {
    let rudder_masq = opts.ip_masq;
    let host = c.add_host_without_daemon(HostOpts {
        external_bridge: true,
        ..opts
    })?;
    crate::netns::run_in(host.netns(), || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "0\n").context("ip_forward off")
    })?;
    let mut dockerd = Dockerd::start(
        host.netns(),
        &c.dir().join(format!("{}-docker", host.name())),
        c.resources(),
        &[],
    )?;
    let forward = crate::netns::exec_ok(host.netns(), "iptables", &["-S", "FORWARD"])?;
    check!(
        forward.contains("-P FORWARD DROP"),
        "docker did not set FORWARD policy DROP:\n{forward}"
    );

    host.start()?;
    host.wait_ready(Duration::from_secs(60))?;
    let opts_file = c.dir().join(format!("{}-docker_opts.env", host.name()));
    let out = output(
        std::process::Command::new(crate::util::rudder_bin())
            .arg("docker-opts")
            .arg("--subnet-file")
            .arg(host.subnet_file())
            .arg("--output")
            .arg(&opts_file),
    )?;
    check!(out.status.success(), "rudder docker-opts failed: {out:?}");
    let opts = std::fs::read_to_string(&opts_file)?;
    let combined = opts
        .lines()
        .find_map(|l| l.strip_prefix("DOCKER_OPTS="))
        .context("no DOCKER_OPTS line")?
        .trim_matches('"');
    let args: Vec<String> = combined.split_whitespace().map(String::from).collect();
    check!(
        args.contains(&format!(
            "--bip={}/{}",
            host.gateway_ip(),
            host.subnet().prefix_len()
        )),
        "docker-opts: {args:?}"
    );
    check!(
        args.contains(&"--ip-masq=false".to_string()) == rudder_masq,
        "docker-opts masquerade flag: {args:?}"
    );
    dockerd.set_args(&args);
    dockerd.restart()?;
    let forward = crate::netns::exec_ok(host.netns(), "iptables", &["-S", "FORWARD"])?;
    check!(
        forward.contains("-P FORWARD DROP"),
        "a docker restart set the policy back (the test would be friendlier than a real host):\n{forward}"
    );
    Ok(DockerHost { host, dockerd })
}

/// A busybox shell script: HTTP/1.0 GET with nc, the body's md5 (`md5sum` output).
pub fn fetch_md5_script(ip: Ipv4Addr, port: u16, file: &str) -> String {
    format!(
        "printf 'GET /{file} HTTP/1.0\\r\\n\\r\\n' | timeout 20 nc {ip} {port} > /tmp/resp-$$ \
         && n=$(sed -n '/^\\r$/=' /tmp/resp-$$ | head -n 1) && tail -n +$((n+1)) /tmp/resp-$$ | md5sum \
         ; rm -f /tmp/resp-$$"
    )
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.shutdown();
    }
}
