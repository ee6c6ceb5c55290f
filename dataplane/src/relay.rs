//! One attempt of a call: the request sent upstream on a pooled connection,
//! the response read up to its headers, and what became of it, with the
//! proof HTTP/2 gives of a request that was never processed.

use std::future::Future;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Version};
use hyper::body::Incoming;

use crate::body::Replay;
use crate::grpc;
use crate::pool::Pool;
use crate::retry::{self, Outcome};
use crate::timeout;

/// How an attempt ended, up to the response's headers.
pub enum Attempt {
    /// A response with a body to come: the call is committed to this attempt.
    Response(Response<Incoming>),
    /// A trailers-only answer: the status is in these headers.
    Answer(HeaderMap),
    /// No answer: why, and a reset to pass on if the upstream reset the stream.
    Failed {
        outcome: Outcome,
        message: String,
        reset: Option<h2::Reason>,
    },
}

impl Attempt {
    /// The outcome for retries and ejection (None: a success).
    pub fn outcome(&self) -> Option<Outcome> {
        match self {
            Attempt::Response(_) => None,
            Attempt::Answer(headers) => match grpc::status_of(headers) {
                Some(grpc::OK) => None,
                Some(code) => Some(retry::classify(code, grpc::not_processed(headers))),
                None => Some(Outcome::Final),
            },
            Attempt::Failed { outcome, .. } => Some(*outcome),
        }
    }
}

/// Headers never forwarded: connection-specific ones (HTTP/2 forbids them)
/// and the deadline, which is rewritten for each attempt.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];

/// The caller's headers as every attempt sends them (less the deadline).
pub fn forwarded_headers(parts: &Parts) -> HeaderMap {
    let mut headers = parts.headers.clone();
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(grpc::GRPC_TIMEOUT);
    // Only a sidecar says who is calling, from the caller's certificate.
    headers.remove(grpc::CALLER);
    headers
}

/// The upstream's response headers as the caller gets them.
pub fn returned_headers(mut headers: HeaderMap, upstream: grpc::Mesh) -> HeaderMap {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::CONTENT_LENGTH);
    grpc::filter_mesh_headers(&mut headers, upstream);
    headers
}

pub struct AttemptRequest<'a> {
    pub pool: &'a Pool,
    pub address: &'a str,
    /// The service the upstream must prove it is (mutual TLS); None for the app.
    pub service: Option<&'a str>,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub replay: &'a Replay,
    pub remaining: Option<Duration>,
    pub connect_wait: Duration,
}

/// An attempt cut off at the caller's deadline: DEADLINE_EXCEEDED is answered
/// here, not left to whichever side notices first.
pub async fn before(deadline: Option<Instant>, attempt: impl Future<Output = Attempt>) -> Attempt {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), attempt)
            .await
            .unwrap_or(Attempt::Failed {
                outcome: Outcome::TimedOut,
                message: "Deadline Exceeded".to_owned(),
                reset: None,
            }),
        None => attempt.await,
    }
}

pub async fn attempt(r: AttemptRequest<'_>) -> Attempt {
    let mut sender = match r.pool.get(r.address, r.service, r.connect_wait).await {
        Ok(sender) => sender,
        Err(err) => {
            return Attempt::Failed {
                outcome: Outcome::NeverSent,
                message: err.0,
                reset: None,
            }
        }
    };
    let mut request = Request::new(r.replay.attempt());
    *request.method_mut() = Method::POST;
    *request.version_mut() = Version::HTTP_2;
    *request.headers_mut() = r.headers.clone();
    if let Some(left) = r.remaining {
        if let Ok(value) = HeaderValue::from_str(&timeout::format(left)) {
            request.headers_mut().insert(grpc::GRPC_TIMEOUT, value);
        }
    }
    match format!("http://{}{}", r.address, r.path).parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => {
            return Attempt::Failed {
                outcome: Outcome::Final,
                message: format!("cannot forward to {}{}: not a valid URI", r.address, r.path),
                reset: None,
            }
        }
    }
    match sender.try_send_request(request).await {
        Ok(response) => {
            if response.status() != http::StatusCode::OK {
                let code = grpc::code_of_http(response.status());
                let message = format!("upstream answered HTTP {}", response.status());
                return Attempt::Answer(grpc::status_headers(code, &message));
            }
            if response.headers().contains_key(grpc::GRPC_STATUS) {
                return Attempt::Answer(response.into_parts().0.headers);
            }
            Attempt::Response(response)
        }
        Err(err) => {
            let message = format!("{}: {}", r.address, err.error());
            if err.message().is_some() {
                // hyper handed the request back: it never left this process.
                return Attempt::Failed {
                    outcome: Outcome::NeverSent,
                    message,
                    reset: None,
                };
            }
            failed(err.error(), message)
        }
    }
}

/// What a failed send proves. A refused stream, and a stream above the last
/// one a GOAWAY says the peer processed, never reached it. (h2 reports a
/// connection that closed after its GOAWAY the same way for the streams
/// below; a sidecar closes so only once its drain grace has run out.)
fn failed(err: &hyper::Error, message: String) -> Attempt {
    let h2 = find_h2(err);
    if let Some(h2) = h2 {
        if h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote()) {
            return Attempt::Failed {
                outcome: Outcome::NeverSent,
                message,
                reset: None,
            };
        }
        if h2.is_reset() && h2.is_remote() {
            let reason = h2.reason().unwrap_or(h2::Reason::INTERNAL_ERROR);
            return Attempt::Failed {
                outcome: retry::classify(grpc::code_of_reset(reason), false),
                message,
                reset: Some(reason),
            };
        }
    }
    if err.is_canceled() {
        return Attempt::Failed {
            outcome: Outcome::NeverSent,
            message,
            reset: None,
        };
    }
    Attempt::Failed {
        outcome: Outcome::Unavailable,
        message,
        reset: None,
    }
}

fn find_h2(err: &hyper::Error) -> Option<&h2::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cause = e.source();
    }
    None
}
