//! Bodies of a relayed call: the request, replayable for a retry until the
//! first response (or 64 KiB); the response, passed through frame by frame
//! with the mesh's trailers, closing the call's books when it ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::call::CallEnding;
use crate::grpc::{self, Mesh};
use crate::snapshot::lock;

/// Why a relayed stream was reset: an HTTP/2 reason (hyper resets the other
/// side's stream with it, found through `source`) and what happened.
#[derive(Debug)]
pub struct RelayError {
    reason: h2::Error,
    what: String,
}

impl RelayError {
    pub fn new(reason: h2::Reason, what: impl Into<String>) -> Self {
        RelayError {
            reason: h2::Error::from(reason),
            what: what.into(),
        }
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.what, self.reason)
    }
}

impl std::error::Error for RelayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.reason)
    }
}

/// The h2 reason somewhere in an error's chain (a reset, a GOAWAY), if any.
pub fn h2_reason(err: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cause = e.source();
    }
    None
}

struct ReplayState {
    source: Incoming,
    buffer: VecDeque<Bytes>,
    start: usize, // stream index of buffer[0]
    count: usize, // messages read from the caller so far
    size: usize,
    ended: bool,
    error: Option<h2::Reason>,
    trailers: Option<HeaderMap>,
    committed: bool,
    generation: u64,
    limit: usize,
}

impl ReplayState {
    fn replayable(&self) -> bool {
        !self.committed && self.start == 0 && self.size <= self.limit
    }
}

/// The caller's request stream, read once, kept while a retry may still need it.
#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<ReplayState>>,
}

impl Replay {
    pub fn new(source: Incoming, limit: usize) -> Self {
        Replay {
            state: Arc::new(Mutex::new(ReplayState {
                source,
                buffer: VecDeque::new(),
                start: 0,
                count: 0,
                size: 0,
                ended: false,
                error: None,
                trailers: None,
                committed: false,
                generation: 0,
                limit,
            })),
        }
    }

    /// True while a new attempt can still send the whole stream.
    pub fn replayable(&self) -> bool {
        lock(&self.state).replayable()
    }

    /// The first response arrived: no more attempts, stop keeping messages.
    pub fn commit(&self) {
        let mut s = lock(&self.state);
        s.committed = true;
    }

    /// The request stream for a new attempt, from its first message; the body
    /// of an earlier attempt ends (it could take a message meant for this one).
    pub fn attempt(&self) -> ReplayBody {
        let mut s = lock(&self.state);
        s.generation += 1;
        ReplayBody {
            state: Some(self.state.clone()),
            once: None,
            generation: s.generation,
            index: 0,
            trailers_sent: false,
        }
    }

    /// Read on until the caller has sent everything, for at most `within` and
    /// the replay limit. A caller answered while still sending may report an
    /// error of its own instead of the answer (grpc.aio does: grpc/grpc#36066),
    /// so a call the mesh could not deliver lets the caller finish first.
    pub async fn drain(&self, within: Duration) {
        let _ = tokio::time::timeout(
            within,
            std::future::poll_fn(|cx| {
                let mut s = lock(&self.state);
                loop {
                    if s.ended || s.size > s.limit {
                        return Poll::Ready(());
                    }
                    match Pin::new(&mut s.source).poll_frame(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Some(data) = frame.data_ref() {
                                s.size += data.len();
                            }
                        }
                        Poll::Ready(_) => s.ended = true,
                    }
                }
            }),
        )
        .await;
    }
}

/// One attempt's view of the request stream (what hyper sends upstream).
pub struct ReplayBody {
    state: Option<Arc<Mutex<ReplayState>>>,
    once: Option<Bytes>,
    generation: u64,
    index: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    /// A body of one message the sidecar writes itself (its health probes).
    pub fn once(message: Bytes) -> Self {
        ReplayBody {
            state: None,
            once: Some(message),
            generation: 0,
            index: 0,
            trailers_sent: true,
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        let this = &mut *self;
        let Some(state) = this.state.as_ref() else {
            return Poll::Ready(this.once.take().map(|data| Ok(Frame::data(data))));
        };
        let mut s = lock(state);
        if s.generation != this.generation {
            return Poll::Ready(None); // a newer attempt owns the stream now
        }
        loop {
            if this.index < s.count {
                let Some(at) = this.index.checked_sub(s.start) else {
                    return Poll::Ready(Some(Err(RelayError::new(
                        h2::Reason::INTERNAL_ERROR,
                        "request stream no longer replayable",
                    ))));
                };
                let Some(data) = s.buffer.get(at).cloned() else {
                    return Poll::Ready(Some(Err(RelayError::new(
                        h2::Reason::INTERNAL_ERROR,
                        "request stream no longer replayable",
                    ))));
                };
                this.index += 1;
                if !s.replayable() {
                    // Only this attempt can still run: drop what it has sent.
                    let sent = this.index - s.start;
                    s.buffer.drain(..sent);
                    s.start = this.index;
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if s.ended {
                if let Some(reason) = s.error {
                    return Poll::Ready(Some(Err(RelayError::new(
                        reason,
                        "the caller's stream ended",
                    ))));
                }
                if !this.trailers_sent {
                    this.trailers_sent = true;
                    if let Some(trailers) = s.trailers.clone() {
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                }
                return Poll::Ready(None);
            }
            match Pin::new(&mut s.source).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => s.ended = true,
                Poll::Ready(Some(Err(err))) => {
                    s.ended = true;
                    s.error = Some(h2_reason(&err).unwrap_or(h2::Reason::CANCEL));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    // An empty DATA frame carries nothing; forwarding one per call
                    // trips gRPC's flood guard ("Too many zero length data frames").
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        s.size += data.len();
                        s.count += 1;
                        s.buffer.push_back(data);
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            s.trailers = Some(trailers);
                        }
                    }
                },
            }
        }
    }
}

/// A response on its way to the caller: the upstream's frames, then its
/// trailers with the mesh's own, and the call's books closed at the end.
pub struct RelayBody {
    inner: Option<Incoming>,
    /// Frames the sidecar writes itself (its health service).
    local: Option<mpsc::Receiver<Frame<Bytes>>>,
    ending: Option<CallEnding>,
    mesh: Mesh,
    attempts: Option<HeaderValue>,
}

impl RelayBody {
    /// Nothing after the headers (a trailers-only response).
    pub fn empty() -> Self {
        RelayBody {
            inner: None,
            local: None,
            ending: None,
            mesh: Mesh::App,
            attempts: None,
        }
    }

    /// Frames written by the sidecar itself, sent as they come.
    pub fn local(frames: mpsc::Receiver<Frame<Bytes>>) -> Self {
        RelayBody {
            local: Some(frames),
            ..RelayBody::empty()
        }
    }

    pub fn relay(
        inner: Incoming,
        ending: CallEnding,
        mesh: Mesh,
        attempts: Option<HeaderValue>,
    ) -> Self {
        RelayBody {
            inner: Some(inner),
            local: None,
            ending: Some(ending),
            mesh,
            attempts,
        }
    }

    fn finish(&mut self, code: u32, message: &str) {
        self.inner = None;
        if let Some(ending) = self.ending.take() {
            ending.end(code, message, true);
        }
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        let this = &mut *self;
        if let Some(local) = this.local.as_mut() {
            let polled = local.poll_recv(cx).map(|frame| frame.map(Ok));
            if let Poll::Ready(None) = polled {
                this.local = None;
            }
            return polled;
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = loop {
            match Pin::new(&mut *inner).poll_frame(cx) {
                // Nothing in it: not worth a frame of our own (see ReplayBody).
                Poll::Ready(Some(Ok(frame)))
                    if frame.data_ref().is_some_and(bytes::Bytes::is_empty) => {}
                polled => break polled,
            }
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                let Ok(mut trailers) = frame.into_trailers() else {
                    return Poll::Ready(Some(Err(RelayError::new(
                        h2::Reason::PROTOCOL_ERROR,
                        "unknown frame from upstream",
                    ))));
                };
                grpc::filter_mesh_headers(&mut trailers, this.mesh);
                if let Some(attempts) = this.attempts.take() {
                    trailers.insert(grpc::ATTEMPTS, attempts);
                }
                let code = grpc::status_of(&trailers).unwrap_or(grpc::UNKNOWN);
                let message = grpc::message_of(&trailers);
                this.finish(code, &message);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Ready(None) => {
                // An upstream that ends without trailers broke the protocol:
                // the caller gets a status all the same.
                let message = "the upstream ended the stream without a gRPC status";
                let mut trailers = grpc::status_headers(grpc::INTERNAL, message);
                if let Some(attempts) = this.attempts.take() {
                    trailers.insert(grpc::ATTEMPTS, attempts);
                }
                this.finish(grpc::INTERNAL, message);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Ready(Some(Err(err))) => {
                // The upstream reset the stream, or its connection broke:
                // reset ours with the same reason, so the caller sees what it would have.
                let reason = h2_reason(&err).unwrap_or(h2::Reason::INTERNAL_ERROR);
                let code = grpc::code_of_reset(reason);
                let what = format!("upstream stream ended: {err}");
                this.finish(code, &what);
                Poll::Ready(Some(Err(RelayError::new(reason, what))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none() && self.local.is_none()
    }
}
