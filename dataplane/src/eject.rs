//! Outlier ejection: which peers to skip for new attempts (a port of
//! sidecar/ejection.py; the clock is the caller's `now`).
//!
//! A connect failure (the peer or its app unreachable) ejects a peer at once;
//! `consecutive` failures in a row eject it for `base` x its ejection count
//! (at most `cap`). A peer ejected as unreachable returns as soon as a health
//! probe passes, since the probe shows exactly that it is reachable again.
//! One ejected for failing calls (UNAVAILABLE, timeouts) serves its time: its
//! sidecar answers SERVING while its app hangs, so a probe proves nothing.
//! Each cause keeps its own multiplier, one less for every `base` back in
//! rotation (as Envoy's): a flapping app does not make a later ejection for
//! failing calls last five minutes.
//! If more than half the peers are ejected, ejections are ignored (panic
//! mode): better to try a suspect peer than to fail for sure.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// Failed calls in a row that eject a peer.
    pub consecutive: u32,
    /// Length of a first ejection, and the period that takes one off a
    /// peer's multiplier while it is back in rotation.
    pub base: Duration,
    /// Longest ejection, however often a peer was ejected.
    pub cap: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        EjectionPolicy {
            consecutive: 5,
            base: Duration::from_secs(30),
            cap: Duration::from_secs(300),
        }
    }
}

/// An ejection as start and length rather than an end instant: an end
/// instant could overflow `Instant` for an absurd `cap`, a length cannot.
#[derive(Debug, Clone, Copy)]
struct Ejection {
    since: Instant,
    length: Duration,
}

impl Ejection {
    /// Python's `ejected_until > now`.
    fn in_force(&self, now: Instant) -> bool {
        match now.checked_duration_since(self.since) {
            Some(elapsed) => elapsed < self.length,
            None => true, // `now` before the start: before its end too
        }
    }

    /// Python's `max(0, now - ejected_until)`.
    fn over_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
            .saturating_sub(self.length)
    }
}

#[derive(Debug, Clone)]
struct PeerHealth {
    /// When it was first seen: lists come out in this order, as Python's
    /// dict kept insertion order.
    seen: u64,
    consecutive_failures: u32,
    // Recent ejections, per cause: each multiplies its cause's next ejection
    // time. A probe cuts an unreachable ejection short, so a flapping app must
    // not make a later ejection for failing calls last minutes.
    unreachable_ejections: u32,
    failure_ejections: u32,
    /// The last ejection; None never ejected, or brought back by a probe
    /// (Python's `ejected_until = 0.0`).
    ejection: Option<Ejection>,
    /// Ejected because it could not be reached.
    unreachable: bool,
}

/// One service's ejection state, keyed by peer id.
#[derive(Debug, Clone, Default)]
pub struct Ejector {
    policy: EjectionPolicy,
    peers: HashMap<String, PeerHealth>,
    next_seen: u64,
    ejection_count: u64,
}

impl Ejector {
    pub fn new(policy: EjectionPolicy) -> Ejector {
        Ejector {
            policy,
            ..Ejector::default()
        }
    }

    pub fn policy(&self) -> &EjectionPolicy {
        &self.policy
    }

    /// Total ejections so far, for telemetry.
    pub fn ejection_count(&self) -> u64 {
        self.ejection_count
    }

    fn entry(&mut self, peer_id: &str) -> &mut PeerHealth {
        let seen = self.next_seen;
        let peer = self
            .peers
            .entry(peer_id.to_owned())
            .or_insert_with(|| PeerHealth {
                seen,
                consecutive_failures: 0,
                unreachable_ejections: 0,
                failure_ejections: 0,
                ejection: None,
                unreachable: false,
            });
        if peer.seen == seen {
            self.next_seen += 1;
        }
        peer
    }

    fn eject(policy: &EjectionPolicy, peer: &mut PeerHealth, unreachable: bool, now: Instant) {
        if let Some(last) = peer.ejection {
            // As Envoy's multiplier: one less for each base period back in rotation.
            let healthy = match policy.base.as_nanos() {
                0 => u32::MAX,
                base => u32::try_from(last.over_for(now).as_nanos() / base).unwrap_or(u32::MAX),
            };
            peer.unreachable_ejections = peer.unreachable_ejections.saturating_sub(healthy);
            peer.failure_ejections = peer.failure_ejections.saturating_sub(healthy);
        }
        let count = if unreachable {
            peer.unreachable_ejections = peer.unreachable_ejections.saturating_add(1);
            peer.unreachable_ejections
        } else {
            peer.failure_ejections = peer.failure_ejections.saturating_add(1);
            peer.failure_ejections
        };
        peer.unreachable = unreachable;
        peer.consecutive_failures = 0;
        peer.ejection = Some(Ejection {
            since: now,
            length: policy.cap.min(policy.base.saturating_mul(count)),
        });
    }

    /// The peer refused or could not be reached: eject it now. True if newly ejected.
    pub fn connect_failed(&mut self, peer_id: &str, now: Instant) -> bool {
        let policy = self.policy;
        let peer = self.entry(peer_id);
        if peer.ejection.is_some_and(|e| e.in_force(now)) {
            return false;
        }
        Ejector::eject(&policy, peer, true, now);
        self.ejection_count += 1;
        true
    }

    /// A failed call; the `consecutive`-th in a row ejects. True if newly ejected.
    pub fn failed(&mut self, peer_id: &str, now: Instant) -> bool {
        let policy = self.policy;
        let peer = self.entry(peer_id);
        peer.consecutive_failures = peer.consecutive_failures.saturating_add(1);
        if peer.consecutive_failures < policy.consecutive {
            return false;
        }
        if peer.ejection.is_some_and(|e| e.in_force(now)) {
            // Reached anyway (panic mode, last resort) and failing: a probe of its
            // sidecar no longer says enough to bring it back.
            peer.unreachable = false;
            return false;
        }
        Ejector::eject(&policy, peer, false, now);
        self.ejection_count += 1;
        true
    }

    pub fn succeeded(&mut self, peer_id: &str) {
        if let Some(peer) = self.peers.get_mut(peer_id) {
            peer.consecutive_failures = 0;
        }
    }

    /// A passing health probe brings back a peer ejected as unreachable.
    pub fn probe_passed(&mut self, peer_id: &str) {
        if let Some(peer) = self.peers.get_mut(peer_id) {
            if peer.unreachable {
                peer.ejection = None;
                peer.consecutive_failures = 0;
            }
        }
    }

    /// Is any peer ejected now? (Cheap when no peer ever failed.)
    pub fn has_ejections(&self, now: Instant) -> bool {
        self.peers.values().any(|p| Ejector::in_force(p, now))
    }

    pub fn is_ejected(&self, peer_id: &str, now: Instant) -> bool {
        self.peers
            .get(peer_id)
            .is_some_and(|p| Ejector::in_force(p, now))
    }

    fn in_force(peer: &PeerHealth, now: Instant) -> bool {
        peer.ejection.is_some_and(|e| e.in_force(now))
    }

    fn listed(&self, keep: impl Fn(&PeerHealth) -> bool) -> Vec<String> {
        let mut found: Vec<(u64, &String)> = self
            .peers
            .iter()
            .filter(|(_, p)| keep(p))
            .map(|(id, p)| (p.seen, id))
            .collect();
        found.sort_unstable();
        found.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// The peers ejected now, in the order they were first seen.
    pub fn ejected(&self, now: Instant) -> Vec<String> {
        self.listed(|p| Ejector::in_force(p, now))
    }

    /// The ejected peers a passing health probe would bring back.
    pub fn awaiting_probe(&self, now: Instant) -> Vec<String> {
        self.listed(|p| p.unreachable && Ejector::in_force(p, now))
    }

    /// For each of `ids`, may a new attempt go there: not ejected, or any
    /// peer at all in panic mode (more than half of `ids` ejected).
    pub fn usable_mask(&self, ids: &[&str], now: Instant) -> Vec<bool> {
        if self.peers.is_empty() {
            return vec![true; ids.len()];
        }
        let mask: Vec<bool> = ids.iter().map(|id| !self.is_ejected(id, now)).collect();
        let ejected = mask.iter().filter(|&&usable| !usable).count();
        if 2 * ejected > ids.len() {
            return vec![true; ids.len()]; // panic mode
        }
        mask
    }

    /// Drop state of peers that left the topology.
    pub fn forget(&mut self, keep: &HashSet<String>) {
        self.peers.retain(|id, _| keep.contains(id));
    }
}

#[cfg(test)]
mod tests {
    //! tests/unit/test_ejection.py, case for case, on a fake clock.
    use super::*;

    struct Clock {
        now: Instant,
    }

    impl Clock {
        fn advance(&mut self, seconds: f64) {
            self.now += Duration::from_secs_f64(seconds);
        }
    }

    fn make() -> (Ejector, Clock) {
        (
            Ejector::default(),
            Clock {
                now: Instant::now(),
            },
        )
    }

    fn usable(ejector: &Ejector, ids: &[&'static str], now: Instant) -> Vec<&'static str> {
        let mask = ejector.usable_mask(ids, now);
        ids.iter()
            .zip(mask)
            .filter(|(_, u)| *u)
            .map(|(id, _)| *id)
            .collect()
    }

    #[test]
    fn a_connect_failure_ejects_at_once_for_30_seconds() {
        let (mut ejector, mut clock) = make();
        assert!(ejector.connect_failed("a", clock.now));
        assert!(ejector.is_ejected("a", clock.now));
        assert!(
            !ejector.connect_failed("a", clock.now),
            "already ejected: not counted twice"
        );
        clock.advance(29.9);
        assert!(ejector.is_ejected("a", clock.now));
        clock.advance(0.2);
        assert!(!ejector.is_ejected("a", clock.now));
        assert_eq!(ejector.ejection_count(), 1);
    }

    #[test]
    fn five_consecutive_failures_eject_and_a_success_resets_the_count() {
        let (mut ejector, clock) = make();
        for _ in 0..4 {
            assert!(!ejector.failed("a", clock.now));
        }
        ejector.succeeded("a");
        for _ in 0..4 {
            assert!(!ejector.failed("a", clock.now));
        }
        assert!(!ejector.is_ejected("a", clock.now));
        assert!(ejector.failed("a", clock.now));
        assert!(ejector.is_ejected("a", clock.now));
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_up_to_300_seconds() {
        let (mut ejector, mut clock) = make();
        let mut durations = Vec::new();
        for _ in 0..12 {
            ejector.connect_failed("a", clock.now);
            durations.push(ejected_for(&ejector, &mut clock, "a"));
        }
        assert_eq!(durations[..4], [30, 60, 90, 120]);
        assert_eq!(durations.last(), Some(&300));
        assert_eq!(durations.iter().max(), Some(&300));
    }

    #[test]
    fn a_passing_probe_brings_a_peer_ejected_as_unreachable_back_early() {
        let (mut ejector, mut clock) = make();
        ejector.connect_failed("a", clock.now);
        assert_eq!(ejector.awaiting_probe(clock.now), ["a"]);
        clock.advance(1.0);
        ejector.probe_passed("a");
        assert!(!ejector.is_ejected("a", clock.now));
        assert_eq!(usable(&ejector, &["a", "b"], clock.now), ["a", "b"]);
        assert!(ejector.awaiting_probe(clock.now).is_empty());
    }

    /// Its sidecar answers SERVING while its app hangs: a probe proves nothing.
    #[test]
    fn a_peer_ejected_for_failing_calls_serves_its_time_whatever_its_probe_says() {
        let (mut ejector, mut clock) = make();
        for _ in 0..5 {
            ejector.failed("a", clock.now);
        }
        assert!(ejector.is_ejected("a", clock.now));
        assert!(ejector.awaiting_probe(clock.now).is_empty());
        clock.advance(1.0);
        ejector.probe_passed("a");
        assert!(ejector.is_ejected("a", clock.now));
        clock.advance(29.1);
        assert!(!ejector.is_ejected("a", clock.now));
        // Unreachable next time: then a probe brings it back again.
        ejector.connect_failed("a", clock.now);
        ejector.probe_passed("a");
        assert!(!ejector.is_ejected("a", clock.now));
    }

    fn eject_for_failures(ejector: &mut Ejector, clock: &Clock, peer: &str) {
        for _ in 0..5 {
            ejector.failed(peer, clock.now);
        }
        assert!(ejector.is_ejected(peer, clock.now));
    }

    /// Whole seconds until `peer` is back, stepping the clock a second at a time.
    fn ejected_for(ejector: &Ejector, clock: &mut Clock, peer: &str) -> u32 {
        let mut seconds = 0;
        while ejector.is_ejected(peer, clock.now) {
            clock.advance(1.0);
            seconds += 1;
        }
        seconds
    }

    #[test]
    fn unreachable_ejections_cut_short_do_not_lengthen_an_ejection_for_failing_calls() {
        let (mut ejector, mut clock) = make();
        for _ in 0..9 {
            // An app that restarts now and then, back after a probe each time.
            ejector.connect_failed("a", clock.now);
            clock.advance(1.0);
            ejector.probe_passed("a");
        }
        eject_for_failures(&mut ejector, &clock, "a");
        assert_eq!(ejected_for(&ejector, &mut clock, "a"), 30);
    }

    #[test]
    fn the_multiplier_decays_while_the_peer_is_back_in_rotation() {
        let (mut ejector, mut clock) = make();
        for expected in [30, 60, 90] {
            eject_for_failures(&mut ejector, &clock, "a");
            assert_eq!(ejected_for(&ejector, &mut clock, "a"), expected);
        }
        clock.advance(2.0 * 30.0); // healthy for two base periods: 3 ejections count as 1
        eject_for_failures(&mut ejector, &clock, "a");
        assert_eq!(ejected_for(&ejector, &mut clock, "a"), 60);
    }

    /// It refused connections, then accepted them and hung (reached in panic mode).
    #[test]
    fn a_peer_failing_while_ejected_as_unreachable_no_longer_returns_on_a_probe() {
        let (mut ejector, clock) = make();
        ejector.connect_failed("a", clock.now);
        for _ in 0..5 {
            assert!(!ejector.failed("a", clock.now));
        }
        assert!(ejector.awaiting_probe(clock.now).is_empty());
        ejector.probe_passed("a");
        assert!(ejector.is_ejected("a", clock.now));
    }

    #[test]
    fn ejected_peers_are_skipped_in_order() {
        let (mut ejector, clock) = make();
        ejector.connect_failed("b", clock.now);
        assert_eq!(
            usable(&ejector, &["a", "b", "c", "d"], clock.now),
            ["a", "c", "d"]
        );
        assert_eq!(ejector.ejected(clock.now), ["b"]);
        assert!(ejector.has_ejections(clock.now));
    }

    #[test]
    fn panic_mode_when_more_than_half_are_ejected() {
        let (mut ejector, clock) = make();
        ejector.connect_failed("a", clock.now);
        ejector.connect_failed("b", clock.now);
        // Exactly half ejected: still honoured.
        assert_eq!(
            usable(&ejector, &["a", "b", "c", "d"], clock.now),
            ["c", "d"]
        );
        ejector.connect_failed("c", clock.now);
        // More than half: ignore ejections rather than fail for sure.
        assert_eq!(
            usable(&ejector, &["a", "b", "c", "d"], clock.now),
            ["a", "b", "c", "d"]
        );
        assert_eq!(
            ejector.usable_mask(&["a", "b", "c", "d"], clock.now),
            [true; 4]
        );
    }

    #[test]
    fn forget_drops_peers_that_left() {
        let (mut ejector, clock) = make();
        ejector.connect_failed("gone", clock.now);
        ejector.forget(&HashSet::from(["a".to_owned()]));
        assert!(!ejector.is_ejected("gone", clock.now));
        assert!(!ejector.has_ejections(clock.now));
    }

    // -- beyond the Python tests ---------------------------------------------------

    #[test]
    fn lists_come_in_the_order_peers_were_first_seen() {
        let (mut ejector, clock) = make();
        for id in ["z", "m", "a", "q"] {
            ejector.connect_failed(id, clock.now);
        }
        ejector.forget(&["z", "a", "q"].iter().map(|s| s.to_string()).collect());
        ejector.connect_failed("b", clock.now);
        assert_eq!(ejector.ejected(clock.now), ["z", "a", "q", "b"]);
        for _ in 0..5 {
            ejector.failed("a", clock.now); // no longer awaiting a probe
        }
        assert_eq!(ejector.awaiting_probe(clock.now), ["z", "q", "b"]);
    }

    #[test]
    fn with_no_state_every_peer_is_usable_and_nothing_is_ejected() {
        let (mut ejector, clock) = make();
        assert_eq!(ejector.usable_mask(&["a", "b"], clock.now), [true, true]);
        assert!(ejector.usable_mask(&[], clock.now).is_empty());
        assert!(!ejector.has_ejections(clock.now));
        ejector.succeeded("a");
        ejector.probe_passed("a");
        assert!(ejector.ejected(clock.now).is_empty());
        assert_eq!(ejector.ejection_count(), 0);
    }

    #[test]
    fn a_probed_back_peer_keeps_its_unreachable_multiplier() {
        // As the Python: a probe clears the ejection without the decay a served
        // ejection gets, so the next unreachable ejection is one step longer.
        let (mut ejector, mut clock) = make();
        ejector.connect_failed("a", clock.now);
        ejector.probe_passed("a");
        clock.advance(3600.0);
        ejector.connect_failed("a", clock.now);
        assert_eq!(ejected_for(&ejector, &mut clock, "a"), 60);
    }

    #[test]
    fn failures_while_ejected_keep_counting_so_one_more_ejects_on_return() {
        // As the Python: the count is only reset by an ejection or a success.
        let (mut ejector, mut clock) = make();
        ejector.connect_failed("a", clock.now);
        for _ in 0..6 {
            ejector.failed("a", clock.now);
        }
        clock.advance(30.0);
        assert!(!ejector.is_ejected("a", clock.now));
        assert!(ejector.failed("a", clock.now));
    }

    #[test]
    fn a_policy_sets_the_threshold_and_lengths() {
        let policy = EjectionPolicy {
            consecutive: 2,
            base: Duration::from_secs(10),
            cap: Duration::from_secs(15),
        };
        let mut ejector = Ejector::new(policy);
        assert_eq!(ejector.policy(), &policy);
        let mut clock = Clock {
            now: Instant::now(),
        };
        assert!(!ejector.failed("a", clock.now));
        assert!(ejector.failed("a", clock.now));
        assert_eq!(ejected_for(&ejector, &mut clock, "a"), 10);
        ejector.failed("a", clock.now);
        ejector.failed("a", clock.now);
        assert_eq!(ejected_for(&ejector, &mut clock, "a"), 15, "capped");
        // An instant before the ejection began is before its end too.
        let early = clock.now;
        clock.advance(1.0);
        ejector.connect_failed("b", clock.now);
        assert!(ejector.is_ejected("b", early));
    }

    #[test]
    fn absurd_lengths_do_not_overflow() {
        let mut ejector = Ejector::new(EjectionPolicy {
            consecutive: 0,
            base: Duration::MAX,
            cap: Duration::MAX,
        });
        let now = Instant::now();
        assert!(
            ejector.failed("a", now),
            "consecutive 0: the first failure ejects"
        );
        assert!(ejector.connect_failed("b", now));
        assert!(ejector.is_ejected("a", now + Duration::from_secs(1 << 40)));
        let mut zero = Ejector::new(EjectionPolicy {
            consecutive: 1,
            base: Duration::ZERO,
            cap: Duration::ZERO,
        });
        assert!(zero.connect_failed("a", now));
        assert!(
            !zero.is_ejected("a", now),
            "a zero-length ejection is over at once"
        );
        assert!(zero.connect_failed("a", now));
    }
}
