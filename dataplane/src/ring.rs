//! Owner lookup and failover order on a consistent-hash ring built by Python.
//!
//! The control plane builds each service's ring with uhashring 2.5 and sends
//! the sorted points and their owners; this side only looks keys up. Keeping
//! the construction in one place (Python) is what guarantees that every
//! sidecar, old or new, routes a key to the same instance.

use std::collections::BTreeMap;
use std::fmt;

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
    /// The byte form is 16 bytes per point.
    BadPointBytes { len: usize },
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
            RingError::BadPointBytes { len } => {
                write!(f, "ring points take 16 bytes each, got {len} bytes")
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

    /// Points given as 16-byte big-endian chunks: what Python sends over the
    /// binding (`point.to_bytes(16, "big")`), since no Python int crosses as a u128.
    pub fn from_be_bytes(points: &[u8], owners: Vec<u32>, peers: usize) -> Result<Ring, RingError> {
        let chunks = points.chunks_exact(16);
        if !chunks.remainder().is_empty() {
            return Err(RingError::BadPointBytes { len: points.len() });
        }
        let points = chunks
            .map(|chunk| {
                let mut be = [0u8; 16];
                be.copy_from_slice(chunk);
                u128::from_be_bytes(be)
            })
            .collect();
        Ring::new(points, owners, peers)
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

    /// The construction uhashring uses, for tests and benchmarks (production
    /// rings come from Python): node `i` of `nodes` is peer `i`; it gets the
    /// points `hash(f"{name}-{v}")` for `v` in `0..vnodes * weight`; nodes are
    /// written in the order given and on a collision the last one written wins.
    pub fn build_like_uhashring(nodes: &[(&str, u32)], vnodes: u32) -> Ring {
        let mut ring: BTreeMap<u128, u32> = BTreeMap::new();
        for (index, &(name, weight)) in nodes.iter().enumerate() {
            let owner = u32::try_from(index).unwrap_or(u32::MAX);
            for v in 0..u64::from(vnodes) * u64::from(weight) {
                ring.insert(Ring::hash(&format!("{name}-{v}")), owner);
            }
        }
        let distinct = ring
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len();
        let (points, owners) = ring.into_iter().unzip();
        Ring {
            points,
            owners,
            peers: nodes.len(),
            distinct,
        }
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
        assert_eq!(
            Ring::from_be_bytes(&[0; 17], vec![0], 1),
            Err(RingError::BadPointBytes { len: 17 })
        );
        assert!(RingError::Unsorted { index: 1 }
            .to_string()
            .contains("ascending"));
    }

    #[test]
    fn byte_form_is_big_endian() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&5u128.to_be_bytes());
        bytes.extend_from_slice(&(u128::MAX - 1).to_be_bytes());
        let ring = Ring::from_be_bytes(&bytes, vec![1, 0], 2).unwrap();
        assert_eq!(ring.points(), &[5, u128::MAX - 1]);
        assert_eq!(ring.owners(), &[1, 0]);
        assert_eq!(ring.peers(), 2);
    }

    #[test]
    fn build_gives_vnodes_times_weight_points_and_last_writer_wins() {
        let ring = Ring::build_like_uhashring(&[("a", 1), ("b", 3)], 10);
        assert_eq!(ring.len(), 40);
        assert_eq!(ring.owners().iter().filter(|&&o| o == 1).count(), 30);
        // The same name twice: every point of the first is overwritten.
        let dup = Ring::build_like_uhashring(&[("a", 1), ("a", 1)], 10);
        assert_eq!(dup.len(), 10);
        assert!(dup.owners().iter().all(|&o| o == 1));
        assert_eq!(dup.order("k"), vec![1]);
        // Weight 0: no point, so in no order.
        let zero = Ring::build_like_uhashring(&[("a", 0), ("b", 1)], 10);
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
            let ring = Ring::build_like_uhashring(&nodes, 8);
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

        #[test]
        fn exported_ring_answers_as_the_original(
            weights in proptest::collection::vec(1u32..4, 1..6),
            key in ".*",
        ) {
            let names: Vec<String> = (0..weights.len()).map(|i| format!("n{i}")).collect();
            let nodes: Vec<(&str, u32)> =
                names.iter().map(String::as_str).zip(weights.iter().copied()).collect();
            let ring = Ring::build_like_uhashring(&nodes, 5);
            let bytes: Vec<u8> = ring.points().iter().flat_map(|p| p.to_be_bytes()).collect();
            let copy = Ring::from_be_bytes(&bytes, ring.owners().to_vec(), nodes.len()).unwrap();
            prop_assert_eq!(copy.order(&key), ring.order(&key));
            prop_assert_eq!(&copy, &ring);
        }
    }
}
