//! One shutdown mechanism for every listener and task: a trigger that starts
//! the drain, watches that see it, and guards that count live connections
//! so the trigger can wait for them to finish.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

#[derive(Debug, Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// Where a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Stop accepting; the listening sockets stay open (a successor in an
    /// upgrade accepts on them).
    Draining,
    /// Stop accepting and stop the listening sockets for every holder of a
    /// descriptor, so that new connects are refused at once.
    Refusing,
}

/// Starts the drain and waits for it; held by whoever handles signals.
#[derive(Debug)]
pub struct DrainTrigger {
    tx: watch::Sender<Phase>,
    active: Arc<Active>,
}

/// Seen by listeners and tasks: tells them when to stop taking new work.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    rx: watch::Receiver<Phase>,
    active: Arc<Active>,
}

/// Held by one live connection; dropping it marks the connection done.
#[derive(Debug)]
pub struct ConnectionGuard {
    active: Arc<Active>,
}

/// A new drain: nothing draining, no connections.
pub fn channel() -> (DrainTrigger, DrainWatch) {
    let (tx, rx) = watch::channel(Phase::Serving);
    let active = Arc::new(Active::default());
    (
        DrainTrigger {
            tx,
            active: active.clone(),
        },
        DrainWatch { rx, active },
    )
}

impl DrainTrigger {
    /// Tells every watch to stop accepting.
    pub fn start(&self) {
        self.tx.send_if_modified(|p| {
            let serving = *p == Phase::Serving;
            if serving {
                *p = Phase::Draining;
            }
            serving
        });
    }

    /// Like [`Self::start`], and every listener stops listening as it stops
    /// accepting: a queued or new connect is refused at once (or, with the
    /// agent's listener gone, takes its service's `on_agent_down` path)
    /// rather than wait in a queue nobody reads. For a stop, never for an
    /// upgrade, whose successor accepts on the same sockets.
    pub fn refuse(&self) {
        self.tx.send_replace(Phase::Refusing);
    }

    /// Stops accepting: [`Self::refuse`] for a stop, [`Self::start`] for an
    /// upgrade (its successor accepts on the same sockets).
    pub fn stop(&self, refuse: bool) {
        if refuse {
            self.refuse();
        } else {
            self.start();
        }
    }

    /// Connections still open.
    pub fn active(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }

    /// Waits until no connection is open or `deadline` passes; returns how
    /// many were still open.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = self.active.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a guard dropped in between wakes us.
            notified.as_mut().enable();
            let open = self.active();
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

/// Waits for the connections of every trigger, all within one `deadline`;
/// returns how many were still open at its end.
pub async fn wait_idle_all<'a>(
    triggers: impl IntoIterator<Item = &'a DrainTrigger>,
    deadline: Duration,
) -> usize {
    let until = tokio::time::Instant::now() + deadline;
    let mut left = 0;
    for trigger in triggers {
        let remaining = until.saturating_duration_since(tokio::time::Instant::now());
        left += trigger.wait_idle(remaining).await;
    }
    left
}

impl DrainWatch {
    /// Resolves once the drain has started.
    pub async fn draining(&mut self) {
        // An error means the trigger is gone: treat it as a drain.
        let _ = self.rx.wait_for(|p| *p != Phase::Serving).await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow() != Phase::Serving
    }

    /// Whether listeners are to stop listening, not only accepting (a
    /// stop, not an upgrade).
    pub fn is_refusing(&self) -> bool {
        *self.rx.borrow() == Phase::Refusing
    }

    /// Counts one connection until the guard is dropped.
    pub fn track(&self) -> ConnectionGuard {
        self.active.count.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            active: self.active.clone(),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.active.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.active.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_connections_then_returns() {
        let (trigger, mut watch) = channel();
        let guard = watch.track();
        trigger.start();
        watch.draining().await;
        assert!(watch.is_draining());
        let done = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(guard);
        });
        assert_eq!(trigger.wait_idle(Duration::from_secs(5)).await, 0);
        done.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let (trigger, watch) = channel();
        let _a = watch.track();
        let _b = watch.track();
        trigger.start();
        let started = tokio::time::Instant::now();
        assert_eq!(trigger.wait_idle(Duration::from_secs(3)).await, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
