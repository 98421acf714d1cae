//! Watching `<prefix>/config` while running: a changed network cannot be applied under
//! running containers, so it is reported (what changed, what to do) and the running config
//! stays. The watch starts right after a read of the key, so no change between two watches
//! is missed, and a cancelled or compacted watch reads again.

use etcd_client::{EventType, WatchOptions};

use crate::config::NetworkConfig;
use crate::etcd::{Backoff, Etcd};

/// Runs until the task is dropped.
pub async fn watch_config(etcd: Etcd, prefix: String, running: NetworkConfig) {
    let key = format!("{prefix}/config");
    let mut backoff = Backoff::default();
    // The last report: a re-read after a broken watch repeats nothing already said.
    let mut reported: Option<String> = None;
    loop {
        let result: Result<String, etcd_client::Error> = async {
            let resp = etcd.client().get(key.as_str(), None).await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let now = match resp.kvs().first() {
                Some(kv) => config_change(&running, EventType::Put, kv.value()),
                None => config_change(&running, EventType::Delete, &[]),
            };
            report(&key, now, &mut reported);
            let mut stream = etcd
                .client()
                .watch(
                    key.as_str(),
                    Some(WatchOptions::new().with_start_revision(revision + 1)),
                )
                .await?;
            while let Some(resp) = stream.message().await? {
                backoff.reset();
                if resp.compact_revision() > 0 {
                    return Ok(format!("revision {} compacted", resp.compact_revision()));
                }
                if resp.canceled() {
                    return Ok(format!("cancelled: {}", resp.cancel_reason()));
                }
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let problem = config_change(&running, event.event_type(), kv.value());
                    if problem.is_none() {
                        tracing::info!("{key} rewritten without changes that matter");
                    }
                    report(&key, problem, &mut reported);
                }
            }
            Ok("stream closed by etcd".into())
        }
        .await;
        match result {
            Ok(reason) => tracing::debug!("config watch ended ({reason}); reading again"),
            Err(e) => {
                tracing::debug!("config watch: {e}");
                etcd.failed().await;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Logs `problem` unless it is what was reported last.
fn report(key: &str, problem: Option<String>, reported: &mut Option<String>) {
    if problem != *reported {
        if let Some(p) = &problem {
            tracing::error!("{key}: {p}");
        }
        *reported = problem;
    }
}

/// What is wrong with a config change seen while running, if anything.
pub fn config_change(running: &NetworkConfig, event: EventType, value: &[u8]) -> Option<String> {
    if event == EventType::Delete {
        return Some(format!(
            "network config deleted; still running with Network {}: write it back (rudder network init)",
            running.network
        ));
    }
    match NetworkConfig::parse(value) {
        Err(e) => Some(format!(
            "new network config is invalid ({e}); still running with Network {}",
            running.network
        )),
        Ok(new) if new != *running => {
            Some(format!(
            "network config changed (Network {} /{} port {} -> Network {} /{} port {}); this host \
             keeps the running config: restart rudder on every host to apply the new one",
            running.network, running.subnet_len, running.port, new.network, new.subnet_len, new.port
        ))
        }
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_changes_while_running_are_explained() {
        let running = NetworkConfig::parse(br#"{"Network":"10.5.0.0/16"}"#).unwrap();
        assert_eq!(
            config_change(&running, EventType::Put, br#"{"network":"10.5.0.0/16"}"#),
            None
        );
        let changed =
            config_change(&running, EventType::Put, br#"{"Network":"10.6.0.0/16"}"#).unwrap();
        assert!(
            changed.contains("10.5.0.0/16 /24 port 8285 -> Network 10.6.0.0/16"),
            "{changed}"
        );
        assert!(
            changed.contains("restart rudder on every host"),
            "{changed}"
        );
        let invalid = config_change(&running, EventType::Put, b"{").unwrap();
        assert!(
            invalid.starts_with("new network config is invalid"),
            "{invalid}"
        );
        let deleted = config_change(&running, EventType::Delete, b"").unwrap();
        assert!(deleted.contains("deleted"), "{deleted}");
    }

    #[test]
    fn a_problem_is_reported_once_until_it_changes() {
        let mut reported = None;
        report("k", Some("changed".into()), &mut reported);
        assert_eq!(reported.as_deref(), Some("changed"));
        // A re-read after a broken watch finds the same problem: nothing new to say.
        report("k", Some("changed".into()), &mut reported);
        assert_eq!(reported.as_deref(), Some("changed"));
        report("k", None, &mut reported);
        assert_eq!(reported, None);
    }
}
