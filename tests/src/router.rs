//! Topologies beyond one flat segment: more segments (bridges in the underlay namespace,
//! without an address of their own), routers joining them, and moving a host onto another
//! segment. Routers are namespaces `<cluster id>-r<n>` registered with the cluster, so its
//! teardown removes them (and the segments go with the underlay namespace).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};

use crate::cleanup::NS_PREFIX;
use crate::netns;
use crate::underlay::{UNDERLAY_BRIDGE, UNDERLAY_PREFIX_LEN};
use crate::util::ip;
use crate::{Cluster, Host};

static NEXT_ROUTER: AtomicUsize = AtomicUsize::new(1);

/// The cluster's own segment: `ubr0`, 192.168.77.0/24, etcd on .1.
pub const MAIN_SEGMENT: &str = UNDERLAY_BRIDGE;

/// A router: one leg (`eth0`, `eth1`, ...) per segment, forwarding on.
pub struct Router {
    ns: String,
}

impl Router {
    pub fn netns(&self) -> &str {
        &self.ns
    }
    /// Takes every leg down (a router that dies) or up again.
    pub fn set_links(&self, up: bool, legs: usize) -> Result<()> {
        for leg in 0..legs {
            let state = if up { "up" } else { "down" };
            ip(&["-n", &self.ns, "link", "set", &format!("eth{leg}"), state])?;
        }
        Ok(())
    }
}

impl Cluster {
    /// Adds segment bridge `name` to the underlay namespace (no address: the underlay
    /// namespace does not route between segments).
    pub fn add_segment(&self, name: &str) -> Result<()> {
        let u = self.underlay_ns();
        ip(&["-n", u, "link", "add", name, "type", "bridge"])?;
        ip(&["-n", u, "link", "set", name, "up"])?;
        Ok(())
    }

    /// Adds a router with leg `eth<i>` on segment `legs[i].0` at address `legs[i].1`/24.
    pub fn add_router(&self, legs: &[(&str, Ipv4Addr)]) -> Result<Router> {
        let n = NEXT_ROUTER.fetch_add(1, Ordering::SeqCst);
        let ns = format!("{NS_PREFIX}{}-r{n}", self.id());
        self.resources().add_netns(&ns);
        netns::create(&ns)?;
        let u = self.underlay_ns();
        for (i, (segment, address)) in legs.iter().enumerate() {
            let leg = format!("eth{i}");
            let uveth = format!("ur{n}-{i}");
            ip(&[
                "-n", u, "link", "add", &uveth, "type", "veth", "peer", "name", &leg, "netns", &ns,
            ])?;
            ip(&["-n", u, "link", "set", &uveth, "master", segment, "up"])?;
            let addr = format!("{address}/{UNDERLAY_PREFIX_LEN}");
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &leg])?;
            ip(&["-n", &ns, "link", "set", &leg, "up"])?;
        }
        netns::run_in(&ns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n").context("enabling ip_forward")
        })?;
        Ok(Router { ns })
    }

    /// Moves a host (before its daemon starts) onto `segment`: its `eth0` gets `address`/24
    /// instead of its 192.168.77.x and a default route via `gateway`. The host's
    /// `underlay_ip()` still names the old address.
    pub fn move_host_to_segment(
        &self,
        h: &Host,
        segment: &str,
        address: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<()> {
        let uveth = format!("u{}", h.name());
        ip(&[
            "-n",
            self.underlay_ns(),
            "link",
            "set",
            &uveth,
            "master",
            segment,
        ])?;
        let old = format!("{}/{UNDERLAY_PREFIX_LEN}", h.underlay_ip());
        ip(&["-n", h.netns(), "addr", "del", &old, "dev", "eth0"])?;
        let new = format!("{address}/{UNDERLAY_PREFIX_LEN}");
        ip(&["-n", h.netns(), "addr", "add", &new, "dev", "eth0"])?;
        let gw = gateway.to_string();
        ip(&["-n", h.netns(), "route", "replace", "default", "via", &gw])?;
        Ok(())
    }
}
