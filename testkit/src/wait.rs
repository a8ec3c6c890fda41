//! Waiting on a condition, never a fixed sleep where something can be
//! looked at.

use std::time::{Duration, Instant};

/// Polls `f` every 10 ms until it is true or `timeout` passes; says
/// whether it became true (`f` is asked once more at the deadline).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
