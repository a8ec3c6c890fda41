//! W3C Trace Context through the request path. A request's `traceparent`
//! passes through untouched while the access log is off. With the access
//! log on (`audit.requests`), the agent is a hop of the trace: each
//! request gets a span of its own, recorded on its access-log line
//! (`trace_id`, `span_id`, `parent_span_id`), and the endpoint is sent a
//! `traceparent` naming that span as its parent; a request that came
//! without one starts a trace (sampled, so the hops after it record it).

use std::hash::{BuildHasher, RandomState};

use http::{HeaderMap, HeaderValue, header::HeaderName};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The sampled flag of a trace the agent starts.
const SAMPLED: u8 = 1;

/// One request's hop: the trace it belongs to, the span that called it
/// (None: it started the trace) and its own span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub trace_id: u128,
    pub parent_span_id: Option<u64>,
    pub span_id: u64,
    flags: u8,
}

impl Hop {
    /// The hop of a request with `headers`: it continues the caller's
    /// trace when its `traceparent` is well formed, or starts one; the
    /// request's `traceparent` is set to name this hop's span.
    pub fn start(headers: &mut HeaderMap) -> Hop {
        let caller = headers.get(&TRACEPARENT).and_then(|v| parse(v.as_bytes()));
        let hop = match caller {
            Some((trace_id, parent, flags)) => Hop {
                trace_id,
                parent_span_id: Some(parent),
                span_id: nonzero_random(),
                flags,
            },
            None => Hop {
                trace_id: u128::from(nonzero_random()) << 64 | u128::from(nonzero_random()),
                parent_span_id: None,
                span_id: nonzero_random(),
                flags: SAMPLED,
            },
        };
        headers.insert(TRACEPARENT, hop.header());
        hop
    }

    /// The `traceparent` to send on: this trace, this hop's span as the
    /// parent.
    pub fn header(&self) -> HeaderValue {
        let text = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        );
        HeaderValue::from_str(&text).expect("hex digits and dashes")
    }
}

/// `version-traceid-parentid-flags` (version 00's layout, which later
/// versions keep as their start); None when malformed, of version ff, or
/// with an all-zero id, as the specification says to ignore it.
fn parse(value: &[u8]) -> Option<(u128, u64, u8)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut fields = text.split('-');
    let (version, trace, parent, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let well_formed = lower_hex(version, 2)
        && version != "ff"
        && lower_hex(trace, 32)
        && lower_hex(parent, 16)
        && lower_hex(flags, 2)
        && (version != "00" || fields.next().is_none());
    if !well_formed {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok()?;
    let parent = u64::from_str_radix(parent, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace != 0 && parent != 0).then_some((trace, parent, flags))
}

/// A random id: each `RandomState` is keyed apart from the last one, so
/// hashing with a new one gives a new value. Ids need to be unique, not
/// secret.
fn nonzero_random() -> u64 {
    loop {
        let id = RandomState::new().hash_one(0u8);
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_hop_continues_the_callers_trace_under_a_span_of_its_own() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(CALLER));
        let hop = Hop::start(&mut headers);
        assert_eq!(hop.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(hop.parent_span_id, Some(0x00f067aa0ba902b7));
        assert_ne!(hop.span_id, 0x00f067aa0ba902b7);
        let sent = headers[&TRACEPARENT].to_str().unwrap().to_owned();
        assert_eq!(
            sent,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01",
                hop.span_id
            )
        );
    }

    #[test]
    fn without_a_usable_traceparent_a_hop_starts_a_sampled_trace() {
        for bad in [
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
            Some("garbage"),
        ] {
            let mut headers = HeaderMap::new();
            if let Some(bad) = bad {
                headers.insert(TRACEPARENT, HeaderValue::from_static(bad));
            }
            let hop = Hop::start(&mut headers);
            assert_eq!(hop.parent_span_id, None, "{bad:?}");
            assert_ne!(hop.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
            let sent = headers[&TRACEPARENT].to_str().unwrap();
            assert_eq!(parse(sent.as_bytes()), Some((hop.trace_id, hop.span_id, 1)));
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_version_00_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(
            parse(later.as_bytes()),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1))
        );
    }

    #[test]
    fn ids_differ_from_one_hop_to_the_next() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| nonzero_random()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
