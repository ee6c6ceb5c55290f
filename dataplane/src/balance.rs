//! Which peer takes a call: bounded-load consistent hashing for keyed calls,
//! power of two choices for the others, on shared in-flight counters.
//!
//! The bound is HAProxy's (src/lb_chash.c): the call about to be placed plus
//! those in flight, times the load factor, is cut into exactly that many
//! slots, shared by weight among the usable peers. Integer arithmetic only,
//! so no peer ever gets one slot more through rounding, and the slots always
//! add up: some usable peer is always below its bound.
//!
//! The counters are atomics shared by every call of the service: a claim is
//! a compare-and-swap against the bound, so two calls racing for the last
//! slot of a peer cannot both take it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The mesh's load factor 1.25, in HAProxy's `hash-balance-factor` units.
pub const DEFAULT_FACTOR_PCT: u64 = 125;

/// How many times a keyed claim re-reads the loads when racing calls took
/// every slot it saw, before it places the call over the bound.
const CLAIM_PASSES: usize = 3;

/// One peer of a snapshot: its weight and its in-flight counter. The counter
/// is shared with the snapshots before and after, for a peer that stays, so
/// its count survives a topology change.
#[derive(Debug, Clone)]
pub struct PeerLoad {
    pub weight: u32,
    pub inflight: Arc<AtomicU32>,
}

impl PeerLoad {
    /// A peer with a fresh counter at zero.
    pub fn new(weight: u32) -> PeerLoad {
        PeerLoad {
            weight,
            inflight: counter(),
        }
    }

    pub fn with_counter(weight: u32, inflight: Arc<AtomicU32>) -> PeerLoad {
        PeerLoad { weight, inflight }
    }

    /// Calls in flight now (a racy read: a hint, not a claim).
    pub fn load(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// A new in-flight counter, for a peer id seen for the first time.
pub fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

/// Slots of one peer: `weight` its weight, `weight_before` the usable weight
/// of the peers before it (by index), `total_weight` all usable weight,
/// `total_inflight` all calls in flight on usable peers, before the new one.
///
/// ```text
/// tot   = ((total_inflight + 1) * factor_pct + 99) / 100
/// q, r  = tot / W, tot % W
/// slots = w*q + ((C + w)*r)/W - (C*r)/W, at least 1
/// ```
/// Before the floor at 1 the slots of all usable peers add up to `tot`
/// exactly (the `r` remainder telescopes over `C`), and each is
/// `floor(w*tot/W)` or `ceil(w*tot/W)`. Usable weight 0 gives every peer 1.
pub fn slots(
    weight: u32,
    weight_before: u64,
    total_weight: u64,
    total_inflight: u64,
    factor_pct: u64,
) -> u64 {
    let raw = raw_slots(
        weight,
        weight_before,
        total_weight,
        total_inflight,
        factor_pct,
    );
    raw.max(1)
}

/// `slots` before the floor at 1 (what adds up to `tot`).
fn raw_slots(
    weight: u32,
    weight_before: u64,
    total_weight: u64,
    total_inflight: u64,
    factor_pct: u64,
) -> u64 {
    if total_weight == 0 {
        return 0;
    }
    let tot = total_slots(total_inflight, factor_pct);
    let (w, c, big_w) = (
        u128::from(weight),
        u128::from(weight_before),
        u128::from(total_weight),
    );
    let (q, r) = (tot / big_w, tot % big_w);
    // Saturating only for absurd inputs: with C + w <= W < 2^64 all fit.
    let share = (c + w).saturating_mul(r) / big_w - c.saturating_mul(r) / big_w;
    let s = w.saturating_mul(q).saturating_add(share);
    u64::try_from(s).unwrap_or(u64::MAX)
}

/// `tot`: the slots all usable peers share, the new call included. A factor
/// below 100 would leave fewer slots than calls, so it counts as 100.
pub fn total_slots(total_inflight: u64, factor_pct: u64) -> u128 {
    let factor = u128::from(factor_pct.max(100));
    (u128::from(total_inflight) + 1)
        .saturating_mul(factor)
        .div_ceil(100)
}

fn is_usable(usable: &[bool], i: usize) -> bool {
    usable.get(i).copied().unwrap_or(false)
}

/// Weight and in-flight calls summed over the usable peers.
fn usable_totals(peers: &[PeerLoad], usable: &[bool]) -> (u64, u64) {
    peers
        .iter()
        .enumerate()
        .filter(|&(i, _)| is_usable(usable, i))
        .fold((0, 0), |(w, n), (_, p)| {
            (w + u64::from(p.weight), n + u64::from(p.load()))
        })
}

fn usable_weight_before(peers: &[PeerLoad], usable: &[bool], i: usize) -> u64 {
    peers
        .iter()
        .take(i)
        .enumerate()
        .filter(|&(j, _)| is_usable(usable, j))
        .map(|(_, p)| u64::from(p.weight))
        .sum()
}

/// Takes one slot on `peer` if it holds fewer than `bound` calls.
fn claim_below(peer: &PeerLoad, bound: u64) -> bool {
    let mut current = peer.inflight.load(Ordering::Relaxed);
    while u64::from(current) < bound {
        match peer.inflight.compare_exchange_weak(
            current,
            current.saturating_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return true,
            Err(actual) => current = actual,
        }
    }
    false
}

/// Keyed calls: the first usable peer of `order` (the key's ring order,
/// indices into `peers`) below its bound takes the call, its counter already
/// incremented. `usable[i]` false (or missing) skips peer `i`; indices of
/// `order` outside `peers` are skipped. Without racing calls the first pass
/// always finds a peer (the slots outnumber the calls); if races took every
/// slot in every pass, the first usable peer of `order` takes it anyway: a
/// call is never refused for load. None when `order` has no usable peer.
pub fn claim_keyed(
    order: &[u32],
    peers: &[PeerLoad],
    usable: &[bool],
    factor_pct: u64,
) -> Option<usize> {
    let candidates = || {
        order
            .iter()
            .map(|&i| i as usize)
            .filter(|&i| i < peers.len() && is_usable(usable, i))
    };
    let first = candidates().next()?;
    for _ in 0..CLAIM_PASSES {
        let (total_weight, total_inflight) = usable_totals(peers, usable);
        for i in candidates() {
            let peer = &peers[i];
            let before = usable_weight_before(peers, usable, i);
            let bound = slots(
                peer.weight,
                before,
                total_weight,
                total_inflight,
                factor_pct,
            );
            if claim_below(peer, bound) {
                return Some(i);
            }
        }
    }
    claim(&peers[first]);
    Some(first)
}

/// Unkeyed calls: of two distinct random usable peers, the less loaded per
/// weight (`b` only if strictly less: `inflight_b * w_a < inflight_a * w_b`),
/// claimed. One usable peer takes every call; None when there is none.
pub fn claim_p2c(peers: &[PeerLoad], usable: &[bool], rng: &mut impl rand::Rng) -> Option<usize> {
    let usable_at = |k: usize| {
        peers
            .iter()
            .enumerate()
            .filter(|&(i, _)| is_usable(usable, i))
            .nth(k)
            .map(|(i, _)| i)
    };
    let n = (0..peers.len()).filter(|&i| is_usable(usable, i)).count();
    let chosen = match n {
        0 => return None,
        1 => usable_at(0)?,
        _ => {
            let ka = rng.random_range(0..n);
            let mut kb = rng.random_range(0..n - 1);
            if kb >= ka {
                kb += 1;
            }
            let (a, b) = (usable_at(ka)?, usable_at(kb)?);
            let (pa, pb) = (&peers[a], &peers[b]);
            let load_a = u64::from(pa.load()) * u64::from(pb.weight);
            let load_b = u64::from(pb.load()) * u64::from(pa.weight);
            if load_b < load_a {
                b
            } else {
                a
            }
        }
    };
    claim(&peers[chosen]);
    Some(chosen)
}

/// One more call on `peer`, whatever its load (a retry sent to a given target).
pub fn claim(peer: &PeerLoad) {
    peer.inflight.fetch_add(1, Ordering::Relaxed);
}

/// One call fewer on `peer`. Never below zero: a stray release would
/// otherwise wrap the counter and make the peer look full forever.
pub fn release(peer: &PeerLoad) {
    let _ = peer
        .inflight
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Ring;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn loads(weights: &[u32], inflight: &[u32]) -> Vec<PeerLoad> {
        weights
            .iter()
            .zip(inflight)
            .map(|(&w, &n)| PeerLoad::with_counter(w, Arc::new(AtomicU32::new(n))))
            .collect()
    }

    fn counts(peers: &[PeerLoad]) -> Vec<u32> {
        peers.iter().map(PeerLoad::load).collect()
    }

    /// The bound of every peer now, as claim_keyed computes it (0 for unusable ones).
    fn bounds(peers: &[PeerLoad], usable: &[bool], factor: u64) -> Vec<u64> {
        let (w, n) = usable_totals(peers, usable);
        (0..peers.len())
            .map(|i| {
                if !is_usable(usable, i) {
                    return 0;
                }
                let before = usable_weight_before(peers, usable, i);
                slots(peers[i].weight, before, w, n, factor)
            })
            .collect()
    }

    #[test]
    fn three_equal_peers_with_23_in_flight_get_10_slots_each() {
        assert_eq!(total_slots(23, 125), 30);
        for (i, c) in [0u64, 1, 2].into_iter().enumerate() {
            assert_eq!(slots(1, c, 3, 23, 125), 10, "peer {i}");
        }
        // The Python test's exact case: weights 3 and 14, 67 in flight.
        assert_eq!(slots(3, 0, 17, 67, 125), 15);
        assert_eq!(slots(14, 3, 17, 67, 125), 70);
    }

    #[test]
    fn slots_share_the_remainder_so_they_add_up_exactly() {
        // Python's ceil(1.25 x 100 x w / 4) gave 94 + 32 = 126 slots for 125
        // calls' worth; HAProxy's rule gives the remainder to one peer only.
        assert_eq!(total_slots(99, 125), 125);
        assert_eq!(slots(3, 0, 4, 99, 125), 93);
        assert_eq!(slots(1, 3, 4, 99, 125), 32);
        // An idle mesh always takes a call; no usable weight: one slot each.
        assert_eq!(slots(1, 3, 4, 0, 125), 1);
        assert_eq!(slots(0, 0, 0, 7, 125), 1);
        // A factor below 1 counts as 1: the slots never fall short of the calls.
        assert_eq!(total_slots(9, 50), 10);
        // Absurd inputs saturate instead of overflowing.
        assert_eq!(slots(u32::MAX, 0, 1, u64::MAX, u64::MAX), u64::MAX);
        assert!(total_slots(u64::MAX, u64::MAX) > u128::from(u64::MAX));
    }

    #[test]
    fn no_load_choose_is_the_first_usable_peer_of_the_order() {
        let peers = loads(&[1, 2, 1, 3], &[0, 0, 0, 0]);
        assert_eq!(claim_keyed(&[2, 0, 1, 3], &peers, &[true; 4], 125), Some(2));
        assert_eq!(counts(&peers), vec![0, 0, 1, 0]);
        let usable = [true, true, false, true];
        assert_eq!(claim_keyed(&[2, 0, 1, 3], &peers, &usable, 125), Some(0));
        assert_eq!(claim_keyed(&[2, 9, 3], &peers, &usable, 125), Some(3));
        assert_eq!(claim_keyed(&[2], &peers, &usable, 125), None);
        assert_eq!(claim_keyed(&[], &peers, &usable, 125), None);
        assert_eq!(
            claim_keyed(&[0, 1], &peers, &[], 125),
            None,
            "missing = unusable"
        );
    }

    #[test]
    fn choose_skips_a_full_owner_to_the_next_peer_in_ring_order() {
        // 8 in flight on 4 equal peers: ceil(1.25 x 9) = 12 slots, 3 each.
        let order = [1, 3, 0, 2];
        let peers = loads(&[1; 4], &[2, 3, 0, 3]);
        assert_eq!(claim_keyed(&order, &peers, &[true; 4], 125), Some(0));
        // 15 in flight: 20 slots, 5 each; the first three in order are full.
        let peers = loads(&[1; 4], &[5, 5, 0, 5]);
        assert_eq!(claim_keyed(&order, &peers, &[true; 4], 125), Some(2));
    }

    #[test]
    fn the_bound_counts_usable_peers_only() {
        // Peer 2 is ejected with 40 calls still in flight: they neither raise
        // the others' bounds nor take a share of the slots.
        let peers = loads(&[1, 1, 1], &[2, 0, 40]);
        let usable = [true, true, false];
        // 2 in flight on 2 usable peers: ceil(1.25 x 3) = 4 slots, 2 each.
        assert_eq!(bounds(&peers, &usable, 125), vec![2, 2, 0]);
        assert_eq!(claim_keyed(&[0, 2, 1], &peers, &usable, 125), Some(1));
    }

    #[test]
    fn when_the_order_has_no_peer_below_its_bound_its_first_takes_the_call() {
        // Only possible with an order that leaves out the idle peers (or with
        // races): a call is never refused for load.
        let peers = loads(&[1, 1], &[3, 0]);
        assert_eq!(claim_keyed(&[0], &peers, &[true, true], 125), Some(0));
        assert_eq!(counts(&peers), vec![4, 0]);
    }

    #[test]
    fn claim_and_release_share_the_counter_across_snapshots() {
        let shared = counter();
        let old = [PeerLoad::with_counter(1, shared.clone())];
        claim(&old[0]);
        let new = [PeerLoad::with_counter(3, shared), PeerLoad::new(1)];
        assert_eq!(new[0].load(), 1);
        release(&new[0]);
        release(&new[0]);
        assert_eq!(old[0].load(), 0, "a stray release does not wrap");
    }

    /// Zipf(s) over `n` keys "k1".."kn" (k1 hottest), by inverse CDF.
    fn zipf(rng: &mut SmallRng, cumulative: &[f64]) -> usize {
        let total = cumulative.last().copied().unwrap_or(0.0);
        let x = rng.random::<f64>() * total;
        cumulative
            .partition_point(|&c| c <= x)
            .min(cumulative.len() - 1)
    }

    fn cumulative(n: usize, s: f64) -> Vec<f64> {
        let mut acc = 0.0;
        (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect()
    }

    fn hot_key_of_peer_zero(ring: &Ring) -> String {
        (0..)
            .map(|i| format!("hot-{i}"))
            .find(|k| ring.owner(k) == Some(0))
            .unwrap()
    }

    #[test]
    fn a_hot_key_spreads_to_at_most_ten_calls_per_peer_of_three() {
        let ring = Ring::build(&[("a", 1), ("b", 1), ("c", 1)], 160);
        let hot = ring.order(&hot_key_of_peer_zero(&ring));
        assert_eq!(hot[0], 0);
        let mut rng = SmallRng::seed_from_u64(11);
        let cum = cumulative(50, 1.1);
        let peers = loads(&[1; 3], &[0; 3]);
        for _ in 0..24 {
            // k1, the hottest, is the hot key; the others hash normally.
            let k = zipf(&mut rng, &cum);
            let order = if k == 0 {
                hot.clone()
            } else {
                ring.order(&format!("k{k}"))
            };
            claim_keyed(&order, &peers, &[true; 3], 125).unwrap();
        }
        assert_eq!(counts(&peers).iter().sum::<u32>(), 24);
        assert!(
            counts(&peers).iter().all(|&n| n <= 10),
            "{:?}",
            counts(&peers)
        );
    }

    #[test]
    fn twenty_four_concurrent_calls_on_a_hot_key_never_overfill_a_peer() {
        let ring = Ring::build(&[("a", 1), ("b", 1), ("c", 1)], 160);
        let order = ring.order(&hot_key_of_peer_zero(&ring));
        for _ in 0..40 {
            let peers = loads(&[1; 3], &[0; 3]);
            let barrier = std::sync::Barrier::new(24);
            std::thread::scope(|scope| {
                for _ in 0..24 {
                    scope.spawn(|| {
                        barrier.wait();
                        claim_keyed(&order, &peers, &[true; 3], 125).unwrap();
                    });
                }
            });
            let n = counts(&peers);
            assert_eq!(n.iter().sum::<u32>(), 24);
            assert!(n.iter().all(|&c| c <= 10), "{n:?}");
        }
    }

    #[test]
    fn bounded_loads_closed_system_with_zipf_hot_keys() {
        let names: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        let weights: Vec<u32> = (0..8)
            .map(|i| if i == 0 || i == 3 { 2 } else { 1 })
            .collect();
        let nodes: Vec<(&str, u32)> = names
            .iter()
            .map(String::as_str)
            .zip(weights.clone())
            .collect();
        let ring = Ring::build(&nodes, 160);
        let orders: Vec<Vec<u32>> = (1..=1000).map(|k| ring.order(&format!("k{k}"))).collect();
        let cum = cumulative(1000, 1.1);
        let mut rng = SmallRng::seed_from_u64(20240611);
        let peers = loads(&weights, &[0; 8]);
        let usable = [true; 8];
        let (mut calls, mut spilled, mut assigned, mut population) = (Vec::new(), 0, 0, 120);
        for step in 0..12_000 {
            if step % 3_000 == 0 {
                population = [20, 120, 400][rng.random_range(0..3)];
            }
            if !calls.is_empty() && (calls.len() >= population || rng.random_bool(0.45)) {
                let done: usize = calls.swap_remove(rng.random_range(0..calls.len()));
                release(&peers[done]);
                continue;
            }
            let order = &orders[zipf(&mut rng, &cum)];
            let bound = bounds(&peers, &usable, 125);
            let before = counts(&peers);
            let chosen = claim_keyed(order, &peers, &usable, 125).unwrap();
            assert!(u64::from(before[chosen]) < bound[chosen], "step {step}");
            for &ahead in order.iter().take_while(|&&p| p as usize != chosen) {
                assert!(u64::from(before[ahead as usize]) >= bound[ahead as usize]);
            }
            calls.push(chosen);
            assigned += 1;
            if chosen != order[0] as usize {
                spilled += 1;
            }
        }
        assert_eq!(counts(&peers).iter().sum::<u32>() as usize, calls.len());
        assert!(
            spilled > assigned / 20,
            "the bound was exercised: {spilled}/{assigned}"
        );
        assert!(
            spilled < assigned / 2,
            "most calls went to their owner: {spilled}/{assigned}"
        );
    }

    #[test]
    fn pick_two_returns_the_less_loaded_per_weight() {
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..50 {
            let peers = loads(&[1, 1], &[5, 2]);
            assert_eq!(claim_p2c(&peers, &[true; 2], &mut rng), Some(1));
            let peers = loads(&[1, 1], &[0, 1]);
            assert_eq!(claim_p2c(&peers, &[true; 2], &mut rng), Some(0));
            let peers = loads(&[3, 1], &[5, 2]);
            assert_eq!(claim_p2c(&peers, &[true; 2], &mut rng), Some(0)); // 5/3 < 2/1
            let peers = loads(&[3, 1], &[7, 2]);
            assert_eq!(claim_p2c(&peers, &[true; 2], &mut rng), Some(1)); // 7/3 > 2/1
        }
    }

    #[test]
    fn pick_two_never_picks_the_one_overloaded_peer_of_three() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut picks = [0; 3];
        for _ in 0..600 {
            let peers = loads(&[1; 3], &[100, 1, 1]);
            picks[claim_p2c(&peers, &[true; 3], &mut rng).unwrap()] += 1;
        }
        assert_eq!(picks[0], 0);
        assert!(picks[1] > 150 && picks[2] > 150, "{picks:?}");
    }

    #[test]
    fn pick_two_with_one_usable_peer_takes_it_and_with_none_nothing() {
        let mut rng = SmallRng::seed_from_u64(0);
        let peers = loads(&[1, 1, 1], &[99, 0, 0]);
        assert_eq!(claim_p2c(&peers[..1], &[true], &mut rng), Some(0));
        assert_eq!(counts(&peers)[0], 100, "claimed");
        assert_eq!(claim_p2c(&peers, &[true, false, false], &mut rng), Some(0));
        assert_eq!(claim_p2c(&peers, &[false; 3], &mut rng), None);
        assert_eq!(claim_p2c(&[], &[], &mut rng), None);
        for _ in 0..50 {
            let got = claim_p2c(&peers, &[false, true, true], &mut rng).unwrap();
            assert_ne!(got, 0, "an unusable peer is never picked");
        }
    }

    fn mask(bits: &[bool], keep: usize) -> Vec<bool> {
        let mut m = bits.to_vec();
        let at = keep % m.len();
        m[at] = true; // at least one usable
        m
    }

    proptest! {
        #[test]
        fn slots_add_up_to_tot_and_are_never_zero(
            weights in proptest::collection::vec(0u32..11, 1..12),
            bits in proptest::collection::vec(any::<bool>(), 12),
            total in 0u64..5_000,
            factor in 100u64..400,
        ) {
            let usable = &bits[..weights.len()];
            let big_w: u64 = weights.iter().zip(usable).filter(|(_, &u)| u).map(|(&w, _)| u64::from(w)).sum();
            let tot = total_slots(total, factor);
            prop_assert_eq!(tot, (u128::from(total) + 1) * u128::from(factor) / 100
                + u128::from((total + 1) * factor % 100 != 0));
            let (mut before, mut raw_sum, mut sum, mut clamped) = (0u64, 0u128, 0u128, 0u128);
            for (&w, _) in weights.iter().zip(usable).filter(|(_, &u)| u) {
                let raw = raw_slots(w, before, big_w, total, factor);
                let s = slots(w, before, big_w, total, factor);
                prop_assert!(s >= 1);
                prop_assert_eq!(s, raw.max(1));
                if big_w > 0 {
                    // The same rule as a difference of floors, within one of w x tot / W.
                    let floors = (u128::from(before + u64::from(w)) * tot) / u128::from(big_w)
                        - (u128::from(before) * tot) / u128::from(big_w);
                    prop_assert_eq!(u128::from(raw), floors);
                    let exact = u128::from(w) * tot;
                    prop_assert!(u128::from(raw) >= exact / u128::from(big_w));
                    prop_assert!(u128::from(raw) <= exact.div_ceil(u128::from(big_w)));
                }
                raw_sum += u128::from(raw);
                sum += u128::from(s);
                clamped += u128::from(raw == 0);
                before += u64::from(w);
            }
            if big_w > 0 {
                prop_assert_eq!(raw_sum, tot);
                // Each slot clamped up from 0 adds one; with tot >= W none is.
                prop_assert_eq!(sum, tot + clamped);
                if tot >= u128::from(big_w) && weights.iter().zip(usable).all(|(&w, &u)| !u || w > 0) {
                    prop_assert_eq!(sum, tot);
                }
            }
        }

        /// The invariant: a claim lands on a usable peer that held fewer calls
        /// than its slots at that moment (so it holds at most its slots after),
        /// and every usable peer ahead of it in the order held at least its
        /// slots. Without races that peer always exists: the usable peers'
        /// slots add up to at least tot >= total + 1 > total in flight.
        #[test]
        fn every_claim_lands_below_its_bound(
            weights in proptest::collection::vec(1u32..11, 1..9),
            steps in proptest::collection::vec(
                (proptest::collection::vec(any::<bool>(), 9), 0usize..9, any::<u64>(), 0u8..4),
                1..150,
            ),
        ) {
            let n = weights.len();
            let peers = loads(&weights, &vec![0; n]);
            let mut held: Vec<usize> = Vec::new();
            for (bits, keep, seed, action) in steps {
                let mut rng = SmallRng::seed_from_u64(seed);
                if action == 0 && !held.is_empty() {
                    release(&peers[held.swap_remove(rng.random_range(0..held.len()))]);
                    continue;
                }
                let usable = mask(&bits[..n], keep);
                let mut order: Vec<u32> = (0..n as u32).collect();
                rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
                let bound = bounds(&peers, &usable, 125);
                let before = counts(&peers);
                let chosen = claim_keyed(&order, &peers, &usable, 125).unwrap();
                prop_assert!(usable[chosen]);
                prop_assert!(u64::from(before[chosen]) < bound[chosen]);
                prop_assert_eq!(peers[chosen].load(), before[chosen] + 1);
                for &ahead in order.iter().take_while(|&&p| p as usize != chosen) {
                    let a = ahead as usize;
                    prop_assert!(!usable[a] || u64::from(before[a]) >= bound[a]);
                }
                held.push(chosen);
            }
        }

        /// While calls only arrive (fixed usable set) every usable peer, not
        /// only the chosen one, stays within max(1, ceil(w x tot / W)): its
        /// slots were at most that when it was last filled, and tot only grows.
        #[test]
        fn arrivals_only_keep_every_peer_within_its_share(
            weights in proptest::collection::vec(1u32..11, 1..9),
            bits in proptest::collection::vec(any::<bool>(), 9),
            keep in 0usize..9,
            seed in any::<u64>(),
            calls in 1usize..200,
        ) {
            let n = weights.len();
            let usable = mask(&bits[..n], keep);
            let peers = loads(&weights, &vec![0; n]);
            let big_w: u64 = (0..n).filter(|&i| usable[i]).map(|i| u64::from(weights[i])).sum();
            let mut rng = SmallRng::seed_from_u64(seed);
            for _ in 0..calls {
                let mut order: Vec<u32> = (0..n as u32).collect();
                rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
                let total: u64 = counts(&peers).iter().map(|&c| u64::from(c)).sum();
                claim_keyed(&order, &peers, &usable, 125).unwrap();
                let tot = total_slots(total, 125);
                for i in (0..n).filter(|&i| usable[i]) {
                    let share = (u128::from(weights[i]) * tot).div_ceil(u128::from(big_w)).max(1);
                    prop_assert!(u128::from(peers[i].load()) <= share);
                }
                for i in (0..n).filter(|&i| !usable[i]) {
                    prop_assert_eq!(peers[i].load(), 0);
                }
            }
        }

        #[test]
        fn pick_two_is_never_the_strictly_most_loaded(
            weights in proptest::collection::vec(1u32..5, 2..7),
            inflight in proptest::collection::vec(0u32..51, 6),
            seed in any::<u64>(),
        ) {
            let n = weights.len();
            let peers = loads(&weights, &inflight[..n]);
            let mut rng = SmallRng::seed_from_u64(seed);
            let chosen = claim_p2c(&peers, &vec![true; n], &mut rng).unwrap();
            let per_weight = |i: usize| (u64::from(inflight[i]), u64::from(weights[i]));
            let (cn, cw) = per_weight(chosen);
            let not_most = (0..n).filter(|&q| q != chosen).any(|q| {
                let (qn, qw) = per_weight(q);
                cn * qw <= qn * cw
            });
            prop_assert!(not_most);
        }
    }
}
