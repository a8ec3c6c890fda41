//! An HTTP/1.1 connection between its requests: how long a request head
//! may take, and how long the connection may wait for one.
//!
//! hyper's header read timeout runs from the end of one exchange to the end
//! of the next request's head, so it is also an idle limit: with it, a
//! keep-alive connection was closed after 10 s without a request, without
//! a word. A client that sent its next request as the connection closed
//! lost that request, and a POST without an idempotency key cannot be sent
//! again: a calling agent's pool, keeping a connection to this agent, hit
//! that whenever its requests came about 10 s apart. So the two limits are
//! kept apart here, as Envoy and Go's HTTP server keep them: a head has
//! [`HEAD_TIMEOUT`] from its first byte, and a connection with no request
//! for its idle limit (the service's `timeouts.idle`, 1 h by default) is
//! closed between requests.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock::{Millis, now_ms};

/// A request head must be whole within this of its first byte, or its
/// connection is closed (bytes that never make a request, a slow client).
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The idle limit of a stream from another node's agent served request by
/// request: the default `timeouts.idle` (this side does not know the
/// calling side's service).
pub(super) const INBOUND_IDLE: Duration = Duration::from_secs(3600);

/// Why a connection was ended between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    /// A head did not arrive whole within [`HEAD_TIMEOUT`].
    Head,
    /// No request for the idle limit.
    Idle,
}

/// What one connection's requests are doing, shared by its reads (a head
/// beginning), its requests (in flight until their answers end) and its
/// watch ([`Between::expired`]).
#[derive(Debug)]
pub(super) struct Between {
    idle: Duration,
    in_flight: AtomicU32,
    /// When the head being read began, plus one (0: none is).
    head_began: AtomicU64,
    /// When the connection last had no request in flight.
    quiet_since: AtomicU64,
}

impl Between {
    pub(super) fn new(idle: Duration) -> Arc<Between> {
        Arc::new(Between {
            idle,
            in_flight: AtomicU32::new(0),
            head_began: AtomicU64::new(0),
            quiet_since: AtomicU64::new(now_ms()),
        })
    }

    /// A request's head was read whole: the request is in flight until the
    /// returned guard is dropped (with its answer's body).
    pub(super) fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_began.store(0, Ordering::Release);
        InFlight(self.clone())
    }

    /// Bytes arrived: with no request in flight, they begin a head.
    fn read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_began.load(Ordering::Acquire) == 0
        {
            self.head_began.store(now_ms() + 1, Ordering::Release);
        }
    }

    /// Resolves when the connection has had no request for its idle limit,
    /// or a head has taken over [`HEAD_TIMEOUT`]; never while a request is
    /// in flight. It looks at least every [`HEAD_TIMEOUT`] (a head that
    /// begins, or a request that ends, wakes nothing, so that requests
    /// cost no wake-up) and, once it sees a head, wakes when that head's
    /// time is up: a quiet connection ends at most `min(idle, 10 s)` late.
    pub(super) async fn expired(&self) -> Expired {
        let head_ms = HEAD_TIMEOUT.as_millis() as Millis;
        let idle_ms = self.idle.as_millis() as Millis;
        loop {
            let now = now_ms();
            let wait_ms = if self.in_flight.load(Ordering::Acquire) > 0 {
                // Its end wakes nothing either: look again within the
                // idle limit, so that one quiet from then is seen in time.
                head_ms.min(idle_ms)
            } else {
                match self.head_began.load(Ordering::Acquire) {
                    0 => {
                        let quiet = now.saturating_sub(self.quiet_since.load(Ordering::Acquire));
                        if quiet >= idle_ms {
                            return Expired::Idle;
                        }
                        (idle_ms - quiet).min(head_ms)
                    }
                    began => {
                        let taken = now.saturating_sub(began - 1);
                        if taken >= head_ms {
                            return Expired::Head;
                        }
                        head_ms - taken
                    }
                }
            };
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
    }
}

/// A request in flight; its drop ends it.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Between>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.quiet_since.store(now_ms(), Ordering::Release);
        }
    }
}

/// A response body that keeps its request in flight until it is dropped
/// (hyper drops it once it has written the last of it, or gave up).
pub(super) struct Answered<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Answered<B> {
    pub(super) fn new(body: B, in_flight: InFlight) -> Answered<B> {
        Answered {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The client's side of the connection, its reads told to [`Between`].
pub(super) struct Heads<T> {
    io: T,
    between: Arc<Between>,
}

impl<T> Heads<T> {
    pub(super) fn new(io: T, between: Arc<Between>) -> Heads<T> {
        Heads { io, between }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Heads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !ready!(crate::poll_read_added(&mut self.io, cx, buf))?.is_empty() {
            self.between.read();
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(impl[T: AsyncWrite + Unpin] Heads<T>);

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    /// Whether `expired` resolves within `within` (paused clock).
    async fn expires_within(between: &Between, within: Duration) -> Option<Expired> {
        tokio::time::timeout(within, between.expired()).await.ok()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_lasts_its_idle_limit_not_the_head_timeout() {
        let between = Between::new(IDLE);
        let early = expires_within(&between, IDLE - Duration::from_secs(1)).await;
        assert_eq!(early, None, "closed before its idle limit");
        let at = expires_within(&between, Duration::from_secs(2)).await;
        assert_eq!(at, Some(Expired::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_has_its_timeout_from_its_first_byte() {
        let between = Between::new(IDLE);
        // Quiet for a while first: that does not count against the head.
        tokio::time::sleep(Duration::from_secs(25)).await;
        between.read();
        let started = tokio::time::Instant::now();
        let why = expires_within(&between, Duration::from_secs(30)).await;
        assert_eq!(why, Some(Expired::Head));
        let took = started.elapsed();
        assert!(
            took >= HEAD_TIMEOUT && took <= HEAD_TIMEOUT + Duration::from_millis(5),
            "closed {took:?} after the head began"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_idle_limit_is_kept_after_a_request_the_watch_first_saw_in_flight() {
        let idle = Duration::from_secs(1);
        let between = Between::new(idle);
        let in_flight = between.request();
        let watching = tokio::spawn({
            let between = between.clone();
            async move { between.expired().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(in_flight);
        let ended = tokio::time::Instant::now();
        let why = tokio::time::timeout(Duration::from_secs(5), watching).await;
        assert_eq!(why.ok().and_then(Result::ok), Some(Expired::Idle));
        let late = ended.elapsed();
        assert!(
            late >= idle && late <= idle * 2,
            "ended {late:?} after the request"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_expired_and_its_end_restarts_the_idle_count() {
        let between = Between::new(IDLE);
        between.read();
        let in_flight = between.request();
        // Body bytes while it is in flight begin no head.
        between.read();
        let during = expires_within(&between, IDLE * 3).await;
        assert_eq!(during, None, "expired with a request in flight");
        drop(in_flight);
        let soon = expires_within(&between, IDLE - Duration::from_secs(1)).await;
        assert_eq!(
            soon, None,
            "the idle count did not restart at the answer's end"
        );
        let at = expires_within(&between, Duration::from_secs(2)).await;
        assert_eq!(at, Some(Expired::Idle));
    }
}
