//! A span per hop in the caller's W3C trace: the hop rewrites `traceparent`
//! to name its own span as the parent of the next, and keeps what it recorded
//! for the control plane to export (OTLP), which takes them in batches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use rand::Rng;

use crate::call::Direction;
use crate::snapshot::lock;

/// Spans waiting for export; past this the oldest are dropped (and counted).
const MAX_QUEUED: usize = 4096;

#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    pub name: String,
    pub direction: Direction,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub code: u32,
    pub message: String,
}

impl SpanRecord {
    pub fn finish(&mut self, code: u32, message: &str) {
        self.end_unix_ns = unix_ns();
        self.code = code;
        message.clone_into(&mut self.message);
    }
}

#[derive(Default)]
pub struct Spans {
    queue: Mutex<VecDeque<SpanRecord>>,
    pub dropped: AtomicU64,
}

impl Spans {
    pub fn push(&self, span: SpanRecord) {
        if !span.sampled {
            return;
        }
        let mut queue = lock(&self.queue);
        if queue.len() >= MAX_QUEUED {
            queue.pop_front();
            self.dropped.fetch_add(1, Relaxed);
        }
        queue.push_back(span);
    }

    pub fn take(&self) -> Vec<SpanRecord> {
        lock(&self.queue).drain(..).collect()
    }
}

fn unix_ns() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// `00-<trace>-<parent>-<flags>` -> (trace id, parent span id, flags), if well formed.
pub fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() {
        return None;
    }
    let trace: [u8; 16] = hex(trace)?.try_into().ok()?;
    let parent: [u8; 8] = hex(parent)?.try_into().ok()?;
    let flags: [u8; 1] = hex(flags)?.try_into().ok()?;
    if trace == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace, parent, flags[0]))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2)
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Begin the hop's span: its record, and the `traceparent` to send upstream.
/// Sampling follows the parent (as OpenTelemetry's ParentBased sampler); a
/// call without a valid parent starts a sampled trace.
pub fn begin(
    traceparent: Option<&HeaderValue>,
    method: &str,
    direction: Direction,
) -> (SpanRecord, HeaderValue) {
    let mut rng = rand::rng();
    let parsed = traceparent.and_then(|v| parse_traceparent(v.as_bytes()));
    let (trace_id, parent, flags) = match parsed {
        Some((trace, parent, flags)) => (trace, Some(parent), flags),
        None => {
            let mut trace = [0u8; 16];
            rng.fill(&mut trace[..]);
            (trace, None, 1)
        }
    };
    let mut span_id = [0u8; 8];
    while span_id == [0; 8] {
        rng.fill(&mut span_id[..]);
    }
    let header = format!(
        "00-{}-{}-{:02x}",
        to_hex(&trace_id),
        to_hex(&span_id),
        flags
    );
    let record = SpanRecord {
        trace_id,
        span_id,
        parent_span_id: parent,
        sampled: flags & 1 == 1,
        name: method.trim_start_matches('/').to_owned(),
        direction,
        start_unix_ns: unix_ns(),
        end_unix_ns: 0,
        code: 0,
        message: String::new(),
    };
    let value = HeaderValue::from_str(&header).unwrap_or_else(|_| HeaderValue::from_static(""));
    (record, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_hop_continues_the_callers_trace() {
        let (span, header) = begin(
            Some(&HeaderValue::from_static(PARENT)),
            "/pkg.Svc/M",
            Direction::Outbound,
        );
        assert_eq!(to_hex(&span.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            span.parent_span_id.map(|p| to_hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(span.sampled);
        assert_eq!(span.name, "pkg.Svc/M");
        let (trace, parent, flags) = parse_traceparent(header.as_bytes()).unwrap();
        assert_eq!((trace, parent, flags), (span.trace_id, span.span_id, 1));
    }

    #[test]
    fn malformed_parents_start_a_new_trace() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-é",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        let (span, _) = begin(None, "/a/b", Direction::Inbound);
        assert!(span.parent_span_id.is_none() && span.sampled);
    }

    #[test]
    fn unsampled_spans_are_not_kept() {
        let spans = Spans::default();
        let (span, _) = begin(
            Some(&HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            )),
            "/a/b",
            Direction::Inbound,
        );
        spans.push(span);
        assert!(spans.take().is_empty());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_traceparent_bytes_parse_or_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_traceparent(&bytes);
        }

        #[test]
        fn a_hop_always_sends_a_valid_traceparent(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let value = HeaderValue::from_bytes(&bytes).ok();
            let (span, header) = begin(value.as_ref(), "/a/b", Direction::Outbound);
            let parsed = parse_traceparent(header.as_bytes());
            prop_assert_eq!(parsed.map(|(t, s, _)| (t, s)), Some((span.trace_id, span.span_id)));
        }
    }
}
