//! The agent's background chores beside the data plane: the inbound port's
//! runtime of its own, giving memory back after a burst, the eBPF log, the
//! sweep of stale redirect records, and the process limits at start.

use std::{io, sync::Arc, time::Duration};

use log::info;

use crate::{
    accept::limits::InboundLimits,
    drain::DrainWatch,
    fastpath,
    redirect::{cgroup, records},
    telemetry::{InboundStats, Refusal, TraceLog},
};

/// A proxy holds two descriptors per connection: take the hard limit.
pub(super) fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A one-thread runtime of its own for the inbound port, running until the
/// returned sender is dropped (after the drain).
pub(super) fn start_inbound_runtime()
-> io::Result<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("sluice-inbound".into())
        .spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
    Ok((handle, stop))
}

/// How often the allocator is asked to give freed memory back.
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// Connections (open at the peak, or refused) since the last look that
/// make a trim worth it.
const TRIM_AFTER: usize = 64;

/// Gives memory back to the kernel after a burst of inbound connections
/// (a flood, or a peer's reconnect storm) has ended. glibc keeps freed
/// memory in its arenas for reuse, so without this the agent's RSS would
/// stay at the peak of the last flood; `malloc_trim` returns the free pages
/// of every arena. It runs only after a burst, never per connection.
pub(super) async fn give_back_memory(
    limits: Arc<InboundLimits>,
    stats: Arc<InboundStats>,
    mut drain: DrainWatch,
) {
    let refused = |s: &InboundStats| -> u64 { Refusal::ALL.iter().map(|r| s.refused(*r)).sum() };
    let mut last_refused = refused(&stats);
    let mut tick = tokio::time::interval(TRIM_EVERY);
    loop {
        tokio::select! {
            _ = drain.draining() => return,
            _ = tick.tick() => {}
        }
        let peak = limits.take_peak();
        let now_refused = refused(&stats);
        let burst =
            peak.saturating_sub(limits.connections()) + (now_refused - last_refused) as usize;
        last_refused = now_refused;
        if burst >= TRIM_AFTER {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only walks the allocator's own state.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// The id of the cgroup this agent runs in.
pub(super) fn own_cgroup_id() -> io::Result<u64> {
    let mount = cgroup::cgroup2_mount()
        .ok_or_else(|| io::Error::other("cgroup v2 is not mounted (see /proc/mounts)"))?;
    let own = cgroup::own_cgroup(&mount)?;
    cgroup::cgroup_id(&own)
}

/// How often stale redirect records are swept, and how old they must be.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
const STALE_AFTER: Duration = Duration::from_secs(30);

/// Forwards the programs' aya-log events to the agent's log.
pub(super) async fn pump_ebpf_log(logger: aya_log::EbpfLogger<TraceLog>, drain: DrainWatch) {
    fastpath::drain_ring(logger, "eBPF log events", drain, None, |logger| {
        logger.flush()
    })
    .await
}

/// Removes records of connects that never reached `accept()` (refused,
/// timed out, abandoned). The LRU maps bound them anyway; this keeps the
/// maps honest for `sluice maps`.
pub(super) async fn sweep_records(
    by_peer: Arc<records::PeerRecords>,
    by_cookie: aya::maps::Map,
    mut drain: DrainWatch,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = drain.draining() => return,
            _ = tick.tick() => {
                let n = records::sweep::<u64>(&by_cookie, STALE_AFTER)
                    + records::sweep::<sluice_maps::PeerKey>(by_peer.map(), STALE_AFTER);
                if n > 0 {
                    info!("swept {n} stale redirect records");
                }
            }
        }
    }
}
