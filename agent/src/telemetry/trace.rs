//! Live redirect decisions for `sluice trace`: the eBPF programs' log
//! events go to the agent's log as always, and to whoever is tracing.

use tokio::sync::broadcast;

/// Events buffered per tracer before the slowest one loses some.
const BUFFER: usize = 1024;

/// A `log::Log` for aya-log's records: forwards each to the process
/// logger and to the trace subscribers.
#[derive(Debug, Clone)]
pub struct TraceLog {
    events: broadcast::Sender<String>,
}

impl Default for TraceLog {
    fn default() -> Self {
        TraceLog {
            events: broadcast::channel(BUFFER).0,
        }
    }
}

impl TraceLog {
    /// A stream of the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }
}

impl log::Log for TraceLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.events.receiver_count() > 0 {
            // No subscriber left is not an error: nobody is tracing.
            let _ = self.events.send(record.args().to_string());
        }
        log::logger().log(record);
    }

    fn flush(&self) {
        log::logger().flush();
    }
}
