//! The consistent-hash ring of one service: uhashring 2.5's construction and lookups.
//!
//! Built here, once per topology change, off the data plane's threads (the
//! binding releases the GIL and never runs on a tokio thread), and swapped in
//! whole. The construction is uhashring's, point for point (checked against
//! uhashring itself by dataplane/tests/uhashring.rs and tests/unit/test_ring.py),
//! so sidecars agree with each other and with any uhashring client; in Rust
//! a 1,000-instance ring (160,000 points) builds in milliseconds and takes
//! 20 bytes a point, where uhashring in Python took ~450 ms and ~200 bytes.

use std::fmt;
use std::fmt::Write as _;

use md5::{Digest, Md5};

/// Points each weight unit gets in uhashring (its `vnodes` default).
pub const DEFAULT_VNODES: u32 = 160;

/// A ring as uhashring would answer it: lookups only, never mutated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    points: Vec<u128>,
    owners: Vec<u32>,
    peers: usize,
    /// How many peers own at least one point: `order` stops once it has seen
    /// them all, as uhashring's `range` stops at its node count.
    distinct: usize,
}

/// Why an exported ring was refused: any of these means the two sides
/// disagree about the format, and routing on it would send keys astray.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// Points must be strictly ascending (uhashring's keys are a sorted set).
    Unsorted { index: usize },
    /// A point names a peer the service does not have.
    OwnerOutOfRange {
        index: usize,
        owner: u32,
        peers: usize,
    },
    /// Every point needs exactly one owner.
    LengthMismatch { points: usize, owners: usize },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Unsorted { index } => {
                write!(f, "ring points are not strictly ascending at index {index}")
            }
            RingError::OwnerOutOfRange {
                index,
                owner,
                peers,
            } => write!(
                f,
                "ring point {index} is owned by peer {owner}, but there are only {peers} peers"
            ),
            RingError::LengthMismatch { points, owners } => {
                write!(f, "ring has {points} points but {owners} owners")
            }
        }
    }
}

impl std::error::Error for RingError {}

impl Ring {
    /// `owners[i]` is the index (in the service's peer list) of the peer that owns `points[i]`.
    pub fn new(points: Vec<u128>, owners: Vec<u32>, peers: usize) -> Result<Ring, RingError> {
        if points.len() != owners.len() {
            return Err(RingError::LengthMismatch {
                points: points.len(),
                owners: owners.len(),
            });
        }
        if let Some(index) = points.windows(2).position(|w| w[0] >= w[1]) {
            return Err(RingError::Unsorted { index: index + 1 });
        }
        let mut seen = vec![false; peers];
        let mut distinct = 0;
        for (index, &owner) in owners.iter().enumerate() {
            match seen.get_mut(owner as usize) {
                Some(flag) => {
                    if !*flag {
                        *flag = true;
                        distinct += 1;
                    }
                }
                None => {
                    return Err(RingError::OwnerOutOfRange {
                        index,
                        owner,
                        peers,
                    })
                }
            }
        }
        Ok(Ring {
            points,
            owners,
            peers,
            distinct,
        })
    }

    /// uhashring's default hash: `int(md5(str(key).encode()).hexdigest(), 16)`,
    /// i.e. the digest read as one big-endian number.
    pub fn hash(key: &str) -> u128 {
        u128::from_be_bytes(Md5::digest(key.as_bytes()).into())
    }

    /// Index of the first point strictly after `hash`, wrapping to the start
    /// (uhashring's `_get_pos`: `bisect_right`, then 0 past the end).
    fn position(&self, hash: u128) -> usize {
        let pos = self.points.partition_point(|&p| p <= hash);
        if pos == self.points.len() {
            0
        } else {
            pos
        }
    }

    pub fn owner(&self, key: &str) -> Option<u32> {
        self.owner_of_hash(Ring::hash(key))
    }

    /// As `owner`, for a key already hashed (a caller that needs both owner
    /// and order, or a benchmark, hashes once).
    pub fn owner_of_hash(&self, hash: u128) -> Option<u32> {
        self.owners.get(self.position(hash)).copied()
    }

    /// Every peer that owns a point, once, in ring order from the key: the
    /// owner, then the failover order (uhashring's `range(key)`).
    pub fn order(&self, key: &str) -> Vec<u32> {
        self.order_of_hash(Ring::hash(key))
    }

    /// As `order`, for a key already hashed.
    pub fn order_of_hash(&self, hash: u128) -> Vec<u32> {
        let mut order = Vec::with_capacity(self.distinct);
        if self.points.is_empty() {
            return order;
        }
        let mut seen = vec![false; self.peers];
        let start = self.position(hash);
        // uhashring walks keys[pos:] then keys[:pos]: the whole circle once.
        let (before, from) = self.owners.split_at(start);
        for &owner in from.iter().chain(before) {
            if let Some(flag) = seen.get_mut(owner as usize) {
                if !*flag {
                    *flag = true;
                    order.push(owner);
                    if order.len() == self.distinct {
                        break;
                    }
                }
            }
        }
        order
    }

    /// Number of points on the ring.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Size of the peer list the owners index into.
    pub fn peers(&self) -> usize {
        self.peers
    }

    pub fn points(&self) -> &[u128] {
        &self.points
    }

    pub fn owners(&self) -> &[u32] {
        &self.owners
    }

    /// uhashring's construction: node `i` of `nodes` is peer `i`; it gets the
    /// points `hash(f"{name}-{v}")` for `v` in `0..vnodes * weight`; nodes are
    /// written in the order given and on a collision the last one written wins.
    pub fn build(nodes: &[(&str, u32)], vnodes: u32) -> Ring {
        let total: u64 = nodes
            .iter()
            .map(|&(_, weight)| u64::from(vnodes) * u64::from(weight))
            .sum();
        let mut all: Vec<(u128, u32)> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        let mut label = String::new();
        for (index, &(name, weight)) in nodes.iter().enumerate() {
            let owner = u32::try_from(index).unwrap_or(u32::MAX);
            for v in 0..u64::from(vnodes) * u64::from(weight) {
                label.clear();
                let _ = write!(label, "{name}-{v}");
                all.push((Ring::hash(&label), owner));
            }
        }
        // A stable sort keeps equal points in the order written: the last one wins.
        all.sort_by_key(|&(point, _)| point);
        let mut points: Vec<u128> = Vec::with_capacity(all.len());
        let mut owners: Vec<u32> = Vec::with_capacity(all.len());
        for (point, owner) in all {
            if points.last() == Some(&point) {
                if let Some(last) = owners.last_mut() {
                    *last = owner;
                }
            } else {
                points.push(point);
                owners.push(owner);
            }
        }
        let mut seen = vec![false; nodes.len()];
        for &owner in &owners {
            seen[owner as usize] = true;
        }
        Ring {
            points,
            owners,
            peers: nodes.len(),
            distinct: seen.iter().filter(|&&s| s).count(),
        }
    }

    /// The fraction of the hash space each peer owns: the arc from the point
    /// before each of its points (what `ringmesh topology` prints).
    pub fn shares(&self) -> Vec<f64> {
        let mut shares = vec![0.0; self.peers];
        if self.distinct == 1 {
            shares[self.owners[0] as usize] = 1.0; // the whole circle: 2^128 fits no u128
            return shares;
        }
        // Exact sums per peer (each below 2^128 when two or more peers own points),
        // divided once: every share is then within 0..=1 and they sum to 1.
        let mut owned = vec![0u128; self.peers];
        let mut previous = self.points.last().copied().unwrap_or(0);
        for (&point, &owner) in self.points.iter().zip(&self.owners) {
            owned[owner as usize] += point.wrapping_sub(previous);
            previous = point;
        }
        let space = 2f64.powi(128);
        for (share, arc) in shares.iter_mut().zip(owned) {
            *share = arc as f64 / space;
        }
        shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_is_md5_read_big_endian() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(Ring::hash(""), 0xd41d8cd98f00b204e9800998ecf8427e);
        // md5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(Ring::hash("a"), 0x0cc175b9c0f1b6a831c399e269772661);
    }

    #[test]
    fn lookup_is_bisect_right_with_wrap_around() {
        let ring = Ring::new(vec![10, 20, 30], vec![0, 1, 2], 3).unwrap();
        let owner = |h| ring.owner_of_hash(h).unwrap();
        assert_eq!(owner(0), 0);
        assert_eq!(owner(9), 0);
        assert_eq!(
            owner(10),
            1,
            "a key on a point goes to the next one (bisect_right)"
        );
        assert_eq!(owner(29), 2);
        assert_eq!(owner(30), 0, "past the last point wraps to the first");
        assert_eq!(owner(u128::MAX), 0);
    }

    #[test]
    fn order_walks_the_whole_circle_once_from_the_key() {
        let ring = Ring::new(vec![10, 20, 30, 40, 50], vec![2, 2, 0, 1, 0], 4).unwrap();
        assert_eq!(ring.order_of_hash(0), vec![2, 0, 1]);
        assert_eq!(ring.order_of_hash(25), vec![0, 1, 2]);
        assert_eq!(ring.order_of_hash(45), vec![0, 2, 1]);
        assert_eq!(ring.order_of_hash(50), vec![2, 0, 1], "wraps to index 0");
        // Peer 3 owns no point: it is in no order (uhashring never yields it).
        assert!(ring.order_of_hash(7).iter().all(|&p| p != 3));
    }

    #[test]
    fn empty_ring_owns_nothing() {
        let ring = Ring::new(vec![], vec![], 0).unwrap();
        assert!(ring.is_empty());
        assert_eq!(ring.len(), 0);
        assert_eq!(ring.owner("x"), None);
        assert_eq!(ring.order("x"), Vec::<u32>::new());
        let no_points = Ring::new(vec![], vec![], 3).unwrap();
        assert_eq!(no_points.order("x"), Vec::<u32>::new());
    }

    #[test]
    fn malformed_exports_are_refused() {
        assert_eq!(
            Ring::new(vec![1, 2], vec![0], 1),
            Err(RingError::LengthMismatch {
                points: 2,
                owners: 1
            })
        );
        assert_eq!(
            Ring::new(vec![1, 3, 2], vec![0, 0, 0], 1),
            Err(RingError::Unsorted { index: 2 })
        );
        assert_eq!(
            Ring::new(vec![1, 1], vec![0, 0], 1),
            Err(RingError::Unsorted { index: 1 })
        );
        assert_eq!(
            Ring::new(vec![1, 2], vec![0, 5], 2),
            Err(RingError::OwnerOutOfRange {
                index: 1,
                owner: 5,
                peers: 2
            })
        );
        assert!(RingError::Unsorted { index: 1 }
            .to_string()
            .contains("ascending"));
    }

    #[test]
    fn shares_are_the_arcs_before_each_point_and_sum_to_one() {
        let half = 1u128 << 127;
        let ring = Ring::new(vec![half / 2, half, half + half / 2], vec![0, 1, 0], 3).unwrap();
        // Peer 0 owns the wrap-around arc (quarter + quarter) and the last quarter.
        assert_eq!(ring.shares(), vec![0.75, 0.25, 0.0]);
        assert_eq!(
            Ring::new(vec![7], vec![1], 2).unwrap().shares(),
            vec![0.0, 1.0]
        );
        assert_eq!(
            Ring::new(vec![], vec![], 2).unwrap().shares(),
            vec![0.0, 0.0]
        );
        let built = Ring::build(&[("a", 1), ("b", 2), ("c", 1)], 160);
        let shares = built.shares();
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(shares[1] > shares[0] && shares[1] > shares[2]);
    }

    #[test]
    fn build_gives_vnodes_times_weight_points_and_last_writer_wins() {
        let ring = Ring::build(&[("a", 1), ("b", 3)], 10);
        assert_eq!(ring.len(), 40);
        assert_eq!(ring.owners().iter().filter(|&&o| o == 1).count(), 30);
        // The same name twice: every point of the first is overwritten.
        let dup = Ring::build(&[("a", 1), ("a", 1)], 10);
        assert_eq!(dup.len(), 10);
        assert!(dup.owners().iter().all(|&o| o == 1));
        assert_eq!(dup.order("k"), vec![1]);
        // Weight 0: no point, so in no order.
        let zero = Ring::build(&[("a", 0), ("b", 1)], 10);
        assert_eq!(zero.order("k"), vec![1]);
    }

    proptest! {
        #[test]
        fn owner_leads_order_and_order_is_every_owning_peer_once(
            weights in proptest::collection::vec(0u32..4, 1..8),
            keys in proptest::collection::vec(".*", 1..20),
        ) {
            let names: Vec<String> = (0..weights.len()).map(|i| format!("p{i}")).collect();
            let nodes: Vec<(&str, u32)> =
                names.iter().map(String::as_str).zip(weights.iter().copied()).collect();
            let ring = Ring::build(&nodes, 8);
            let mut owning: Vec<u32> = ring.owners().to_vec();
            owning.sort_unstable();
            owning.dedup();
            for key in &keys {
                let order = ring.order(key);
                prop_assert_eq!(order.first().copied(), ring.owner(key));
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(&sorted, &owning);
            }
        }
    }
}
