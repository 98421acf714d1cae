//! Arbitrary bytes through the userspace data plane's decisions, both directions: no panic;
//! a delivered packet is a valid IPv4 packet whose TTL went down by one where the rules make
//! the receiving host's hop (the eBPF socket path) and is unchanged where the kernel makes
//! it (TUN); an outbound packet leaves unchanged. The last byte doubles as the outer TOS.
#![no_main]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rudder::dataplane::forwarding::{
    decide_inbound, decide_outbound, ForwardingTable, IcmpSources, Inbound, Outbound,
    ReceiverHop,
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

    let outer_tos = data.last().copied().unwrap_or(0);

    let mut inbound = data.to_vec();
    let hop = ReceiverHop::Rules;
    if let Inbound::Deliver { len, .. } =
        decide_inbound(&mut inbound, PEER, outer_tos, table(), hop, &mut icmp)
    {
        let view = parse_ipv4(&inbound[..len]).expect("a delivered packet parses");
        assert_eq!(Some(view.ttl + 1), ttl_before, "TTL decremented once");
    }
    let mut inbound = data.to_vec();
    let hop = ReceiverHop::Kernel;
    if let Inbound::Deliver { len, .. } =
        decide_inbound(&mut inbound, PEER, outer_tos, table(), hop, &mut icmp)
    {
        let view = parse_ipv4(&inbound[..len]).expect("a delivered packet parses");
        assert_eq!(Some(view.ttl), ttl_before, "TTL left to the kernel");
        // Only the ECN field (and so the checksum) may change: CE copied from outside.
        assert_eq!(inbound[2..10], data[2..10]);
        assert_eq!(inbound[12..len], data[12..len]);
    }
    if let Inbound::Drop {
        icmp_len: Some(n), ..
    } = decide_inbound(
        &mut data.to_vec(),
        PEER,
        outer_tos,
        table(),
        ReceiverHop::Rules,
        &mut icmp,
    ) {
        parse_ipv4(&icmp[..n]).expect("an ICMP error is a valid packet");
    }

    let mut outbound = data.to_vec();
    match decide_outbound(&mut outbound, table(), 1472, &mut icmp) {
        Outbound::Drop {
            icmp_len: Some(n), ..
        } => {
            parse_ipv4(&icmp[..n]).expect("an ICMP error is a valid packet");
        }
        Outbound::Encapsulate { len, .. } => {
            assert_eq!(outbound[..len], data[..len], "sent as the kernel routed it");
        }
        _ => {}
    }
});
