//! The rules a request is held to: whether it may be sent again (RFC 9110's
//! idempotent methods, an idempotency key, a gRPC status the route
//! declared retryable), how long it may wait (`grpc-timeout`), and how long
//! a server asked it to wait (`Retry-After`, `grpc-retry-pushback-ms`).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// A request service's settings, from its `requests` block.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    pub timeout: Option<Duration>,
    pub max_attempts: u32,
    pub idempotency_header: HeaderName,
    pub max_replay_bytes: u64,
    /// Requests per connection to an endpoint; None: no limit.
    pub max_requests_per_connection: Option<u32>,
    /// Bit `n` set: gRPC status `n` is retryable.
    pub grpc_retry_on: u32,
    /// What answers while no endpoint is eligible.
    pub fallback: Option<FallbackTo>,
}

/// A request service's fallback.
#[derive(Debug, Clone)]
pub enum FallbackTo {
    /// Another service of the same protocol.
    Service { namespace: String, name: String },
    /// A fixed answer.
    Answer {
        status: http::StatusCode,
        body: bytes::Bytes,
    },
}

impl std::fmt::Display for FallbackTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FallbackTo::Service { namespace, name } => write!(f, "service {namespace}/{name}"),
            FallbackTo::Answer { status, .. } => write!(f, "a fixed {} answer", status.as_u16()),
        }
    }
}

impl Default for RequestPolicy {
    fn default() -> Self {
        RequestPolicy {
            timeout: None,
            max_attempts: 2,
            idempotency_header: HeaderName::from_static("idempotency-key"),
            max_replay_bytes: 64 << 10,
            max_requests_per_connection: None,
            grpc_retry_on: 0,
            fallback: None,
        }
    }
}

impl RequestPolicy {
    /// Whether a request may be sent again after it reached an endpoint:
    /// its method cannot double an effect, or its caller vouches with an
    /// idempotency key. A gRPC call (a POST) is judged by its status
    /// instead ([`Self::grpc_retryable`]).
    pub fn may_resend(&self, method: &Method, headers: &HeaderMap) -> bool {
        is_idempotent(method) || headers.contains_key(&self.idempotency_header)
    }

    pub fn grpc_retryable(&self, status: u16) -> bool {
        status < 32 && self.grpc_retry_on & (1 << status) != 0
    }
}

/// RFC 9110 section 9.2.2's idempotent methods (TRACE aside: a mesh has
/// no reason to resend it).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// gRPC's DEADLINE_EXCEEDED.
pub const GRPC_DEADLINE_EXCEEDED: u16 = 4;
/// gRPC's UNAVAILABLE.
pub const GRPC_UNAVAILABLE: u16 = 14;

/// The fields that concern one hop only (RFC 9110 section 7.6.1), `te`
/// second: its one HTTP/2 value, `trailers`, stays.
const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes what concerns one hop only (RFC 9110 section 7.6.1): the
/// connection's own headers and those it names. Each side of the agent
/// frames its messages itself, so a caller's `Transfer-Encoding`,
/// `Connection: close` or `Upgrade` does not reach the endpoint, nor the
/// endpoint's the caller. Returns how long the connection may still be
/// used when a `Keep-Alive` said ([`keep_alive_for`]), read before it goes.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<Duration> {
    use http::header::{CONNECTION, TE};
    // Twice per request: one pass over the names finds those present
    // (most messages carry none, or only `Connection: keep-alive`), where
    // a removal of each would hash every name.
    let mut present = 0u8;
    for (name, value) in headers.iter() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name)
            // `TE: trailers` is the one value HTTP/2 allows, and gRPC
            // servers insist on it (it says the caller reads trailers).
            && !(name == TE && value.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return None;
    }
    // `keep-alive`'s place in HOP_BY_HOP.
    let keep_alive = (present & (1 << 5) != 0)
        .then(|| keep_alive_for(headers))
        .flatten();
    if present & 1 != 0 {
        // Those the list removes anyway (but `te`, which a `Connection`
        // naming it removes whole) are not looked up twice.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| {
                name.eq_ignore_ascii_case(TE.as_str())
                    || !HOP_BY_HOP
                        .iter()
                        .any(|h| h.as_str().eq_ignore_ascii_case(name))
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let trailers = headers
        .get(TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if trailers && !headers.contains_key(TE) {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    keep_alive
}

/// A call's `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit);
/// None when absent or malformed (a malformed one is ignored, as gRPC
/// servers do).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value, in whole milliseconds rounded up (the
/// endpoint's deadline is the caller's, less what was spent here).
pub fn grpc_timeout_value(left: Duration) -> HeaderValue {
    let ms = left.as_micros().div_ceil(1000).min(99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).expect("digits and a unit")
}

/// A gRPC status in `headers` (a trailers-only answer, or trailers).
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// What an answer asked of a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Nothing: retry at once.
    None,
    /// Not before this long.
    After(Duration),
    /// Not at all (gRPC's negative or malformed pushback; an HTTP date,
    /// which cannot be read without trusting the server's clock).
    Never,
}

/// The wait an answer asked for: `Retry-After` in seconds for HTTP,
/// `grpc-retry-pushback-ms` for gRPC.
pub fn pushback(headers: &HeaderMap, grpc: bool) -> Pushback {
    let (name, unit) = match grpc {
        true => (GRPC_PUSHBACK, Duration::from_millis(1)),
        false => (http::header::RETRY_AFTER, Duration::from_secs(1)),
    };
    let Some(value) = headers.get(name) else {
        return Pushback::None;
    };
    match value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(0) => Pushback::None,
        Some(n) => Pushback::After(unit * n),
        None => Pushback::Never,
    }
}

/// How long an endpoint's connection may still be used after an answer
/// whose `Keep-Alive: timeout=N` says the endpoint closes it N seconds
/// quiet (Node.js says 5): a little less, so that no request goes out as
/// it closes (one that did could not be sent again if it were a POST).
/// None without the hint.
pub fn keep_alive_for(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&HOP_BY_HOP[5])?;
    let seconds = value.to_str().ok()?.split(',').find_map(|param| {
        let (name, n) = param.split_once('=')?;
        let n = n.trim().trim_matches('"');
        (name.trim().eq_ignore_ascii_case("timeout")).then(|| n.parse::<u32>().ok())?
    })?;
    let hinted = Duration::from_secs(seconds.into());
    Some(hinted - (hinted / 4).min(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn only_idempotent_methods_or_keyed_requests_may_be_resent() {
        let policy = RequestPolicy::default();
        let none = HeaderMap::new();
        for method in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            assert!(policy.may_resend(&method, &none), "{method}");
        }
        for method in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!policy.may_resend(&method, &none), "{method}");
        }
        let keyed = headers(&[("idempotency-key", "pay-42")]);
        assert!(policy.may_resend(&Method::POST, &keyed));
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_written_in_milliseconds() {
        let read = |v: &'static str| grpc_timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(read("2S"), Some(Duration::from_secs(2)));
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(read("100u"), Some(Duration::from_micros(100)));
        assert_eq!(read("123456789S"), None, "nine digits");
        assert_eq!(read("S"), None);
        assert_eq!(read("10x"), None);
        assert_eq!(read("-1S"), None);
        assert_eq!(grpc_timeout_value(Duration::from_micros(1500)), "2m");
        assert_eq!(grpc_timeout_value(Duration::from_secs(3)), "3000m");
    }

    #[test]
    fn pushback_is_read_as_asked_and_refused_when_unreadable() {
        let h = headers(&[("retry-after", "2")]);
        assert_eq!(pushback(&h, false), Pushback::After(Duration::from_secs(2)));
        let date = headers(&[("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")]);
        assert_eq!(pushback(&date, false), Pushback::Never);
        let g = headers(&[("grpc-retry-pushback-ms", "150")]);
        assert_eq!(
            pushback(&g, true),
            Pushback::After(Duration::from_millis(150))
        );
        let negative = headers(&[("grpc-retry-pushback-ms", "-1")]);
        assert_eq!(pushback(&negative, true), Pushback::Never);
        assert_eq!(pushback(&HeaderMap::new(), true), Pushback::None);
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_stay_on_their_hop() {
        let mut h = headers(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "h2c"),
            ("te", "gzip"),
            ("idempotency-key", "pay-42"),
            ("content-length", "10"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort();
        assert_eq!(left, ["content-length", "idempotency-key"]);
        let mut grpc = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut grpc);
        assert_eq!(grpc.get("te").unwrap(), "trailers", "gRPC needs it");
        let mut two = headers(&[("te", "trailers"), ("te", "gzip")]);
        strip_hop_by_hop(&mut two);
        let te: Vec<_> = two.get_all("te").iter().collect();
        assert_eq!(te, ["trailers"], "only trailers is kept");
        let mut named = headers(&[("connection", "te"), ("te", "trailers")]);
        strip_hop_by_hop(&mut named);
        assert!(named.is_empty(), "a te that Connection names goes whole");
        let mut plain = headers(&[("connection", "keep-alive"), ("keep-alive", "timeout=5")]);
        strip_hop_by_hop(&mut plain);
        assert!(plain.is_empty());
    }

    #[test]
    fn grpc_statuses_are_retryable_only_when_declared() {
        let policy = RequestPolicy {
            grpc_retry_on: 1 << GRPC_UNAVAILABLE,
            ..RequestPolicy::default()
        };
        assert!(policy.grpc_retryable(GRPC_UNAVAILABLE));
        assert!(!policy.grpc_retryable(13));
        assert!(!policy.grpc_retryable(99));
    }

    #[test]
    fn a_keep_alive_timeout_is_used_a_little_less_than_it_says() {
        let for_ = |v: &'static str| keep_alive_for(&headers(&[("keep-alive", v)]));
        assert_eq!(for_("timeout=5"), Some(Duration::from_secs(4)));
        assert_eq!(for_("max=100, Timeout=60"), Some(Duration::from_secs(59)));
        assert_eq!(for_("timeout=\"2\""), Some(Duration::from_millis(1500)));
        assert_eq!(for_("timeout=0"), Some(Duration::ZERO));
        assert_eq!(for_("max=100"), None);
        assert_eq!(for_("timeout=soon"), None);
        assert_eq!(keep_alive_for(&headers(&[])), None);
        // Read as it is stripped.
        let mut answer = headers(&[("connection", "keep-alive"), ("keep-alive", "timeout=5")]);
        assert_eq!(strip_hop_by_hop(&mut answer), Some(Duration::from_secs(4)));
        assert!(answer.is_empty(), "{answer:?}");
        assert_eq!(strip_hop_by_hop(&mut headers(&[("x-a", "1")])), None);
    }
}
