//! The generated delegate config, saved per attachment under `dataDir` at ADD so that DEL (and
//! CHECK, GC) use exactly what ADD used, even after the subnet file changed or vanished.

use crate::error::{self, CniError, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub delegate: Map<String, Value>,
}

fn io_err(what: String, e: std::io::Error) -> CniError {
    CniError::new(error::IO_FAILURE, what).details(e.to_string())
}

pub fn path(data_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    data_dir.join(format!("{container_id}-{ifname}.json"))
}

pub fn save(data_dir: &Path, a: &Attachment) -> Result<()> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| io_err(format!("cannot create dataDir {}", data_dir.display()), e))?;
    let p = path(data_dir, &a.container_id, &a.ifname);
    let body = json!({
        "network": a.network,
        "containerID": a.container_id,
        "ifName": a.ifname,
        "delegate": a.delegate,
    });
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&body).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, &p))
        .map_err(|e| io_err(format!("cannot save {}", p.display()), e))
}

fn parse(p: &Path, bytes: &[u8]) -> Result<Attachment> {
    let bad = || {
        CniError::new(
            error::DECODE_FAILURE,
            format!("saved attachment {} is malformed", p.display()),
        )
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|_| bad())?;
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(bad)
    };
    Ok(Attachment {
        network: s("network")?,
        container_id: s("containerID")?,
        ifname: s("ifName")?,
        delegate: v
            .get("delegate")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(bad)?,
    })
}

/// The saved attachment, or None if there is none.
pub fn load(data_dir: &Path, container_id: &str, ifname: &str) -> Result<Option<Attachment>> {
    let p = path(data_dir, container_id, ifname);
    match std::fs::read(&p) {
        Ok(bytes) => parse(&p, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("cannot read {}", p.display()), e)),
    }
}

pub fn remove(data_dir: &Path, container_id: &str, ifname: &str) -> Result<()> {
    let p = path(data_dir, container_id, ifname);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("cannot remove {}", p.display()), e)),
    }
}

/// Every attachment saved in `data_dir` (unreadable files are skipped).
pub fn list(data_dir: &Path) -> Vec<Attachment> {
    let Ok(rd) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| std::fs::read(&p).ok().and_then(|b| parse(&p, &b).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert_eq!(load(&data, "c1", "eth0").unwrap(), None);
        let a = Attachment {
            network: "n".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            delegate: json!({"type": "bridge"}).as_object().cloned().unwrap(),
        };
        save(&data, &a).unwrap();
        assert_eq!(load(&data, "c1", "eth0").unwrap(), Some(a.clone()));
        assert_eq!(list(&data), vec![a]);
        remove(&data, "c1", "eth0").unwrap();
        remove(&data, "c1", "eth0").unwrap();
        assert!(list(&data).is_empty());
    }
}
