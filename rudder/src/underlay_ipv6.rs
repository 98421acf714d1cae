//! The underlay's IPv6 address for the lease's PublicIPv6: `--public-ipv6`, else the chosen
//! interface's best IPv6 address, picked as flannel's `GetInterfaceIP6Addrs`
//! (pkg/ip/iface.go): global or link-local unicast, not deprecated; global before
//! link-local, permanent (configured) before autoconfigured, non-temporary before temporary.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::Context;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};

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
