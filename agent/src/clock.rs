//! Milliseconds on tokio's clock, so that time-dependent state can be
//! tested with a paused clock and stored in an `AtomicU64`.

use std::sync::OnceLock;

use tokio::time::Instant;

/// Milliseconds since the agent's clock started.
pub type Millis = u64;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Now, in [`Millis`]. Never 0 after the first call's instant passes, but
/// callers must not rely on that.
pub fn now_ms() -> Millis {
    Instant::now()
        .saturating_duration_since(epoch())
        .as_millis() as Millis
}
