//! Log limiting for the forwarding tasks: a flood of bad packets must not become a flood
//! of log lines.

use std::time::{Duration, Instant};

use rudder_ebpf::Counter;

/// At most one log line per this interval and kind of event, with a count of the
/// events it stands for.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs an event at most once per [`LOG_INTERVAL`], with how many were suppressed.
struct LogLimiter {
    next_allowed: Instant,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> Self {
        LogLimiter {
            next_allowed: Instant::now(),
            suppressed: 0,
        }
    }

    /// Returns how many events were suppressed since the last line when a line may be
    /// written now, or `None` to stay quiet.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now < self.next_allowed {
            self.suppressed += 1;
            return None;
        }
        self.next_allowed = now + LOG_INTERVAL;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Per-task rate limiters: one per kind of event so a flood of one kind cannot hide
/// another.
pub(super) struct TaskLogs {
    drops: LogLimiter,
    io: LogLimiter,
}

impl TaskLogs {
    pub(super) fn new() -> Self {
        TaskLogs {
            drops: LogLimiter::new(),
            io: LogLimiter::new(),
        }
    }

    pub(super) fn dropped(
        &mut self,
        direction: &str,
        reason: Counter,
        detail: impl std::fmt::Display,
    ) {
        if let Some(suppressed) = self.drops.allow() {
            tracing::debug!(
                direction,
                reason = reason.name(),
                suppressed,
                "dropped packet: {detail}"
            );
        }
    }

    pub(super) fn io(&mut self, what: &str, error: &std::io::Error) {
        if let Some(suppressed) = self.io.allow() {
            tracing::warn!(suppressed, "{what} failed: {error}");
        }
    }
}
