//! The Rust ring against the real uhashring 2.5: tests/data/uhashring.json is
//! what uhashring answers (written by tests/gen_uhashring_fixture.py); every
//! owner and every failover order of 100,000 keys must match it bit for bit,
//! since Python builds the rings and old Python sidecars still route on them.

use ringmesh_dataplane::ring::Ring;
use serde_json::Value;
use sha2::{Digest, Sha256};

const FIXTURE: &str = include_str!("data/uhashring.json");
const KEYS: usize = 100_000;

fn sha256_lines<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let mut hasher = Sha256::new();
    for (i, line) in lines.enumerate() {
        if i > 0 {
            hasher.update(b"\n");
        }
        hasher.update(line.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn nodes(case: &Value) -> Vec<(String, u32)> {
    case["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let weight = u32::try_from(n["weight"].as_u64().unwrap()).unwrap();
            (n["name"].as_str().unwrap().to_owned(), weight)
        })
        .collect()
}

#[test]
fn rings_answer_as_uhashring_does() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    assert_eq!(fixture["uhashring"], "2.5");
    let hashes: Vec<u128> = (0..KEYS).map(|i| Ring::hash(&format!("key-{i}"))).collect();
    let rings = fixture["rings"].as_array().unwrap();
    assert_eq!(rings.len(), 4);
    for case in rings {
        let nodes = nodes(case);
        let names: Vec<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
        let spec: Vec<(&str, u32)> = nodes.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        let vnodes = u32::try_from(case["vnodes"].as_u64().unwrap()).unwrap();
        let ring = Ring::build(&spec, vnodes);
        let label = format!("ring of {}", nodes.len());

        assert_eq!(
            ring.len() as u64,
            case["points"].as_u64().unwrap(),
            "{label}"
        );
        let points: Vec<String> = ring.points().iter().map(|p| format!("{p:032x}")).collect();
        assert_eq!(
            sha256_lines(points.iter().map(String::as_str)),
            case["points_sha256"].as_str().unwrap(),
            "{label}: points"
        );

        let owners = hashes
            .iter()
            .map(|&h| names[ring.owner_of_hash(h).unwrap() as usize]);
        assert_eq!(
            sha256_lines(owners),
            case["owners_sha256"].as_str().unwrap(),
            "{label}: owners"
        );

        let mut line = String::new();
        let mut hasher = Sha256::new();
        for (i, &h) in hashes.iter().enumerate() {
            line.clear();
            if i > 0 {
                line.push('\n');
            }
            for (j, &peer) in ring.order_of_hash(h).iter().enumerate() {
                if j > 0 {
                    line.push(',');
                }
                line.push_str(names[peer as usize]);
            }
            hasher.update(line.as_bytes());
        }
        let orders: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            orders,
            case["orders_sha256"].as_str().unwrap(),
            "{label}: orders"
        );

        for sample in case["samples"].as_array().unwrap() {
            let key = sample["key"].as_str().unwrap();
            let expected: Vec<&str> = sample["order"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            let order: Vec<&str> = ring.order(key).iter().map(|&p| names[p as usize]).collect();
            assert_eq!(order, expected, "{label}: key {key:?}");
            assert_eq!(
                ring.owner(key).map(|p| names[p as usize]),
                expected.first().copied(),
                "{label}: owner of {key:?}"
            );
        }
    }
}
