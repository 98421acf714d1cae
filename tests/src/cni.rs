//! CNI: rudder's CNI plugin (`rudder-cni`, installed as `rudder`) driven the way a runtime
//! drives it (CNI_* variables, config on stdin, inside the host's network namespace), with
//! Debian's reference plugins (`containernetworking-plugins`: bridge, host-local, portmap) as
//! its delegates, and a small conflist runner doing what libcni does for a chain.

use crate::host::Host;
use crate::util::{output, run, workspace_root};
use crate::Endpoint;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's containernetworking-plugins puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The plugin binary under test: `$RUDDER_CNI_BIN`, else `rudder-cni` beside the daemon
/// binary, else `$CARGO_TARGET_DIR/debug/rudder-cni`, else `<workspace>/target/debug/rudder-cni`.
pub fn cni_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RUDDER_CNI_BIN") {
        return PathBuf::from(p);
    }
    if let Some(dir) = crate::util::rudder_bin().parent() {
        let p = dir.join("rudder-cni");
        if p.exists() {
            return p;
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let p = PathBuf::from(t).join("debug/rudder-cni");
        if p.exists() {
            return p;
        }
    }
    workspace_root().join("target/debug/rudder-cni")
}

/// The conflist the README shows (`dist/cni/10-rudder.conflist`).
pub fn shipped_conflist() -> Result<Value> {
    let p = workspace_root().join("dist/cni/10-rudder.conflist");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// A plugin directory as `/opt/cni/bin` would be on a host: `rudder` (the plugin under test)
/// and links to the reference plugins.
pub fn plugin_dir(dir: &Path) -> Result<PathBuf> {
    let bin = cni_bin();
    if !bin.is_file() {
        bail!(
            "{} not found: build it (cargo build -p rudder-cni) or set RUDDER_CNI_BIN",
            bin.display()
        );
    }
    if !Path::new(REFERENCE_PLUGINS).join("bridge").is_file() {
        bail!("{REFERENCE_PLUGINS}/bridge not found: install containernetworking-plugins");
    }
    let d = dir.join("cni-bin");
    std::fs::create_dir_all(&d)?;
    let _ = std::fs::remove_file(d.join("rudder"));
    std::fs::copy(&bin, d.join("rudder"))?;
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        let link = d.join(p);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new(REFERENCE_PLUGINS).join(p), link)?;
        }
    }
    Ok(d)
}

/// One CNI host: a rudder host, its plugin directory, and per-host state directories (the
/// hosts of a test share one file system, so the plugin's `dataDir` and host-local's are set
/// per host; on a real host the defaults do).
pub struct CniHost {
    pub host: Host,
    pub bin_dir: PathBuf,
    pub state: PathBuf,
}

/// What one plugin invocation returned.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "plugin stdout is not JSON: {:?} (stderr {:?})",
                self.stdout, self.stderr
            )
        })
    }

    /// The spec's error JSON: fails unless the plugin failed with `code` and a message.
    pub fn expect_error(&self, code: u64) -> Result<Value> {
        if self.success {
            bail!(
                "expected error {code}, the plugin succeeded: {}",
                self.stdout
            );
        }
        let v = self.json()?;
        if v["code"].as_u64() != Some(code) || !v["msg"].is_string() || !v["cniVersion"].is_string()
        {
            bail!("expected an error JSON with code {code}, got {v}");
        }
        Ok(v)
    }

    pub fn expect_ok(&self) -> Result<()> {
        if !self.success {
            bail!("plugin failed: {} {}", self.stdout, self.stderr);
        }
        Ok(())
    }
}

/// A container's network namespace made for a CNI attachment: `<host ns>-<suffix>`.
pub struct Sandbox {
    pub ns: String,
    pub id: String,
}

impl Sandbox {
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.ns)
    }
}

impl CniHost {
    pub fn new(host: Host, dir: &Path) -> Result<CniHost> {
        let state = dir.join(format!("{}-cni", host.name()));
        std::fs::create_dir_all(&state)?;
        let bin_dir = plugin_dir(&state)?;
        Ok(CniHost {
            host,
            bin_dir,
            state,
        })
    }

    /// The plugin's own config (one entry of a conflist, or a .conf) for this host.
    pub fn net_conf(&self, version: &str) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": format!("rudder-{}", self.host.name()),
            "type": "rudder",
            "delegate": { "isDefaultGateway": true },
        });
        self.localize(&mut c);
        c
    }

    /// The fields that differ per test host: the host's subnet file, the plugin's dataDir and
    /// host-local's dataDir.
    pub fn localize(&self, plugin: &mut Value) {
        plugin["subnetFile"] = json!(self.host.subnet_file());
        plugin["dataDir"] = json!(self.state.join("rudder-data"));
        plugin["ipam"] = json!({ "dataDir": self.state.join("ipam") });
    }

    /// The shipped conflist, localized for this host.
    pub fn conflist(&self) -> Result<Value> {
        let mut list = shipped_conflist()?;
        list["name"] = json!(format!("rudder-{}", self.host.name()));
        for p in list["plugins"].as_array_mut().context("plugins")? {
            if p["type"] == "rudder" {
                self.localize(p);
            }
        }
        Ok(list)
    }

    /// A new namespace for a container, removed with the cluster.
    pub fn sandbox(&self, res: &crate::cleanup::Resources, suffix: &str) -> Result<Sandbox> {
        let ns = format!("{}-{suffix}", self.host.netns());
        res.add_netns(&ns);
        crate::netns::create(&ns)?;
        Ok(Sandbox {
            ns,
            id: format!("ctr-{suffix}-{}", crate::util::rand_suffix(8)),
        })
    }

    /// Runs `plugin` from this host's plugin directory as a runtime does: in the host's network
    /// namespace, `command` and the attachment's variables in the environment, `conf` on stdin.
    /// `env` adds or overrides variables (a value of "" removes one).
    pub fn invoke(
        &self,
        plugin: &str,
        command: &str,
        conf: &[u8],
        sandbox: Option<&Sandbox>,
        env: &[(&str, &str)],
    ) -> Result<Outcome> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.host.netns()))
            .arg(self.bin_dir.join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(s) = sandbox {
            cmd.env("CNI_CONTAINERID", &s.id).env("CNI_NETNS", s.path());
        }
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().context("running the CNI plugin")?;
        child.stdin.take().context("stdin")?.write_all(conf)?;
        let out = child.wait_with_output()?;
        Ok(Outcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Invokes the rudder plugin with a JSON config.
    pub fn rudder(&self, command: &str, conf: &Value, sandbox: &Sandbox) -> Result<Outcome> {
        self.invoke(
            "rudder",
            command,
            conf.to_string().as_bytes(),
            Some(sandbox),
            &[],
        )
    }

    /// ADD of a conflist, as libcni runs it: each plugin in order, with the list's cniVersion
    /// and name, the previous plugin's result as `prevResult`, and `runtimeConfig` for the
    /// capabilities it declares (`portMappings`). Returns the final result.
    pub fn add_list(&self, list: &Value, sandbox: &Sandbox, runtime: &Value) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for p in list["plugins"].as_array().context("plugins")? {
            let conf = chain_entry(list, p, prev.as_ref(), runtime);
            let t = p["type"].as_str().context("type")?;
            let out = self.invoke(t, "ADD", conf.to_string().as_bytes(), Some(sandbox), &[])?;
            if !out.success {
                bail!("{t} ADD failed: {} {}", out.stdout, out.stderr);
            }
            prev = Some(out.json()?);
        }
        prev.context("empty conflist")
    }

    /// CHECK or DEL of a conflist (DEL in reverse order), with the cached ADD result.
    pub fn run_list(
        &self,
        command: &str,
        list: &Value,
        sandbox: &Sandbox,
        runtime: &Value,
        result: &Value,
    ) -> Result<()> {
        let mut plugins: Vec<&Value> = list["plugins"]
            .as_array()
            .context("plugins")?
            .iter()
            .collect();
        if command == "DEL" {
            plugins.reverse();
        }
        for p in plugins {
            let conf = chain_entry(list, p, Some(result), runtime);
            let t = p["type"].as_str().context("type")?;
            self.invoke(t, command, conf.to_string().as_bytes(), Some(sandbox), &[])?
                .expect_ok()
                .with_context(|| format!("{t} {command}"))?;
        }
        Ok(())
    }
}

/// One plugin's config in a chain, as libcni builds it.
pub fn chain_entry(list: &Value, plugin: &Value, prev: Option<&Value>, runtime: &Value) -> Value {
    let mut conf = plugin.clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    if let Some(caps) = plugin["capabilities"].as_object() {
        let mut rc = serde_json::Map::new();
        for (cap, on) in caps {
            if on == &json!(true) && !runtime[cap].is_null() {
                rc.insert(cap.clone(), runtime[cap].clone());
            }
        }
        if !rc.is_empty() {
            conf["runtimeConfig"] = Value::Object(rc);
        }
    }
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    conf
}

/// The container's IPv4 address in an ADD result (`ips[0].address`).
pub fn result_ip(result: &Value) -> Result<(Ipv4Addr, u8)> {
    let addr = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("no ips in result {result}"))?;
    let (ip, len) = addr.split_once('/').context("address without prefix")?;
    Ok((ip.parse()?, len.parse()?))
}

/// The container as a traffic endpoint.
pub fn endpoint(sandbox: &Sandbox, result: &Value) -> Result<Endpoint> {
    Ok(Endpoint {
        ns: sandbox.ns.clone(),
        ip: result_ip(result)?.0,
    })
}

/// `ip <args>` inside the sandbox.
pub fn sandbox_ip(sandbox: &Sandbox, args: &[&str]) -> Result<String> {
    let mut a = vec!["-n", sandbox.ns.as_str()];
    a.extend(args);
    run(Command::new("ip").args(&a))
}

/// Whether the sandbox still has interface `ifname`.
pub fn has_link(sandbox: &Sandbox, ifname: &str) -> bool {
    output(Command::new("ip").args(["-n", &sandbox.ns, "link", "show", ifname]))
        .is_ok_and(|o| o.status.success())
}
