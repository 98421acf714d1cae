//! What depends on our subnet on this host, outside the data plane: IP forwarding, the
//! bridge (`--bridge`), masquerade and forward rules, the subnet file, the blackhole route.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::watch;

use crate::cli::RunArgs;
use crate::firewall::{self, ForwardRules};
use crate::host::{self, Netlink};
use crate::host_ipv6;
use crate::subnet::{gateway, gateway6};
use crate::subnet_file::SubnetFile;

/// What depends on our subnet outside the data plane: subnet file, bridge, masquerade.
/// Clones share the subnet file's content: the lease keeper changes the subnet, the
/// underlay follower the MTU.
#[derive(Clone)]
pub(crate) struct LocalSetup {
    pub(crate) args: RunArgs,
    pub(crate) network: Ipv4Net,
    /// IPv6Network when the network has IPv6 on (only the subnet file uses it so far).
    pub(crate) ipv6_network: Option<Ipv6Net>,
    pub(crate) netlink: Netlink,
    file: Arc<Mutex<FileContent>>,
}

/// What the subnet file says; `subnet` is `None` until the first [`LocalSetup::apply`].
struct FileContent {
    subnet: Option<Ipv4Net>,
    ipv6_subnet: Option<Ipv6Net>,
    overlay_mtu: u16,
}

impl LocalSetup {
    pub(crate) fn new(
        args: RunArgs,
        network: Ipv4Net,
        ipv6_network: Option<Ipv6Net>,
        overlay_mtu: u16,
        netlink: Netlink,
    ) -> Self {
        LocalSetup {
            args,
            network,
            ipv6_network,
            netlink,
            file: Arc::new(Mutex::new(FileContent {
                subnet: None,
                ipv6_subnet: None,
                overlay_mtu,
            })),
        }
    }

    fn overlay_mtu(&self) -> u16 {
        self.file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overlay_mtu
    }

    pub(crate) async fn apply(
        &self,
        subnet: Ipv4Net,
        ipv6_subnet: Option<Ipv6Net>,
    ) -> anyhow::Result<()> {
        host::enable_ip_forwarding()?;
        if ipv6_subnet.is_some() {
            host_ipv6::enable_ipv6_forwarding()?;
        }
        if let Some(bridge) = &self.args.bridge {
            let address = self.bridge_address(subnet)?;
            let index = self
                .netlink
                .ensure_bridge(bridge, address, u32::from(self.overlay_mtu()))
                .await?;
            if let Some(subnet6) = ipv6_subnet {
                // The containers' IPv6 gateway: the subnet's first address, as for IPv4.
                let gateway6 = Ipv6Net::new(gateway6(subnet6), subnet6.prefix_len())?;
                host_ipv6::set_only_global_ipv6(self.netlink.handle(), index, gateway6)
                    .await
                    .with_context(|| format!("putting {gateway6} on bridge {bridge}"))?;
            }
        }
        if self.args.ip_masq && self.ipv4_on() {
            firewall::install_masquerade(
                self.network,
                subnet,
                !self.args.ip_masq_fully_random_disable,
            )?;
        } else {
            if self.args.ip_masq {
                tracing::warn!(
                    "--ip-masq masquerades IPv4 only: nothing to do on an IPv6-only network"
                );
            }
            // A previous run with --ip-masq may have left its table.
            firewall::remove_masquerade().ok();
        }
        if let Some(rules) = self.forward_rules() {
            // Not fatal: a host without iptables has no docker chains to get past.
            match rules.ensure() {
                Ok(_) => tracing::info!(network = %self.network, "iptables forward rules in place"),
                Err(e) => tracing::warn!("installing the iptables forward rules failed: {e:#}"),
            }
        }
        self.write_subnet_file(|file| {
            file.subnet = Some(subnet);
            file.ipv6_subnet = ipv6_subnet;
        })?;
        tracing::info!(file = %self.args.subnet_file.display(), %subnet, ipv6_subnet = ?ipv6_subnet, "subnet file written");
        Ok(())
    }

    /// The underlay's MTU changed: the bridge's MTU and the subnet file's FLANNEL_MTU follow
    /// (containers made from now on get it).
    pub(crate) async fn set_overlay_mtu(&self, overlay_mtu: u16) -> anyhow::Result<()> {
        let subnet = self.write_subnet_file(|file| file.overlay_mtu = overlay_mtu)?;
        tracing::info!(file = %self.args.subnet_file.display(), mtu = overlay_mtu, "subnet file rewritten");
        if let (Some(bridge), Some(subnet)) = (&self.args.bridge, subnet) {
            let address = self.bridge_address(subnet)?;
            self.netlink
                .ensure_bridge(bridge, address, u32::from(overlay_mtu))
                .await?;
        }
        Ok(())
    }

    /// Changes the content and rewrites the file (once there is a subnet), under one lock so
    /// a subnet move and an MTU change cannot undo each other; returns the subnet.
    fn write_subnet_file(
        &self,
        change: impl FnOnce(&mut FileContent),
    ) -> anyhow::Result<Option<Ipv4Net>> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut file);
        if let Some(subnet) = file.subnet {
            SubnetFile {
                enable_ipv4: self.ipv4_on(),
                network: self.network,
                subnet,
                ipv6: self.ipv6_network.zip(file.ipv6_subnet),
                mtu: file.overlay_mtu,
                ip_masq: self.args.ip_masq,
            }
            .write(&self.args.subnet_file)?;
        }
        Ok(file.subnet)
    }

    pub(crate) async fn undo(&self) {
        if let Some(bridge) = &self.args.bridge {
            if let Err(e) = self.netlink.delete_link(bridge).await {
                tracing::warn!("removing bridge {bridge}: {e:#}");
            }
        }
        if self.args.ip_masq {
            if let Err(e) = firewall::remove_masquerade() {
                tracing::warn!("removing masquerade rules: {e:#}");
            }
        }
        if let Some(rules) = self.forward_rules() {
            if let Err(e) = rules.remove() {
                tracing::warn!("removing the iptables forward rules: {e:#}");
            }
        }
    }

    pub(crate) fn forward_rules(&self) -> Option<ForwardRules> {
        (self.args.iptables_forward_rules && self.ipv4_on())
            .then(|| ForwardRules::new(self.network))
    }

    /// False on an IPv6-only network (its IPv4 network and subnet are 0.0.0.0/0, which no
    /// IPv4 rule or route may be made from).
    pub(crate) fn ipv4_on(&self) -> bool {
        self.network != Ipv4Net::default()
    }

    /// The bridge's IPv4 gateway address; none on an IPv6-only network.
    fn bridge_address(&self, subnet: Ipv4Net) -> anyhow::Result<Option<Ipv4Net>> {
        if !self.ipv4_on() {
            return Ok(None);
        }
        Ok(Some(Ipv4Net::new(gateway(subnet), subnet.prefix_len())?))
    }
}

/// `--ip-blackhole-route`: keeps a blackhole route for our subnet, as flanneld does, checking
/// every `period` (its --iptables-resync); follows the subnet when the lease changes.
pub(crate) async fn keep_blackhole_route(
    netlink: Netlink,
    mut subnet: watch::Receiver<Ipv4Net>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    let mut installed: Option<Ipv4Net> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = subnet.changed() => if changed.is_err() { return },
        }
        let current = *subnet.borrow();
        if let Some(old) = installed.filter(|old| *old != current) {
            if let Err(e) = netlink.remove_blackhole(old).await {
                tracing::warn!("removing the blackhole route {old}: {e:#}");
            }
        }
        match netlink.ensure_blackhole(current).await {
            Ok(added) => {
                if added {
                    tracing::info!(subnet = %current, "blackhole route added");
                }
                installed = Some(current);
                failing = false;
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!("adding the blackhole route {current}: {e:#}");
            }
            Err(_) => {}
        }
    }
}
