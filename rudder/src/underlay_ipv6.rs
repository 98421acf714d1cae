//! The underlay's IPv6 side: the lease's PublicIPv6 (`--public-ipv6`, else the address
//! `--iface` named, else the chosen interface's best IPv6 address, picked as flannel's
//! `GetInterfaceIP6Addrs`
//! (pkg/ip/iface.go): global or link-local unicast, not deprecated; global before
//! link-local, permanent (configured) before autoconfigured, non-temporary before temporary),
//! the outer family it implies and the overlay MTU that leaves.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::Context;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};

use crate::config::NetworkConfig;
use crate::host::Netlink;

/// One IPv6 address of an interface with the flags that rank it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Candidate {
    pub addr: Ipv6Addr,
    pub deprecated: bool,
    pub permanent: bool,
    /// IFA_F_TEMPORARY (privacy extensions; the same bit as IFA_F_SECONDARY).
    pub temporary: bool,
}

fn is_link_local(addr: &Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

/// Go's `IsGlobalUnicast` for IPv6: not unspecified, loopback, multicast or link-local.
fn is_global_unicast(addr: &Ipv6Addr) -> bool {
    !(addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || is_link_local(addr))
}

/// The address flannel would use, or `None` when the interface has no usable one.
pub fn pick(candidates: &[Ipv6Candidate]) -> Option<Ipv6Addr> {
    candidates
        .iter()
        .filter(|c| (is_global_unicast(&c.addr) || is_link_local(&c.addr)) && !c.deprecated)
        // A stable sort keeps the kernel's order among equals, as flannel's does.
        .min_by_key(|c| (is_link_local(&c.addr), !c.permanent, c.temporary))
        .map(|c| c.addr)
}

impl Netlink {
    /// The interface's IPv6 addresses with their flags.
    pub async fn ipv6_candidates(&self, index: u32) -> anyhow::Result<Vec<Ipv6Candidate>> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        Ok(messages
            .iter()
            .filter_map(|msg| {
                let addr = msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                    _ => None,
                })?;
                let flags = msg
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        AddressAttribute::Flags(f) => Some(*f),
                        _ => None,
                    })
                    .unwrap_or_else(|| {
                        AddressFlags::from_bits_retain(msg.header.flags.bits().into())
                    });
                Some(Ipv6Candidate {
                    addr,
                    deprecated: flags.contains(AddressFlags::Deprecated),
                    permanent: flags.contains(AddressFlags::Permanent),
                    temporary: flags.contains(AddressFlags::Secondary),
                })
            })
            .collect())
    }
}

/// The outer header this host's largest datagrams carry.
pub fn outer_family(public_ipv6: Option<Ipv6Addr>) -> crate::underlay::OuterFamily {
    match public_ipv6 {
        Some(_) => crate::underlay::OuterFamily::Ipv6,
        None => crate::underlay::OuterFamily::Ipv4,
    }
}

/// The IPv6 side of `config`: our PublicIPv6 (IPv6 on) and the overlay MTU the largest outer
/// header leaves; an error when an IPv6 overlay would get less than 1280 bytes, or when the
/// network has IPv4 on and the underlay no IPv4 address.
pub async fn ipv6_side(
    netlink: &Netlink,
    underlay: &crate::underlay::Underlay,
    flag: Option<Ipv6Addr>,
    config: &NetworkConfig,
) -> anyhow::Result<(Option<Ipv6Addr>, u16)> {
    underlay.require_ipv4(config.enable_ipv4)?;
    if config.ipv6.is_none() {
        return Ok((None, crate::underlay::overlay_mtu(underlay.mtu)));
    }
    let public_ipv6 = public_ipv6_of(netlink, underlay, flag).await;
    if !config.enable_ipv4 && public_ipv6.is_none() {
        anyhow::bail!(
            "the network is IPv6-only (EnableIPv4 false): peers are reached over IPv6, so this host needs a PublicIPv6; give {} an IPv6 address or pass --public-ipv6",
            underlay.name
        );
    }
    let mtu =
        crate::underlay::ipv6_overlay_mtu(&underlay.name, underlay.mtu, outer_family(public_ipv6))?;
    Ok((public_ipv6, mtu))
}

/// PublicIPv6: `--public-ipv6`, else the IPv6 address `--iface` named, else the underlay
/// interface's IPv6 address as flannel picks it; none is a warning (the lease then says
/// null), not a stop.
async fn public_ipv6_of(
    netlink: &Netlink,
    underlay: &crate::underlay::Underlay,
    flag: Option<Ipv6Addr>,
) -> Option<Ipv6Addr> {
    if flag.is_some() {
        return flag;
    }
    if underlay.named_ipv6.is_some() {
        return underlay.named_ipv6;
    }
    match netlink.ipv6_candidates(underlay.index).await {
        Ok(candidates) => {
            let picked = crate::underlay_ipv6::pick(&candidates);
            if picked.is_none() {
                tracing::warn!(
                    "interface {} has no usable IPv6 address: PublicIPv6 stays null; give it one or pass --public-ipv6",
                    underlay.name
                );
            }
            picked
        }
        Err(e) => {
            tracing::warn!(
                "listing the IPv6 addresses of {}: {e:#}; PublicIPv6 stays null",
                underlay.name
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(addr: &str, permanent: bool, temporary: bool, deprecated: bool) -> Ipv6Candidate {
        Ipv6Candidate {
            addr: addr.parse().unwrap(),
            deprecated,
            permanent,
            temporary,
        }
    }

    #[test]
    fn global_permanent_non_temporary_first_as_flannel() {
        let link_local = c("fe80::1", true, false, false);
        let slaac = c("2001:db8::aa", false, false, false);
        let privacy = c("2001:db8::bb", false, true, false);
        let configured = c("fd00:77::11", true, false, false);
        let old = c("fd00:77::99", true, false, true);
        assert_eq!(
            pick(&[link_local, privacy, slaac, old, configured]),
            Some(configured.addr)
        );
        assert_eq!(pick(&[link_local, privacy, slaac]), Some(slaac.addr));
        assert_eq!(pick(&[privacy, link_local]), Some(privacy.addr));
        assert_eq!(pick(&[link_local]), Some(link_local.addr));
        // Kernel order among equals.
        let second = c("fd00:77::12", true, false, false);
        assert_eq!(pick(&[configured, second]), Some(configured.addr));
    }

    #[test]
    fn nothing_usable_is_none() {
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&[c("fd00::1", true, false, true)]), None);
        assert_eq!(pick(&[c("::1", true, false, false)]), None);
    }
}
