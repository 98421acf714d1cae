//! The loaded BPF object: loading and attaching the programs, and their maps.

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap},
    programs::{SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use rudder_ebpf::{
    names, Counter, DataplaneConfig, DataplaneConfig6, LocalEndpoint, PeerValue, PeerValue6,
    Senders6, UnderlayAddr,
};

use super::pins::{PinDir, PINNED_MAPS};
use crate::dataplane::counters::{CounterSnapshot, PeerTraffic};

pub(super) use aya::programs::tc::SchedClassifierLinkId;

/// The BPF object built by `build.rs`.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rudder-ebpf"));

/// Deleting an absent key is fine: every operation here is idempotent.
pub(super) fn ignore_missing(
    result: Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The loaded BPF object and its maps.
pub(super) struct Kernel {
    pub(super) ebpf: Ebpf,
    /// Forwards the programs' aya-log records to `tracing`; stopped on drop.
    pub(super) log_task: Option<tokio::task::JoinHandle<()>>,
    pub(super) config: Array<MapData, DataplaneConfig>,
    pub(super) peers: LpmTrie<MapData, [u8; 4], PeerValue>,
    pub(super) senders: HashMap<MapData, [u8; 4], u32>,
    pub(super) endpoints: HashMap<MapData, [u8; 4], LocalEndpoint>,
    pub(super) endpoints6: HashMap<MapData, [u8; 16], LocalEndpoint>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) bytes: PerCpuArray<MapData, u64>,
    pub(super) peer_traffic: PerCpuHashMap<MapData, u32, PeerTraffic>,
    pub(super) config6: Array<MapData, DataplaneConfig6>,
    pub(super) peers6: LpmTrie<MapData, [u8; 16], PeerValue6>,
    pub(super) senders6: HashMap<MapData, UnderlayAddr, Senders6>,
    /// IPv4 peer subnets reached over IPv6.
    pub(super) peers46: LpmTrie<MapData, [u8; 4], PeerValue6>,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if let Some(task) = self.log_task.take() {
            task.abort();
        }
    }
}

/// Reads the programs' aya-log records (rare diagnostics, never per packet) into `tracing`
/// (through the `log` bridge) from a task on the current tokio runtime. Without a runtime
/// (unit tests) or without the log map, the records are simply not read.
fn forward_bpf_logs(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!("BPF programs' log records will not be shown: {e}");
            return None;
        }
    };
    Some(runtime.spawn(async move {
        // SAFETY: the logger owns its ring buffer fd and moves into the AsyncFd, so the fd
        // stays open exactly as long as it is registered.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("polling the BPF log buffer failed: {e}");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

impl Kernel {
    /// Loads both programs into the kernel (verifier included) without attaching them. With
    /// `pins`, the maps are the pinned ones (a previous run's, with its state) or new ones
    /// pinned there.
    pub(super) fn load(pins: Option<&PinDir>) -> anyhow::Result<Self> {
        let mut loader = EbpfLoader::new();
        if let Some(pins) = pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader.load(BPF_OBJECT).context(
            "loading the BPF object failed: needs root (CAP_BPF + CAP_NET_ADMIN) and a kernel with BTF",
        )?;
        for name in [names::PROG_EGRESS, names::PROG_INGRESS, names::PROG_BRIDGE] {
            classifier(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the kernel rejected BPF program {name}"))?;
        }
        fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
        where
            T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
        {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("BPF object has no map {name}"))?;
            T::try_from(map).with_context(|| format!("BPF map {name} has an unexpected type"))
        }
        let log_task = forward_bpf_logs(&mut ebpf);
        Ok(Kernel {
            log_task,
            config: take(&mut ebpf, names::MAP_CONFIG)?,
            peers: take(&mut ebpf, names::MAP_PEERS)?,
            senders: take(&mut ebpf, names::MAP_SENDERS)?,
            endpoints: take(&mut ebpf, names::MAP_ENDPOINTS)?,
            endpoints6: take(&mut ebpf, names::MAP_ENDPOINTS6)?,
            counters: take(&mut ebpf, names::MAP_COUNTERS)?,
            bytes: take(&mut ebpf, names::MAP_BYTES)?,
            peer_traffic: take(&mut ebpf, names::MAP_PEER_TRAFFIC)?,
            config6: take(&mut ebpf, names::MAP_CONFIG6)?,
            peers6: take(&mut ebpf, names::MAP_PEERS6)?,
            senders6: take(&mut ebpf, names::MAP_SENDERS6)?,
            peers46: take(&mut ebpf, names::MAP_PEERS46)?,
            ebpf,
        })
    }

    pub(super) fn set_config(&mut self, config: &DataplaneConfig) -> anyhow::Result<()> {
        self.config
            .set(0, config, 0)
            .context("writing the data plane config map")
    }

    pub(super) fn set_config6(&mut self, config: &DataplaneConfig6) -> anyhow::Result<()> {
        self.config6
            .set(0, config, 0)
            .context("writing the IPv6 data plane config map")
    }

    /// The IPv6 peers in the (adopted) LPM trie: subnet → (underlay address, traffic id).
    pub(super) fn installed_peers6(
        &self,
    ) -> std::collections::BTreeMap<ipnet::Ipv6Net, (std::net::IpAddr, u32)> {
        self.peers6
            .iter()
            .flatten()
            .filter_map(|(key, value)| {
                let subnet = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8).ok()?;
                let underlay = std::net::Ipv6Addr::from(value.underlay).to_canonical();
                Some((subnet, (underlay, value.traffic_id)))
            })
            .collect()
    }

    /// The (program, interface, direction) pairs attached to the underlay.
    fn underlay_attachments(underlay: &str) -> [(&'static str, &str, TcAttachType); 2] {
        [
            (names::PROG_INGRESS, underlay, TcAttachType::Ingress),
            (names::PROG_EGRESS, underlay, TcAttachType::Egress),
        ]
    }

    /// Without pins, programs of ours already attached mean a live second instance in this
    /// namespace (with pins, the pin directory's lock says so).
    pub(super) fn ensure_not_attached(underlay: &str) -> anyhow::Result<()> {
        for (name, ifname, direction) in Self::underlay_attachments(underlay) {
            let (_, attached) = SchedClassifier::query_tcx(ifname, direction).with_context(|| {
                format!("listing TCX programs on {ifname} ({direction:?}): does the interface exist in this namespace?")
            })?;
            if attached.iter().any(|info| info.name_as_str() == Some(name)) {
                bail!("{name} is already attached to {ifname} ({direction:?}): another rudder runs in this namespace; stop it first");
            }
        }
        Ok(())
    }

    /// TCX attach (kernel >= 6.6) to ingress and egress of the underlay. The bridge program
    /// is attached separately ([`Kernel::attach_bridge`]), whenever a bridge is adopted.
    /// With `pins`, the links are pinned, and links a previous run pinned get the new
    /// programs atomically.
    pub(super) fn attach(&mut self, underlay: &str, pins: Option<&PinDir>) -> anyhow::Result<()> {
        for (name, ifname, direction) in Self::underlay_attachments(underlay) {
            if let Some(pins) = pins {
                pins.attach_or_replace(classifier(&mut self.ebpf, name)?, name, ifname, direction)?;
                continue;
            }
            classifier(&mut self.ebpf, name)?
                .attach(ifname, direction)
                .with_context(|| format!("attaching {name} to {ifname} ({direction:?}) failed: does the interface exist in this namespace?"))?;
        }
        Ok(())
    }

    /// Attaches the container → peer fast path to a bridge's ingress.
    pub(super) fn attach_bridge(&mut self, bridge: &str) -> anyhow::Result<SchedClassifierLinkId> {
        classifier(&mut self.ebpf, names::PROG_BRIDGE)?
            .attach(bridge, TcAttachType::Ingress)
            .with_context(|| format!("attaching {} to {bridge} (ingress)", names::PROG_BRIDGE))
    }

    /// Detaches it again; a link whose interface is gone already went with it.
    pub(super) fn detach_bridge(&mut self, link: SchedClassifierLinkId) {
        if let Ok(program) = classifier(&mut self.ebpf, names::PROG_BRIDGE) {
            let _ = program.detach(link);
        }
    }

    /// The peers in the (adopted) LPM trie: subnet → (public IP, traffic id).
    pub(super) fn installed_peers(
        &self,
    ) -> std::collections::BTreeMap<ipnet::Ipv4Net, (std::net::Ipv4Addr, u32)> {
        self.peers
            .iter()
            .flatten()
            .filter_map(|(key, value)| {
                let subnet = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8).ok()?;
                Some((subnet, (value.public_ip.into(), value.traffic_id)))
            })
            .collect()
    }

    pub(super) fn packet_counts(&self) -> CounterSnapshot {
        sum_over_cpus(&self.counters)
    }

    pub(super) fn byte_counts(&self) -> CounterSnapshot {
        sum_over_cpus(&self.bytes)
    }

    /// The traffic of one peer entry, summed over CPUs (zero before its first packet).
    pub(super) fn peer_traffic(&self, traffic_id: u32) -> PeerTraffic {
        let mut total = PeerTraffic::default();
        if let Ok(per_cpu) = self.peer_traffic.get(&traffic_id, 0) {
            for t in per_cpu.iter() {
                total.tx_packets += t.tx_packets;
                total.tx_bytes += t.tx_bytes;
                total.rx_packets += t.rx_packets;
                total.rx_bytes += t.rx_bytes;
            }
        }
        total
    }

    /// Drops traffic entries of peers that are gone: a packet in flight while a peer was
    /// removed can re-create its entry after the removal.
    pub(super) fn forget_traffic_except(&mut self, live: &std::collections::BTreeSet<u32>) {
        let stale: Vec<u32> = self
            .peer_traffic
            .keys()
            .flatten()
            .filter(|id| !live.contains(id))
            .collect();
        for id in stale {
            let _ = self.peer_traffic.remove(&id);
        }
    }

    /// (instructions the verifier processed, instructions after translation).
    pub(super) fn program_sizes(&self, name: &str) -> anyhow::Result<(u32, u32)> {
        let program: &SchedClassifier = self
            .ebpf
            .program(name)
            .with_context(|| format!("BPF object has no program {name}"))?
            .try_into()?;
        let info = program
            .info()
            .with_context(|| format!("reading info of {name}"))?;
        Ok((
            info.verified_instruction_count().unwrap_or(0),
            info.size_translated().unwrap_or(0) / 8,
        ))
    }
}

/// In the calling thread's network namespace (sysfs would show the mounter's).
fn sum_over_cpus(map: &PerCpuArray<MapData, u64>) -> CounterSnapshot {
    let mut snapshot = [0u64; Counter::COUNT];
    for counter in Counter::ALL {
        if let Ok(per_cpu) = map.get(&(counter.index() as u32), 0) {
            snapshot[counter.index()] = per_cpu.iter().sum();
        }
    }
    snapshot
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .with_context(|| format!("BPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("BPF program {name} is not a TC classifier"))
}
