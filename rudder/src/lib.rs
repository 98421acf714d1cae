//! rudder: an IP-in-UDP overlay network for containers, leased through etcd.
//!
//! One module per concern: `config` (etcd network config), `subnet` (arithmetic and lease
//! encodings), `etcd` (connection, back-off), `lease` (our subnet), `peers` (everyone
//! else), `reconcile` (peers → data plane), `dataplane` (`tun` and `ebpf` behind one
//! trait), `host` (netlink), `firewall` (iptables forward rules, nftables masquerade), `subnet_file`, `metrics` and `http` (status and
//! health), `cli` and `daemon` (the `rudder` command).

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod docker_opts;
pub mod etcd;
pub mod firewall;
pub mod host;
pub mod http;
pub mod json;
pub mod lease;
pub mod metrics;
pub mod packet;
pub mod peers;
pub mod reconcile;
pub mod status;
pub mod subnet;
pub mod subnet_file;
