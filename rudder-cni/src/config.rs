//! The plugin's network config and the delegate config it generates (flannel's semantics).

use crate::error::{self, CniError, Result};
use crate::subnet_env::SubnetEnv;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

pub const DEFAULT_SUBNET_FILE: &str = "/run/rudder/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/rudder";

/// Versions of the spec this plugin speaks (and accepts in configs).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// `"a.b.c"` as a comparable triple.
pub fn version_tuple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next().unwrap_or(Some(0))?);
    it.next().is_none().then_some(t)
}

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    /// The whole config as received (delegate, ipam, runtimeConfig, prevResult, …).
    pub raw: Map<String, Value>,
}

fn str_field<'a>(raw: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CniError::new(
            error::INVALID_CONFIG,
            format!("network config field {key:?} must be a string, not {other}"),
        )),
    }
}

fn object_field<'a>(
    raw: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(CniError::new(
            error::INVALID_CONFIG,
            format!("network config field {key:?} must be an object, not {other}"),
        )),
    }
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                error::DECODE_FAILURE,
                "cannot decode the network config on stdin",
            )
            .details(e.to_string())
        })?;
        let Value::Object(raw) = value else {
            return Err(CniError::new(
                error::DECODE_FAILURE,
                "the network config on stdin is not a JSON object",
            ));
        };
        let cni_version = str_field(&raw, "cniVersion")?
            .ok_or_else(|| {
                CniError::new(error::INVALID_CONFIG, "network config has no cniVersion")
            })?
            .to_string();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                error::INCOMPATIBLE_VERSION,
                format!("incompatible CNI version {cni_version:?}"),
            )
            .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        let name = str_field(&raw, "name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| CniError::new(error::INVALID_CONFIG, "network config has no name"))?
            .to_string();
        let subnet_file = str_field(&raw, "subnetFile")?
            .unwrap_or(DEFAULT_SUBNET_FILE)
            .into();
        let data_dir = str_field(&raw, "dataDir")?
            .unwrap_or(DEFAULT_DATA_DIR)
            .into();
        object_field(&raw, "delegate")?;
        object_field(&raw, "ipam")?;
        if let Some(d) = object_field(&raw, "delegate")? {
            let t = str_field(d, "type")?;
            if let Some(t) = t {
                check_plugin_name(t)?;
            }
        }
        Ok(NetConf {
            cni_version,
            name,
            subnet_file,
            data_dir,
            raw,
        })
    }

    pub fn version_at_least(&self, v: &str) -> bool {
        version_tuple(&self.cni_version) >= version_tuple(v)
    }

    /// The delegate's config: the `delegate` block with flannel's defaults filled in (type
    /// `bridge`, `ipMasq` = not the file's IPMASQ, `mtu` = the overlay MTU, `isGateway` for
    /// bridge), our `name` and `cniVersion`, and host-local IPAM over the host's subnet with a
    /// route to the whole network (top-level `ipam`, then `delegate.ipam`, override its keys).
    pub fn delegate(&self, env: &SubnetEnv) -> Result<Map<String, Value>> {
        let mut d = object_field(&self.raw, "delegate")?
            .cloned()
            .unwrap_or_default();
        d.entry("type").or_insert_with(|| json!("bridge"));
        d.entry("ipMasq").or_insert_with(|| json!(!env.ipmasq));
        d.entry("mtu").or_insert_with(|| json!(env.mtu));
        if d.get("type") == Some(&json!("bridge")) {
            d.entry("isGateway").or_insert_with(|| json!(true));
        }
        d.insert("name".into(), json!(self.name));
        d.insert("cniVersion".into(), json!(self.cni_version));

        let mut ranges = vec![json!([{ "subnet": env.subnet.network().to_string() }])];
        // The gateway is given (bridge's default gateway is the same address): bridge
        // 1.1.1's CHECK does not match a route without one against the one it installed.
        let mut routes =
            vec![json!({ "dst": env.network.to_string(), "gw": env.subnet.addr.to_string() })];
        // IPv6 on: a second range set gives each container an address of each family.
        if let Some((network6, subnet6)) = env.ipv6 {
            ranges.push(json!([{ "subnet": subnet6.network().to_string() }]));
            routes.push(json!({ "dst": network6.to_string(), "gw": subnet6.addr.to_string() }));
        }
        let mut ipam = json!({
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
        })
        .as_object()
        .cloned()
        .unwrap_or_default();
        for over in [object_field(&self.raw, "ipam")?, object_field(&d, "ipam")?]
            .into_iter()
            .flatten()
        {
            for (k, v) in over {
                ipam.insert(k.clone(), v.clone());
            }
        }
        d.insert("ipam".into(), Value::Object(ipam));
        for key in ["runtimeConfig", "args"] {
            if let Some(v) = self.raw.get(key) {
                d.entry(key).or_insert_with(|| v.clone());
            }
        }
        Ok(d)
    }
}

/// A delegate's `type` names a file in CNI_PATH: a plain file name, nothing else.
pub fn check_plugin_name(t: &str) -> Result<()> {
    if t.is_empty() || t.contains('/') || t == "." || t == ".." {
        return Err(CniError::new(
            error::INVALID_CONFIG,
            format!("invalid delegate plugin type {t:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(ipmasq: bool) -> SubnetEnv {
        SubnetEnv::parse(&format!(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ={ipmasq}\n"
        ))
        .unwrap()
    }

    #[test]
    fn flannel_defaults() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"rudder","type":"rudder"}"#).unwrap();
        assert_eq!(conf.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        let d = Value::Object(conf.delegate(&env(true)).unwrap());
        assert_eq!(
            d,
            json!({
                "cniVersion": "1.0.0",
                "name": "rudder",
                "type": "bridge",
                "ipMasq": false,
                "mtu": 1472,
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.1.74.0/24"}]],
                    "routes": [{"dst": "10.1.0.0/16", "gw": "10.1.74.1"}],
                },
            })
        );
        let d = conf.delegate(&env(false)).unwrap();
        assert_eq!(d["ipMasq"], json!(true));
    }

    #[test]
    fn ipv6_subnet_adds_a_second_range_and_route() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"rudder","type":"rudder"}"#).unwrap();
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:22::1/64\n\
             FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let d = conf.delegate(&env).unwrap();
        assert_eq!(
            d["ipam"],
            json!({
                "type": "host-local",
                "ranges": [[{"subnet": "10.1.74.0/24"}], [{"subnet": "fc00:0:0:22::/64"}]],
                "routes": [
                    {"dst": "10.1.0.0/16", "gw": "10.1.74.1"},
                    {"dst": "fc00::/48", "gw": "fc00:0:0:22::1"},
                ],
            })
        );
    }

    #[test]
    fn the_delegate_block_overrides_and_picks_another_plugin() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"n","type":"rudder",
                 "ipam":{"dataDir":"/tmp/x"},
                 "delegate":{"bridge":"br9","mtu":1400,"ipMasq":true,"hairpinMode":true}}"#,
        )
        .unwrap();
        let d = conf.delegate(&env(true)).unwrap();
        assert_eq!(d["bridge"], json!("br9"));
        assert_eq!(d["mtu"], json!(1400));
        assert_eq!(d["ipMasq"], json!(true));
        assert_eq!(d["hairpinMode"], json!(true));
        assert_eq!(d["cniVersion"], json!("0.3.1"));
        assert_eq!(d["ipam"]["dataDir"], json!("/tmp/x"));
        assert_eq!(d["ipam"]["type"], json!("host-local"));

        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"rudder","delegate":{"type":"ptp"}}"#,
        )
        .unwrap();
        let d = conf.delegate(&env(true)).unwrap();
        assert_eq!(d["type"], json!("ptp"));
        assert!(!d.contains_key("isGateway"));
    }

    #[test]
    fn malformed_configs_are_refused_with_spec_codes() {
        let code = |s: &str| NetConf::parse(s.as_bytes()).unwrap_err().code;
        assert_eq!(code("{nope"), error::DECODE_FAILURE);
        assert_eq!(code("[1]"), error::DECODE_FAILURE);
        assert_eq!(code(r#"{"name":"n"}"#), error::INVALID_CONFIG);
        assert_eq!(
            code(r#"{"cniVersion":"0.2.0","name":"n"}"#),
            error::INCOMPATIBLE_VERSION
        );
        assert_eq!(code(r#"{"cniVersion":"1.0.0"}"#), error::INVALID_CONFIG);
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","delegate":3}"#),
            error::INVALID_CONFIG
        );
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","name":"n","delegate":{"type":"../sh"}}"#),
            error::INVALID_CONFIG
        );
    }

    #[test]
    fn versions_compare() {
        assert!(version_tuple("0.4.0") > version_tuple("0.3.1"));
        assert!(version_tuple("1.0.0") > version_tuple("0.4.0"));
        assert_eq!(version_tuple("x"), None);
    }
}
