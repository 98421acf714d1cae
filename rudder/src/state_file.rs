//! The state file beside the subnet file (`rudder-state.json`): the network config, our
//! lease and the last known peers. Written on every change; read at start so the data plane
//! is programmed before etcd answers (a start while etcd is down still carries traffic).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::config::NetworkConfig;
use crate::peers::{Ipv6Peer, Ipv6PeerMap};
use crate::status::State;

/// What a start needs before etcd answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedState {
    pub config: NetworkConfig,
    pub subnet: Ipv4Net,
    /// Our IPv6 subnet when the network has IPv6 on (a restart asks for it again).
    pub ipv6_subnet: Option<Ipv6Net>,
    pub peers: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// The IPv6 halves of the leases (IPv6 on): which peers are reached over IPv6.
    pub ipv6_peers: Ipv6PeerMap,
}

/// One IPv6 half on disk.
#[derive(Serialize, Deserialize)]
struct DiskIpv6Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ipv4_subnet: Option<String>,
    public_ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_ipv6: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    /// The network config in etcd's JSON format.
    config: serde_json::Value,
    subnet: String,
    /// Absent in files from before dual stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ipv6_subnet: Option<String>,
    /// subnet → public IP.
    peers: BTreeMap<String, String>,
    /// IPv6 subnet → its lease's other fields; absent in files from before dual stack.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    ipv6_peers: BTreeMap<String, DiskIpv6Peer>,
}

/// `rudder-state.json` in the subnet file's directory.
pub fn path_beside(subnet_file: &Path) -> PathBuf {
    subnet_file.with_file_name("rudder-state.json")
}

fn config_json(c: &NetworkConfig) -> serde_json::Value {
    let mut json = serde_json::json!({
        "Network": c.network.to_string(),
        "SubnetLen": c.subnet_len,
        "SubnetMin": c.subnet_min.to_string(),
        "SubnetMax": c.subnet_max.to_string(),
        "Backend": { "Type": c.backend_type, "Port": c.port },
    });
    if !c.enable_ipv4 {
        json["EnableIPv4"] = false.into();
    }
    if let Some(v6) = &c.ipv6 {
        json["EnableIPv6"] = true.into();
        json["IPv6Network"] = v6.network.to_string().into();
        json["IPv6SubnetLen"] = v6.subnet_len.into();
        json["IPv6SubnetMin"] = v6.subnet_min.to_string().into();
        json["IPv6SubnetMax"] = v6.subnet_max.to_string().into();
    }
    json
}

impl SavedState {
    fn render(&self) -> String {
        let disk = OnDisk {
            config: config_json(&self.config),
            subnet: self.subnet.to_string(),
            ipv6_subnet: self.ipv6_subnet.map(|s| s.to_string()),
            peers: self
                .peers
                .iter()
                .map(|(s, ip)| (s.to_string(), ip.to_string()))
                .collect(),
            ipv6_peers: self
                .ipv6_peers
                .iter()
                .map(|(s, p)| {
                    let peer = DiskIpv6Peer {
                        ipv4_subnet: p.ipv4_subnet.map(|s| s.to_string()),
                        public_ip: p.public_ip.to_string(),
                        public_ipv6: p.public_ipv6.map(|ip| ip.to_string()),
                    };
                    (s.to_string(), peer)
                })
                .collect(),
        };
        serde_json::to_string_pretty(&disk).expect("plain JSON") + "\n"
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let disk: OnDisk = serde_json::from_str(text)?;
        let config = NetworkConfig::parse(disk.config.to_string().as_bytes())
            .map_err(|e| anyhow::anyhow!("config: {e}"))?;
        let subnet: Ipv4Net = disk.subnet.parse().context("subnet")?;
        anyhow::ensure!(
            config.network.contains(&subnet),
            "subnet {subnet} is outside the network {}",
            config.network
        );
        let ipv6_subnet: Option<Ipv6Net> = disk
            .ipv6_subnet
            .as_deref()
            .map(str::parse)
            .transpose()
            .context("ipv6_subnet")?;
        if let Some(v6) = ipv6_subnet {
            let range = config.ipv6.map(|c| c.range());
            anyhow::ensure!(
                range.is_some_and(|r| r.contains(v6)),
                "IPv6 subnet {v6} is not one the network config hands out"
            );
        }
        let peers = disk
            .peers
            .iter()
            .map(|(s, ip)| Ok((s.parse()?, ip.parse()?)))
            .collect::<anyhow::Result<_>>()
            .context("peers")?;
        let ipv6_peers = disk
            .ipv6_peers
            .iter()
            .map(|(s, p)| {
                let peer = Ipv6Peer {
                    ipv4_subnet: p.ipv4_subnet.as_deref().map(str::parse).transpose()?,
                    public_ip: p.public_ip.parse()?,
                    public_ipv6: p.public_ipv6.as_deref().map(str::parse).transpose()?,
                };
                Ok((s.parse()?, peer))
            })
            .collect::<anyhow::Result<_>>()
            .context("ipv6_peers")?;
        Ok(SavedState {
            config,
            subnet,
            ipv6_subnet,
            peers,
            ipv6_peers,
        })
    }

    /// Writes a temporary file beside `path` and renames it over it.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".rudder-state.")
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        tmp.write_all(self.render().as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("writing the state file {}", path.display()))?;
        Ok(())
    }
}

/// The saved state, if there is a usable one (an unusable one is logged and ignored).
pub fn load(path: &Path) -> Option<SavedState> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "reading the state file {}: {e}; ignoring it",
                path.display()
            );
            return None;
        }
    };
    match SavedState::parse(&text) {
        Ok(saved) => Some(saved),
        Err(e) => {
            tracing::warn!(
                "the state file {} is unusable ({e:#}); ignoring it",
                path.display()
            );
            None
        }
    }
}

/// Writes the state file whenever our lease or the installed peers change (checked four
/// times a second).
pub async fn keep_written(path: PathBuf, config: NetworkConfig, state: State) {
    let mut last: Option<SavedState> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let now = {
            let s = state.snapshot();
            s.subnet.map(|subnet| SavedState {
                config: config.clone(),
                subnet,
                ipv6_subnet: s.ipv6_subnet,
                peers: s.peers.clone(),
                ipv6_peers: s.ipv6_peers.clone(),
            })
        };
        if now.is_none() || now == last {
            continue;
        }
        let saved = now.expect("checked");
        // Off the async workers: rendering 65,536 peers takes long enough to hold up the
        // peer watch and the reconciler sharing a worker with it.
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let result = saved.write(&target);
            (saved, result)
        })
        .await;
        match written {
            Ok((saved, Ok(()))) => last = Some(saved),
            Ok((_, Err(e))) => tracing::warn!("{e:#}"),
            Err(e) => tracing::warn!("writing the state file: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_a_subnet_outside_the_network() {
        let config = NetworkConfig::parse(br#"{"Network":"10.5.0.0/16"}"#).unwrap();
        let saved = SavedState {
            config,
            subnet: "10.5.7.0/24".parse().unwrap(),
            ipv6_subnet: None,
            peers: [(
                "10.5.9.0/24".parse().unwrap(),
                Ipv4Addr::new(192, 168, 1, 9),
            )]
            .into(),
            ipv6_peers: BTreeMap::new(),
        };
        assert_eq!(SavedState::parse(&saved.render()).unwrap(), saved);
        let outside = saved.render().replace("10.5.7.0/24", "10.6.7.0/24");
        let err = SavedState::parse(&outside).unwrap_err();
        assert!(format!("{err:#}").contains("outside"), "{err:#}");
        assert!(SavedState::parse("{").is_err());
    }

    #[test]
    fn keeps_the_ipv6_subnet_and_the_ipv6_config() {
        let config = NetworkConfig::parse(
            br#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#,
        )
        .unwrap();
        let saved = SavedState {
            config,
            subnet: "10.5.7.0/24".parse().unwrap(),
            ipv6_subnet: Some("fc00:0:0:22::/64".parse().unwrap()),
            peers: [(
                "10.5.9.0/24".parse().unwrap(),
                Ipv4Addr::new(192, 168, 1, 9),
            )]
            .into(),
            ipv6_peers: [
                (
                    "fc00:0:0:23::/64".parse().unwrap(),
                    Ipv6Peer {
                        ipv4_subnet: Some("10.5.9.0/24".parse().unwrap()),
                        public_ip: Ipv4Addr::new(192, 168, 1, 9),
                        public_ipv6: Some("fd00:77::9".parse().unwrap()),
                    },
                ),
                (
                    "fc00:0:0:ff00::/64".parse().unwrap(),
                    Ipv6Peer {
                        ipv4_subnet: None,
                        public_ip: Ipv4Addr::UNSPECIFIED,
                        public_ipv6: None,
                    },
                ),
            ]
            .into(),
        };
        let text = saved.render();
        assert!(text.contains("\"public_ipv6\": \"fd00:77::9\""), "{text}");
        assert!(
            text.contains("\"ipv6_subnet\": \"fc00:0:0:22::/64\""),
            "{text}"
        );
        assert_eq!(SavedState::parse(&text).unwrap(), saved);
        // A file from before the IPv6 peers were saved still loads.
        let old: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut old = old.as_object().unwrap().clone();
        old.remove("ipv6_peers");
        let old = SavedState::parse(&serde_json::Value::Object(old).to_string()).unwrap();
        assert!(old.ipv6_peers.is_empty() && old.peers == saved.peers);
        let outside = text.replace("fc00:0:0:22::/64", "fd00:0:0:22::/64");
        let err = SavedState::parse(&outside).unwrap_err();
        assert!(
            format!("{err:#}").contains("not one the network"),
            "{err:#}"
        );
    }
}
