//! The reconciler's tests, and the recording data plane the IPv6 half's tests share.
use super::*;
use crate::dataplane::{CounterSnapshot, DataplaneKind};
use ipnet::Ipv6Net;
use std::sync::Mutex;

/// A data plane that records what it was told.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) peers: Mutex<PeerMap>,
    /// Where each IPv4 peer is reached.
    pub(crate) underlays: Mutex<BTreeMap<Ipv4Net, IpAddr>>,
    pub(crate) peers6: Mutex<BTreeMap<Ipv6Net, IpAddr>>,
    pub(crate) calls: Mutex<Vec<String>>,
    /// Whether a peer batch is open, and the calls made inside one.
    in_batch: Mutex<bool>,
    batched: Mutex<Vec<String>>,
}

impl Dataplane for Recorder {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Tun
    }
    fn set_local_subnet(&self, _: Ipv4Net) -> anyhow::Result<()> {
        Ok(())
    }
    fn set_overlay_mtu(&self, _: u16) -> anyhow::Result<()> {
        Ok(())
    }
    fn upsert_peer(&self, subnet: Ipv4Net, underlay: IpAddr) -> anyhow::Result<()> {
        self.calls.lock().unwrap().push(format!("+{subnet}"));
        if *self.in_batch.lock().unwrap() {
            self.batched.lock().unwrap().push(format!("+{subnet}"));
        }
        if let IpAddr::V4(ip) = underlay {
            self.peers.lock().unwrap().insert(subnet, ip);
        }
        self.underlays.lock().unwrap().insert(subnet, underlay);
        Ok(())
    }
    fn set_local_subnet6(&self, _: Ipv6Net) -> anyhow::Result<()> {
        Ok(())
    }
    fn upsert_peer6(&self, subnet: Ipv6Net, underlay: IpAddr) -> anyhow::Result<()> {
        self.calls.lock().unwrap().push(format!("+{subnet}"));
        self.peers6.lock().unwrap().insert(subnet, underlay);
        Ok(())
    }
    fn remove_peer6(&self, subnet: Ipv6Net) -> anyhow::Result<()> {
        self.calls.lock().unwrap().push(format!("-{subnet}"));
        self.peers6.lock().unwrap().remove(&subnet);
        Ok(())
    }
    fn begin_peer_batch(&self) {
        *self.in_batch.lock().unwrap() = true;
    }
    fn end_peer_batch(&self) {
        *self.in_batch.lock().unwrap() = false;
    }
    fn remove_peer(&self, subnet: Ipv4Net) -> anyhow::Result<()> {
        self.calls.lock().unwrap().push(format!("-{subnet}"));
        if *self.in_batch.lock().unwrap() {
            self.batched.lock().unwrap().push(format!("-{subnet}"));
        }
        self.peers.lock().unwrap().remove(&subnet);
        self.underlays.lock().unwrap().remove(&subnet);
        Ok(())
    }
    fn counters(&self) -> CounterSnapshot {
        [0; rudder_ebpf::Counter::COUNT]
    }
    fn byte_counters(&self) -> CounterSnapshot {
        [0; rudder_ebpf::Counter::COUNT]
    }
    fn peer_stats(&self) -> Vec<crate::dataplane::PeerStats> {
        Vec::new()
    }
    fn shutdown(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

pub(crate) fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

pub(crate) const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
pub(crate) const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

/// A reconciler for 10.5.1.0/24 at [`ME`], with the recorder it drives.
pub(crate) fn setup() -> (
    Reconciler,
    Arc<Recorder>,
    Arc<Notify>,
    watch::Sender<Ipv4Net>,
) {
    let recorder = Arc::new(Recorder::default());
    let notify = Arc::new(Notify::new());
    let (tx, rx) = watch::channel(net("10.5.1.0/24"));
    let r = Reconciler::new(recorder.clone(), State::default(), ME, rx, notify.clone());
    (r, recorder, notify, tx)
}

#[test]
fn a_snapshot_is_one_peer_batch_and_a_watch_event_none() {
    let (mut r, dp, _, _tx) = setup();
    let snap: PeerMap = [(net("10.5.2.0/24"), PEER), (net("10.5.3.0/24"), PEER)].into();
    r.handle(PeerEvent::Snapshot(snap));
    r.handle(PeerEvent::Upsert(net("10.5.4.0/24"), PEER));
    assert_eq!(
        *dp.batched.lock().unwrap(),
        vec!["+10.5.2.0/24", "+10.5.3.0/24"]
    );
    assert!(!*dp.in_batch.lock().unwrap(), "the batch was closed");
    assert_eq!(dp.calls.lock().unwrap().len(), 3);
}

#[test]
fn snapshot_is_applied_as_a_diff_without_our_own_subnet() {
    let (mut r, dp, _, _tx) = setup();
    let snap: PeerMap = [(net("10.5.1.0/24"), ME), (net("10.5.2.0/24"), PEER)].into();
    r.handle(PeerEvent::Snapshot(snap.clone()));
    assert_eq!(*dp.calls.lock().unwrap(), vec!["+10.5.2.0/24"]);
    // The same snapshot again (a resync after an outage) changes nothing.
    r.handle(PeerEvent::Snapshot(snap));
    assert_eq!(dp.calls.lock().unwrap().len(), 1);
    // A resync that misses a peer keeps it for the grace period...
    r.handle(PeerEvent::Snapshot([(net("10.5.1.0/24"), ME)].into()));
    assert_eq!(dp.calls.lock().unwrap().len(), 1);
    // ...a delete event removes at once.
    r.handle(PeerEvent::Remove(net("10.5.2.0/24")));
    assert_eq!(
        *dp.calls.lock().unwrap(),
        vec!["+10.5.2.0/24", "-10.5.2.0/24"]
    );
    assert!(r.state.snapshot().peers.is_empty());
}

#[tokio::test(start_paused = true)]
async fn peers_missing_from_a_resync_stay_for_the_grace_period() {
    let (mut r, dp, _, _tx) = setup();
    let full: PeerMap = [
        (net("10.5.1.0/24"), ME),
        (net("10.5.2.0/24"), PEER),
        (net("10.5.3.0/24"), Ipv4Addr::new(192, 168, 0, 3)),
    ]
    .into();
    r.handle(PeerEvent::Snapshot(full));
    // etcd wiped: the resync lists nobody.
    r.handle(PeerEvent::Snapshot(PeerMap::new()));
    assert_eq!(
        dp.peers.lock().unwrap().len(),
        2,
        "peers kept during the grace"
    );
    // One host re-registers; the other never comes back.
    tokio::time::advance(Duration::from_secs(5)).await;
    r.handle(PeerEvent::Upsert(net("10.5.2.0/24"), PEER));
    tokio::time::advance(RESYNC_GRACE).await;
    assert_eq!(
        r.next_grace_expiry().map(|t| t <= Instant::now()),
        Some(true)
    );
    r.apply();
    let left: Vec<Ipv4Net> = dp.peers.lock().unwrap().keys().copied().collect();
    assert_eq!(left, vec![net("10.5.2.0/24")]);
    assert_eq!(r.next_grace_expiry(), None);
}

#[test]
fn two_leases_on_one_address_are_both_routed_and_reported() {
    let (mut r, dp, _, _tx) = setup();
    r.handle(PeerEvent::Snapshot(
        [(net("10.5.2.0/24"), PEER), (net("10.5.3.0/24"), PEER)].into(),
    ));
    assert_eq!(dp.peers.lock().unwrap().len(), 2);
    assert_eq!(r.shared_ips_warned.get(&PEER).map(Vec::len), Some(2));
    r.handle(PeerEvent::Remove(net("10.5.3.0/24")));
    assert!(r.shared_ips_warned.is_empty());
}

#[test]
fn single_events_keep_status_and_data_plane_in_step() {
    let (mut r, dp, _, _tx) = setup();
    r.handle(PeerEvent::Snapshot(
        [(net("10.5.1.0/24"), ME), (net("10.5.2.0/24"), PEER)].into(),
    ));
    // A stale lease of ours under another subnet is no peer; a new one is.
    r.handle(PeerEvent::Upsert(net("10.5.9.0/24"), ME));
    r.handle(PeerEvent::Upsert(net("10.5.3.0/24"), PEER));
    r.handle(PeerEvent::Remove(net("10.5.2.0/24")));
    r.handle(PeerEvent::Remove(net("10.5.7.0/24")));
    let expect: PeerMap = [(net("10.5.3.0/24"), PEER)].into();
    assert_eq!(*dp.peers.lock().unwrap(), expect);
    assert_eq!(r.state.snapshot().peers, expect);
    assert_eq!(
        *dp.calls.lock().unwrap(),
        vec!["+10.5.2.0/24", "+10.5.3.0/24", "-10.5.2.0/24"]
    );
}

#[test]
fn changed_public_ip_is_reprogrammed() {
    let (mut r, dp, _, _tx) = setup();
    r.handle(PeerEvent::Upsert(net("10.5.2.0/24"), PEER));
    r.handle(PeerEvent::Upsert(
        net("10.5.2.0/24"),
        Ipv4Addr::new(192, 168, 0, 9),
    ));
    assert_eq!(
        dp.peers.lock().unwrap().get(&net("10.5.2.0/24")),
        Some(&Ipv4Addr::new(192, 168, 0, 9))
    );
    assert_eq!(dp.calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn losing_our_key_triggers_a_lease_check() {
    let (mut r, _, notify, _tx) = setup();
    r.handle(PeerEvent::Snapshot([(net("10.5.1.0/24"), ME)].into()));
    r.handle(PeerEvent::Remove(net("10.5.1.0/24")));
    tokio::time::timeout(std::time::Duration::from_secs(1), notify.notified())
        .await
        .expect("lease check requested");
}

#[test]
fn a_new_own_subnet_removes_it_from_peers() {
    let (mut r, dp, _, tx) = setup();
    r.handle(PeerEvent::Snapshot(
        [(net("10.5.1.0/24"), ME), (net("10.5.3.0/24"), PEER)].into(),
    ));
    tx.send(net("10.5.3.0/24")).unwrap();
    r.apply();
    let peers = dp.peers.lock().unwrap().clone();
    assert!(!peers.contains_key(&net("10.5.3.0/24")));
    assert!(
        !peers.contains_key(&net("10.5.1.0/24")),
        "our stale lease is no peer"
    );
}
