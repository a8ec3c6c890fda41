//! A request body on its way to an endpoint. One that fits the replay
//! bound is read whole first, so that a retry can send it again; a longer
//! one (or one of unknown length that turns out longer) is sent as the
//! part already read followed by the rest, streamed, and only once.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus_client::metrics::histogram::Histogram;

/// What was read of a body, and what is left to stream.
#[derive(Debug, Default)]
pub struct UpBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Incoming>,
    /// Where its size goes when it has streamed to its end, and the bytes
    /// so far.
    meter: Option<(Histogram, u64)>,
}

impl UpBody {
    /// Reads `body` whole when it is at most `max` bytes; otherwise what
    /// was read goes first and the rest streams.
    pub async fn read(mut body: Incoming, max: u64) -> Result<UpBody, hyper::Error> {
        if body.is_end_stream() {
            return Ok(UpBody::default());
        }
        if body.size_hint().lower() > max {
            return Ok(UpBody::streamed(body));
        }
        let mut data = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() as u64 > max {
                        return Ok(UpBody {
                            data: Some(data.freeze()),
                            trailers: None,
                            rest: Some(body),
                            meter: None,
                        });
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok(UpBody {
            data: Some(data.freeze()),
            trailers,
            rest: None,
            meter: None,
        })
    }

    /// `body` as it comes, sent once.
    pub fn streamed(body: Incoming) -> UpBody {
        UpBody {
            rest: Some(body),
            ..UpBody::default()
        }
    }

    /// A copy to send again, when the body was read whole.
    pub fn replay(&self) -> Option<UpBody> {
        self.rest.is_none().then(|| UpBody {
            data: self.data.clone(),
            trailers: self.trailers.clone(),
            rest: None,
            meter: None,
        })
    }

    /// Its size goes to `sizes`: now when it is whole, else when it has
    /// streamed to its end (it is sent once, so counted once).
    pub fn measure(&mut self, sizes: &Histogram) {
        let read = self.data.as_ref().map_or(0, |d| d.len() as u64);
        match self.rest {
            None => sizes.observe(read as f64),
            Some(_) => self.meter = Some((sizes.clone(), 0)),
        }
    }

    /// Reads what is left of a body nobody will send, up to `max` bytes
    /// and for at most a second, so that an HTTP/1.1 connection whose
    /// request the agent answered itself stays open for the next one (a
    /// body left unread closes it). Returns whether the body was read to
    /// its end.
    pub async fn discard(self, max: u64) -> bool {
        let Some(mut rest) = self.rest else {
            return true;
        };
        let reading = async {
            let mut read = 0;
            while let Some(frame) = rest.frame().await {
                let Ok(frame) = frame else { return false };
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > max {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(std::time::Duration::from_secs(1), reading)
            .await
            .unwrap_or(false)
    }

    /// Whether the whole body is in hand.
    pub fn is_whole(&self) -> bool {
        self.rest.is_none()
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take().filter(|d| !d.is_empty()) {
            if let Some((_, passed)) = &mut this.meter {
                *passed += data.len() as u64;
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(rest) = &mut this.rest {
            let frame = std::task::ready!(Pin::new(rest).poll_frame(cx));
            match (&frame, &mut this.meter) {
                (Some(Ok(frame)), Some((_, passed))) if frame.is_data() => {
                    *passed += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                (Some(Ok(_)) | None, Some(_)) => {
                    if let Some((sizes, passed)) = this.meter.take() {
                        sizes.observe(passed as f64);
                    }
                }
                _ => {}
            }
            return Poll::Ready(frame);
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(Bytes::is_empty)
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.data.as_ref().map_or(0, |d| d.len() as u64);
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + read);
        }
        hint.set_lower(rest.lower() + read);
        hint
    }
}
