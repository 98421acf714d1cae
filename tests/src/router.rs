//! Extra underlay namespaces for topologies beyond one flat segment: a router on the
//! underlay bridge (a gateway hosts can route through and that can be taken away).
//! Named `<cluster id>-r<n>` and registered with the cluster, so its teardown removes them.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;

use crate::cleanup::NS_PREFIX;
use crate::netns;
use crate::underlay::{UNDERLAY_BRIDGE, UNDERLAY_PREFIX_LEN};
use crate::util::ip;
use crate::Cluster;

static NEXT_ROUTER: AtomicUsize = AtomicUsize::new(1);

/// A router: namespace with `eth0` on the underlay bridge at `ip`/24, forwarding on and
/// sending no ICMP redirects (hosts keep routing through it even towards their own segment).
pub struct Router {
    ns: String,
    ip: Ipv4Addr,
}

impl Router {
    pub fn netns(&self) -> &str {
        &self.ns
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    /// Takes the router's link down or up (a router that dies, or comes back).
    pub fn set_link(&self, up: bool) -> Result<()> {
        ip(&[
            "-n",
            &self.ns,
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }
}

impl Cluster {
    /// Adds a router on the underlay bridge at `ip` (in 192.168.77.0/24).
    pub fn add_router(&self, router_ip: Ipv4Addr) -> Result<Router> {
        let n = NEXT_ROUTER.fetch_add(1, Ordering::SeqCst);
        let ns = format!("{NS_PREFIX}{}-r{n}", self.id());
        self.resources().add_netns(&ns);
        netns::create(&ns)?;
        let uveth = format!("ur{n}");
        let u = self.underlay_ns();
        ip(&[
            "-n", u, "link", "add", &uveth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&[
            "-n",
            u,
            "link",
            "set",
            &uveth,
            "master",
            UNDERLAY_BRIDGE,
            "up",
        ])?;
        let addr = format!("{router_ip}/{UNDERLAY_PREFIX_LEN}");
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        netns::run_in(&ns, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")?;
            for conf in ["all", "default", "eth0"] {
                std::fs::write(
                    format!("/proc/sys/net/ipv4/conf/{conf}/send_redirects"),
                    "0\n",
                )?;
            }
            Ok(())
        })?;
        Ok(Router { ns, ip: router_ip })
    }
}
