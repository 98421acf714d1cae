//! rudder: an IP-in-UDP overlay network for containers, leased through etcd.
//!
//! One module per concern, bottom-up: `json` (flannel's JSON), `subnet` (arithmetic and
//! lease encodings), `config` (etcd network config), `packet` (packet rules), `host`
//! (netlink), `firewall` (iptables forward rules, nftables masquerade), `metrics`
//! (control-plane counters), `dataplane` (`tun` and `ebpf` behind one trait), `cli`,
//! `etcd` (connection, back-off, diagnosis), `lease` (our subnet), `peers` (everyone
//! else), `status` and `http` (status, health, metrics), `reconcile` (peers → data
//! plane), `subnet_file`, `docker_opts`, `local_setup` (this host's plumbing for the lease), `admin`,
//! `daemon` (the `rudder` command). Each
//! imports only from those before it.

pub mod admin;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod config_ipv6;
pub mod config_watch;
pub mod daemon;
pub mod dataplane;
pub mod docker_opts;
pub mod endpoint_watch;
pub mod etcd;
pub mod firewall;
pub mod flanneld_compat;
pub mod host;
pub mod host_ipv6;
pub mod http;
pub mod json;
pub mod lease;
mod lease_keeper;
pub mod local_setup;
pub mod metrics;
pub mod packet;
pub mod packet6;
pub mod packet6_icmp;
pub mod packet_segment;
pub mod peer_book;
pub mod peers;
pub mod reconcile;
pub mod reconcile6;
pub mod reconcile_saved;
pub mod route_event_filter;
pub mod state_file;
pub mod status;
pub mod status_socket;
pub mod subnet;
pub mod subnet_file;
pub mod subnet_range6;
pub mod subnet_set;
pub mod underlay;
pub mod underlay_ipv6;
pub mod underlay_watch;
