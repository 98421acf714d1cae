//! Firewall rules: flannel's forward rules in iptables (so docker's FORWARD policy DROP lets
//! overlay traffic through), the exemption of overlay-to-overlay traffic from docker's
//! masquerade, and `--ip-masq`'s masquerade in rudder's own nftables table.
//!
//! The iptables rules go through the `iptables` binary on PATH, the same one docker uses, so
//! they land in the tables docker's rules are in (nft flavour or legacy). An accept in a table of
//! our own would not help: a drop in docker's chain on the same hook still drops.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use ipnet::Ipv4Net;

/// Our filter chain, jumped to from the end of FORWARD (after docker's own rules, as flannel's
/// FLANNEL-FWD).
pub const FORWARD_CHAIN: &str = "RUDDER-FWD";
/// Our nat chain, jumped to first in POSTROUTING.
pub const POSTROUTING_CHAIN: &str = "RUDDER-POSTRTG";
const COMMENT: &str = "rudder overlay";

/// The iptables rules for one overlay network.
#[derive(Debug, Clone)]
pub struct ForwardRules {
    network: Ipv4Net,
    iptables: String,
}

/// One rule: table, chain, arguments after the chain.
struct Rule {
    table: &'static str,
    chain: &'static str,
    args: Vec<String>,
}

impl ForwardRules {
    pub fn new(network: Ipv4Net) -> Self {
        ForwardRules {
            network,
            iptables: "iptables".into(),
        }
    }

    fn chain_rules(&self) -> Vec<Rule> {
        let n = self.network.to_string();
        let with_comment = |mut args: Vec<&str>| {
            args.extend(["-m", "comment", "--comment", COMMENT]);
            args.into_iter().map(String::from).collect::<Vec<_>>()
        };
        vec![
            Rule {
                table: "filter",
                chain: FORWARD_CHAIN,
                args: with_comment(vec!["-s", &n, "-j", "ACCEPT"]),
            },
            Rule {
                table: "filter",
                chain: FORWARD_CHAIN,
                args: with_comment(vec!["-d", &n, "-j", "ACCEPT"]),
            },
            // Overlay to overlay keeps its container source: docker's `-s <subnet> ! -o
            // docker0 -j MASQUERADE` would rewrite it to the underlay address, and peers drop
            // that as a spoofed source. ACCEPT in nat ends NAT for the packet.
            Rule {
                table: "nat",
                chain: POSTROUTING_CHAIN,
                args: with_comment(vec!["-s", &n, "-d", &n, "-j", "ACCEPT"]),
            },
        ]
    }

    fn jump(&self, table: &'static str) -> Rule {
        let (chain, target) = match table {
            "filter" => ("FORWARD", FORWARD_CHAIN),
            _ => ("POSTROUTING", POSTROUTING_CHAIN),
        };
        Rule {
            table,
            chain,
            args: ["-m", "comment", "--comment", COMMENT, "-j", target]
                .map(String::from)
                .to_vec(),
        }
    }

    /// Adds whatever is missing (idempotent) and returns what had to be added or moved, so a
    /// resync can say what someone flushed.
    pub fn ensure(&self) -> anyhow::Result<Vec<String>> {
        let mut repaired = Vec::new();
        for (table, chain) in [("filter", FORWARD_CHAIN), ("nat", POSTROUTING_CHAIN)] {
            if !self.succeeds(&["-t", table, "-S", chain]) {
                self.run(&["-t", table, "-N", chain])?;
                repaired.push(format!("chain {table} {chain}"));
            }
        }
        for rule in self.chain_rules() {
            if !self.exists(&rule) {
                self.append(&rule)?;
                repaired.push(format!(
                    "{} {} rule {}",
                    rule.table,
                    rule.chain,
                    rule.args.join(" ")
                ));
            }
        }
        // FORWARD: appended once, after docker's rules (flannel's order).
        let forward_jump = self.jump("filter");
        if !self.exists(&forward_jump) {
            self.append(&forward_jump)?;
            repaired.push("filter FORWARD jump".into());
        }
        // POSTROUTING: must come before docker's MASQUERADE, which docker may insert at the top
        // when it restarts.
        let nat_jump = self.jump("nat");
        if !self.first_in_chain(&nat_jump)? {
            while self.exists(&nat_jump) {
                self.delete(&nat_jump)?;
            }
            let mut args = vec!["-t", "nat", "-I", "POSTROUTING", "1"];
            args.extend(nat_jump.args.iter().map(String::as_str));
            self.run(&args)?;
            repaired.push("nat POSTROUTING jump (first)".into());
        }
        Ok(repaired)
    }

    /// Removes exactly what [`ForwardRules::ensure`] adds; missing pieces are fine.
    pub fn remove(&self) -> anyhow::Result<()> {
        for table in ["filter", "nat"] {
            let jump = self.jump(table);
            while self.exists(&jump) {
                self.delete(&jump)?;
            }
        }
        for (table, chain) in [("filter", FORWARD_CHAIN), ("nat", POSTROUTING_CHAIN)] {
            if self.succeeds(&["-t", table, "-S", chain]) {
                self.run(&["-t", table, "-F", chain])?;
                self.run(&["-t", table, "-X", chain])?;
            }
        }
        Ok(())
    }

    fn first_in_chain(&self, rule: &Rule) -> anyhow::Result<bool> {
        let listing = self.output(&["-t", rule.table, "-S", rule.chain])?;
        let first = listing.lines().find(|l| l.starts_with("-A "));
        Ok(first.is_some_and(|l| {
            l.contains(&format!(
                "-j {}",
                rule.args.last().expect("a jump has a target")
            ))
        }))
    }

    fn exists(&self, rule: &Rule) -> bool {
        let mut args = vec!["-t", rule.table, "-C", rule.chain];
        args.extend(rule.args.iter().map(String::as_str));
        self.succeeds(&args)
    }

    fn append(&self, rule: &Rule) -> anyhow::Result<()> {
        let mut args = vec!["-t", rule.table, "-A", rule.chain];
        args.extend(rule.args.iter().map(String::as_str));
        self.run(&args)
    }

    fn delete(&self, rule: &Rule) -> anyhow::Result<()> {
        let mut args = vec!["-t", rule.table, "-D", rule.chain];
        args.extend(rule.args.iter().map(String::as_str));
        self.run(&args)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.iptables);
        // -w: wait for the xtables lock docker may hold instead of failing.
        cmd.arg("-w").arg("5").args(args).stdin(Stdio::null());
        cmd
    }

    fn succeeds(&self, args: &[&str]) -> bool {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn output(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(args)
            .output()
            .with_context(|| format!("running {} (install the iptables package)", self.iptables))?;
        if !out.status.success() {
            bail!(
                "{} {}: {}",
                self.iptables,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        self.output(args).map(drop)
    }
}

/// Re-asserts the rules every `period` (docker rewrites its chains when it restarts), logging
/// what had to be repaired and the first failure of a run of failures.
pub async fn keep_forward_rules(rules: ForwardRules, period: std::time::Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let r = rules.clone();
        match tokio::task::spawn_blocking(move || r.ensure()).await {
            Ok(Ok(repaired)) => {
                failing = false;
                if !repaired.is_empty() {
                    tracing::warn!(
                        "iptables forward rules were missing (flushed by docker or an operator?); \
                         re-added: {}",
                        repaired.join(", ")
                    );
                }
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::warn!("re-asserting the iptables forward rules failed: {e:#}");
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::error!("the iptables resync panicked: {e}"),
        }
    }
}

/// The nftables table rudder owns; replaced as a whole, so a crash leaves nothing to merge.
pub const NFT_TABLE: &str = "rudder";

/// flannel's masquerade semantics: overlay to outside is masqueraded, overlay to overlay is not.
/// `fully_random` is flanneld's default; `--ip-masq-fully-random-disable` turns it off.
pub fn masquerade_ruleset(network: Ipv4Net, subnet: Ipv4Net, fully_random: bool) -> String {
    let masquerade = if fully_random {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    format!(
        "table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 return
    ip saddr {subnet} ip daddr {network} return
    ip saddr {network} ip daddr {subnet} return
    ip saddr != {network} ip daddr {subnet} return
    ip saddr {network} ip daddr != 224.0.0.0/4 {masquerade}
    ip saddr != {network} ip daddr {network} {masquerade}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {network} accept
    ip daddr {network} accept
  }}
}}
"
    )
}

pub fn install_masquerade(
    network: Ipv4Net,
    subnet: Ipv4Net,
    fully_random: bool,
) -> anyhow::Result<()> {
    nft(&masquerade_ruleset(network, subnet, fully_random))
        .context("installing the --ip-masq rules")
}

/// Removes rudder's nftables table if present.
pub fn remove_masquerade() -> anyhow::Result<()> {
    nft(&format!(
        "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"
    ))
}

pub(crate) fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (install the nftables package)")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerade_rules_follow_flannel() {
        let rules = masquerade_ruleset(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.7.0/24".parse().unwrap(),
            true,
        );
        assert!(rules.contains("ip saddr 10.5.7.0/24 ip daddr 10.5.0.0/16 return"));
        assert!(
            rules.contains("ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random")
        );
        assert!(
            rules.contains("ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random")
        );
        // Replaces the whole table in one transaction.
        assert!(rules.starts_with("table ip rudder\ndelete table ip rudder\n"));
        // --ip-masq-fully-random-disable
        let plain = masquerade_ruleset(
            "10.5.0.0/16".parse().unwrap(),
            "10.5.7.0/24".parse().unwrap(),
            false,
        );
        assert!(!plain.contains("fully-random"));
        assert!(plain.contains("ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade\n"));
    }

    /// Real iptables in a private network namespace: a docker-like FORWARD policy DROP with a
    /// MASQUERADE inserted first; ensure adds, repairs what is flushed or overtaken, and
    /// remove leaves the foreign rules alone.
    #[test]
    fn forward_rules_are_added_repaired_and_removed_in_a_private_namespace() {
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test needs root (it unshares a network namespace)");
        }
        // A thread of its own: unshare(CLONE_NEWNET) changes only the calling thread.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let ipt = |args: &str| {
                let st = Command::new("iptables")
                    .args(args.split(' '))
                    .status()
                    .unwrap();
                assert!(st.success(), "iptables {args}");
            };
            let listing = |table: &str| {
                let out = Command::new("iptables")
                    .args(["-t", table, "-S"])
                    .output()
                    .unwrap();
                String::from_utf8(out.stdout).unwrap()
            };
            ipt("-P FORWARD DROP");
            ipt("-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT");
            let rules = ForwardRules::new("10.5.0.0/16".parse().unwrap());
            let added = rules.ensure().unwrap();
            assert_eq!(added.len(), 7, "{added:?}");
            assert!(rules.ensure().unwrap().is_empty(), "ensure is idempotent");
            let filter = listing("filter");
            assert!(filter.contains("-A RUDDER-FWD -s 10.5.0.0/16"), "{filter}");
            assert!(filter.contains("-A RUDDER-FWD -d 10.5.0.0/16"), "{filter}");
            // Appended after docker's rule.
            let forward: Vec<&str> = filter
                .lines()
                .filter(|l| l.starts_with("-A FORWARD"))
                .collect();
            assert!(forward[1].ends_with("-j RUDDER-FWD"), "{forward:?}");

            // docker restarts: its MASQUERADE goes first, FORWARD is flushed.
            ipt("-t nat -I POSTROUTING 1 -s 10.5.7.0/24 ! -o docker0 -j MASQUERADE");
            ipt("-F FORWARD");
            let repaired = rules.ensure().unwrap();
            assert_eq!(
                repaired,
                vec![
                    "filter FORWARD jump".to_string(),
                    "nat POSTROUTING jump (first)".into()
                ]
            );
            let nat = listing("nat");
            let postrouting: Vec<&str> = nat
                .lines()
                .filter(|l| l.starts_with("-A POSTROUTING"))
                .collect();
            assert!(
                postrouting[0].ends_with("-j RUDDER-POSTRTG"),
                "{postrouting:?}"
            );
            assert_eq!(postrouting.len(), 2, "{postrouting:?}");

            rules.remove().unwrap();
            let (filter, nat) = (listing("filter"), listing("nat"));
            assert!(
                !filter.contains("RUDDER") && !nat.contains("RUDDER"),
                "{filter}{nat}"
            );
            assert!(nat.contains("-j MASQUERADE"), "docker's rule stays: {nat}");
            assert!(filter.contains("-P FORWARD DROP"), "{filter}");
        })
        .join()
        .unwrap();
    }
}
