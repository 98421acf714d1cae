//! A host's container: a network namespace behind the daemon's bridge (veth `eth0` with
//! the subnet's .2, default route via .1); the container and the host as traffic endpoints.

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;

use crate::host::{Host, BRIDGE};
use crate::netns;
use crate::traffic::Endpoint;
use crate::util::{ip, wait_until};

/// Host side of the container's veth, inside the host namespace.
const CONTAINER_VETH_HOST: &str = "vc0";
impl Host {
    /// The container's network namespace (exists once the host was ready).
    pub fn container_netns(&self) -> &str {
        &self.0.ctr_ns
    }
    /// The container's address: the subnet's second address (e.g. 10.5.7.2).
    pub fn container_ip(&self) -> Ipv4Addr {
        let n = u32::from(self.subnet().network());
        Ipv4Addr::from(n + 2)
    }

    /// The bridge's (gateway's) address: the subnet's first address.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet().network()) + 1)
    }

    /// The container as a traffic endpoint.
    pub fn container(&self) -> Endpoint {
        Endpoint {
            ns: self.0.ctr_ns.clone(),
            ip: self.container_ip(),
        }
    }

    /// The host namespace itself as a traffic endpoint (its underlay address).
    pub fn host_endpoint(&self) -> Endpoint {
        Endpoint {
            ns: self.0.ns.clone(),
            ip: self.0.underlay_ip,
        }
    }

    /// Creates the container namespace (first time) or re-attaches its veth to the bridge
    /// (after a restart). Container: `eth0` = subnet .2, MTU from the subnet file, default
    /// route via subnet .1.
    pub fn ensure_container(&self) -> Result<()> {
        let env = self.subnet_env();
        let ns = self.0.ns.as_str();
        wait_until(
            &format!("bridge {BRIDGE} in {}", self.0.name),
            Duration::from_secs(10),
            || Ok(ip(&["-n", ns, "link", "show", BRIDGE]).is_ok()),
        )?;
        let mtu = env.mtu.to_string();
        if !self.0.container_made.load(Ordering::SeqCst) {
            let c = self.0.ctr_ns.as_str();
            self.0.res.add_netns(c);
            netns::create(c)?;
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                CONTAINER_VETH_HOST,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "mtu",
                &mtu,
                "netns",
                c,
            ])?;
            let cidr = format!("{}/{}", self.container_ip(), env.subnet.prefix_len());
            ip(&["-n", c, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", c, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                c,
                "route",
                "add",
                "default",
                "via",
                &self.gateway_ip().to_string(),
            ])?;
            self.0.container_made.store(true, Ordering::SeqCst);
        }
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            CONTAINER_VETH_HOST,
            "master",
            BRIDGE,
            "up",
        ])?;
        Ok(())
    }
}
