//! The soak's table ([`SoakReport::table`]): one row per measure, Markdown.

use crate::soak::{
    Churn, ChurnEvent, SoakReport, FD_GROWTH_BOUND, RSS_GROWTH_BOUND_KIB, TCP_BYTES,
};
use crate::soak_probe::PingRecord;

impl SoakReport {
    /// The run as a Markdown table (what the README shows).
    pub fn table(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let minutes = self.duration.as_secs_f64() / 60.0;
        let mut rows: Vec<(String, String)> = Vec::new();
        let (sent, lost) = self.stable_pings.iter().fold((0, 0), |(s, l), (_, _, r)| {
            (s + r.transmitted, l + r.lost())
        });
        rows.push((
            format!(
                "pings lost between stayed-up hosts ({} ordered pairs, 5/s each)",
                self.stable_pings.len()
            ),
            format!("{lost} of {sent}"),
        ));
        rows.push((
            format!(
                "TCP transfers between stayed-up hosts ({} KiB, content checked)",
                TCP_BYTES >> 10
            ),
            format!("{} ok, {} failed", self.tcp_ok, self.tcp_failures.len()),
        ));
        let mut kinds: Vec<Churn> = self.events.iter().map(|e| e.kind).collect();
        kinds.sort();
        kinds.dedup();
        for kind in kinds {
            let events: Vec<&ChurnEvent> = self.events.iter().filter(|e| e.kind == kind).collect();
            let recovered = events
                .iter()
                .map(|e| e.recovered_in.as_secs_f64())
                .fold(0.0, f64::max);
            let gap_in = |r: &PingRecord| {
                events
                    .iter()
                    .map(|e| {
                        r.longest_gap_within(e.started, e.started + e.recovered_in.as_secs_f64())
                    })
                    .fold(0.0, f64::max)
            };
            let (label, value) = match kind {
                Churn::RestartGraceful | Churn::RestartKill9 => (
                    format!(
                        "h4 restarts ({}): longest ping gap / ready and reachable",
                        if kind == Churn::RestartGraceful {
                            "SIGTERM + start"
                        } else {
                            "SIGKILL + start"
                        }
                    ),
                    format!("{:.1} s / {recovered:.1} s", gap_in(&self.restarted_pings)),
                ),
                Churn::LeaseDeleted => (
                    "h5 lease deleted by an operator: longest ping gap / lease back and reachable"
                        .into(),
                    format!(
                        "{:.1} s / {recovered:.1} s",
                        gap_in(&self.lease_deleted_pings)
                    ),
                ),
                Churn::LeaveOrJoin => {
                    let joins = events.iter().filter(|e| e.what.ends_with("joined")).count();
                    (
                        "hosts left (lease released) / joined: longest until dropped / in the mesh"
                            .into(),
                        format!("{} / {joins}: {recovered:.1} s", events.len() - joins),
                    )
                }
                Churn::ContainerChurn => (
                    "containers started on h5: longest until reachable from h1".into(),
                    format!("{recovered:.1} s"),
                ),
                Churn::EtcdMemberRestart => (
                    "etcd member restarts: longest until all healthy".into(),
                    format!("{recovered:.1} s"),
                ),
            };
            rows.push((format!("{label} (×{})", events.len()), value));
        }
        for (host, s, e) in &self.usage {
            rows.push((
                format!("{host} daemon RSS / open fds, start → end"),
                format!(
                    "{:.1} → {:.1} MiB / {} → {}",
                    mib(s.rss_kib),
                    mib(e.rss_kib),
                    s.fds,
                    e.fds
                ),
            ));
        }
        rows.push((
            "etcd requests per minute (grpc_server_handled_total, 3 members)".into(),
            format!("{:.0}", self.etcd_requests / minutes),
        ));
        let mut out = format!(
            "soak: {minutes:.1} min on {}, {} churn events; bounds: RSS +{} MiB, fds +{FD_GROWTH_BOUND}\n\n\
             | measure | value |\n| --- | --- |\n",
            self.dataplane,
            self.events.len(),
            RSS_GROWTH_BOUND_KIB / 1024
        );
        for (k, v) in rows {
            out += &format!("| {k} | {v} |\n");
        }
        out
    }
}
