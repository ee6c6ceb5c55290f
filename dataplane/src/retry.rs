//! Retry decisions: when a failed attempt may be sent again, and when to wait
//! (a port of sidecar/retry.py and of `Attempts.ended` in sidecar/attempts.py).
//!
//! A call is retried on the next ring instance when it provably never reached
//! the app (connect failure, refused stream, `ringmesh-not-processed`); any
//! other UNAVAILABLE only for idempotent methods. At most 3 attempts, never
//! past the caller's deadline, full-jitter backoff (25 ms base, 250 ms cap)
//! except before the first hop to a different instance, and a retry budget
//! (see `budget`) so a dying cluster is not hammered.
//!
//! Everything here is pure: the attempt loop of every RPC kind asks `decide`
//! and does what it says, so the four kinds cannot drift apart.

use std::time::Duration;

mod glob;

pub use glob::{Glob, GlobError};

/// Trailer an inbound sidecar sets when it could not reach its app.
pub const NOT_PROCESSED_HEADER: &str = "ringmesh-not-processed";
/// Request header a caller sets to declare its call safe to repeat.
pub const IDEMPOTENT_HEADER: &str = "ringmesh-idempotent";
/// Header telling the upstream which attempt this is.
pub const ATTEMPTS_HEADER: &str = "ringmesh-attempts";

/// gRPC's UNAVAILABLE and DEADLINE_EXCEEDED, the two codes retrying cares about.
const UNAVAILABLE: u32 = 14;
const DEADLINE_EXCEEDED: u32 = 4;

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Connect failure or refused stream.
    NeverSent,
    /// The inbound sidecar could not reach its app.
    NotProcessed,
    /// May or may not have been processed.
    Unavailable,
    /// The deadline passed upstream: not retried, counts as a failure.
    TimedOut,
    /// An answer from the app: never retried.
    Final,
    /// The caller left or its deadline passed: says nothing of the peer.
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::NeverSent,
        Outcome::NotProcessed,
        Outcome::Unavailable,
        Outcome::TimedOut,
        Outcome::Final,
        Outcome::Cancelled,
    ];

    /// The Python enum's value: metric label values, kept so dashboards survive the port.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NeverSent => "connect",
            Outcome::NotProcessed => "not_processed",
            Outcome::Unavailable => "unavailable",
            Outcome::TimedOut => "timed_out",
            Outcome::Final => "final",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A failed attempt's gRPC status (non-zero: a success is never classified),
/// with `not_processed` the `ringmesh-not-processed: 1` trailer. Connect
/// failures and refused streams are known where they happen: they are
/// `Outcome::NeverSent` without asking here.
pub fn classify(grpc_status: u32, not_processed: bool) -> Outcome {
    match grpc_status {
        UNAVAILABLE if not_processed => Outcome::NotProcessed,
        UNAVAILABLE => Outcome::Unavailable,
        DEADLINE_EXCEEDED => Outcome::TimedOut,
        _ => Outcome::Final,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub budget_ratio: f64,
    pub budget_min: u32,
    /// How long a retry over the budget waits for a slot (never past the
    /// deadline): long enough for the first retries of a dead instance's
    /// calls to finish.
    pub budget_wait: Duration,
    pub stream_buffer_bytes: usize,
    pub idempotent: Vec<Glob>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff_base: Duration::from_millis(25),
            backoff_cap: Duration::from_millis(250),
            budget_ratio: 0.2,
            budget_min: 3,
            budget_wait: Duration::from_secs(1),
            stream_buffer_bytes: 64 * 1024,
            idempotent: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The defaults, with the methods matching any of `idempotent_globs`
    /// (fnmatch globs over `/package.Service/Method`) retried on UNAVAILABLE.
    pub fn new(idempotent_globs: &[String]) -> Result<Self, GlobError> {
        let idempotent = idempotent_globs
            .iter()
            .map(|g| Glob::new(g))
            .collect::<Result<_, _>>()?;
        Ok(RetryPolicy {
            idempotent,
            ..RetryPolicy::default()
        })
    }

    pub fn is_idempotent(&self, method: &str) -> bool {
        self.idempotent.iter().any(|g| g.matches(method))
    }

    pub fn may_retry(&self, outcome: Outcome, idempotent: bool) -> bool {
        match outcome {
            Outcome::NeverSent | Outcome::NotProcessed => true,
            Outcome::Unavailable => idempotent,
            Outcome::TimedOut | Outcome::Final | Outcome::Cancelled => false,
        }
    }

    /// The wait before attempt number `attempt` (2 = the first retry), given
    /// `jitter` uniform in [0, 1): none before the first hop to a different
    /// instance; otherwise full jitter up to base x 2^(attempt - 2) (25, 50,
    /// 100 ... ms), capped. Out-of-range jitter is clamped, NaN taken as 0.
    pub fn backoff(&self, attempt: u32, new_instance: bool, jitter: f64) -> Duration {
        if attempt <= 2 && new_instance {
            return Duration::ZERO;
        }
        let ceiling = match attempt.checked_sub(2) {
            // Python's 2 ** (attempt - 2) is a fraction below attempt 2.
            None => self.backoff_base / (1u32 << (2 - attempt)),
            Some(doublings) => match 1u32.checked_shl(doublings) {
                Some(factor) => self.backoff_base.saturating_mul(factor),
                None => Duration::MAX,
            },
        }
        .min(self.backoff_cap);
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * jitter)
            .unwrap_or(ceiling)
            .min(ceiling)
    }
}

/// What the attempt loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The attempt succeeded: the call is over.
    Done,
    /// Send the next attempt after `delay`.
    Retry { delay: Duration },
    /// Pass the failure to the caller.
    GiveUp,
}

/// How an attempt ended, as the attempt loop saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptEnd {
    /// None: success.
    pub outcome: Option<Outcome>,
    /// A response had been passed on to the caller: it cannot be taken back.
    pub responded: bool,
    /// The request body can be sent again (still all in the replay buffer).
    pub replayable: bool,
}

/// The one retry decision of every RPC kind, in the Python's order.
/// `attempts_made` counts the attempt that just ended; `next_target` is None
/// when the plan has no untried target, `Some(true)` when it is a different
/// instance than the last attempt's; `remaining` is the caller's deadline
/// left, None without one; `jitter` is uniform in [0, 1).
///
/// The budget is not asked here (it waits, so it is the loop's): a Retry
/// still needs a budget slot, and a body that stopped being replayable
/// during the wait ends the call there, as the Python's `possible()`.
pub fn decide(
    policy: &RetryPolicy,
    end: &AttemptEnd,
    attempts_made: u32,
    idempotent: bool,
    next_target: Option<bool>,
    remaining: Option<Duration>,
    jitter: f64,
) -> Decision {
    let Some(outcome) = end.outcome else {
        return Decision::Done;
    };
    if end.responded || !end.replayable || attempts_made >= policy.max_attempts {
        return Decision::GiveUp;
    }
    if !policy.may_retry(outcome, idempotent) {
        return Decision::GiveUp;
    }
    let Some(new_instance) = next_target else {
        return Decision::GiveUp;
    };
    let delay = policy.backoff(attempts_made.saturating_add(1), new_instance, jitter);
    match remaining {
        Some(left) if delay >= left => Decision::GiveUp,
        _ => Decision::Retry { delay },
    }
}

/// How an attempt ended, for the director (Python's `Attempts.ended`): cut
/// off by the caller's deadline before any response is a timeout (the peer
/// did not answer in time), not a caller leaving; a stream that was
/// answering until its deadline is fine, so its timeout is a cancellation.
pub fn attempt_outcome(
    result: Option<Outcome>,
    deadline_passed: bool,
    responded: bool,
) -> Option<Outcome> {
    let result = match result {
        Some(Outcome::Cancelled) if deadline_passed => Some(Outcome::TimedOut),
        other => other,
    };
    match result {
        Some(Outcome::TimedOut) if responded => Some(Outcome::Cancelled),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    //! tests/unit/test_retry.py's policy cases, and every row of `decide`.
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn outcome_labels_are_the_python_values() {
        let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            labels,
            [
                "connect",
                "not_processed",
                "unavailable",
                "timed_out",
                "final",
                "cancelled"
            ]
        );
    }

    #[test]
    fn classify() {
        use super::classify as c;
        assert_eq!(c(14, true), Outcome::NotProcessed);
        assert_eq!(c(14, false), Outcome::Unavailable);
        assert_eq!(c(13, false), Outcome::Final); // INTERNAL
        assert_eq!(c(4, false), Outcome::TimedOut);
        assert_eq!(c(4, true), Outcome::TimedOut);
        assert_eq!(c(5, true), Outcome::Final); // NOT_FOUND: the trailer means nothing there
        assert_eq!(c(1, false), Outcome::Final); // CANCELLED from upstream is an answer
        assert_eq!(c(999, false), Outcome::Final);
    }

    #[test]
    fn may_retry() {
        use Outcome::*;
        let p = RetryPolicy::default();
        let rows = [
            (NeverSent, false, true),
            (NeverSent, true, true),
            (NotProcessed, false, true),
            (NotProcessed, true, true),
            (Unavailable, false, false),
            (Unavailable, true, true),
            (Final, false, false),
            (Final, true, false),
            (TimedOut, true, false),
            (Cancelled, true, false),
        ];
        for (outcome, idempotent, retry) in rows {
            assert_eq!(
                p.may_retry(outcome, idempotent),
                retry,
                "{outcome:?} {idempotent}"
            );
        }
    }

    #[test]
    fn idempotent_globs_match_method_paths() {
        let globs = ["/shop.Catalog/*".to_owned(), "/shop.Orders/Get*".to_owned()];
        let policy = RetryPolicy::new(&globs).unwrap();
        assert!(policy.is_idempotent("/shop.Catalog/List"));
        assert!(policy.is_idempotent("/shop.Orders/GetOrder"));
        assert!(!policy.is_idempotent("/shop.Orders/PlaceOrder"));
        assert!(!policy.is_idempotent("/shop.CatalogAdmin/Drop"));
        assert!(!RetryPolicy::default().is_idempotent("/shop.Catalog/List"));
        assert_eq!(policy.idempotent[1].pattern(), "/shop.Orders/Get*");
    }

    #[test]
    fn no_backoff_before_the_first_hop_to_another_instance() {
        let mut rng = SmallRng::seed_from_u64(1);
        let policy = RetryPolicy::default();
        assert_eq!(policy.backoff(2, true, rng.random()), Duration::ZERO);
        // Same instance again, or a later attempt: the n-th retry waits up to
        // base x 2^(n-1) (full jitter), capped at 250 ms.
        for _ in 0..200 {
            assert!(policy.backoff(2, false, rng.random()) <= 25 * MS);
            assert!(policy.backoff(3, true, rng.random()) <= 50 * MS);
            assert!(policy.backoff(5, true, rng.random()) <= 200 * MS);
            assert!(policy.backoff(10, true, rng.random()) <= 250 * MS);
        }
        let samples: Vec<Duration> = (0..500)
            .map(|_| policy.backoff(3, true, rng.random()))
            .collect();
        assert!(
            samples.iter().max().unwrap() > &(40 * MS),
            "full jitter spreads over [0, cap]"
        );
        assert!(samples.iter().min().unwrap() < &(10 * MS));
        let late = (0..500)
            .map(|_| policy.backoff(10, true, rng.random()))
            .max()
            .unwrap();
        assert!(late > 200 * MS);
    }

    #[test]
    fn backoff_is_jitter_times_the_ceiling() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(2, false, 0.5), Duration::from_micros(12_500));
        assert_eq!(p.backoff(4, false, 0.5), 50 * MS);
        assert_eq!(
            p.backoff(1, false, 1.0),
            Duration::from_micros(12_500),
            "2^-1, as Python"
        );
        assert_eq!(p.backoff(0, false, 1.0), Duration::from_micros(6_250));
        assert_eq!(p.backoff(0, true, 1.0), Duration::ZERO);
        assert_eq!(
            p.backoff(u32::MAX, false, 0.999),
            p.backoff_cap.mul_f64(0.999)
        );
        assert_eq!(p.backoff(40, false, f64::NAN), Duration::ZERO);
        assert_eq!(
            p.backoff(40, false, 7.0),
            250 * MS,
            "clamped to the ceiling"
        );
        assert_eq!(p.backoff(40, false, -1.0), Duration::ZERO);
    }

    fn failed(outcome: Outcome) -> AttemptEnd {
        AttemptEnd {
            outcome: Some(outcome),
            responded: false,
            replayable: true,
        }
    }

    /// Why, the attempt's end, attempts made, idempotent, next target,
    /// remaining, jitter, and the decision.
    type Row = (
        &'static str,
        AttemptEnd,
        u32,
        bool,
        Option<bool>,
        Option<Duration>,
        f64,
        Decision,
    );

    #[test]
    fn decide_every_row() {
        use Decision::*;
        use Outcome::*;
        let p = RetryPolicy::default();
        let ok = AttemptEnd {
            outcome: None,
            responded: true,
            replayable: false,
        };
        let responded = AttemptEnd {
            responded: true,
            ..failed(NeverSent)
        };
        let spent = AttemptEnd {
            replayable: false,
            ..failed(NeverSent)
        };
        let s = Some(Duration::from_secs(5));
        let retry = |ms: f64| Retry {
            delay: Duration::from_secs_f64(ms / 1000.0),
        };
        #[rustfmt::skip]
        let rows: &[Row] = &[
            ("success is done, whatever else",      ok,                  1, false, None,        s,    0.5, Done),
            ("a response was passed on",            responded,           1, true,  Some(true),  s,    0.5, GiveUp),
            ("the body cannot be replayed",         spent,               1, true,  Some(true),  s,    0.5, GiveUp),
            ("attempts used up",                    failed(NeverSent),   3, true,  Some(true),  s,    0.5, GiveUp),
            ("more than used up",                   failed(NeverSent),   9, true,  Some(true),  s,    0.5, GiveUp),
            ("unavailable, not idempotent",         failed(Unavailable), 1, false, Some(true),  s,    0.5, GiveUp),
            ("an answer from the app",              failed(Final),       1, true,  Some(true),  s,    0.5, GiveUp),
            ("timed out upstream",                  failed(TimedOut),    1, true,  Some(true),  s,    0.5, GiveUp),
            ("cancelled",                           failed(Cancelled),   1, true,  Some(true),  s,    0.5, GiveUp),
            ("no untried target",                   failed(NeverSent),   1, true,  None,        s,    0.5, GiveUp),
            ("first hop elsewhere goes at once",    failed(NeverSent),   1, false, Some(true),  s,    0.5, Retry { delay: Duration::ZERO }),
            ("not processed, elsewhere",            failed(NotProcessed),1, false, Some(true),  None, 0.5, Retry { delay: Duration::ZERO }),
            ("unavailable, idempotent",             failed(Unavailable), 1, true,  Some(true),  s,    0.5, Retry { delay: Duration::ZERO }),
            ("same instance again: backoff",        failed(NeverSent),   1, false, Some(false), s,    0.5, retry(12.5)),
            ("third attempt elsewhere: backoff",    failed(NeverSent),   2, false, Some(true),  s,    0.5, retry(25.0)),
            ("third attempt, no deadline",          failed(NotProcessed),2, false, Some(false), None, 0.9, retry(45.0)),
            ("backoff reaching the deadline",       failed(NeverSent),   2, false, Some(true),  Some(25 * MS), 0.5, GiveUp),
            ("backoff just within the deadline",    failed(NeverSent),   2, false, Some(true),  Some(26 * MS), 0.5, retry(25.0)),
            ("deadline already passed",             failed(NeverSent),   1, false, Some(true),  Some(Duration::ZERO), 0.5, GiveUp),
        ];
        for (why, end, made, idem, next, left, jitter, want) in rows {
            assert_eq!(
                decide(&p, end, *made, *idem, *next, *left, *jitter),
                *want,
                "{why}"
            );
        }
        let patient = RetryPolicy {
            max_attempts: 5,
            ..RetryPolicy::default()
        };
        assert_eq!(
            decide(
                &patient,
                &failed(NeverSent),
                4,
                false,
                Some(false),
                None,
                0.5
            ),
            retry(100.0),
            "max_attempts comes from the policy"
        );
    }

    #[test]
    fn only_a_deadline_before_any_response_is_a_timeout() {
        use Outcome::*;
        assert_eq!(
            attempt_outcome(Some(Cancelled), true, false),
            Some(TimedOut)
        );
        assert_eq!(attempt_outcome(Some(TimedOut), true, true), Some(Cancelled));
        assert_eq!(
            attempt_outcome(Some(TimedOut), false, true),
            Some(Cancelled)
        );
        assert_eq!(
            attempt_outcome(Some(Cancelled), true, true),
            Some(Cancelled)
        );
        assert_eq!(attempt_outcome(None, true, false), None);
        assert_eq!(attempt_outcome(None, true, true), None);
        // The caller left early.
        assert_eq!(
            attempt_outcome(Some(Cancelled), false, false),
            Some(Cancelled)
        );
        for other in [NeverSent, NotProcessed, Unavailable, Final] {
            assert_eq!(attempt_outcome(Some(other), true, true), Some(other));
        }
    }
}
