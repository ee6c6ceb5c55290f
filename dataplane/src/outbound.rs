//! The outbound side: the app's calls to its peers, routed by consistent
//! hashing with bounded loads, failed over along the key's ring order.
//!
//! One attempt loop for all four RPC kinds (HTTP/2 makes them one shape):
//! each attempt's end goes through the pure `retry::decide`, and the books
//! (load slots, budget, histograms, ejection) through `CallEnding`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;
use rand::Rng;

use crate::balance;
use crate::body::{RelayBody, RelayError, Replay};
use crate::call::{self, Begun, CallEnding, Direction, Hold, PeerHold};
use crate::grpc::{self, Mesh};
use crate::inbound;
use crate::plane::Plane;
use crate::relay::{self, Attempt, AttemptRequest};
use crate::retry::{self, AttemptEnd, Decision, Outcome};
use crate::snapshot::{lock, Rejection, ServiceRoutes};

/// A call the mesh could not deliver waits this long for the caller to finish sending.
pub const DRAIN_BEFORE_FAILING: Duration = Duration::from_millis(250);

/// A peer chosen for an attempt (its load slot already claimed).
struct Target {
    hold: PeerHold,
    address: String,
}

/// A call's targets: the bounded-load choice first, then the key's ring order
/// in the topology in force at the first retry, skipping ejected and tried peers.
struct Plan {
    service: String,
    key: Option<String>,
    tried: Vec<String>,
    order: Option<Vec<(String, String)>>,
}

impl Plan {
    fn first(&mut self, routes: &ServiceRoutes, plane: &Plane) -> Option<Target> {
        let now = Instant::now();
        let ids: Vec<&str> = routes.peers.iter().map(|p| p.id.as_str()).collect();
        let usable = lock(&routes.state.ejector).usable_mask(&ids, now);
        let chosen = match &self.key {
            Some(key) => {
                let order = routes.ring.order(key);
                balance::claim_keyed(&order, &routes.loads, &usable, plane.config.load_factor_pct)
            }
            None => balance::claim_p2c(&routes.loads, &usable, &mut rand::rng()),
        }?;
        let peer = routes.peers.get(chosen)?;
        let load = routes.loads.get(chosen)?.clone();
        self.tried.push(peer.id.clone());
        Some(Target {
            hold: PeerHold {
                state: routes.state.clone(),
                id: peer.id.clone(),
                load,
            },
            address: peer.address.clone(),
        })
    }

    /// The next untried peer (not claimed yet): its id and address.
    fn peek(&mut self, plane: &Plane) -> Option<(String, String)> {
        if self.order.is_none() {
            let snapshot = plane.routes.load();
            let order = match snapshot.services.get(&self.service) {
                Some(routes) if !routes.peers.is_empty() => {
                    let indices: Vec<u32> = match &self.key {
                        Some(key) => routes.ring.order(key),
                        None => {
                            let mut all: Vec<u32> = (0..routes.peers.len() as u32).collect();
                            shuffle(&mut all);
                            all
                        }
                    };
                    let ids: Vec<&str> = indices
                        .iter()
                        .filter_map(|i| routes.peers.get(*i as usize))
                        .map(|p| p.id.as_str())
                        .collect();
                    let usable = lock(&routes.state.ejector).usable_mask(&ids, Instant::now());
                    indices
                        .iter()
                        .zip(usable)
                        .filter(|(_, ok)| *ok)
                        .filter_map(|(i, _)| routes.peers.get(*i as usize))
                        .map(|p| (p.id.clone(), p.address.clone()))
                        .collect()
                }
                _ => Vec::new(),
            };
            self.order = Some(order);
        }
        self.order
            .as_ref()?
            .iter()
            .find(|(id, _)| !self.tried.contains(id))
            .cloned()
    }

    /// Claim the peer `peek` named, in the snapshot in force now.
    fn take(&mut self, plane: &Plane, id: &str, address: &str) -> Option<Target> {
        let snapshot = plane.routes.load();
        let routes = snapshot.services.get(&self.service)?;
        let i = routes.index_of(id)?;
        let load = routes.loads.get(i)?.clone();
        balance::claim(&load);
        self.tried.push(id.to_owned());
        Some(Target {
            hold: PeerHold {
                state: routes.state.clone(),
                id: id.to_owned(),
                load,
            },
            address: address.to_owned(),
        })
    }
}

fn shuffle(v: &mut [u32]) {
    let mut rng = rand::rng();
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

fn text(headers: &HeaderMap, name: &http::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The authority's host, when it may name a service (`echo`, `echo:80`).
fn authority_host(request: &Request<Incoming>) -> Option<String> {
    let host = request.uri().host()?;
    Some(host.to_owned())
}

pub async fn serve(
    plane: Arc<Plane>,
    request: Request<Incoming>,
) -> Result<Response<RelayBody>, RelayError> {
    let started = Instant::now();
    if let Some(rejected) = inbound::not_grpc(&request) {
        return Ok(rejected);
    }
    let authority = authority_host(&request);
    let (parts, body) = request.into_parts();
    plane.stats.calls.fetch_add(1, Relaxed);
    let Begun {
        method,
        path,
        headers,
        mut ending,
    } = match call::begin(&plane, &parts, Direction::Outbound, started) {
        Ok(begun) => begun,
        Err(rejected) => return Ok(*rejected),
    };

    let snapshot = plane.routes.load();
    let service_header = text(&parts.headers, &grpc::SERVICE);
    let by_authority =
        authority.filter(|host| service_header.is_none() && snapshot.known.contains(host));
    let resolved = snapshot
        .resolve(
            service_header.as_deref().or(by_authority.as_deref()),
            &method,
        )
        .and_then(|service| snapshot.routes(service));
    let routes = match resolved {
        Ok(routes) => routes,
        Err(Rejection { code, message }) => return Ok(ending.reject(code, &message)),
    };
    let idempotent = parts
        .headers
        .get(grpc::IDEMPOTENT)
        .is_some_and(|v| v.as_bytes() == b"1")
        || plane.config.retry.is_idempotent(&method);
    let mut plan = Plan {
        service: routes.name.clone(),
        key: text(&parts.headers, &grpc::HASH_KEY),
        tried: Vec::new(),
        order: None,
    };
    let Some(mut target) = plan.first(routes, &plane) else {
        let message = format!(
            "no live instance of service {}",
            crate::snapshot::py_repr(&routes.name)
        );
        return Ok(ending.reject(grpc::UNAVAILABLE, &message));
    };
    drop(snapshot);
    ending.enter_budget();
    let replay = Replay::new(body, plane.config.retry.stream_buffer_bytes);

    loop {
        let now = Instant::now();
        let remaining = ending.remaining(now);
        let address = target.address.clone();
        let id = target.hold.id.clone();
        ending.attempt_started(Hold::Peer(target.hold));
        let sent = relay::attempt(AttemptRequest {
            pool: &plane.peers,
            address: &address,
            service: Some(&plan.service),
            path: &path,
            headers: &headers,
            replay: &replay,
            remaining,
            connect_wait: plane.connect_wait(remaining),
        });
        let result = relay::before(ending.deadline(), sent).await;
        let attempts = HeaderValue::from(ending.attempts);
        let outcome = result.outcome();
        if let Attempt::Response(response) = result {
            replay.commit();
            ending.mark_responded();
            let (response_parts, incoming) = response.into_parts();
            let mut downstream = Response::new(RelayBody::relay(
                incoming,
                ending,
                Mesh::Sidecar,
                Some(attempts),
            ));
            *downstream.headers_mut() =
                relay::returned_headers(response_parts.headers, Mesh::Sidecar);
            return Ok(downstream);
        }
        ending.attempt_ended(outcome, false);
        let Some(failure) = outcome else {
            // A trailers-only OK: passed on as it is.
            let mut answer = match result {
                Attempt::Answer(answer) => answer,
                _ => grpc::status_headers(grpc::OK, ""),
            };
            grpc::filter_mesh_headers(&mut answer, Mesh::Sidecar);
            answer.insert(grpc::ATTEMPTS, attempts);
            ending.end(grpc::OK, "", true);
            return Ok(grpc::trailers_only(answer));
        };
        let next = plan.peek(&plane);
        let end = AttemptEnd {
            outcome: Some(failure),
            responded: false,
            replayable: replay.replayable(),
        };
        let jitter: f64 = rand::rng().random();
        let decision = retry::decide(
            &plane.config.retry,
            &end,
            ending.attempts,
            idempotent,
            next.as_ref().map(|(next_id, _)| *next_id != id),
            ending.remaining(Instant::now()),
            jitter,
        );
        let retry_to = match (decision, next) {
            (Decision::Retry { delay }, Some((next_id, next_address))) => {
                if !take_retry_slot(&mut ending, &plane).await {
                    None
                } else {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    // The caller may have sent past the replay buffer meanwhile.
                    if replay.replayable()
                        && ending.remaining(Instant::now()) != Some(Duration::ZERO)
                    {
                        plan.take(&plane, &next_id, &next_address)
                    } else {
                        None
                    }
                }
            }
            _ => None,
        };
        match retry_to {
            Some(next_target) => {
                plane.stats.retried(failure);
                target = next_target;
            }
            None => {
                let described = format!("service {}", crate::snapshot::py_repr(&plan.service));
                return give_up(ending, &replay, result, failure, &described).await;
            }
        }
    }
}

/// One slot per retrying call, kept until the call ends; over the budget, a
/// retry waits its turn for a bounded time, never past the deadline.
async fn take_retry_slot(ending: &mut CallEnding, plane: &Plane) -> bool {
    if ending.retrying() {
        return true;
    }
    let budget = &plane.budget;
    if !budget.try_acquire() {
        let policy = &plane.config.retry;
        let wait = ending
            .remaining(Instant::now())
            .map_or(policy.budget_wait, |left| left.min(policy.budget_wait));
        if !wait.is_zero() {
            plane.stats.retry_budget_waits.fetch_add(1, Relaxed);
        }
        if !budget.acquire(wait).await {
            plane.stats.retry_budget_exhausted.fetch_add(1, Relaxed);
            return false;
        }
    }
    ending.hold_retry_slot();
    plane.stats.note_retrying(u64::from(budget.retrying()));
    true
}

/// The call's last attempt failed and no retry is left: say why.
async fn give_up(
    ending: CallEnding,
    replay: &Replay,
    result: Attempt,
    outcome: Outcome,
    described: &str,
) -> Result<Response<RelayBody>, RelayError> {
    let plane = ending.plane().clone();
    plane.stats.failed_calls.fetch_add(1, Relaxed);
    let attempts = HeaderValue::from(ending.attempts);
    let mut trailers = match result {
        Attempt::Answer(mut headers) => {
            grpc::filter_mesh_headers(&mut headers, Mesh::Sidecar);
            headers
        }
        Attempt::Failed {
            reset: Some(reason),
            message,
            ..
        } => {
            // The upstream reset the stream: so does this hop.
            ending.end(grpc::code_of_reset(reason), &message, false);
            return Err(RelayError::new(reason, message));
        }
        Attempt::Failed {
            outcome: Outcome::TimedOut,
            message,
            ..
        } => grpc::status_headers(grpc::DEADLINE_EXCEEDED, &message),
        Attempt::Failed { message, .. } => grpc::status_headers(grpc::UNAVAILABLE, &message),
        Attempt::Response(_) => HeaderMap::new(),
    };
    if matches!(outcome, Outcome::NeverSent | Outcome::NotProcessed) {
        // The mesh could not deliver the call: say so, naming the service.
        let last = grpc::message_of(&trailers);
        let message = format!(
            "no instance of {described} could take the call after {} attempt(s): {last}",
            ending.attempts
        );
        trailers.extend(grpc::status_headers(grpc::UNAVAILABLE, &message));
        let left = ending.remaining(Instant::now());
        replay
            .drain(left.map_or(DRAIN_BEFORE_FAILING, |l| l.min(DRAIN_BEFORE_FAILING)))
            .await;
    }
    trailers.insert(grpc::ATTEMPTS, attempts);
    let code = grpc::status_of(&trailers).unwrap_or(grpc::UNKNOWN);
    ending.end(code, &grpc::message_of(&trailers), false);
    Ok(grpc::trailers_only(trailers))
}
