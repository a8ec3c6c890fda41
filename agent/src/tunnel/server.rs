//! The called agent's end of a tunnel connection: CONNECT streams handed
//! to a handler that accepts or refuses each.

use std::{future::Future, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Moves, TunnelConfig, TunnelError, TunnelStream,
    coalesce::{Coalesce, RefusedStreams},
    control::{
        BadToken, CONTROL_HEADER, ControlStream, RESUME_HEADER, STAYS_HEADER, Token,
        control_authority,
    },
    keepalive,
};

/// A CONNECT the peer asked for, not yet answered. [`Incoming::accept`]
/// answers 200 and gives the stream; [`Incoming::refuse`] answers with a
/// status and ends it. Dropped unanswered, it answers 503.
#[derive(Debug)]
pub struct Incoming {
    target: SocketAddr,
    headers: HeaderMap,
    pending: Option<(RecvStream, SendResponse<Bytes>)>,
    /// The connection's pausable streams, which an accepted one joins.
    moves: Arc<Moves>,
    /// The stream window this end grants.
    window: u32,
}

impl Incoming {
    /// The `ip:port` of the CONNECT's `:authority`.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The request's headers (HBONE's `baggage`, `forwarded`, `traceparent`).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Whether the calling end asks that the stream stay where it is in
    /// an upgrade (see [`STAYS_HEADER`]).
    pub fn stays(&self) -> bool {
        self.headers.contains_key(STAYS_HEADER)
    }

    /// Whether this is a peer agent's control stream (see `control`),
    /// not an application connection.
    fn is_control(&self) -> bool {
        self.target == control_authority() && self.headers.contains_key(CONTROL_HEADER)
    }

    /// The token of a stream that takes up a paused one (a moved
    /// connection's successor), if the request carries one; Err when the
    /// header is there but is no token.
    pub fn resume_token(&self) -> Result<Option<Token>, BadToken> {
        match self.headers.get(RESUME_HEADER) {
            None => Ok(None),
            Some(value) => value
                .to_str()
                .ok()
                .and_then(Token::from_hex)
                .map(Some)
                .ok_or(BadToken),
        }
    }

    /// Answers 200: from here bytes flow both ways. Connect to the target
    /// first, so a 200 means the target was reached.
    pub fn accept(self) -> Result<TunnelStream, TunnelError> {
        let moves = self.moves.clone();
        Ok(self.accept_unlisted()?.with_moves(&moves))
    }

    /// [`Incoming::accept`], without listing the stream as pausable: it
    /// stays in this agent (one served request by request).
    pub fn accept_unlisted(mut self) -> Result<TunnelStream, TunnelError> {
        let (recv, mut respond) = self.pending.take().expect("answered once, by value");
        let send = respond
            .send_response(status_only(StatusCode::OK), false)
            .map_err(|source| TunnelError::Stream {
                target: self.target,
                source,
            })?;
        Ok(TunnelStream::new(send, recv, false, self.window))
    }

    /// Answers `status` (an error status: 400, 401, 403, 503, ...) and
    /// ends the stream; the connection and its other streams go on.
    pub fn refuse(mut self, status: StatusCode) {
        debug_assert!(!status.is_success(), "a refusal with {status}");
        if let Some((_, mut respond)) = self.pending.take() {
            let _ = respond.send_response(status_only(status), true);
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some((_, mut respond)) = self.pending.take() {
            let _ = respond.send_response(status_only(StatusCode::SERVICE_UNAVAILABLE), true);
        }
    }
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// The target of a well-formed tunnel request, or the status refusing it:
/// only CONNECT (405 otherwise) to an `ip:port` (400 otherwise: no names,
/// the caller resolved them), with a header list of at most `max_headers`
/// bytes as RFC 9113 counts them (431 otherwise).
fn target_of(request: &Request<RecvStream>, max_headers: u32) -> Result<SocketAddr, StatusCode> {
    if request.method() != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let field = |name: usize, value: usize| name + value + 32;
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| field(name.as_str().len(), value.len()))
        .sum::<usize>()
        + field(":method".len(), "CONNECT".len())
        + field(
            ":authority".len(),
            request.uri().authority().map_or(0, |a| a.as_str().len()),
        );
    if size > max_headers as usize {
        return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or(StatusCode::BAD_REQUEST)
}

/// Serves one tunnel connection over `io` (after its TLS handshake): each
/// well-formed CONNECT goes to `handler`, which must not block (it spawns
/// the stream's work where it belongs); malformed ones are refused here,
/// and `malformed` hears what each was. When `shutdown` resolves, a GOAWAY tells the
/// peer to open new streams elsewhere; the streams already open go on,
/// and this returns once they are done (or the connection fails).
pub async fn serve<T, H, M>(
    io: T,
    config: &TunnelConfig,
    mut handler: H,
    mut malformed: M,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TunnelError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Incoming),
    M: FnMut(String),
{
    let refused = Arc::new(RefusedStreams::default());
    let mut connection = h2::server::Builder::new()
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_frame_size(config.max_frame_size)
        .max_send_buffer_size(config.max_send_buffer)
        // Twice ours: a larger block reaches our own check, which answers
        // 431 and counts it; h2 would answer it alone, uncounted.
        .max_header_list_size(config.max_header_list_size.saturating_mul(2))
        .max_concurrent_streams(config.max_concurrent_streams)
        .handshake::<_, Bytes>(Coalesce::watching(io, refused.clone()))
        .await
        .map_err(TunnelError::Handshake)?;
    let alive = config.keepalive;
    let pings = connection.ping_pong();
    let watch = async move {
        match (pings, alive) {
            (Some(pings), Some(alive)) => keepalive(pings, alive).await,
            _ => std::future::pending().await,
        }
    };
    tokio::pin!(watch, shutdown);
    let moves = Arc::new(Moves::default());
    let mut going_away = false;
    loop {
        let next = tokio::select! {
            biased;
            next = connection.accept() => next,
            () = &mut shutdown, if !going_away => {
                // Streams that crossed the GOAWAY are still accepted.
                connection.graceful_shutdown();
                // The control stream ends with the last stream, or the
                // connection could never close.
                moves.go_away();
                going_away = true;
                continue;
            }
            () = &mut watch => {
                let timeout = alive.map(|a| a.timeout).unwrap_or_default();
                return Err(TunnelError::KeepaliveTimeout(timeout));
            }
            () = refused.refused() => {
                for _ in 0..refused.take() {
                    malformed(format!(
                        "a stream over the limit of {} at once, refused (REFUSED_STREAM)",
                        config.max_concurrent_streams
                    ));
                }
                continue;
            }
        };
        let (request, mut respond) = match next {
            None => return Ok(()),
            Some(Ok(stream)) => stream,
            Some(Err(e)) => return Err(TunnelError::Connection(e)),
        };
        let target = match target_of(&request, config.max_header_list_size) {
            Ok(target) => target,
            Err(status) => {
                malformed(format!(
                    "{} {} answered {status}",
                    request.method(),
                    request.uri()
                ));
                let _ = respond.send_response(status_only(status), true);
                continue;
            }
        };
        let (parts, recv) = request.into_parts();
        let incoming = Incoming {
            target,
            headers: parts.headers,
            pending: Some((recv, respond)),
            moves: moves.clone(),
            window: config.stream_window,
        };
        if incoming.is_control() {
            control(incoming, &moves);
            continue;
        }
        handler(incoming);
    }
}

/// Answers a peer agent's control stream and speaks it on a task of its
/// own. The node it names must read as a node name; the agent looks it up
/// among the nodes it knows before it ever dials it.
fn control(incoming: Incoming, moves: &Arc<Moves>) {
    let node = incoming
        .headers
        .get(CONTROL_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| !n.is_empty() && n.len() <= 253)
        .map(str::to_owned);
    let Some(node) = node else {
        incoming.refuse(StatusCode::BAD_REQUEST);
        return;
    };
    let Ok(stream) = incoming.accept_unlisted() else {
        return;
    };
    let moves = moves.clone();
    let control = ControlStream::new(stream);
    tokio::spawn(moves.start(control, Some(node), std::future::pending()));
}
