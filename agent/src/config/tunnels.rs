//! `mesh.tunnels`: the pooled HTTP/2 tunnels between node agents.

use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Problem};

/// `mesh.tunnels`: application connections to other nodes as HTTP/2
/// CONNECT streams inside a few pooled mTLS connections per (source
/// identity, pod, peer node, destination identity), instead of one mTLS
/// connection each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelsConfig {
    /// On (the default): application connections to other nodes are
    /// streams of pooled mTLS connections, and move to the next agent in
    /// an upgrade of either end (with a peer agent that speaks moves).
    /// Off: one mTLS connection per application connection, which moves
    /// as well.
    pub enabled: bool,
    /// Streams one pool connection carries before another is made (and
    /// never more than the peer agent allows).
    pub max_streams_per_connection: usize,
    /// A pool connection without a stream for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Bytes a peer may send on one stream before this agent reads them
    /// (HTTP/2's SETTINGS_INITIAL_WINDOW_SIZE, both ends of a tunnel). It
    /// is also what one bulk stream can have queued where a small
    /// stream's frame cannot overtake it, and one stream carries at most
    /// a window per round trip: small for latency, large for bulk.
    pub stream_window: u32,
}

/// The stream window a tunnel connection grants by default
/// (`mesh.tunnels.stream_window` sets another). It bounds
/// what one bulk stream can have queued in the connection's TCP path
/// (both sockets' queues and the peer's buffers), where no other stream's
/// frame can overtake it: at 1 MiB the bench's bulk stream kept up to
/// 330 KB queued there and a latency stream beside it waited behind it
/// (head-of-line row 3.42x, against 2.18x at 64 KiB). The price is one
/// stream's throughput, at most a window per round trip: 64 KiB is
/// about 650 MB/s at a 100 us round trip inside a data centre.
pub const STREAM_WINDOW: u32 = 64 * 1024;

/// The stream windows `mesh.tunnels.stream_window` may set: at least one
/// DATA frame (16 KiB), at most a quarter of the connection's window
/// (16 MiB), so that a few stalled readers cannot stop the others.
pub const STREAM_WINDOWS: std::ops::RangeInclusive<u32> = 16 * 1024..=4 * 1024 * 1024;

impl Default for TunnelsConfig {
    fn default() -> Self {
        TunnelsConfig {
            enabled: true,
            max_streams_per_connection: 100,
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            stream_window: STREAM_WINDOW,
        }
    }
}

/// Adds the problems of `tunnels` to `problems`.
pub(super) fn check(tunnels: &TunnelsConfig, problems: &mut Vec<Problem>) {
    if !(1..=1000).contains(&tunnels.max_streams_per_connection) {
        problems.push(Problem {
            line: 0,
            field: "mesh.tunnels.max_streams_per_connection".into(),
            message: format!(
                "{} is not between 1 and 1000",
                tunnels.max_streams_per_connection
            ),
        });
    }
    if !STREAM_WINDOWS.contains(&tunnels.stream_window) {
        problems.push(Problem {
            line: 0,
            field: "mesh.tunnels.stream_window".into(),
            message: format!(
                "{} is not between {} and {} bytes",
                tunnels.stream_window,
                STREAM_WINDOWS.start(),
                STREAM_WINDOWS.end()
            ),
        });
    }
    if tunnels.idle_timeout.0.is_zero() {
        problems.push(Problem {
            line: 0,
            field: "mesh.tunnels.idle_timeout".into(),
            message: "must be longer than 0".into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{
        Config,
        tests::{GOOD, problems},
    };

    #[test]
    fn a_stream_window_outside_its_range_is_refused_by_name() {
        let window = |bytes: u32| format!("{GOOD}mesh:\n  tunnels:\n    stream_window: {bytes}\n");
        let wide = Config::parse(&window(1 << 20), "t.yaml").unwrap();
        wide.validate().unwrap();
        assert_eq!(wide.mesh.tunnels.stream_window, 1 << 20);
        for bytes in [1024, 8 << 20] {
            let found = problems(&window(bytes));
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].field, "mesh.tunnels.stream_window");
            assert!(
                found[0]
                    .message
                    .contains(&format!("{bytes} is not between 16384 and 4194304")),
                "{}",
                found[0].message
            );
        }
    }
}
