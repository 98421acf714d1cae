//! Adopting a bridge someone else made (docker0, cni0): found by the gateway address, its
//! fast path attached, followed when it is deleted and re-created. Two host namespaces of
//! [`Topology`], real TCX attachments, real routes.

use std::sync::Arc;

use aya::programs::{SchedClassifier, TcAttachType};
use ipnet::Ipv4Net;
use rudder_ebpf::names;

use super::smoke_tests::{rudder_routes, Topology, UNDERLAY_A, UNDERLAY_B};
use crate::dataplane::Dataplane as _;

/// Whether `rudder_br_in` is attached to br0's ingress in `host`'s namespace.
fn bridge_program_attached(topo: &Topology, host: &str) -> bool {
    topo.in_ns(host, || {
        SchedClassifier::query_tcx("br0", TcAttachType::Ingress)
            .map(|(_, progs)| {
                progs
                    .iter()
                    .any(|p| p.name_as_str() == Some(names::PROG_BRIDGE))
            })
            .unwrap_or(false)
    })
    .join()
    .unwrap()
}

/// Runs the daemon's periodic refresh `times` times inside the host's namespace.
fn refresh(topo: &Topology, host: &str, dp: &Arc<super::EbpfDataplane>, times: usize) {
    let dp = dp.clone();
    topo.in_ns(host, move || {
        for _ in 0..times {
            dp.refresh_host_state().unwrap();
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_bridge_made_by_someone_else_is_adopted_and_followed() {
    super::kernel_tests::require_root();
    let topo = Topology::build();
    // No --bridge: br0 is found because it holds 10.5.1.1, the subnet's gateway address.
    let a = Arc::new(topo.load_with_bridge("hA", UNDERLAY_A, "10.5.1.0/24", None));
    let peer: Ipv4Net = "10.5.2.0/24".parse().unwrap();
    a.upsert_peer(peer, UNDERLAY_B.into()).unwrap();
    let fast = a.fast_path().unwrap();
    assert_eq!(fast.bridge.as_deref(), Some("br0"), "{fast:?}");
    assert!(bridge_program_attached(&topo, "hA"));
    let routes = rudder_routes(&topo, "hA");
    assert!(
        routes.contains("src 10.5.1.1"),
        "preferred source: {routes}"
    );
    // The bridge learns the container (neighbour + FDB entry) from its traffic.
    topo.exec("cA", &["ping", "-c", "1", "-W", "2", "10.5.1.1"]);
    refresh(&topo, "hA", &a, 1);
    assert_eq!(a.fast_path().unwrap().local_endpoints, 1, "cA behind br0");

    // docker stops: its bridge goes, and the kernel drops the routes with its address as
    // source. The refresh notices; the routes come back without a source.
    topo.ip("hA", "link del br0");
    refresh(&topo, "hA", &a, 8);
    let fast = a.fast_path().unwrap();
    assert_eq!(fast.bridge, None, "{fast:?}");
    assert_eq!(fast.local_endpoints, 0, "{fast:?}");
    let routes = rudder_routes(&topo, "hA");
    assert!(
        routes.contains("10.5.2.0/24 via") && !routes.contains("src"),
        "peer route without the vanished source: {routes}"
    );

    // docker starts again: a new bridge (new ifindex) with the gateway address.
    topo.ip("hA", "link add br0 type bridge");
    topo.ip("hA", "addr add 10.5.1.1/24 dev br0");
    topo.ip("hA", "link set br0 up");
    topo.ip("hA", "link set veth-c master br0");
    topo.exec("cA", &["ping", "-c", "1", "-W", "2", "10.5.1.1"]);
    refresh(&topo, "hA", &a, 1);
    let fast = a.fast_path().unwrap();
    assert_eq!(fast.bridge.as_deref(), Some("br0"), "{fast:?}");
    assert_eq!(fast.local_endpoints, 1, "cA behind the new br0: {fast:?}");
    assert!(
        bridge_program_attached(&topo, "hA"),
        "re-attached to the new br0"
    );
    let routes = rudder_routes(&topo, "hA");
    assert!(routes.contains("src 10.5.1.1"), "source back: {routes}");
    a.shutdown().unwrap();
}
