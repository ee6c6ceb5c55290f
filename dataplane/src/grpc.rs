//! gRPC over HTTP/2 as a relay sees it: statuses in headers and trailers, the
//! mesh's own metadata, and answers the mesh writes itself.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderName, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Response};

use crate::body::RelayBody;
use crate::status;

pub const OK: u32 = 0;
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const INVALID_ARGUMENT: u32 = 3;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const NOT_FOUND: u32 = 5;
pub const PERMISSION_DENIED: u32 = 7;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const UNAUTHENTICATED: u32 = 16;

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
pub const ATTEMPTS: HeaderName = HeaderName::from_static("ringmesh-attempts");
pub const NOT_PROCESSED: HeaderName = HeaderName::from_static("ringmesh-not-processed");
pub const SERVICE: HeaderName = HeaderName::from_static("ringmesh-service");
pub const HASH_KEY: HeaderName = HeaderName::from_static("ringmesh-hash-key");
pub const IDEMPOTENT: HeaderName = HeaderName::from_static("ringmesh-idempotent");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const CALLER: HeaderName = HeaderName::from_static("ringmesh-caller");

/// Who is upstream of a hop, for the mesh's own trailers: another sidecar
/// (whose `ringmesh-not-processed` is passed on) or an app (whose never is:
/// only a sidecar may say a call was not processed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mesh {
    Sidecar,
    App,
}

/// Drop the mesh metadata that is not the upstream's to send: a downstream
/// hop's attempt count always, and a not-processed flag set by an app.
pub fn filter_mesh_headers(headers: &mut HeaderMap, upstream: Mesh) {
    headers.remove(ATTEMPTS);
    if upstream == Mesh::App {
        headers.remove(NOT_PROCESSED);
    }
}

pub fn status_of(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| status::parse_status(v.as_bytes()))
}

pub fn message_of(headers: &HeaderMap) -> String {
    headers
        .get(GRPC_MESSAGE)
        .map(|v| status::decode_message(v.as_bytes()))
        .unwrap_or_default()
}

pub fn not_processed(headers: &HeaderMap) -> bool {
    headers
        .get(NOT_PROCESSED)
        .is_some_and(|v| v.as_bytes() == b"1")
}

/// The headers of a status: `grpc-status`, and a percent-encoded `grpc-message`.
pub fn status_headers(code: u32, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    if !message.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&status::encode_message(message)) {
            headers.insert(GRPC_MESSAGE, value);
        }
    }
    headers
}

/// A trailers-only response: one HEADERS frame with END_STREAM.
pub fn trailers_only(mut headers: HeaderMap) -> Response<RelayBody> {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let mut response = Response::new(RelayBody::empty());
    *response.headers_mut() = headers;
    response
}

/// The gRPC status a caller's library reports for a stream reset with `reason`
/// (as grpc-core maps them).
pub fn code_of_reset(reason: h2::Reason) -> u32 {
    match reason {
        h2::Reason::CANCEL => CANCELLED,
        h2::Reason::REFUSED_STREAM => UNAVAILABLE,
        h2::Reason::ENHANCE_YOUR_CALM => RESOURCE_EXHAUSTED,
        h2::Reason::INADEQUATE_SECURITY => PERMISSION_DENIED,
        _ => INTERNAL,
    }
}

/// The gRPC status of a non-200 HTTP response (gRPC's http-grpc-status-mapping.md).
pub fn code_of_http(status: http::StatusCode) -> u32 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502..=504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// One length-prefixed gRPC message (uncompressed).
pub fn frame_message(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// The first length-prefixed message in `buf`, if complete and uncompressed.
pub fn unframe_message(buf: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = buf.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let (len, body) = rest.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    body.get(..len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips() {
        let framed = frame_message(b"\x08\x01");
        assert_eq!(&framed[..], b"\x00\x00\x00\x00\x02\x08\x01");
        assert_eq!(unframe_message(&framed), Some(&b"\x08\x01"[..]));
        assert_eq!(unframe_message(b"\x00\x00\x00\x00\x05ab"), None);
        assert_eq!(unframe_message(b"\x01\x00\x00\x00\x00"), None);
        assert_eq!(unframe_message(b""), None);
    }

    #[test]
    fn mesh_headers_from_apps_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(ATTEMPTS, HeaderValue::from_static("2"));
        h.insert(NOT_PROCESSED, HeaderValue::from_static("1"));
        let mut from_sidecar = h.clone();
        filter_mesh_headers(&mut from_sidecar, Mesh::Sidecar);
        assert!(from_sidecar.get(ATTEMPTS).is_none() && not_processed(&from_sidecar));
        filter_mesh_headers(&mut h, Mesh::App);
        assert!(h.is_empty());
    }
}
