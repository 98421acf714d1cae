//! `rudder docker-opts`: docker's options from the subnet file, as flannel's mk-docker-opts.sh.

use std::path::Path;

use anyhow::{bail, Context};

/// Renders the options file from the subnet file's text.
pub fn render(subnet_env: &str, combined_key: &str) -> anyhow::Result<String> {
    let get = |name: &str| {
        subnet_env
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
    };
    let subnet = get("FLANNEL_SUBNET");
    let subnet6 = get("FLANNEL_IPV6_SUBNET");
    let (Some(mtu), true) = (get("FLANNEL_MTU"), subnet.is_some() || subnet6.is_some()) else {
        bail!("the subnet file lacks FLANNEL_SUBNET (or FLANNEL_IPV6_SUBNET) or FLANNEL_MTU: is the daemon running?");
    };
    // With rudder masquerading, docker must not masquerade as well.
    let masq_by_rudder = get("FLANNEL_IPMASQ") == Some("true");
    let mut out = String::new();
    let mut combined = String::new();
    if let Some(subnet) = subnet {
        out += &format!("DOCKER_OPT_BIP=\"--bip={subnet}\"\n");
        combined += &format!(" --bip={subnet}");
    }
    // IPv6 (rudder's addition: flannel's mk-docker-opts.sh has none): docker's IPv6 on, its
    // containers' addresses from our IPv6 subnet (the network form docker expects).
    if let Some(subnet6) = subnet6 {
        let net: ipnet::Ipv6Net = subnet6
            .parse()
            .with_context(|| format!("FLANNEL_IPV6_SUBNET {subnet6:?} is not an IPv6 CIDR"))?;
        let opt = format!("--ipv6 --fixed-cidr-v6={}", net.trunc());
        out += &format!("DOCKER_OPT_IPV6=\"{opt}\"\n");
        combined += &format!(" {opt}");
    }
    if masq_by_rudder {
        out += "DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n";
        combined += " --ip-masq=false";
    }
    out += &format!("DOCKER_OPT_MTU=\"--mtu={mtu}\"\n");
    combined += &format!(" --mtu={mtu}");
    out += &format!("{combined_key}=\"{combined}\"\n");
    Ok(out)
}

pub fn write(subnet_file: &Path, output: &Path, combined_key: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(subnet_file)
        .with_context(|| format!("reading the subnet file {}", subnet_file.display()))?;
    let rendered = render(&text, combined_key)?;
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(output, &rendered).with_context(|| format!("writing {}", output.display()))?;
    print!("{rendered}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_mk_docker_opts_line_by_line() {
        let env = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
        assert_eq!(
            render(env, "DOCKER_OPTS").unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n\
             DOCKER_OPT_MTU=\"--mtu=1472\"\n\
             DOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=false --mtu=1472\"\n"
        );
        let no_masq = env.replace("IPMASQ=true", "IPMASQ=false");
        let out = render(&no_masq, "DOCKER_OPTS").unwrap();
        assert!(!out.contains("ip-masq"), "{out}");
    }

    #[test]
    fn ipv6_subnet_turns_on_docker_ipv6() {
        let env = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\n\
                   FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:22::1/64\n\
                   FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";
        assert_eq!(
            render(env, "DOCKER_OPTS").unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\n\
             DOCKER_OPT_IPV6=\"--ipv6 --fixed-cidr-v6=fc00:0:0:22::/64\"\n\
             DOCKER_OPT_MTU=\"--mtu=1472\"\n\
             DOCKER_OPTS=\" --bip=10.1.74.1/24 --ipv6 --fixed-cidr-v6=fc00:0:0:22::/64 --mtu=1472\"\n"
        );
        let only6 = "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:22::1/64\n\
                     FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";
        let out = render(only6, "DOCKER_OPTS").unwrap();
        assert!(!out.contains("--bip"), "{out}");
        assert!(
            out.contains("DOCKER_OPTS=\" --ipv6 --fixed-cidr-v6=fc00:0:0:22::/64 --mtu=1472\""),
            "{out}"
        );
        let bad = env.replace("fc00:0:0:22::1/64", "nonsense");
        let err = render(&bad, "DOCKER_OPTS").unwrap_err();
        assert_eq!(
            err.to_string(),
            "FLANNEL_IPV6_SUBNET \"nonsense\" is not an IPv6 CIDR"
        );
    }

    #[test]
    fn incomplete_subnet_file_is_an_error() {
        let err = render("FLANNEL_NETWORK=10.1.0.0/16\n", "DOCKER_OPTS").unwrap_err();
        assert!(err.to_string().contains("FLANNEL_SUBNET"), "{err}");
    }
}
