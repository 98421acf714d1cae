//! Our own peer routes kept off the host watchers' netlink subscriptions, in the kernel.
//!
//! Every peer route the eBPF plane adds or removes is broadcast to each route listener. At
//! 65,536 peers the watchers (endpoints, underlay) received, parsed and dropped 65,536
//! messages each, overran their socket buffers, and the overrun forced full re-reads of the
//! host's state. A classic BPF socket filter drops route messages of our protocol before
//! they are queued. Only for sockets that never ask for a dump: a dump's answer would be
//! filtered too.

use std::io;
use std::os::fd::AsRawFd;

use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::proto::Connection;
use rtnetlink::sys::AsyncSocket;

use crate::dataplane::ebpf::RTPROT_RUDDER;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
/// `struct nlmsghdr` is 16 bytes; `struct rtmsg`'s protocol is its sixth byte.
const NLMSG_TYPE_OFFSET: u32 = 4;
const RTM_PROTOCOL_OFFSET: u32 = 16 + 5;

/// Attaches the filter to a multicast-only rtnetlink connection.
pub fn drop_own_route_events(connection: &mut Connection<RouteNetlinkMessage>) -> io::Result<()> {
    let fd = connection.socket_mut().socket_ref().as_raw_fd();
    let program = own_route_filter();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drops RTM_NEWROUTE/RTM_DELROUTE with `rtm_protocol == RTPROT_RUDDER`, keeps the rest.
fn own_route_filter() -> [libc::sock_filter; 7] {
    // Absolute half-word loads are big-endian; nlmsg_type is in host order.
    let as_loaded = |t: u16| u16::from_be_bytes(t.to_ne_bytes()) as u32;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let (ld, abs, h, b) = (libc::BPF_LD, libc::BPF_ABS, libc::BPF_H, libc::BPF_B);
    let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let ret = libc::BPF_RET | libc::BPF_K;
    [
        op(ld | h | abs, 0, 0, NLMSG_TYPE_OFFSET),
        op(jeq, 1, 0, as_loaded(RTM_NEWROUTE)),
        op(jeq, 0, 3, as_loaded(RTM_DELROUTE)),
        op(ld | b | abs, 0, 0, RTM_PROTOCOL_OFFSET),
        op(jeq, 0, 1, RTPROT_RUDDER as u32),
        op(ret, 0, 0, 0),
        op(ret, 0, 0, u32::MAX),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
    use rtnetlink::MulticastGroup;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    /// Root, in a namespace of its own: a route of ours is not delivered, another one is.
    #[test]
    fn routes_of_our_protocol_never_reach_the_subscription() {
        // A thread of its own: unshare(CLONE_NEWNET) changes only the calling thread.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET): the test needs root");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (mut conn, _, mut messages) =
                    rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Route]).unwrap();
                drop_own_route_events(&mut conn).unwrap();
                tokio::spawn(conn);
                let status = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()
                    .unwrap();
                assert!(status.success());
                for (dst, proto) in [("10.77.1.0/24", "211"), ("10.77.2.0/24", "static")] {
                    let status = std::process::Command::new("ip")
                        .args(["route", "add", dst, "dev", "lo", "proto", proto])
                        .status()
                        .unwrap();
                    assert!(status.success(), "ip route add {dst} proto {proto}");
                }
                let mut seen = Vec::new();
                while let Ok(Some((msg, _))) =
                    tokio::time::timeout(Duration::from_millis(300), messages.next()).await
                {
                    if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) =
                        msg.payload
                    {
                        let dst = r.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                            _ => None,
                        });
                        seen.push((dst, r.header.protocol));
                    }
                }
                assert!(
                    seen.contains(&(Some(Ipv4Addr::new(10, 77, 2, 0)), RouteProtocol::Static)),
                    "the static route was not delivered: {seen:?}"
                );
                assert!(
                    !seen
                        .iter()
                        .any(|(_, p)| *p == RouteProtocol::Other(RTPROT_RUDDER)),
                    "a route of ours was delivered: {seen:?}"
                );
            });
        })
        .join()
        .unwrap();
    }
}
