//! The subnet file docker (`--bip`, `--mtu`) and the flannel CNI plugin read, in flannel's format.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::subnet::{gateway, gateway6};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetFile {
    /// `false` on an IPv6-only network: no FLANNEL_NETWORK/FLANNEL_SUBNET then, as flannel.
    pub enable_ipv4: bool,
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    /// IPv6Network and our IPv6 subnet when the network has IPv6 on.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
    pub mtu: u16,
    pub ip_masq: bool,
}

impl SubnetFile {
    /// flannel's `WriteSubnetFile` (pkg/subnet/subnet.go): each family's network, then its
    /// subnet's first address with the prefix length, then MTU and IPMASQ.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.enable_ipv4 {
            out += &format!(
                "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\n",
                self.network,
                gateway(self.subnet),
                self.subnet.prefix_len(),
            );
        }
        if let Some((network, subnet)) = self.ipv6 {
            out += &format!(
                "FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={}/{}\n",
                gateway6(subnet),
                subnet.prefix_len(),
            );
        }
        out + &format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ip_masq
        )
    }

    /// Writes to a temporary file beside `path` and renames it over, so readers never see
    /// a half-written file. Mode 0644: docker and CNI read it, only root writes it.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for the subnet file", dir.display()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".subnet.env.")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        tmp.write_all(self.render().as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("writing the subnet file {}", path.display()))?;
        Ok(())
    }
}

/// The subnet a previous run wrote (`FLANNEL_SUBNET`), if the file exists and parses.
pub fn previous_subnet(path: &Path) -> Option<Ipv4Net> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .and_then(|v| v.trim().parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
}

/// The IPv6 subnet a previous run wrote (`FLANNEL_IPV6_SUBNET`), if any.
pub fn previous_ipv6_subnet(path: &Path) -> Option<Ipv6Net> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .and_then(|v| v.trim().parse::<Ipv6Net>().ok())
        .map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> SubnetFile {
        SubnetFile {
            enable_ipv4: true,
            network: "10.1.0.0/16".parse().unwrap(),
            subnet: "10.1.74.0/24".parse().unwrap(),
            ipv6: None,
            mtu: 1472,
            ip_masq: false,
        }
    }

    fn with_ipv6(mut file: SubnetFile) -> SubnetFile {
        file.ipv6 = Some((
            "fc00::/48".parse().unwrap(),
            "fc00:0:0:22::/64".parse().unwrap(),
        ));
        file
    }

    #[test]
    fn dual_stack_and_ipv6_only_files_match_flannel() {
        assert_eq!(
            with_ipv6(sample()).render(),
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:22::1/64\n\
             FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
        let only6 = SubnetFile {
            enable_ipv4: false,
            ..with_ipv6(sample())
        };
        assert_eq!(
            only6.render(),
            "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:22::1/64\n\
             FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        only6.write(&path).unwrap();
        assert_eq!(previous_subnet(&path), None);
        assert_eq!(
            previous_ipv6_subnet(&path),
            Some("fc00:0:0:22::/64".parse().unwrap())
        );
    }

    #[test]
    fn renders_flannels_variables() {
        assert_eq!(
            sample().render(),
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn write_is_atomic_readable_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/rudder/subnet.env");
        sample().write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(
            previous_subnet(&path),
            Some("10.1.74.0/24".parse().unwrap())
        );
        let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "temporary file left behind");
    }

    #[test]
    fn missing_or_garbled_file_gives_no_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        assert_eq!(previous_subnet(&path), None);
        std::fs::write(&path, "FLANNEL_SUBNET=nonsense\n").unwrap();
        assert_eq!(previous_subnet(&path), None);
    }
}
