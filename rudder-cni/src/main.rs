//! `rudder` CNI plugin (built as `rudder-cni`, installed as `/opt/cni/bin/rudder`): reads
//! rudder's subnet file and delegates to the reference `bridge` plugin with `host-local` IPAM
//! over the host's subnet, the way flannel's CNI plugin does with flannel's file.
//!
//! Spec 1.0.0 (configs of 0.3.0, 0.3.1, 0.4.0 and 1.1.0 accepted): ADD, DEL, CHECK, VERSION,
//! and STATUS and GC of spec 1.1. Errors are the spec's error JSON on stdout, exit status 1.

mod config;
mod error;
mod store;
mod subnet_env;

use config::{check_plugin_name, NetConf, SUPPORTED_VERSIONS};
use error::{CniError, Result};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use store::Attachment;
use subnet_env::SubnetEnv;

/// The runtime's CNI_* variables.
#[derive(Debug, Default)]
struct Env {
    command: String,
    container_id: String,
    netns: String,
    ifname: String,
    path: Vec<PathBuf>,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

impl Env {
    fn from_process() -> Env {
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            path: std::env::split_paths(&var("CNI_PATH"))
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
        }
    }

    /// The variables an attachment command (ADD, DEL, CHECK) needs; CNI_NETNS only where
    /// the spec requires it (DEL may come without one).
    fn require(&self, netns: bool) -> Result<()> {
        let bad = |msg: String| Err(CniError::new(error::INVALID_ENV, msg));
        let id = &self.container_id;
        if id.is_empty() {
            return bad("CNI_CONTAINERID is not set".into());
        }
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return bad(format!(
                "CNI_CONTAINERID {id:?} has characters other than alphanumerics, '_', '.', '-'"
            ));
        }
        let ifn = &self.ifname;
        if ifn.is_empty() {
            return bad("CNI_IFNAME is not set".into());
        }
        if ifn.len() > 15
            || ifn == "."
            || ifn == ".."
            || ifn.contains(['/', ':'])
            || ifn.contains(char::is_whitespace)
        {
            return bad(format!("CNI_IFNAME {ifn:?} is not a valid interface name"));
        }
        if netns && self.netns.is_empty() {
            return bad("CNI_NETNS is not set".into());
        }
        if self.path.is_empty() {
            return bad("CNI_PATH is not set: cannot find the delegate plugins".into());
        }
        Ok(())
    }

    fn find_plugin(&self, name: &str) -> Result<PathBuf> {
        check_plugin_name(name)?;
        self.path
            .iter()
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::new(
                    error::INVALID_CONFIG,
                    format!("delegate plugin {name:?} not found in CNI_PATH"),
                )
                .details(format!(
                    "searched {}",
                    std::env::join_paths(&self.path)
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ))
            })
    }
}

/// Runs the delegate named by `delegate.type` with `command` and the attachment's variables;
/// its stdout on success, its own error (passed on with the plugin named) on failure.
fn exec_delegate(
    env: &Env,
    command: &str,
    container_id: &str,
    ifname: &str,
    netns: &str,
    delegate: &Map<String, Value>,
) -> Result<Vec<u8>> {
    let t = delegate
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| CniError::new(error::INVALID_CONFIG, "delegate has no type"))?;
    let plugin = env.find_plugin(t)?;
    let mut cmd = Command::new(&plugin);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_IFNAME", ifname)
        .env(
            "CNI_PATH",
            std::env::join_paths(&env.path).unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if netns.is_empty() {
        cmd.env_remove("CNI_NETNS");
    } else {
        cmd.env("CNI_NETNS", netns);
    }
    let mut child = cmd.spawn().map_err(|e| {
        CniError::new(
            error::IO_FAILURE,
            format!("cannot run delegate {}", plugin.display()),
        )
        .details(e.to_string())
    })?;
    let input = serde_json::to_vec(delegate).unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that exits without reading its stdin is judged by its exit status.
        let _ = stdin.write_all(&input);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(
            error::IO_FAILURE,
            format!("delegate {} failed", plugin.display()),
        )
        .details(e.to_string())
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(Value::as_u64)
        .map_or(error::IO_FAILURE, |c| c as u32);
    let msg = parsed
        .as_ref()
        .and_then(|v| v.get("msg"))
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| format!("exited with {}", out.status));
    let details = match &parsed {
        Some(v) => v
            .get("details")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        None => String::from_utf8_lossy(&out.stdout).trim().to_string(),
    };
    Err(CniError::new(code, format!("delegate {t} {command}: {msg}")).details(details))
}

fn attachment(conf: &NetConf, env: &Env, delegate: Map<String, Value>) -> Attachment {
    Attachment {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        delegate,
    }
}

fn with_prev_result(mut delegate: Map<String, Value>, conf: &NetConf) -> Map<String, Value> {
    if let Some(prev) = conf.raw.get("prevResult") {
        delegate.insert("prevResult".into(), prev.clone());
    }
    delegate
}

fn cmd_add(conf: &NetConf, env: &Env) -> Result<Option<Vec<u8>>> {
    env.require(true)?;
    let subnet = SubnetEnv::load(&conf.subnet_file)?;
    let a = attachment(conf, env, conf.delegate(&subnet)?);
    // Saved before the delegate runs: a DEL after a half-done ADD cleans up what it left.
    store::save(&conf.data_dir, &a)?;
    match exec_delegate(
        env,
        "ADD",
        &a.container_id,
        &a.ifname,
        &env.netns,
        &a.delegate,
    ) {
        Ok(out) => Ok(Some(out)),
        Err(e) => {
            let _ = exec_delegate(
                env,
                "DEL",
                &a.container_id,
                &a.ifname,
                &env.netns,
                &a.delegate,
            );
            let _ = store::remove(&conf.data_dir, &a.container_id, &a.ifname);
            Err(e)
        }
    }
}

fn cmd_del(conf: &NetConf, env: &Env) -> Result<Option<Vec<u8>>> {
    env.require(false)?;
    let delegate = match store::load(&conf.data_dir, &env.container_id, &env.ifname)? {
        Some(a) => a.delegate,
        // Nothing saved (dataDir lost, or never added): DEL what the current subnet file
        // would have made, if there is one; otherwise there is nothing to release.
        None => match SubnetEnv::load(&conf.subnet_file) {
            Ok(subnet) => conf.delegate(&subnet)?,
            Err(_) => return Ok(None),
        },
    };
    let delegate = with_prev_result(delegate, conf);
    exec_delegate(
        env,
        "DEL",
        &env.container_id,
        &env.ifname,
        &env.netns,
        &delegate,
    )?;
    store::remove(&conf.data_dir, &env.container_id, &env.ifname)?;
    Ok(None)
}

fn cmd_check(conf: &NetConf, env: &Env) -> Result<Option<Vec<u8>>> {
    if !conf.version_at_least("0.4.0") {
        return Err(CniError::new(
            error::INCOMPATIBLE_VERSION,
            format!("CHECK is not defined for CNI version {}", conf.cni_version),
        ));
    }
    env.require(true)?;
    let a = store::load(&conf.data_dir, &env.container_id, &env.ifname)?.ok_or_else(|| {
        CniError::new(
            error::UNKNOWN_CONTAINER,
            format!(
                "no attachment of container {} interface {} to network {}",
                env.container_id, env.ifname, conf.name
            ),
        )
    })?;
    if !conf.raw.contains_key("prevResult") {
        return Err(CniError::new(
            error::INVALID_CONFIG,
            "CHECK without prevResult",
        ));
    }
    let delegate = with_prev_result(a.delegate, conf);
    exec_delegate(
        env,
        "CHECK",
        &env.container_id,
        &env.ifname,
        &env.netns,
        &delegate,
    )?;
    Ok(None)
}

fn cmd_status(conf: &NetConf) -> Result<Option<Vec<u8>>> {
    SubnetEnv::load(&conf.subnet_file).map_err(|e| CniError {
        code: error::NOT_AVAILABLE,
        ..e
    })?;
    Ok(None)
}

/// GC (spec 1.1): every attachment saved for this network and not in
/// `cni.dev/valid-attachments` is deleted through its delegate.
fn cmd_gc(conf: &NetConf, env: &Env) -> Result<Option<Vec<u8>>> {
    let valid: Vec<(String, String)> = conf
        .raw
        .get("cni.dev/valid-attachments")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|v| {
                    Some((
                        v.get("containerID")?.as_str()?.to_string(),
                        v.get("ifname")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut last = Ok(None);
    for a in store::list(&conf.data_dir) {
        if a.network != conf.name || valid.contains(&(a.container_id.clone(), a.ifname.clone())) {
            continue;
        }
        match exec_delegate(env, "DEL", &a.container_id, &a.ifname, "", &a.delegate) {
            Ok(_) => {
                let _ = store::remove(&conf.data_dir, &a.container_id, &a.ifname);
            }
            Err(e) => last = Err(e),
        }
    }
    last
}

fn version_json() -> Value {
    json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS })
}

/// Runs one invocation; `(cniVersion for an error, outcome)`.
fn run(env: &Env, stdin: &[u8]) -> (String, Result<Option<Vec<u8>>>) {
    if env.command == "VERSION" {
        return (
            "1.0.0".into(),
            Ok(Some(version_json().to_string().into_bytes())),
        );
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return ("1.0.0".into(), Err(e)),
    };
    let out = match env.command.as_str() {
        "ADD" => cmd_add(&conf, env),
        "DEL" => cmd_del(&conf, env),
        "CHECK" => cmd_check(&conf, env),
        "STATUS" | "GC" if !conf.version_at_least("1.1.0") => Err(CniError::new(
            error::INCOMPATIBLE_VERSION,
            format!(
                "{} needs CNI version 1.1.0, the config has {}",
                env.command, conf.cni_version
            ),
        )),
        "STATUS" => cmd_status(&conf),
        "GC" => {
            if env.path.is_empty() {
                Err(CniError::new(error::INVALID_ENV, "CNI_PATH is not set"))
            } else {
                cmd_gc(&conf, env)
            }
        }
        "" => Err(CniError::new(error::INVALID_ENV, "CNI_COMMAND is not set")),
        other => Err(CniError::new(
            error::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    };
    (conf.cni_version, out)
}

fn main() {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    if env.command != "VERSION" {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = CniError::new(error::IO_FAILURE, "cannot read stdin").details(e.to_string());
            println!("{}", err.to_json("1.0.0"));
            std::process::exit(1);
        }
    }
    let (version, out) = run(&env, &stdin);
    let mut stdout = std::io::stdout().lock();
    match out {
        Ok(Some(bytes)) => {
            let _ = stdout.write_all(&bytes);
            let _ = stdout.flush();
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&version));
            let _ = stdout.flush();
            drop(stdout);
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "c1".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            path: vec![PathBuf::from("/nonexistent")],
        }
    }

    #[test]
    fn version_needs_no_config() {
        let (_, out) = run(&env("VERSION"), b"");
        let v: Value = serde_json::from_slice(&out.unwrap().unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("0.3.1")));
    }

    #[test]
    fn environment_errors() {
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"rudder"}"#;
        let code = |e: Env| run(&e, conf).1.unwrap_err().code;
        assert_eq!(code(env("")), error::INVALID_ENV);
        assert_eq!(code(env("FROB")), error::INVALID_ENV);
        assert_eq!(
            code(Env {
                container_id: String::new(),
                ..env("ADD")
            }),
            error::INVALID_ENV
        );
        assert_eq!(
            code(Env {
                container_id: "../x".into(),
                ..env("ADD")
            }),
            error::INVALID_ENV
        );
        assert_eq!(
            code(Env {
                ifname: "a/b".into(),
                ..env("ADD")
            }),
            error::INVALID_ENV
        );
        assert_eq!(
            code(Env {
                netns: String::new(),
                ..env("ADD")
            }),
            error::INVALID_ENV
        );
        assert_eq!(
            code(Env {
                path: vec![],
                ..env("ADD")
            }),
            error::INVALID_ENV
        );
        assert_eq!(code(env("STATUS")), error::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn subnet_file_and_delegate_errors_and_idempotent_del() {
        let dir = tempfile::tempdir().unwrap();
        let sf = dir.path().join("subnet.env");
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"rudder","subnetFile":"{}","dataDir":"{}"}}"#,
            sf.display(),
            dir.path().join("data").display()
        );
        let e = run(&env("ADD"), conf.as_bytes()).1.unwrap_err();
        assert_eq!(e.code, error::TRY_AGAIN_LATER, "{e}");
        assert_eq!(
            run(&env("STATUS"), conf.as_bytes()).1.unwrap_err().code,
            error::NOT_AVAILABLE
        );
        // DEL with nothing saved and no subnet file: nothing to release.
        assert_eq!(run(&env("DEL"), conf.as_bytes()).1.unwrap(), None);
        std::fs::write(
            &sf,
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        assert_eq!(run(&env("STATUS"), conf.as_bytes()).1.unwrap(), None);
        let e = run(&env("ADD"), conf.as_bytes()).1.unwrap_err();
        assert_eq!(e.code, error::INVALID_CONFIG);
        assert!(e.msg.contains("\"bridge\" not found"), "{e}");
        // The failed ADD left nothing saved.
        assert!(store::list(&dir.path().join("data")).is_empty());
    }

    #[test]
    fn error_json_has_the_spec_fields() {
        let v = CniError::new(7, "m").details("d").to_json("0.4.0");
        assert_eq!(
            v,
            json!({"cniVersion":"0.4.0","code":7,"msg":"m","details":"d"})
        );
    }
}

#[cfg(test)]
mod delegate_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in `bridge` that logs its command and container, and answers ADD with a result.
    fn fake_bridge(dir: &std::path::Path) -> PathBuf {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let p = bin.join("bridge");
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\ncat > {log}/stdin-$CNI_COMMAND-$CNI_CONTAINERID\n\
                 echo \"$CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME\" >> {log}/calls\n\
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.1.0\",\"ips\":[]}}'\n\
                 exit 0\n",
                log = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn add_saves_del_uses_the_saved_config_and_gc_deletes_the_stale() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_bridge(dir.path());
        let sf = dir.path().join("subnet.env");
        std::fs::write(
            &sf,
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let data = dir.path().join("data");
        let conf = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"rudder","subnetFile":"{}","dataDir":"{}"}}"#,
            sf.display(),
            data.display()
        );
        let env = |cmd: &str, id: &str| Env {
            command: cmd.into(),
            container_id: id.into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            path: vec![bin.clone()],
        };
        for id in ["a", "b", "c"] {
            let out = run(&env("ADD", id), conf.as_bytes()).1.unwrap().unwrap();
            assert!(String::from_utf8_lossy(&out).contains("\"ips\""));
        }
        let sent: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("stdin-ADD-a")).unwrap())
                .unwrap();
        assert_eq!(sent["mtu"], 1472);
        assert_eq!(sent["ipMasq"], false);
        assert_eq!(store::list(&data).len(), 3);

        // The subnet file changes: DEL of "a" still sends what ADD used.
        std::fs::write(
            &sf,
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.99.1/24\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        run(&env("DEL", "a"), conf.as_bytes()).1.unwrap();
        let sent: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("stdin-DEL-a")).unwrap())
                .unwrap();
        assert_eq!(sent["mtu"], 1472);
        assert_eq!(sent["ipam"]["ranges"][0][0]["subnet"], "10.1.74.0/24");

        // GC keeps the valid attachment "b", deletes the stale "c".
        let gc = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"rudder","dataDir":"{}",
                "cni.dev/valid-attachments":[{{"containerID":"b","ifname":"eth0"}}]}}"#,
            data.display()
        );
        run(&env("GC", ""), gc.as_bytes()).1.unwrap();
        let left: Vec<String> = store::list(&data)
            .into_iter()
            .map(|a| a.container_id)
            .collect();
        assert_eq!(left, vec!["b".to_string()]);
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert!(
            calls.contains("DEL c eth0") && !calls.contains("DEL b"),
            "{calls}"
        );
    }
}
