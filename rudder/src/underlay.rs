//! Picking the underlay interface (flanneld's `--iface`, `--iface-regex`,
//! `--iface-can-reach`, `--public-ip`) and what the data planes need to know about it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Context};
use rtnetlink::packet_route::link::LinkLayerType;

use crate::host::{LinkInfo, Netlink};

/// The interface other hosts reach us through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// The address peers send to (the lease's PublicIP): `--public-ip`, else `local_ip`.
    pub public_ip: Ipv4Addr,
    /// The address this host owns on the underlay: the outer source of what it sends and the
    /// outer destination of what it receives. Differs from `public_ip` only behind a 1:1 NAT
    /// (a cloud's elastic IP), where the provider translates between the two.
    pub local_ip: Ipv4Addr,
    /// ARPHRD_* of the device: the eBPF programs need Ethernet frames.
    pub link_layer: LinkLayerType,
    /// The IPv6 address `--iface` named: the PublicIPv6 unless `--public-ipv6` says
    /// otherwise, as flanneld's.
    pub named_ipv6: Option<Ipv6Addr>,
}

impl Underlay {
    /// A network with IPv4 on needs an IPv4 address to be reached at (the lease's PublicIP).
    pub fn require_ipv4(&self, enable_ipv4: bool) -> anyhow::Result<()> {
        if enable_ipv4 && self.public_ip.is_unspecified() {
            bail!(
                "interface {} has no IPv4 address: give it one or pass --public-ip (only an IPv6-only network, EnableIPv4 false, runs without)",
                self.name
            );
        }
        Ok(())
    }

    /// Whether peers reach us through an address translation (`--public-ip` is not ours).
    pub fn behind_nat(&self) -> bool {
        self.public_ip != self.local_ip
    }

    /// Why the eBPF programs cannot run on this underlay: they parse a 14-byte Ethernet
    /// header, which an L3 device (tun, WireGuard, PPP, GRE) does not have.
    pub fn ebpf_unsupported(&self) -> Option<String> {
        (self.link_layer != LinkLayerType::Ether).then(|| {
            format!(
                "underlay {} is not an Ethernet device (link type {}): the eBPF programs need \
                 Ethernet frames",
                self.name,
                link_layer_name(self.link_layer)
            )
        })
    }
}

/// The overlay MTU over an underlay of `underlay_mtu`: less the encapsulation overhead.
pub fn overlay_mtu(underlay_mtu: u32) -> u16 {
    u16::try_from(underlay_mtu.saturating_sub(u32::from(rudder_ebpf::ENCAP_OVERHEAD)))
        .unwrap_or(u16::MAX)
}

/// The outer header's family: what encapsulation costs (IPv4 + UDP, or IPv6 + UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OuterFamily {
    Ipv4,
    Ipv6,
}

/// Encapsulation overhead over an IPv6 outer header: 40 bytes of IPv6, 8 of UDP.
pub const IPV6_ENCAP_OVERHEAD: u32 = 48;

impl OuterFamily {
    pub const fn overhead(self) -> u32 {
        match self {
            OuterFamily::Ipv4 => rudder_ebpf::ENCAP_OVERHEAD as u32,
            OuterFamily::Ipv6 => IPV6_ENCAP_OVERHEAD,
        }
    }
}

/// The overlay MTU over an underlay of `underlay_mtu` for an outer header of `outer`.
pub fn overlay_mtu_over(underlay_mtu: u32, outer: OuterFamily) -> u16 {
    u16::try_from(underlay_mtu.saturating_sub(outer.overhead())).unwrap_or(u16::MAX)
}

/// The overlay MTU when the overlay carries IPv6: an error naming the underlay when it
/// cannot give the 1280 bytes IPv6 requires of every link (RFC 8200 §5).
pub fn ipv6_overlay_mtu(
    underlay_name: &str,
    underlay_mtu: u32,
    outer: OuterFamily,
) -> anyhow::Result<u16> {
    let mtu = overlay_mtu_over(underlay_mtu, outer);
    let floor = crate::packet6::IPV6_MIN_MTU as u32;
    if u32::from(mtu) < floor {
        bail!(
            "underlay {underlay_name} has MTU {underlay_mtu}: the overlay gets {mtu} over an \
             {outer:?} outer header, below the 1280 IPv6 needs (an underlay MTU of at least {} \
             is required)",
            floor + outer.overhead()
        );
    }
    Ok(mtu)
}

/// `ip link`'s name for a link type (`none` for a tun, `ppp`, `ether`).
fn link_layer_name(kind: LinkLayerType) -> String {
    kind.to_string().to_lowercase()
}

/// How to pick the underlay: flanneld's `--iface` (repeatable), `--iface-regex`
/// (repeatable), `--iface-can-reach` and `--public-ip`.
#[derive(Debug, Clone, Default)]
pub struct UnderlaySelection {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

/// The interface holding address `ip`, with it.
fn holding(
    links: &[(LinkInfo, Vec<Ipv4Addr>)],
    ip: Ipv4Addr,
) -> Option<(LinkInfo, Option<Ipv4Addr>)> {
    links
        .iter()
        .find(|(_, addrs)| addrs.contains(&ip))
        .map(|(l, _)| (l.clone(), Some(ip)))
}

/// `--iface`: an IPv4 or IPv6 address names the interface holding it (`ipv6`: each
/// interface's IPv6 addresses); anything else is a name.
fn by_name_or_address(
    links: &[(LinkInfo, Vec<Ipv4Addr>)],
    ipv6: &[(u32, Vec<Ipv6Addr>)],
    want: &str,
) -> Option<(LinkInfo, Option<Ipv4Addr>)> {
    match want.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => holding(links, ip),
        Ok(IpAddr::V6(ip)) => {
            let (index, _) = ipv6.iter().find(|(_, addrs)| addrs.contains(&ip))?;
            links
                .iter()
                .find(|(l, _)| l.index == *index)
                .map(|(l, _)| (l.clone(), None))
        }
        Err(_) => links
            .iter()
            .find(|(l, _)| l.name == want)
            .map(|(l, _)| (l.clone(), None)),
    }
}

/// `--iface-regex`: the first interface with a matching IPv4 address (that address), else
/// the first interface with a matching name.
fn match_regex(
    re: &regex::Regex,
    links: &[(LinkInfo, Vec<Ipv4Addr>)],
) -> Option<(LinkInfo, Option<Ipv4Addr>)> {
    links
        .iter()
        .find_map(|(l, addrs)| {
            addrs
                .iter()
                .find(|ip| re.is_match(&ip.to_string()))
                .map(|ip| (l.clone(), Some(*ip)))
        })
        .or_else(|| {
            links
                .iter()
                .find(|(l, _)| re.is_match(&l.name))
                .map(|(l, _)| (l.clone(), None))
        })
}

fn describe(links: &[(LinkInfo, Vec<Ipv4Addr>)]) -> String {
    links
        .iter()
        .map(|(l, a)| format!("{}:{a:?}", l.name))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Netlink {
    /// Picks the underlay as flanneld's `LookupExtIface` does: with none of `--iface`,
    /// `--iface-regex`, `--iface-can-reach`, the interface holding `--public-ip` (else the
    /// default route's); otherwise each `--iface` (name or address) in order, then each
    /// regex, then the route to `--iface-can-reach`, the first that resolves winning.
    /// `--public-ip` overrides the address found.
    pub async fn underlay(&self, sel: &UnderlaySelection) -> anyhow::Result<Underlay> {
        let links = self.links_with_addresses().await?;
        // Each interface's IPv6 addresses, listed only when an `--iface` is one.
        let mut ipv6 = Vec::new();
        if sel.ifaces.iter().any(|i| i.parse::<Ipv6Addr>().is_ok()) {
            for (link, _) in &links {
                let addrs = self.ipv6_candidates(link.index).await?;
                ipv6.push((link.index, addrs.iter().map(|c| c.addr).collect()));
            }
        }
        let mut named_ipv6 = None;
        let (link, found_ip) = if sel.ifaces.is_empty()
            && sel.regexes.is_empty()
            && sel.can_reach.is_none()
        {
            let holder = sel.public_ip.and_then(|ip| holding(&links, ip));
            match holder {
                Some(found) => found,
                None => {
                    // An IPv6-only host has only an IPv6 default route (flanneld's ipv6Stack).
                    let index = match self.default_route_iface().await? {
                        Some(index) => Some(index),
                        None => self.default_route_iface6().await?,
                    };
                    let index = index.ok_or_else(|| {
                        anyhow!("no default route (IPv4 or IPv6) to pick the underlay interface from: pass --iface")
                    })?;
                    (self.link_by_index(index).await?, None)
                }
            }
        } else {
            let mut found = None;
            for want in &sel.ifaces {
                found = by_name_or_address(&links, &ipv6, want);
                match &found {
                    Some(_) => {
                        named_ipv6 = want.parse::<Ipv6Addr>().ok();
                        break;
                    }
                    None => tracing::info!("--iface {want}: no interface has that name or address"),
                }
            }
            if found.is_none() {
                for pattern in &sel.regexes {
                    let re = regex::Regex::new(pattern)
                        .with_context(|| format!("--iface-regex {pattern}"))?;
                    found = match_regex(&re, &links);
                    match &found {
                        Some(_) => break,
                        None => tracing::info!(
                            "--iface-regex {pattern}: matches no interface address or name"
                        ),
                    }
                }
            }
            if found.is_none() {
                if let Some(dest) = sel.can_reach {
                    match self.route_get(dest).await {
                        Ok((oif, src)) => {
                            found = links
                                .iter()
                                .find(|(l, _)| l.index == oif)
                                .map(|(l, _)| (l.clone(), src));
                        }
                        Err(e) => tracing::info!("--iface-can-reach {dest}: {e:#}"),
                    }
                }
            }
            found.ok_or_else(|| {
                anyhow!(
                    "no interface matches --iface/--iface-regex/--iface-can-reach (interfaces: {})",
                    describe(&links)
                )
            })?
        };
        let addresses = links
            .iter()
            .find(|(l, _)| l.index == link.index)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        // `--public-ip` held by this host (any interface) is also the source; one it does not
        // hold is a NAT's address: send from the underlay's own address.
        let public_ip_is_local = sel
            .public_ip
            .is_some_and(|ip| holding(&links, ip).is_some());
        let own = if public_ip_is_local {
            sel.public_ip
        } else {
            found_ip.or(addresses.first().copied())
        };
        // An interface without an IPv4 address of its own: the kernel picks the source. With
        // none at all only an IPv6-only network can run (see [`Underlay::require_ipv4`]).
        let local_ip = own.or(sel.public_ip).unwrap_or(Ipv4Addr::UNSPECIFIED);
        Ok(Underlay {
            name: link.name,
            index: link.index,
            mtu: link.mtu,
            public_ip: sel.public_ip.unwrap_or(local_ip),
            local_ip,
            link_layer: link.link_layer,
            named_ipv6,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Vec<(LinkInfo, Vec<Ipv4Addr>)> {
        let link = |index, name: &str| LinkInfo {
            index,
            name: name.into(),
            mtu: 1500,
            link_layer: LinkLayerType::Ether,
        };
        vec![
            (link(1, "lo"), vec![Ipv4Addr::LOCALHOST]),
            (link(2, "eth0"), vec![Ipv4Addr::new(192, 168, 1, 5)]),
            (
                link(3, "ens4"),
                vec![Ipv4Addr::new(10, 1, 0, 7), Ipv4Addr::new(10, 2, 0, 7)],
            ),
            (link(4, "docker0"), vec![]),
        ]
    }

    #[test]
    fn iface_is_a_name_or_an_address() {
        let l = links();
        let v6: Vec<(u32, Vec<Ipv6Addr>)> = vec![
            (2, vec!["fd00:77::10".parse().unwrap()]),
            (
                3,
                vec!["fe80::1".parse().unwrap(), "fd00:99::7".parse().unwrap()],
            ),
        ];
        let (link, ip) = by_name_or_address(&l, &v6, "ens4").unwrap();
        assert_eq!((link.name.as_str(), ip), ("ens4", None));
        let (link, ip) = by_name_or_address(&l, &v6, "10.2.0.7").unwrap();
        assert_eq!(
            (link.name.as_str(), ip),
            ("ens4", Some(Ipv4Addr::new(10, 2, 0, 7)))
        );
        // An IPv6 address names its interface; the IPv4 address is then the interface's own.
        let (link, ip) = by_name_or_address(&l, &v6, "fd00:99::7").unwrap();
        assert_eq!((link.name.as_str(), ip), ("ens4", None));
        assert!(by_name_or_address(&l, &v6, "eth9").is_none());
        assert!(by_name_or_address(&l, &v6, "10.9.9.9").is_none());
        assert!(by_name_or_address(&l, &v6, "fd00:77::99").is_none());
    }

    #[test]
    fn iface_regex_matches_addresses_before_names() {
        let l = links();
        let re = |s| regex::Regex::new(s).unwrap();
        let (link, ip) = match_regex(&re(r"^10\.2\."), &l).unwrap();
        assert_eq!(
            (link.name.as_str(), ip),
            ("ens4", Some(Ipv4Addr::new(10, 2, 0, 7)))
        );
        // "e" is in eth0's name, but 192.168.1.5 holds no "e": names are tried after every address.
        let (link, ip) = match_regex(&re("^(e|192)"), &l).unwrap();
        assert_eq!(
            (link.name.as_str(), ip),
            ("eth0", Some(Ipv4Addr::new(192, 168, 1, 5)))
        );
        let (link, ip) = match_regex(&re("^dock"), &l).unwrap();
        assert_eq!((link.name.as_str(), ip), ("docker0", None));
        assert!(match_regex(&re("^wlan"), &l).is_none());
    }

    #[test]
    fn overlay_mtu_depends_on_the_outer_family() {
        assert_eq!(overlay_mtu_over(1500, OuterFamily::Ipv4), 1472);
        assert_eq!(overlay_mtu_over(1500, OuterFamily::Ipv6), 1452);
        assert_eq!(overlay_mtu_over(1500, OuterFamily::Ipv4), overlay_mtu(1500));
        assert_eq!(overlay_mtu_over(20, OuterFamily::Ipv6), 0);
    }

    #[test]
    fn ipv6_needs_an_overlay_of_1280() {
        assert_eq!(
            ipv6_overlay_mtu("eth0", 1328, OuterFamily::Ipv6).unwrap(),
            1280
        );
        assert_eq!(
            ipv6_overlay_mtu("eth0", 1308, OuterFamily::Ipv4).unwrap(),
            1280
        );
        let err = ipv6_overlay_mtu("eth0", 1327, OuterFamily::Ipv6).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("eth0") && text.contains("1279"), "{text}");
        assert!(text.contains("at least 1328"), "{text}");
        let err = ipv6_overlay_mtu("eth0", 1307, OuterFamily::Ipv4).unwrap_err();
        assert!(err.to_string().contains("at least 1308"), "{err}");
    }
}
