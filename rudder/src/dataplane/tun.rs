//! Placeholder until the TUN data plane lands (replaced on merge).
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{CounterSnapshot, Dataplane, DataplaneKind};

pub struct TunOptions {
    pub name: String,
    pub mtu: u16,
    pub local_subnet: Ipv4Net,
    pub network: Ipv4Net,
    pub port: u16,
    pub public_ip: Ipv4Addr,
}

pub struct TunDataplane;

impl TunDataplane {
    pub async fn start(_opts: TunOptions) -> anyhow::Result<Self> {
        anyhow::bail!("not yet")
    }
}

impl Dataplane for TunDataplane {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Tun
    }
    fn set_local_subnet(&self, _: Ipv4Net) -> anyhow::Result<()> {
        Ok(())
    }
    fn upsert_peer(&self, _: Ipv4Net, _: Ipv4Addr) -> anyhow::Result<()> {
        Ok(())
    }
    fn remove_peer(&self, _: Ipv4Net) -> anyhow::Result<()> {
        Ok(())
    }
    fn counters(&self) -> CounterSnapshot {
        [0; rudder_ebpf::Counter::COUNT]
    }
    fn shutdown(&self) -> anyhow::Result<()> {
        Ok(())
    }
}
