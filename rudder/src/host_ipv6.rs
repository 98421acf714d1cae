//! IPv6 host plumbing over netlink (dual stack, issue 17): addresses without duplicate
//! address detection, routes, forwarding, and a device's IPv6 kept quiet. Used by the bridge
//! set-up (`local_setup`) and the TUN data plane.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::Context;
use futures::TryStreamExt;
use ipnet::Ipv6Net;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressScope,
};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// Adds (or refreshes) `address/prefix_len` on interface `index` without DAD: the overlay
/// hands out every address itself, and a tentative address would hold traffic back.
pub async fn add_ipv6_address(
    handle: &Handle,
    index: u32,
    address: Ipv6Addr,
    prefix_len: u8,
) -> anyhow::Result<()> {
    let mut request = handle
        .address()
        .add(index, IpAddr::V6(address), prefix_len)
        .replace();
    let message = request.message_mut();
    message.header.flags = AddressHeaderFlags::Nodad;
    message
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    request.execute().await.with_context(|| {
        format!("adding address {address}/{prefix_len} to interface index {index} failed")
    })
}

/// The global IPv6 addresses of interface `index` (link-local ones left out).
pub async fn global_ipv6_addresses(handle: &Handle, index: u32) -> anyhow::Result<Vec<Ipv6Net>> {
    let mut found = Vec::new();
    let mut messages = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(message) = messages
        .try_next()
        .await
        .with_context(|| format!("listing addresses of interface index {index} failed"))?
    {
        if message.header.family != AddressFamily::Inet6
            || message.header.scope != AddressScope::Universe
        {
            continue;
        }
        for attribute in &message.attributes {
            if let AddressAttribute::Address(IpAddr::V6(address)) = attribute {
                if let Ok(net) = Ipv6Net::new(*address, message.header.prefix_len) {
                    found.push(net);
                }
            }
        }
    }
    Ok(found)
}

/// Removes `address` (any prefix length) from interface `index`, if it is there.
pub async fn remove_ipv6_address(
    handle: &Handle,
    index: u32,
    address: Ipv6Addr,
) -> anyhow::Result<()> {
    let mut messages = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(IpAddr::V6(address))
        .execute();
    let mut matching = Vec::new();
    while let Some(message) = messages
        .try_next()
        .await
        .with_context(|| format!("listing addresses of interface index {index} failed"))?
    {
        matching.push(message);
    }
    for message in matching {
        handle
            .address()
            .del(message)
            .execute()
            .await
            .with_context(|| {
                format!("removing address {address} from interface index {index} failed")
            })?;
    }
    Ok(())
}

/// Makes `address` the only global IPv6 address of interface `index` (a lease that moved
/// leaves no old gateway behind).
pub async fn set_only_global_ipv6(
    handle: &Handle,
    index: u32,
    address: Ipv6Net,
) -> anyhow::Result<()> {
    for present in global_ipv6_addresses(handle, index).await? {
        if present != address {
            remove_ipv6_address(handle, index, present.addr()).await?;
        }
    }
    add_ipv6_address(handle, index, address.addr(), address.prefix_len()).await
}

/// Routes `network` out of interface `index` (link scope), replacing a leftover route.
pub async fn replace_ipv6_route(
    handle: &Handle,
    network: Ipv6Net,
    index: u32,
) -> anyhow::Result<()> {
    let route = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(index)
        .scope(RouteScope::Universe)
        .build();
    handle.route().add(route).replace().execute().await.with_context(|| {
        format!("adding route {network} via interface index {index} failed; check `ip -6 route show {network}`")
    })
}

/// Writes `value` to `/proc/sys/net/ipv6/conf/<device>/<key>`.
fn write_conf(device: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{device}/{key}");
    std::fs::write(&path, value)
        .with_context(|| format!("writing {value} to {path} failed; is /proc/sys writable?"))
}

/// IPv6 on for a device that carries only the overlay's routed addresses, and quiet: no
/// link-local address (so no router solicitations from it), no router advertisements
/// taken, no DAD, and no MLD reports. The device joined all-routers at creation (forwarding
/// is on in the namespace); leaving it per device (forwarding there is a router-behaviour
/// switch: packets are forwarded by `all.forwarding`) in MLDv1 mode, where a group never
/// reported is left silently, means nothing is reported when the link comes up. Must run
/// before the link comes up.
pub fn quiet_ipv6(device: &str) -> anyhow::Result<()> {
    write_conf(device, "disable_ipv6", "0")?;
    // 1 = no link-local address generated.
    write_conf(device, "addr_gen_mode", "1")?;
    write_conf(device, "accept_ra", "0")?;
    write_conf(device, "router_solicitations", "0")?;
    write_conf(device, "accept_dad", "0")?;
    write_conf(device, "dad_transmits", "0")?;
    write_conf(device, "force_mld_version", "1")?;
    write_conf(device, "forwarding", "0")
}

/// Routing IPv6 between the bridge and the overlay needs forwarding on.
pub fn enable_ipv6_forwarding() -> anyhow::Result<()> {
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        .context("enabling net.ipv6.conf.all.forwarding (needs CAP_NET_ADMIN)")
}
