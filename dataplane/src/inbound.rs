//! The inbound side: calls from peers, forwarded to the local app, and the
//! sidecar's own `grpc.health.v1.Health`, answered here.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::body::{RelayBody, RelayError, Replay};
use crate::call::{self, Begun, Direction, Hold};
use crate::grpc::{self, Mesh};
use crate::outbound::DRAIN_BEFORE_FAILING;
use crate::plane::{Health, Plane};
use crate::relay::{self, Attempt, AttemptRequest};
use crate::retry::Outcome;

pub const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
pub const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";
/// A health request is a service name: anything longer is not one.
const MAX_HEALTH_REQUEST: usize = 4096;

/// An HTTP response for a request that is not gRPC at all (gRPC's spec: 415).
pub fn not_grpc(request: &Request<Incoming>) -> Option<Response<RelayBody>> {
    let is_grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if request.method() == http::Method::POST && is_grpc {
        return None;
    }
    let mut response = Response::new(RelayBody::empty());
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    Some(response)
}

pub async fn serve(
    plane: Arc<Plane>,
    caller: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Result<Response<RelayBody>, RelayError> {
    let started = Instant::now();
    if let Some(rejected) = not_grpc(&request) {
        return Ok(rejected);
    }
    match request.uri().path() {
        HEALTH_CHECK => return Ok(health_check(&plane, request).await),
        HEALTH_WATCH => return Ok(health_watch(&plane, request).await),
        _ => {}
    }
    let Some(app) = plane.config.app.clone() else {
        return Ok(grpc::trailers_only(grpc::status_headers(
            grpc::UNIMPLEMENTED,
            "this sidecar has no app",
        )));
    };
    let (parts, body) = request.into_parts();
    let Begun {
        path,
        mut headers,
        mut ending,
        ..
    } = match call::begin(&plane, &parts, Direction::Inbound, started) {
        Ok(begun) => begun,
        Err(rejected) => return Ok(*rejected),
    };
    if let Err(why) = plane.authorize(caller.as_deref()) {
        plane
            .stats
            .authz_denied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(ending.reject(grpc::PERMISSION_DENIED, &why));
    }
    if let Some(caller) = caller.as_deref() {
        if let Ok(value) = HeaderValue::from_str(caller) {
            headers.insert(grpc::CALLER, value);
        }
    }
    let replay = Replay::new(body, 0);
    ending.attempt_started(Hold::App);
    let remaining = ending.remaining(Instant::now());
    let sent = relay::attempt(AttemptRequest {
        pool: &plane.app,
        address: &app,
        service: None,
        path: &path,
        headers: &headers,
        replay: &replay,
        remaining,
        connect_wait: plane.connect_wait(remaining),
    });
    let result = relay::before(ending.deadline(), sent).await;
    let outcome = result.outcome();
    match result {
        Attempt::Response(response) => {
            ending.mark_responded();
            let (response_parts, incoming) = response.into_parts();
            let mut downstream = Response::new(RelayBody::relay(incoming, ending, Mesh::App, None));
            *downstream.headers_mut() = relay::returned_headers(response_parts.headers, Mesh::App);
            Ok(downstream)
        }
        Attempt::Answer(mut answer) => {
            grpc::filter_mesh_headers(&mut answer, Mesh::App);
            ending.attempt_ended(outcome, true);
            let code = grpc::status_of(&answer).unwrap_or(grpc::UNKNOWN);
            ending.end(code, &grpc::message_of(&answer), true);
            Ok(grpc::trailers_only(answer))
        }
        Attempt::Failed {
            reset: Some(reason),
            message,
            ..
        } => {
            ending.attempt_ended(outcome, false);
            ending.end(grpc::code_of_reset(reason), &message, false);
            Err(RelayError::new(reason, message))
        }
        Attempt::Failed {
            outcome, message, ..
        } => {
            ending.attempt_ended(Some(outcome), false);
            let mut trailers;
            if outcome == Outcome::NeverSent {
                // The app never saw the call: callers may safely send it elsewhere.
                let message = format!(
                    "no instance of the app could take the call after 1 attempt(s): {message}"
                );
                trailers = grpc::status_headers(grpc::UNAVAILABLE, &message);
                trailers.insert(grpc::NOT_PROCESSED, HeaderValue::from_static("1"));
                let left = ending.remaining(Instant::now());
                replay
                    .drain(left.map_or(DRAIN_BEFORE_FAILING, |l| l.min(DRAIN_BEFORE_FAILING)))
                    .await;
            } else if outcome == Outcome::TimedOut {
                trailers = grpc::status_headers(grpc::DEADLINE_EXCEEDED, &message);
            } else {
                trailers = grpc::status_headers(grpc::UNAVAILABLE, &message);
            }
            plane
                .stats
                .failed_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let code = grpc::status_of(&trailers).unwrap_or(grpc::UNKNOWN);
            ending.end(code, &grpc::message_of(&trailers), false);
            Ok(grpc::trailers_only(trailers))
        }
    }
}

/// grpc.health.v1's enum: SERVING = 1, NOT_SERVING = 2, SERVICE_UNKNOWN = 3.
fn health_message(status: u8) -> Bytes {
    grpc::frame_message(&[0x08, status])
}

fn health_code(health: Health) -> u8 {
    match health {
        Health::Serving => 1,
        Health::NotServing => 2,
    }
}

/// The service name of a HealthCheckRequest (field 1), or why it is not one.
fn health_service(body: &[u8]) -> Result<String, &'static str> {
    let message = grpc::unframe_message(body).ok_or("not one uncompressed gRPC message")?;
    let mut rest = message;
    let mut service = String::new();
    while let Some((&tag, after)) = rest.split_first() {
        if tag != 0x0a {
            return Err("unexpected field in HealthCheckRequest");
        }
        let (len, after) = varint(after).ok_or("malformed length")?;
        let len = usize::try_from(len).map_err(|_| "malformed length")?;
        let value = after.get(..len).ok_or("truncated field")?;
        service = String::from_utf8(value.to_vec()).map_err(|_| "service name is not UTF-8")?;
        rest = &after[len..];
    }
    Ok(service)
}

fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &buf[i + 1..]));
        }
    }
    None
}

async fn read_small(body: Incoming) -> Result<BytesMut, &'static str> {
    let mut body = body;
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "the request stream broke")?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > MAX_HEALTH_REQUEST {
                return Err("request too large");
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}

async fn health_request(request: Request<Incoming>) -> Result<String, Response<RelayBody>> {
    let body = read_small(request.into_body()).await;
    match body.as_deref().map_err(|e| *e).and_then(health_service) {
        Ok(service) => Ok(service),
        Err(why) => Err(grpc::trailers_only(grpc::status_headers(
            grpc::INVALID_ARGUMENT,
            &format!("malformed HealthCheckRequest: {why}"),
        ))),
    }
}

fn unknown_service(service: &str) -> Response<RelayBody> {
    grpc::trailers_only(grpc::status_headers(
        grpc::NOT_FOUND,
        &format!("unknown service {}", crate::snapshot::py_repr(service)),
    ))
}

async fn health_check(plane: &Plane, request: Request<Incoming>) -> Response<RelayBody> {
    let service = match health_request(request).await {
        Ok(service) => service,
        Err(response) => return response,
    };
    if !service.is_empty() {
        return unknown_service(&service);
    }
    let status = health_code(*plane.health().borrow());
    let (tx, rx) = mpsc::channel(2);
    let _ = tx.try_send(Frame::data(health_message(status)));
    let _ = tx.try_send(Frame::trailers(grpc::status_headers(grpc::OK, "")));
    local_response(rx)
}

async fn health_watch(plane: &Plane, request: Request<Incoming>) -> Response<RelayBody> {
    let service = match health_request(request).await {
        Ok(service) => service,
        Err(response) => return response,
    };
    let mut health = plane.health();
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if !service.is_empty() {
            // As grpcio's servicer: an unknown service is watched as SERVICE_UNKNOWN.
            let _ = tx.send(Frame::data(health_message(3))).await;
            tx.closed().await;
            return;
        }
        loop {
            let status = health_code(*health.borrow_and_update());
            if tx.send(Frame::data(health_message(status))).await.is_err() {
                return;
            }
            tokio::select! {
                changed = health.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    local_response(rx)
}

fn local_response(frames: mpsc::Receiver<Frame<Bytes>>) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::local(frames));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_requests_parse() {
        let empty = grpc::frame_message(b"");
        assert_eq!(health_service(&empty), Ok(String::new()));
        let named = grpc::frame_message(b"\x0a\x04echo");
        assert_eq!(health_service(&named), Ok("echo".to_owned()));
        assert!(health_service(&grpc::frame_message(b"\x0a\x09echo")).is_err());
        assert!(health_service(&grpc::frame_message(b"\x10\x01")).is_err());
        assert!(health_service(b"\x00\x00").is_err());
    }

    #[test]
    fn health_answers_are_grpc_messages() {
        assert_eq!(&health_message(1)[..], b"\x00\x00\x00\x00\x02\x08\x01");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_health_request_bytes_parse_or_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = health_service(&bytes);
            let _ = grpc::unframe_message(&bytes);
        }

        #[test]
        fn named_health_requests_round_trip(name in "[a-z.]{0,100}") {
            let mut message = vec![0x0a, u8::try_from(name.len()).unwrap()];
            message.extend_from_slice(name.as_bytes());
            prop_assert_eq!(health_service(&grpc::frame_message(&message)), Ok(name));
        }
    }
}
