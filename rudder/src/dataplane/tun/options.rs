//! How the TUN data plane is set up: [`TunOptions`], their defaults and their checks.

use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

use anyhow::bail;
use ipnet::{Ipv4Net, Ipv6Net};
use rudder_ebpf::{DEFAULT_UDP_PORT, ENCAP_OVERHEAD};

use crate::dataplane::forwarding::default_device_icmp_source;
use crate::packet;
use crate::subnet::gateway;

/// Name of the TUN device unless configured otherwise.
pub const DEFAULT_DEVICE_NAME: &str = "rudder0";

/// How the TUN data plane is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunOptions {
    /// Name of the TUN device; a stale device of that name is removed first.
    pub device_name: String,
    /// MTU of the TUN device: the underlay MTU minus [`ENCAP_OVERHEAD`].
    pub mtu: u16,
    /// Our leased subnet: its network address /32 goes on the device, and only
    /// destinations inside it are delivered from the underlay.
    pub local_subnet: Ipv4Net,
    /// The whole overlay network: routed into the device.
    pub network: Ipv4Net,
    /// Local address of the UDP socket. Its port is also the port every peer listens on.
    pub bind: SocketAddrV4,
    /// Source of the ICMP errors we send to peers over the underlay (time exceeded on
    /// arrival): our subnet's first host address, so the peer's anti-spoofing accepts it.
    pub gateway: Ipv4Addr,
    /// Source of the ICMP errors we write back into the device (no lease, TTL expired
    /// on the way out). It must not be a local address: on a real host the gateway
    /// address sits on the container bridge, and the kernel drops a packet arriving on
    /// the TUN device with a local source as a martian. An unleased address of the
    /// network is routed back through the device, so it also passes strict rp_filter.
    pub device_icmp_source: Ipv4Addr,
    /// Batch with the kernel's offloads: TSO/USO on the device (`IFF_VNET_HDR`), GSO and
    /// GRO on the socket. Off means one packet per system call, as flannel's udp backend.
    pub offload: bool,
    /// The underlay interface: plain overlay-to-overlay packets arriving on it are dropped
    /// by an nftables rule (counted `unencapsulated`). `None`: no rule (tests).
    pub underlay: Option<String>,
    /// The IPv6 overlay (`EnableIPv6`); `None`: IPv4 only, exactly as flannel's udp backend.
    pub ipv6: Option<TunIpv6>,
}

/// The TUN plane's IPv6 half (dual stack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunIpv6 {
    /// IPv6Network: routed into the device.
    pub network: Ipv6Net,
    /// Our IPv6 subnet: its network address /128 goes on the device.
    pub local_subnet: Ipv6Net,
    /// Where the second, IPv6-only UDP socket binds (our PublicIPv6, the overlay port):
    /// peers that announce a PublicIPv6 too are reached over IPv6. `None`: every peer is
    /// reached over IPv4, IPv6 inner packets included.
    pub bind: Option<SocketAddrV6>,
}

impl TunIpv6 {
    /// From the daemon's IPv6 plane: the IPv6 socket on our PublicIPv6 and `port`.
    pub fn from_plane(plane: &crate::dataplane::Ipv6Plane, port: u16) -> Self {
        TunIpv6 {
            network: plane.network,
            local_subnet: plane.local_subnet,
            bind: plane
                .public_ipv6
                .map(|ip| SocketAddrV6::new(ip, port, 0, 0)),
        }
    }
}

impl TunOptions {
    /// False on an IPv6-only network, whose IPv4 network and subnet are 0.0.0.0/0.
    pub fn carries_ipv4(&self) -> bool {
        self.network != Ipv4Net::default()
    }

    /// Defaults for a host: device `rudder0`, UDP on 0.0.0.0:8285, MTU from the underlay
    /// interface's MTU, ICMP errors to peers from the subnet's first host address and
    /// into the device from [`default_device_icmp_source`].
    pub fn new(local_subnet: Ipv4Net, network: Ipv4Net, underlay_mtu: u16) -> Self {
        TunOptions {
            device_name: DEFAULT_DEVICE_NAME.to_owned(),
            mtu: underlay_mtu.saturating_sub(ENCAP_OVERHEAD),
            local_subnet,
            network,
            bind: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_UDP_PORT),
            gateway: gateway(local_subnet),
            device_icmp_source: default_device_icmp_source(network, local_subnet),
            offload: true,
            underlay: None,
            ipv6: None,
        }
    }

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        if self.device_name.is_empty() || self.device_name.len() > 15 {
            bail!(
                "TUN device name {:?} must be 1 to 15 bytes long (Linux IFNAMSIZ); choose a shorter name",
                self.device_name
            );
        }
        if usize::from(self.mtu) < packet::IPV4_MIN_HEADER_LEN + 48 {
            bail!(
                "overlay MTU {} is too small (IPv4 needs at least 68); check the underlay interface MTU",
                self.mtu
            );
        }
        if !self.network.contains(&self.local_subnet) {
            bail!(
                "local subnet {} is not inside the overlay network {}; the lease and the network config disagree",
                self.local_subnet,
                self.network
            );
        }
        if self.carries_ipv4()
            && (!self.network.contains(&self.device_icmp_source)
                || self.local_subnet.contains(&self.device_icmp_source))
        {
            bail!(
                "ICMP source {} for the TUN device must be inside the overlay network {} but outside our subnet {} (a local address would be dropped as martian)",
                self.device_icmp_source,
                self.network,
                self.local_subnet
            );
        }
        if let Some(v6) = &self.ipv6 {
            if !v6.network.contains(&v6.local_subnet) {
                bail!(
                    "local IPv6 subnet {} is not inside the IPv6 network {}; the lease and the network config disagree",
                    v6.local_subnet,
                    v6.network
                );
            }
            if usize::from(self.mtu) < crate::packet6::IPV6_MIN_MTU {
                bail!(
                    "overlay MTU {} is below IPv6's minimum of 1280; the underlay MTU is too small for an IPv6 overlay",
                    self.mtu
                );
            }
        }
        if self.bind.port() == 0 {
            bail!(
                "UDP port 0 cannot be used: every peer sends to the same fixed port (default 8285)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn options_defaults_follow_flannel() {
        let o = TunOptions::new(net("10.5.34.0/24"), net("10.5.0.0/16"), 1500);
        assert_eq!(o.device_name, "rudder0");
        assert_eq!(o.mtu, 1472);
        assert_eq!(o.bind, "0.0.0.0:8285".parse().unwrap());
        assert_eq!(o.gateway, ip("10.5.34.1"));
        assert_eq!(o.device_icmp_source, ip("10.5.0.1"));
        assert_eq!(
            default_device_icmp_source(net("10.5.0.0/16"), net("10.5.0.0/24")),
            ip("10.5.255.254")
        );
        o.validate().unwrap();
        let mut bad = o.clone();
        bad.local_subnet = net("10.6.0.0/24");
        assert!(bad.validate().is_err());
        let mut bad = o.clone();
        bad.device_icmp_source = ip("10.5.34.1");
        assert!(
            bad.validate().is_err(),
            "a local ICMP source would be martian"
        );
        let mut bad = o;
        bad.device_name = "a-name-that-is-too-long".into();
        assert!(bad.validate().is_err());
    }
}
