//! A second, single-member etcd in the underlay namespace with flags of the test's choosing
//! (TLS, auth, token TTLs), stoppable and restartable with its data.

use std::fs::File;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cluster::{Cluster, DEFAULT_CONFIG, DEFAULT_PREFIX, UNDERLAY_GW};
use crate::netns;
use crate::process::stop_child;
use crate::util::wait_until;

pub struct ExtraEtcd<'c> {
    cluster: &'c Cluster,
    name: String,
    client_url: String,
    peer_url: String,
    flags: Vec<String>,
    child: Mutex<Option<Child>>,
}

/// The user and password [`ExtraEtcd::enable_auth`] creates for the daemons.
pub const RUDDER_USER: &str = "rudder";
pub const RUDDER_PASSWORD: &str = "s3cret";
const ROOT: &str = "root:rootpw";

impl<'c> ExtraEtcd<'c> {
    /// Starts it on `scheme://<underlay gateway>:port` (peer port + 1) with `flags`. Does not
    /// wait for it to answer (TLS set-ups check that themselves).
    pub fn start(
        cluster: &'c Cluster,
        name: &str,
        scheme: &str,
        port: u16,
        flags: &[String],
    ) -> Result<Self> {
        let etcd = ExtraEtcd {
            cluster,
            name: name.to_string(),
            client_url: format!("{scheme}://{UNDERLAY_GW}:{port}"),
            peer_url: format!("http://127.0.0.1:{}", port + 1),
            flags: flags.to_vec(),
            child: Mutex::new(None),
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    pub fn endpoint(&self) -> &str {
        &self.client_url
    }

    fn spawn(&self) -> Result<()> {
        let c = self.cluster;
        let log = File::options()
            .create(true)
            .append(true)
            .open(c.dir().join(format!("{}.log", self.name)))?;
        let child = netns::exec(c.underlay_ns(), "etcd")
            .args(["--name", &self.name, "--data-dir"])
            .arg(c.dir().join(format!("{}-data", self.name)))
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args([
                "--initial-cluster",
                &format!("{}={}", self.name, self.peer_url),
            ])
            .args(["--log-level", "warn"])
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        c.resources().add_pid(child.id());
        *self.child.lock().unwrap() = Some(child);
        Ok(())
    }

    /// `etcdctl --endpoints=<this> <extra> <args>` in the underlay namespace.
    pub fn etcdctl(&self, extra: &[&str], args: &[&str]) -> Result<String> {
        netns::exec_ok(
            self.cluster.underlay_ns(),
            "etcdctl",
            &[
                &[format!("--endpoints={}", self.client_url).as_str()],
                extra,
                args,
            ]
            .concat(),
        )
    }

    pub fn wait_healthy(&self, extra: &[&str]) -> Result<()> {
        wait_until(
            &format!("etcd {} to answer", self.name),
            Duration::from_secs(30),
            || Ok(self.etcdctl(extra, &["endpoint", "health"]).is_ok()),
        )
    }

    /// Users `root` and [`RUDDER_USER`] (read-write on the default prefix), auth on, and the
    /// default network config written.
    pub fn enable_auth(&self) -> Result<()> {
        let user = format!("{RUDDER_USER}:{RUDDER_PASSWORD}");
        for args in [
            vec!["user", "add", ROOT],
            vec!["user", "add", &user],
            vec!["role", "add", RUDDER_USER],
            vec![
                "role",
                "grant-permission",
                RUDDER_USER,
                "--prefix=true",
                "readwrite",
                "/coreos.com/network/",
            ],
            vec!["user", "grant-role", RUDDER_USER, RUDDER_USER],
            vec!["auth", "enable"],
        ] {
            self.etcdctl(&[], &args)?;
        }
        self.etcdctl(
            &[&format!("--user={ROOT}")],
            &["put", &format!("{DEFAULT_PREFIX}/config"), DEFAULT_CONFIG],
        )?;
        Ok(())
    }

    /// `etcdctl` as root (auth on).
    pub fn etcdctl_root(&self, args: &[&str]) -> Result<String> {
        self.etcdctl(&[&format!("--user={ROOT}")], args)
    }

    /// SIGTERM, then start again with the same data (tokens issued before are gone).
    pub fn restart(&self) -> Result<()> {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            stop_child(&mut child, Duration::from_secs(10))?;
            self.cluster.resources().remove_pid(child.id());
        }
        self.spawn()
    }
}
