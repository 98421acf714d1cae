//! Per-peer traffic for status output: the IPv4 subnets reached over IPv4 (with what the
//! socket path decapsulated for them), those reached over IPv6, and the IPv6 subnets.

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

use super::EbpfDataplane;
use crate::dataplane::PeerStats;

impl EbpfDataplane {
    /// Every peer entry (IPv4 subnets over either outer family, IPv6 subnets) with its
    /// traffic.
    pub(super) fn peer_stats_of_all(&self) -> Vec<PeerStats> {
        let socket_path = self.socket_path();
        // The peers first, then one map read per lock: a status scraper never holds the lock
        // that reconciliation needs for more than one syscall.
        let peers: Vec<(Ipv4Net, Ipv4Addr, u32, std::time::SystemTime)> = {
            let state = self.lock();
            state
                .peers
                .iter()
                .map(|(subnet, public_ip)| {
                    let (traffic_id, changed) = state
                        .peer_entries
                        .get(subnet)
                        .copied()
                        .unwrap_or((0, std::time::UNIX_EPOCH));
                    (*subnet, *public_ip, traffic_id, changed)
                })
                .collect()
        };
        let over6: Vec<PeerStats> = {
            let state = self.lock();
            state
                .peers_over6
                .iter()
                .map(|(subnet, (ip, traffic_id, changed))| PeerStats {
                    subnet: (*subnet).into(),
                    public_ip: (*ip).into(),
                    changed: *changed,
                    traffic: state
                        .kernel
                        .as_ref()
                        .map(|k| k.peer_traffic(*traffic_id))
                        .unwrap_or_default(),
                })
                .collect()
        };
        let ipv6: Vec<PeerStats> = {
            let state = self.lock();
            state
                .peers6
                .iter()
                .map(|(subnet, (underlay, traffic_id))| PeerStats {
                    subnet: (*subnet).into(),
                    public_ip: *underlay,
                    changed: state
                        .peer6_changed
                        .get(subnet)
                        .copied()
                        .unwrap_or(std::time::UNIX_EPOCH),
                    traffic: state
                        .kernel
                        .as_ref()
                        .map(|k| k.peer_traffic(*traffic_id))
                        .unwrap_or_default(),
                })
                .collect()
        };
        peers
            .into_iter()
            .map(|(subnet, public_ip, traffic_id, changed)| {
                let mut traffic = self
                    .lock()
                    .kernel
                    .as_ref()
                    .map(|k| k.peer_traffic(traffic_id))
                    .unwrap_or_default();
                // Trains the socket path decapsulated are received traffic too.
                if let Some(path) = &socket_path {
                    let socket = path.traffic(subnet);
                    traffic.rx_packets += socket.rx_packets;
                    traffic.rx_bytes += socket.rx_bytes;
                }
                PeerStats {
                    subnet: subnet.into(),
                    public_ip: public_ip.into(),
                    changed,
                    traffic,
                }
            })
            .chain(over6)
            .chain(ipv6)
            .collect()
    }
}
