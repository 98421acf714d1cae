//! nftables tables that carry a data plane's rule where the kernel's stack must apply it:
//! - eBPF: `rudder_fastpath` (`ip` and `ip6`) marks packets of NAT'd connections ([`STACK_MARK`]) so that
//!   `rudder_br_in` leaves them to the stack (with `br_netfilter` the bridge DNATs before the
//!   program runs, so the destination alone does not show it);
//! - TUN: `rudder_guard` drops plain overlay-to-overlay packets arriving on the underlay, the
//!   rule `rudder_ingress` applies on the eBPF plane, and counts them (`unencapsulated`).
//!
//! Each table is replaced as a whole (a crash leaves nothing to merge) and removed on shutdown.

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use rudder_ebpf::STACK_MARK;

use crate::firewall::nft;

pub const FAST_PATH_TABLE: &str = "rudder_fastpath";
pub const GUARD_TABLE: &str = "rudder_guard";
const GUARD_COUNTER: &str = "unencapsulated";

fn replace_table(name: &str, body: &str) -> String {
    replace_table_of("ip", name, body)
}

fn replace_table_of(family: &str, name: &str, body: &str) -> String {
    format!(
        "table {family} {name}\ndelete table {family} {name}\ntable {family} {name} {{\n{body}}}\n"
    )
}

/// After DNAT (priority dstnat): every packet of a NAT'd connection, either direction, of
/// either family (one table each: an `ip` one from older versions is replaced in place).
pub fn nat_mark_ruleset() -> String {
    let body = format!(
        "  chain prerouting {{
    type filter hook prerouting priority dstnat + 10; policy accept;
    ct status snat,dnat meta mark set meta mark | {STACK_MARK:#010x}
  }}
"
    );
    replace_table_of("ip", FAST_PATH_TABLE, &body)
        + &replace_table_of("ip6", FAST_PATH_TABLE, &body)
}

pub fn install_nat_mark() -> anyhow::Result<()> {
    nft(&nat_mark_ruleset()).context("installing the NAT'd-flow mark rule (nftables)")
}

pub fn remove_nat_mark() -> anyhow::Result<()> {
    nft(&format!(
        "table ip {FAST_PATH_TABLE}\ndelete table ip {FAST_PATH_TABLE}\ntable ip6 {FAST_PATH_TABLE}\ndelete table ip6 {FAST_PATH_TABLE}\n"
    ))
}

pub fn remove_table(name: &str) -> anyhow::Result<()> {
    nft(&format!("table ip {name}\ndelete table ip {name}\n"))
}

/// The TUN plane's drop of unencapsulated overlay-to-overlay packets on the underlay.
#[derive(Debug)]
pub struct UnderlayGuard {
    underlay: String,
    network: Ipv4Net,
    last: Mutex<Reading>,
}

impl UnderlayGuard {
    pub fn new(underlay: &str, network: Ipv4Net) -> Self {
        UnderlayGuard {
            underlay: underlay.to_string(),
            network: network.trunc(),
            last: Mutex::new(Reading::default()),
        }
    }

    pub fn ruleset(&self) -> String {
        let (iface, net) = (&self.underlay, self.network);
        replace_table(
            GUARD_TABLE,
            &format!(
                "  counter {GUARD_COUNTER} {{ }}
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifname \"{iface}\" ip saddr {net} ip daddr {net} counter name \"{GUARD_COUNTER}\" drop
  }}
"
            ),
        )
    }

    pub fn install(&self) -> anyhow::Result<()> {
        nft(&self.ruleset()).context("installing the unencapsulated-packet drop (nftables)")
    }

    pub fn remove(&self) -> anyhow::Result<()> {
        remove_table(GUARD_TABLE)
    }

    /// (packets, bytes) dropped so far; `None` when the table is gone (flushed by someone).
    fn read(&self) -> anyhow::Result<Option<(u64, u64)>> {
        let out = Command::new("nft")
            .args(["-j", "list", "counter", "ip", GUARD_TABLE, GUARD_COUNTER])
            .output()
            .context("running nft")?;
        if !out.status.success() {
            return Ok(None);
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("nft -j output is not JSON")?;
        let counter = json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|item| item.get("counter"));
        match counter.map(|c| (c["packets"].as_u64(), c["bytes"].as_u64())) {
            Some((Some(packets), Some(bytes))) => Ok(Some((packets, bytes))),
            _ => bail!("nft lists no packets/bytes for counter {GUARD_COUNTER}"),
        }
    }

    /// Packets and bytes dropped, read anew when the last reading is older than `max_age`.
    /// A missing table is re-installed (and said so): the drop must stay in place.
    pub fn counts(&self, max_age: Duration) -> (u64, u64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.at.is_some_and(|at| at.elapsed() < max_age) {
            return last.total();
        }
        last.at = Some(Instant::now());
        match self.read() {
            Ok(Some(now)) => {
                // A re-created counter starts from zero: keep what the old one had counted.
                if now.0 < last.current.0 {
                    last.carry();
                }
                last.current = now;
            }
            Ok(None) => match self.install() {
                Ok(()) => {
                    last.carry();
                    tracing::warn!(
                        "nftables table {GUARD_TABLE} was missing (flushed?); re-installed"
                    )
                }
                Err(e) => tracing::warn!("re-installing nftables table {GUARD_TABLE}: {e:#}"),
            },
            Err(e) => tracing::warn!("reading the {GUARD_COUNTER} counter: {e:#}"),
        }
        last.total()
    }
}

/// The guard's counter as last read, plus what earlier incarnations of it had counted.
#[derive(Debug, Default)]
struct Reading {
    at: Option<Instant>,
    carried: (u64, u64),
    current: (u64, u64),
}

impl Reading {
    fn carry(&mut self) {
        self.carried = (
            self.carried.0 + self.current.0,
            self.carried.1 + self.current.1,
        );
        self.current = (0, 0);
    }

    fn total(&self) -> (u64, u64) {
        (
            self.carried.0 + self.current.0,
            self.carried.1 + self.current.1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_drops_overlay_to_overlay_on_the_underlay_only() {
        let guard = UnderlayGuard::new("eth0", "10.5.0.0/16".parse().unwrap());
        let rules = guard.ruleset();
        assert!(rules.contains(
            "iifname \"eth0\" ip saddr 10.5.0.0/16 ip daddr 10.5.0.0/16 counter name \"unencapsulated\" drop"
        ), "{rules}");
        assert!(rules.starts_with("table ip rudder_guard\ndelete table ip rudder_guard\n"));
    }

    #[test]
    fn nat_mark_covers_both_nat_kinds() {
        let rules = nat_mark_ruleset();
        assert_eq!(
            rules
                .matches("ct status snat,dnat meta mark set meta mark | 0x01000000")
                .count(),
            2,
            "{rules}"
        );
        assert!(
            rules.contains("table ip rudder_fastpath {")
                && rules.contains("table ip6 rudder_fastpath {"),
            "{rules}"
        );
    }

    /// Real nftables in a private network namespace: installed, read, re-installed when
    /// flushed, removed.
    #[test]
    fn guard_is_installed_read_restored_and_removed_in_a_private_namespace() {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (it unshares a network namespace)"
        );
        // A thread of its own: unshare(CLONE_NEWNET) changes only the calling thread.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let table_exists = || {
                Command::new("nft")
                    .args(["list", "table", "ip", GUARD_TABLE])
                    .output()
                    .unwrap()
                    .status
                    .success()
            };
            let guard = UnderlayGuard::new("eth0", "10.5.0.0/16".parse().unwrap());
            guard.install().unwrap();
            guard
                .install()
                .expect("installing again replaces the table");
            assert_eq!(guard.read().unwrap(), Some((0, 0)));
            assert_eq!(guard.counts(Duration::ZERO), (0, 0));

            nft(&format!("delete table ip {GUARD_TABLE}\n")).unwrap();
            assert_eq!(guard.read().unwrap(), None);
            guard.counts(Duration::ZERO);
            assert!(table_exists(), "a flushed guard is re-installed");

            guard.remove().unwrap();
            assert!(!table_exists());
            guard.remove().expect("removing an absent table is fine");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_recreated_counter_keeps_what_the_old_one_counted() {
        let mut reading = Reading {
            current: (5, 500),
            ..Reading::default()
        };
        reading.carry();
        reading.current = (2, 200);
        assert_eq!(reading.total(), (7, 700));
    }
}
