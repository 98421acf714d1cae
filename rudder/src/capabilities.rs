//! Linux capabilities: which ones this process has, and a clear error naming a missing one.

use anyhow::bail;

/// Linux capability numbers rudder checks for (`linux/capability.h`).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    effective_capabilities().is_some_and(|set| set & (1u64 << cap) != 0)
}

/// The effective capability set from `/proc/self/status` (`CapEff`).
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Fails with the capability's name and what needs it, when it is missing.
pub fn require_capability(cap: u32, name: &str, why: &str) -> anyhow::Result<()> {
    if !has_capability(cap) {
        bail!(
            "missing {name}: {why}; run as root or grant it (systemd: AmbientCapabilities={name})"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_are_read_from_proc_status() {
        let status = "Name:\trudder\nCapInh:\t0000000000000000\nCapEff:\t0000000000001000\n";
        let set = parse_cap_eff(status).unwrap();
        assert_ne!(set & (1 << CAP_NET_ADMIN), 0);
        assert_eq!(set & (1 << CAP_BPF), 0);
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
