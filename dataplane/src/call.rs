//! A call's books: what it holds while it runs (a peer's load slot, the
//! app's in-flight count, the retry budget) and what is recorded when it
//! ends (its duration and status, its span, the peer's health). Every path
//! out of a call, a caller leaving included, goes through `end` or `Drop`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderMap, Response};

use crate::balance::{self, PeerLoad};
use crate::body::RelayBody;
use crate::grpc;
use crate::plane::Plane;
use crate::retry::{self, Outcome};
use crate::snapshot::{lock, ServiceState};
use crate::trace::{self, SpanRecord};
use crate::{relay, timeout};

/// A caller that leaves this close to its deadline is its deadline passing:
/// its client cancels at the deadline it computed, a little before ours.
const DEADLINE_SLACK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// One attempt in flight at a peer: its load slot, and its health to report.
pub struct PeerHold {
    pub state: Arc<ServiceState>,
    pub id: String,
    pub load: PeerLoad,
}

/// What an attempt holds until it ends.
pub enum Hold {
    Peer(PeerHold),
    App,
}

impl Hold {
    fn release(self, plane: &Plane, outcome: Option<Outcome>) {
        let now = Instant::now();
        match self {
            Hold::Peer(peer) => {
                balance::release(&peer.load);
                let mut ejector = lock(&peer.state.ejector);
                let newly = match outcome {
                    None => {
                        ejector.succeeded(&peer.id);
                        false
                    }
                    // Unreachable, or its app is: as good as a connect failure.
                    Some(Outcome::NeverSent | Outcome::NotProcessed) => {
                        ejector.connect_failed(&peer.id, now)
                    }
                    // Like Envoy's consecutive gateway failures: a peer that
                    // hangs every call is ejected too, not only one that refuses.
                    Some(Outcome::Unavailable | Outcome::TimedOut) => ejector.failed(&peer.id, now),
                    Some(Outcome::Final | Outcome::Cancelled) => false,
                };
                if newly {
                    plane
                        .stats
                        .ejections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Hold::App => {
                plane.inbound.finished(now);
                if outcome != Some(Outcome::Cancelled) {
                    // A caller leaving says nothing of the app.
                    plane.note_app(outcome != Some(Outcome::NeverSent));
                }
            }
        }
    }
}

pub struct CallEnding {
    plane: Arc<Plane>,
    direction: Direction,
    method: String,
    started: Instant,
    deadline: Option<Instant>,
    hold: Option<Hold>,
    span: Option<SpanRecord>,
    /// Outbound calls count as active in the retry budget until they end.
    in_budget: bool,
    retrying: bool,
    pub attempts: u32,
    responded: bool,
    ended: bool,
}

/// A call as both sides begin it: what to forward, and its books.
pub struct Begun {
    pub method: String,
    /// Path and query, as forwarded.
    pub path: String,
    pub headers: HeaderMap,
    pub ending: CallEnding,
}

/// Read what every hop needs from a request: its method, the headers to
/// forward (with this hop's `traceparent` when tracing), its deadline. A
/// malformed `grpc-timeout` is answered at once.
pub fn begin(
    plane: &Arc<Plane>,
    parts: &Parts,
    direction: Direction,
    started: Instant,
) -> Result<Begun, Box<Response<RelayBody>>> {
    let method = parts.uri.path().to_owned();
    let path = parts
        .uri
        .path_and_query()
        .map_or(method.clone(), |p| p.as_str().to_owned());
    let mut headers = relay::forwarded_headers(parts);
    let span = if plane.config.tracing {
        let (span, traceparent) =
            trace::begin(parts.headers.get(grpc::TRACEPARENT), &method, direction);
        headers.insert(grpc::TRACEPARENT, traceparent);
        Some(span)
    } else {
        None
    };
    let mut deadline = None;
    if let Some(value) = parts.headers.get(grpc::GRPC_TIMEOUT) {
        match timeout::parse(value.as_bytes()) {
            Ok(left) => deadline = started.checked_add(left),
            Err(_) => {
                let ending =
                    CallEnding::new(plane.clone(), direction, &method, started, None, span);
                let message = format!(
                    "malformed grpc-timeout {:?}",
                    String::from_utf8_lossy(value.as_bytes())
                );
                return Err(Box::new(ending.reject(grpc::INVALID_ARGUMENT, &message)));
            }
        }
    }
    let ending = CallEnding::new(plane.clone(), direction, &method, started, deadline, span);
    Ok(Begun {
        method,
        path,
        headers,
        ending,
    })
}

impl CallEnding {
    /// A call the mesh answers itself (unroutable, or malformed): counted as failed.
    pub fn reject(self, code: u32, message: &str) -> Response<RelayBody> {
        self.plane
            .stats
            .failed_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.end(code, message, false);
        grpc::trailers_only(grpc::status_headers(code, message))
    }

    pub fn new(
        plane: Arc<Plane>,
        direction: Direction,
        method: &str,
        started: Instant,
        deadline: Option<Instant>,
        span: Option<SpanRecord>,
    ) -> Self {
        CallEnding {
            plane,
            direction,
            method: method.to_owned(),
            started,
            deadline,
            hold: None,
            span,
            in_budget: false,
            retrying: false,
            attempts: 0,
            responded: false,
            ended: false,
        }
    }

    pub fn plane(&self) -> &Arc<Plane> {
        &self.plane
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(now))
    }

    /// The call counts in the retry budget's active calls from now on.
    pub fn enter_budget(&mut self) {
        self.plane.budget.call_started();
        self.in_budget = true;
    }

    /// The call holds a retry slot until it ends.
    pub fn hold_retry_slot(&mut self) {
        self.retrying = true;
    }

    pub fn retrying(&self) -> bool {
        self.retrying
    }

    pub fn span_mut(&mut self) -> Option<&mut SpanRecord> {
        self.span.as_mut()
    }

    /// An attempt begins: it holds `hold` until `attempt_ended` (or the call's end).
    pub fn attempt_started(&mut self, hold: Hold) {
        if matches!(hold, Hold::App) {
            self.plane.inbound.started(Instant::now());
        }
        self.attempts += 1;
        self.hold = Some(hold);
    }

    /// The attempt in flight ended with `outcome` (None: it succeeded).
    pub fn attempt_ended(&mut self, outcome: Option<Outcome>, responded: bool) {
        if let Some(hold) = self.hold.take() {
            let outcome = retry::attempt_outcome(outcome, self.deadline_passed(), responded);
            hold.release(&self.plane, outcome);
        }
    }

    /// The upstream's response is being passed on: no more attempts.
    pub fn mark_responded(&mut self) {
        self.responded = true;
    }

    fn deadline_passed(&self) -> bool {
        self.deadline
            .is_some_and(|d| Instant::now() + DEADLINE_SLACK >= d)
    }

    /// The call ended with this status (`responded`: the upstream's response was passed on).
    pub fn end(mut self, code: u32, message: &str, responded: bool) {
        self.close(code, message, responded);
    }

    fn close(&mut self, code: u32, message: &str, responded: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        let responded = responded || self.responded;
        let outcome = match code {
            grpc::OK => None,
            grpc::CANCELLED => Some(Outcome::Cancelled),
            code => Some(retry::classify(code, false)),
        };
        self.attempt_ended(outcome, responded);
        let durations = match self.direction {
            Direction::Inbound => &self.plane.stats.server,
            Direction::Outbound => &self.plane.stats.client,
        };
        durations.record(&self.method, code, self.started.elapsed());
        if let Some(mut span) = self.span.take() {
            span.finish(code, message);
            self.plane.spans.push(span);
        }
        let stats = &self.plane.stats;
        stats.attempts.fetch_add(
            u64::from(self.attempts),
            std::sync::atomic::Ordering::Relaxed,
        );
        if self.in_budget {
            self.plane.budget.call_ended();
            self.in_budget = false;
        }
        if self.retrying {
            self.plane.budget.release();
            self.retrying = false;
        }
    }
}

impl Drop for CallEnding {
    fn drop(&mut self) {
        if !self.ended {
            // The caller left (a reset), or its deadline passed.
            let responded = self.responded;
            if self.deadline_passed() {
                self.close(grpc::DEADLINE_EXCEEDED, "deadline exceeded", responded);
            } else {
                self.close(grpc::CANCELLED, "cancelled by the caller", responded);
            }
        }
    }
}
