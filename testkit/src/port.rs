//! A TCP port to listen on.

use std::{
    io,
    net::TcpListener,
    sync::atomic::{AtomicU32, Ordering},
};

/// A port on 127.0.0.1 that is free now and that the kernel will not hand
/// out on its own. Ports from `bind(:0)` come from the ephemeral range, and
/// the many client connections that tests open in parallel take their
/// source ports from the same range, so such a port can be gone by the time
/// the agent binds it. Ports below the ephemeral range are only ever taken
/// by someone binding them explicitly.
pub fn free_port() -> io::Result<u16> {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000; // stays under 32768, the ephemeral range's floor
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread processes apart so two runs at once rarely probe the same ports.
    let start = std::process::id().wrapping_mul(397) % SPAN;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + step) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free port in {FIRST}..{}", FIRST + SPAN),
    ))
}
