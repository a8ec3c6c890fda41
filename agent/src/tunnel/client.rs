//! The calling agent's end of a tunnel connection: the HTTP/2 handshake,
//! a task that drives the connection, and CONNECT streams opened on it.

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request, StatusCode, Version, uri::Authority};
use log::debug;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Moves, TunnelConfig, TunnelError, TunnelStream,
    coalesce::Coalesce,
    control::{CONTROL_HEADER, ControlStream, control_authority},
    keepalive,
};

/// One tunnel connection to a peer agent. Clones share the connection;
/// it closes (GOAWAY, then the transport) once every clone and every
/// stream opened on it is gone.
#[derive(Clone)]
pub struct TunnelClient {
    send: SendRequest<Bytes>,
    /// Set by the driver task when the connection has ended.
    ended: Arc<AtomicBool>,
    /// Its streams, for the peer's pauses (see `moves`).
    moves: Arc<Moves>,
    /// The stream window this end grants.
    window: u32,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient")
            .field("ended", &self.ended.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl TunnelClient {
    /// Speaks HTTP/2 as a client over `io` (the connection preface and
    /// SETTINGS), then drives the connection on a task of the current
    /// runtime until it ends, the peer stops answering PINGs, or no clone
    /// and no stream is left.
    pub async fn handshake<T>(io: T, config: &TunnelConfig) -> Result<TunnelClient, TunnelError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .max_frame_size(config.max_frame_size)
            .max_send_buffer_size(config.max_send_buffer)
            .max_header_list_size(config.max_header_list_size)
            // Until the peer's SETTINGS come, assume it takes what we
            // would take ourselves.
            .initial_max_send_streams(config.max_concurrent_streams as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(Coalesce::new(io))
            .await
            .map_err(TunnelError::Handshake)?;
        let ended = Arc::new(AtomicBool::new(false));
        let pings = connection.ping_pong();
        let alive = config.keepalive;
        let ended_by_driver = ended.clone();
        tokio::spawn(async move {
            let watch = async {
                match (pings, alive) {
                    (Some(pings), Some(alive)) => keepalive(pings, alive).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                result = connection => {
                    if let Err(e) = result {
                        debug!("tunnel connection ended: {e}");
                    }
                }
                () = watch => debug!("tunnel peer stopped answering PINGs; closing"),
            }
            // Dropping the connection fails the streams still open on it.
            ended_by_driver.store(true, Ordering::Release);
        });
        Ok(TunnelClient {
            send,
            ended,
            moves: Arc::default(),
            window: config.stream_window,
        })
    }

    /// Whether the peer speaks moves: the control stream is open.
    pub fn speaks_moves(&self) -> bool {
        self.moves.speaks_moves()
    }

    /// Lets this handle go; the flag says when the connection has ended.
    pub fn into_ended(self) -> Arc<AtomicBool> {
        self.ended.clone()
    }

    /// Whether a new stream may be opened: the connection has not ended
    /// and no GOAWAY came.
    pub fn is_usable(&self) -> bool {
        if self.ended.load(Ordering::Acquire) {
            return false;
        }
        // A fresh clone has no stream pending open, so this only looks at
        // the connection's state (an error or GOAWAY makes it Err).
        let mut send = self.send.clone();
        let mut cx = Context::from_waker(Waker::noop());
        matches!(send.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// The streams the peer lets us have open at once: its
    /// SETTINGS_MAX_CONCURRENT_STREAMS as last received (our own limit
    /// until its first SETTINGS came).
    pub fn peer_max_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Opens the control stream (see `control`), naming this agent's
    /// `node`: None when the peer does not speak it (it refused the
    /// CONNECT).
    pub async fn open_control(&self, node: &str) -> Result<Option<ControlStream>, TunnelError> {
        let mut headers = HeaderMap::new();
        let name = http::HeaderValue::try_from(node).map_err(|_| {
            TunnelError::Dial(std::io::Error::other(format!(
                "the node name {node:?} is no header value"
            )))
        })?;
        headers.insert(CONTROL_HEADER, name);
        match self.open_unlisted(control_authority(), headers).await {
            Ok(stream) => Ok(Some(ControlStream::new(stream))),
            Err(TunnelError::Refused { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the control stream and speaks it, so that this connection's
    /// streams can be paused for a move, until the peer closes it or
    /// `stop` resolves (the pool let the connection go: the control
    /// stream must not keep it open).
    pub async fn control(self, node: String, stop: impl Future<Output = ()>) {
        let moves = self.moves.clone();
        tokio::pin!(stop);
        let opened = tokio::select! {
            opened = self.open_control(&node) => opened,
            () = &mut stop => return,
        };
        // The control stream alone must not hold the connection open.
        drop(self);
        match opened {
            Ok(Some(control)) => moves.start(control, None, stop).await,
            Ok(None) => debug!("the peer agent does not speak moves: its streams stay"),
            Err(e) => debug!("no control stream: {e}"),
        }
    }

    /// Opens a CONNECT stream to `target` with `headers` (HBONE's
    /// `baggage`, `forwarded`, `traceparent`), and waits for the answer:
    /// the stream on 200, [`TunnelError::Refused`] with any other status.
    /// Bound the wait with the connect timeout.
    pub async fn open(
        &self,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<TunnelStream, TunnelError> {
        let stream = self.open_unlisted(target, headers).await?;
        Ok(stream.with_moves(&self.moves))
    }

    /// [`TunnelClient::open`], without listing the stream as pausable.
    async fn open_unlisted(
        &self,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<TunnelStream, TunnelError> {
        let mut send = self.send.clone();
        poll_fn(|cx| send.poll_ready(cx))
            .await
            .map_err(TunnelError::Unavailable)?;
        let authority =
            Authority::try_from(target.to_string()).expect("an ip:port is a valid authority");
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = authority.into();
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = headers;
        let failed = |source| TunnelError::Stream { target, source };
        let (response, stream) = send.send_request(request, false).map_err(failed)?;
        let response = response.await.map_err(failed)?;
        if response.status() != StatusCode::OK {
            // The stream ends here: the peer closed its side with the
            // answer, and dropping ours cancels the rest.
            return Err(TunnelError::Refused {
                target,
                status: response.status(),
            });
        }
        Ok(TunnelStream::new(
            stream,
            response.into_body(),
            true,
            self.window,
        ))
    }
}
