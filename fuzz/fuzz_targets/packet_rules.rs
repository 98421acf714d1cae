//! Arbitrary bytes through the TUN data plane's decisions, both directions: no panic, and a
//! delivered packet is a valid IPv4 packet whose TTL went down by one.
#![no_main]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rudder::dataplane::forwarding::{
    decide_inbound, decide_outbound, ForwardingTable, IcmpSources, Inbound, Outbound,
};
use rudder::packet::{parse_ipv4, ICMP_ERROR_MAX_LEN};

const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

fn table() -> &'static ForwardingTable {
    static TABLE: OnceLock<ForwardingTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let peers: BTreeMap<_, _> = [
            ("10.5.2.0/24".parse().unwrap(), PEER),
            (
                "10.5.3.0/24".parse().unwrap(),
                Ipv4Addr::new(192, 168, 1, 3),
            ),
        ]
        .into();
        ForwardingTable::new(
            "10.5.1.0/24".parse().unwrap(),
            "10.5.0.0/16".parse().unwrap(),
            IcmpSources {
                to_peers: Ipv4Addr::new(10, 5, 1, 1),
                into_device: Ipv4Addr::new(10, 5, 0, 1),
            },
            &peers,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let ttl_before = parse_ipv4(data).map(|v| v.ttl).ok();
    let mut icmp = [0u8; ICMP_ERROR_MAX_LEN];

    let mut inbound = data.to_vec();
    if let Inbound::Deliver { len, .. } = decide_inbound(&mut inbound, PEER, table(), &mut icmp) {
        let view = parse_ipv4(&inbound[..len]).expect("a delivered packet parses");
        assert_eq!(Some(view.ttl + 1), ttl_before, "TTL decremented once");
    }
    if let Inbound::Drop {
        icmp_len: Some(n), ..
    } = decide_inbound(&mut data.to_vec(), PEER, table(), &mut icmp)
    {
        parse_ipv4(&icmp[..n]).expect("an ICMP error is a valid packet");
    }

    let mut outbound = data.to_vec();
    match decide_outbound(&mut outbound, table(), 1472, &mut icmp) {
        Outbound::Drop {
            icmp_len: Some(n), ..
        } => {
            parse_ipv4(&icmp[..n]).expect("an ICMP error is a valid packet");
        }
        _ => {}
    }
});
