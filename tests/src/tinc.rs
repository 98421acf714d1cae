//! An L3 underlay: tinc 1.0 in router mode between host namespaces, over their `eth0`.
//! Each host gets a tun device `tinc0` (ARPHRD_NONE: no Ethernet header) with an address
//! in 172.30.0.0/24, as a WireGuard or PPP link would give it.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;

use crate::util::{require, run, wait_until};
use crate::{netns, Cluster, Host};

/// The tun device tinc creates in each host.
pub const TINC_DEVICE: &str = "tinc0";
/// Below eth0's 1500, so tinc's UDP never needs fragmenting.
pub const TINC_MTU: u32 = 1400;

/// Host `i`'s address on the tinc underlay: 172.30.0.(10+i).
pub fn tinc_ip(h: &Host) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 10 + h.index() as u8)
}

/// Starts one tincd per host (each connecting to every other, no cipher, no digest) and
/// waits until every host pings every other over `tinc0`. The daemons are the cluster's:
/// its teardown stops them.
pub fn start_tinc_mesh(c: &Cluster, hosts: &[&Host]) -> Result<()> {
    start(c, hosts, TINC_MTU, &[], false).map(|_| ())
}

/// [`start_tinc_mesh`] with `tinc0`'s MTU `mtu` and each host also owning the subnets
/// `subnets[i]` (tinc routes packets for them to that host; add the kernel routes into
/// `tinc0` yourself). The path MTU is set, not discovered: while tinc 1.0 discovers it,
/// packets above the minimum found so far go over its TCP meta connection. Returns the
/// tincd PIDs.
pub fn start_tinc_mesh_carrying(
    c: &Cluster,
    hosts: &[&Host],
    mtu: u32,
    subnets: &[Vec<Ipv4Net>],
) -> Result<Vec<u32>> {
    start(c, hosts, mtu, subnets, true)
}

fn start(
    c: &Cluster,
    hosts: &[&Host],
    mtu: u32,
    subnets: &[Vec<Ipv4Net>],
    fixed_pmtu: bool,
) -> Result<Vec<u32>> {
    require(&["tincd"])?;
    let dir_of = |h: &Host| c.dir().join(format!("tinc-{}", h.name()));
    let mut pids = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let dir = dir_of(h);
        std::fs::create_dir_all(dir.join("hosts"))?;
        let mut conf = format!("Name = {}\nDeviceType = tun\nInterface = {TINC_DEVICE}\nMode = router\nAddressFamily = ipv4\n", h.name());
        for other in hosts.iter().filter(|o| o.name() != h.name()) {
            conf.push_str(&format!("ConnectTo = {}\n", other.name()));
        }
        std::fs::write(dir.join("tinc.conf"), conf)?;
        let up = dir.join("tinc-up");
        std::fs::write(
            &up,
            format!(
                "#!/bin/sh\nip link set $INTERFACE mtu {mtu}\nip addr add {}/24 dev $INTERFACE\nip link set $INTERFACE up\n",
                tinc_ip(h)
            ),
        )?;
        std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o755))?;
        let mut host_file = format!(
            "Address = {}\nSubnet = {}/32\nCipher = none\nDigest = none\n",
            h.underlay_ip(),
            tinc_ip(h)
        );
        if fixed_pmtu {
            // tinc's MTU counts the Ethernet header it keeps even in router mode.
            host_file.push_str(&format!("PMTUDiscovery = no\nPMTU = {}\n", mtu + 14));
        }
        for subnet in subnets.get(i).into_iter().flatten() {
            host_file.push_str(&format!("Subnet = {subnet}\n"));
        }
        std::fs::write(dir.join("hosts").join(h.name()), host_file)?;
        // Appends the public key to hosts/<name>.
        run(std::process::Command::new("tincd")
            .arg("-c")
            .arg(&dir)
            .args(["-K", "1024"])
            .stdin(Stdio::null()))
        .context("generating tinc keys")?;
    }
    for h in hosts {
        for other in hosts.iter().filter(|o| o.name() != h.name()) {
            std::fs::copy(
                dir_of(other).join("hosts").join(other.name()),
                dir_of(h).join("hosts").join(other.name()),
            )?;
        }
    }
    for h in hosts {
        let dir = dir_of(h);
        let log = File::create(dir.join("tincd.log"))?;
        let child = netns::exec(h.netns(), "tincd")
            .arg("-c")
            .arg(&dir)
            .arg("-D")
            .arg("--pidfile")
            .arg(dir.join("tincd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting tincd")?;
        c.resources().add_pid(child.id());
        pids.push(child.id());
    }
    for h in hosts {
        for other in hosts.iter().filter(|o| o.name() != h.name()) {
            let to = tinc_ip(other).to_string();
            wait_until(
                &format!("{} to ping {} over tinc", h.name(), other.name()),
                Duration::from_secs(30),
                || {
                    Ok(
                        netns::exec_ok(h.netns(), "ping", &["-n", "-q", "-c", "1", "-W", "1", &to])
                            .is_ok(),
                    )
                },
            )
            .with_context(|| {
                std::fs::read_to_string(dir_of(h).join("tincd.log")).unwrap_or_default()
            })?;
        }
    }
    Ok(pids)
}
