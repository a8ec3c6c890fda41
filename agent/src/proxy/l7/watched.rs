//! A response on its way back to the caller: how it ends is what its
//! endpoint is told. A 5xx (or a gRPC failure in a trailers-only answer)
//! is decided at its head; otherwise a body that breaks off, or gRPC
//! trailers with a failing status, make it a failure; a body read to its
//! end, a success with the latency of its head. The endpoint counts the
//! request in flight until then (least_request and peak EWMA see it).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::{
    catalog::Service,
    clock::now_ms,
    request::{pool::StreamSlot, rules::grpc_status},
    resilience::{InFlight, Outcome},
    route::{self, Chosen},
};

/// gRPC statuses that count against the endpoint that sent them
/// (INTERNAL, UNAVAILABLE): the server is broken or going away, where the
/// others are about the call.
pub(super) fn grpc_failure(status: u16) -> bool {
    matches!(status, 13 | 14)
}

/// What the endpoint will be told, once the response ends.
pub(super) struct Verdict {
    pub service: Arc<Service>,
    pub chosen: Chosen,
    /// From the request to the response's head.
    pub micros: u64,
    /// Decided at the head.
    pub failed: bool,
    pub grpc: bool,
    pub _in_flight: InFlight,
    /// Its place on a shared HTTP/2 connection, given back with it.
    pub _stream: Option<StreamSlot>,
}

impl Verdict {
    fn tell(self, failed: bool) {
        let outcome = match self.failed || failed {
            true => Outcome::Reset,
            false => Outcome::Answered {
                micros: self.micros,
            },
        };
        route::report(&self.service, self.chosen, outcome, now_ms());
    }
}

/// An endpoint's response body, streamed through.
pub(super) struct Watched {
    inner: Incoming,
    verdict: Option<Verdict>,
    /// Body bytes passed so far.
    passed: u64,
}

impl Watched {
    pub(super) fn new(inner: Incoming, verdict: Verdict) -> Watched {
        Watched {
            inner,
            verdict: Some(verdict),
            passed: 0,
        }
    }

    fn end(&mut self, failed: bool) {
        if let Some(verdict) = self.verdict.take() {
            if let Some(counters) = verdict.service.requests.get() {
                counters.response_bytes.observe(self.passed as f64);
            }
            verdict.tell(failed);
        }
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                this.passed += frame.data_ref().map_or(0, |d| d.len() as u64);
                if let Some(trailers) = frame.trailers_ref() {
                    let grpc = this.verdict.as_ref().filter(|v| v.grpc);
                    let status = grpc.and_then(|_| grpc_status(trailers));
                    if let (Some(verdict), Some(status)) = (grpc, status)
                        && let Some(counters) = verdict.service.requests.get()
                    {
                        counters.grpc(status);
                    }
                    this.end(status.is_some_and(grpc_failure));
                }
            }
            Some(Err(_)) => this.end(true),
            None => this.end(false),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    /// The caller went away first, or the body ended without a last poll:
    /// what the head said stands.
    fn drop(&mut self) {
        self.end(false);
    }
}
