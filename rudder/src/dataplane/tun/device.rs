//! The TUN device: opening it (with offloads when they work) and its netlink set-up
//! (address, link up, the network's route), from async and from sync code.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::Context;
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tun_rs::AsyncDevice;

use super::options::TunOptions;

/// Removes a stale device of the same name, creates the device (with offloads when asked
/// and the kernel agrees, else one packet per read) and configures it. Returns it with
/// whether offloads are on.
pub(super) async fn open(options: &TunOptions) -> anyhow::Result<(Arc<AsyncDevice>, bool)> {
    let handle = netlink_connect()?;
    if let Some(stale) = link_index(&handle, &options.device_name).await? {
        tracing::warn!(
            device = %options.device_name,
            "removing a stale device of the same name (left by a crashed daemon?)"
        );
        delete_link(&handle, stale, &options.device_name).await?;
    }

    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(&options.device_name)
            .mtu(options.mtu)
            .offload(offload)
            // Up only once configured: IPv6 must be off before the link comes up.
            .enable(false)
            .build_async()
    };
    let (device, offload) = match build(options.offload) {
        Ok(device) => (device, options.offload),
        Err(error) if options.offload => {
            tracing::warn!("TUN device with offloads failed ({error}); using one packet per read");
            let device = build(false).with_context(|| device_error(options))?;
            (device, false)
        }
        Err(error) => return Err(anyhow::Error::from(error).context(device_error(options))),
    };
    let device = Arc::new(device);
    let index = device.if_index().with_context(|| {
        format!(
            "reading the interface index of new TUN device {:?} failed",
            options.device_name
        )
    })?;
    configure_device(&handle, index, options).await?;
    Ok((device, offload))
}

fn device_error(options: &TunOptions) -> String {
    format!(
        "creating TUN device {:?} with MTU {} failed; is /dev/net/tun present and are we root (CAP_NET_ADMIN)?",
        options.device_name, options.mtu
    )
}

// --- netlink helpers (candidates for rudder/src/host.rs) ---

/// Opens an rtnetlink connection whose driver runs on the current tokio runtime.
pub(super) fn netlink_connect() -> anyhow::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection()
        .context("opening a netlink socket failed; is this Linux with NETLINK_ROUTE?")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs a netlink job to completion from synchronous code, on a helper thread with its
/// own runtime: safe to call from inside any tokio runtime, even a single-threaded one
/// (which could not drive a connection spawned on itself while we block it).
pub(super) fn run_netlink_blocking<F, Fut>(job: F) -> anyhow::Result<()>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a runtime for a netlink request failed")?;
        runtime.block_on(async move { job(netlink_connect()?).await })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netlink helper thread panicked"))?
}

/// Interface index of the link called `name`, or `None` when there is none.
pub(super) async fn link_index(handle: &Handle, name: &str) -> anyhow::Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|link| link.header.index)),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.to_io().raw_os_error() == Some(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("looking up network device {name:?} failed")),
    }
}

pub(super) async fn delete_link(handle: &Handle, index: u32, name: &str) -> anyhow::Result<()> {
    handle.link().del(index).execute().await.with_context(|| {
        format!("deleting network device {name:?} (index {index}) failed; remove it by hand with `ip link del {name}`")
    })
}

/// Puts the subnet's network address /32 on the device, brings it up and routes the whole
/// overlay network into it (flannel's udp backend layout).
/// With an IPv6 overlay, likewise the IPv6 subnet's network address /128 and the IPv6
/// network's route.
async fn configure_device(handle: &Handle, index: u32, options: &TunOptions) -> anyhow::Result<()> {
    match &options.ipv6 {
        None => disable_ipv6(&options.device_name)?,
        Some(_) => crate::host_ipv6::quiet_ipv6(&options.device_name)?,
    }
    // (An IPv6-only network's IPv4 "network" is 0.0.0.0/0: nothing of it goes on the device.)
    if options.carries_ipv4() {
        add_device_address(handle, index, options.local_subnet.network()).await?;
    }
    if let Some(v6) = &options.ipv6 {
        let address = v6.local_subnet.network();
        crate::host_ipv6::add_ipv6_address(handle, index, address, 128).await?;
    }
    set_link_up(handle, index, &options.device_name).await?;
    if options.carries_ipv4() {
        add_network_route(handle, index, options.network).await?;
    }
    if let Some(v6) = &options.ipv6 {
        crate::host_ipv6::replace_ipv6_route(handle, v6.network, index).await?;
    }
    Ok(())
}

/// An IPv4-only overlay. With IPv6 on, the kernel sends router solicitations and MLD
/// reports from the link-local address into the device, which would only show up as
/// `not_ipv4` drops. (An IPv6 overlay keeps the device quiet instead:
/// [`crate::host_ipv6::quiet_ipv6`].)
fn disable_ipv6(device: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{device}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        // IPv6 is not in this kernel at all: nothing to disable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("writing 1 to {path} failed; is /proc/sys writable?"))
        }
    }
}

async fn set_link_up(handle: &Handle, index: u32, name: &str) -> anyhow::Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("bringing network device {name:?} (index {index}) up failed"))
}

pub(super) async fn set_device_mtu(
    handle: &Handle,
    index: u32,
    name: &str,
    mtu: u16,
) -> anyhow::Result<()> {
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(u32::from(mtu))
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("setting the MTU of network device {name:?} to {mtu} failed"))
}

pub(super) async fn add_device_address(
    handle: &Handle,
    index: u32,
    address: Ipv4Addr,
) -> anyhow::Result<()> {
    handle
        .address()
        .add(index, IpAddr::V4(address), 32)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding address {address}/32 to interface index {index} failed"))
}

pub(super) async fn remove_device_address(
    handle: &Handle,
    index: u32,
    address: Ipv4Addr,
) -> anyhow::Result<()> {
    let mut addresses = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .set_address_filter(IpAddr::V4(address))
        .execute();
    while let Some(message) = addresses
        .try_next()
        .await
        .with_context(|| format!("listing addresses of interface index {index} failed"))?
    {
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

async fn add_network_route(handle: &Handle, index: u32, network: Ipv4Net) -> anyhow::Result<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    // Replace: a leftover route for the network (an old flannel0) must not block us.
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .with_context(|| {
            format!("adding route {network} via interface index {index} failed; check `ip route show {network}`")
        })
}
