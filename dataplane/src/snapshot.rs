//! What the control plane knows, as one immutable value the data plane reads per call.
//!
//! Python builds it from etcd (rings built by [`Ring::build`]) and swaps it in
//! whole; a call reads the snapshot in force when it starts, and a retry reads
//! the one in force when it is made. State that must outlive a snapshot (the
//! in-flight count and the ejection record of each peer) lives in
//! [`ServiceState`], which every snapshot of that service shares.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use crate::balance::PeerLoad;
use crate::eject::{EjectionPolicy, Ejector};
use crate::ring::Ring;

/// One routable instance of a service.
#[derive(Debug)]
pub struct Peer {
    pub id: String,
    pub address: String,
}

/// The serving instances of one service, their ring, and their shared load counters.
pub struct ServiceRoutes {
    pub name: String,
    pub peers: Vec<Peer>,
    /// `loads[i]` belongs to `peers[i]`; the counters are shared with older snapshots.
    pub loads: Vec<PeerLoad>,
    pub ring: Arc<Ring>, // shared with the RingLookup Python built it as: never copied
    pub state: Arc<ServiceState>,
}

impl ServiceRoutes {
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.id == id)
    }
}

/// Per service, kept across snapshots: in-flight counters and ejections by peer id.
pub struct ServiceState {
    pub ejector: Mutex<Ejector>,
    counters: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

impl ServiceState {
    pub fn new(policy: EjectionPolicy) -> Self {
        ServiceState {
            ejector: Mutex::new(Ejector::new(policy)),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// The in-flight counter of a peer, the same one every snapshot uses.
    pub fn counter(&self, id: &str) -> Arc<AtomicU32> {
        let mut counters = lock(&self.counters);
        counters.entry(id.to_owned()).or_default().clone()
    }

    /// Forget peers that left the topology (calls still in flight keep their counter).
    pub fn retain(&self, ids: &HashSet<String>) {
        lock(&self.counters).retain(|id, _| ids.contains(id));
        lock(&self.ejector).forget(ids);
    }
}

/// The routing snapshot: services with their rings, and how calls name them.
#[derive(Default)]
pub struct Snapshot {
    /// Shared with the snapshot before for every service a change did not touch.
    pub services: HashMap<String, Arc<ServiceRoutes>>,
    /// Services ever seen: one with no serving instance is "no live instance", not unknown.
    pub known: HashSet<String>,
    /// gRPC service (`pkg.Svc`) -> the mesh services that declare it.
    pub declared_by: HashMap<String, Vec<String>>,
    /// Instances registered but not routable (draining): their connections stay
    /// open while calls already sent there finish.
    pub draining_addresses: Vec<String>,
    pub revision: u64,
    /// A scoped sidecar's watched services (sorted; empty: it watches the whole mesh).
    pub watching: Vec<String>,
}

/// Why a call cannot be routed: a gRPC status and its message.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: u32,
    pub message: String,
}

pub const INVALID_ARGUMENT: u32 = 3;
pub const UNIMPLEMENTED: u32 = 12;
pub const UNAVAILABLE: u32 = 14;

pub const SERVICE_HEADER: &str = "ringmesh-service";

impl Snapshot {
    /// The callee service: the `ringmesh-service` metadata first, then the one
    /// registered service declaring the gRPC service of the method path.
    pub fn resolve(&self, service: Option<&str>, method: &str) -> Result<&str, Rejection> {
        if let Some(name) = service {
            validate_service(name)?;
            return match self.known.get(name) {
                Some(known) => Ok(known.as_str()),
                None => Err(self.unknown(name)),
            };
        }
        let grpc_service = grpc_service_of(method);
        match self.declared_by.get(grpc_service).map(Vec::as_slice) {
            Some([only]) => Ok(only.as_str()),
            Some(owners) if owners.len() > 1 => {
                let mut names: Vec<&str> = owners.iter().map(String::as_str).collect();
                names.sort_unstable();
                Err(Rejection {
                    code: UNIMPLEMENTED,
                    message: format!(
                        "gRPC service {} is served by several services ({}): set the '{SERVICE_HEADER}' metadata",
                        py_repr(grpc_service),
                        names.join(", ")
                    ),
                })
            }
            _ => Err(Rejection {
                code: UNIMPLEMENTED,
                message: format!(
                    "unknown service for {}: no registered service declares {}; set the '{SERVICE_HEADER}' metadata",
                    py_repr(method),
                    py_repr(grpc_service)
                ),
            }),
        }
    }

    /// A service this sidecar does not know; a scoped one says what it watches.
    fn unknown(&self, service: &str) -> Rejection {
        let mut message = format!("unknown service {}", py_repr(service));
        if !self.watching.is_empty() {
            let watched: Vec<String> = self.watching.iter().map(|s| py_repr(s)).collect();
            message.push_str(&format!(
                ": this sidecar watches only {} (--watch)",
                watched.join(", ")
            ));
        }
        Rejection {
            code: UNIMPLEMENTED,
            message,
        }
    }

    /// The serving instances of a resolved service, or why there are none.
    pub fn routes(&self, service: &str) -> Result<&ServiceRoutes, Rejection> {
        match self.services.get(service) {
            Some(routes) if !routes.peers.is_empty() => Ok(routes),
            _ if self.known.contains(service) => Err(Rejection {
                code: UNAVAILABLE,
                message: format!("no live instance of service {}", py_repr(service)),
            }),
            _ => Err(self.unknown(service)),
        }
    }
}

/// `/pkg.Svc/Method` -> `pkg.Svc` ("" if the path is malformed).
pub fn grpc_service_of(method: &str) -> &str {
    let mut parts = method.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(""), Some(service), Some(_), None) => service,
        _ => "",
    }
}

/// Service names are DNS labels (the contract's rule, as registry/keys.py checks it).
pub fn validate_service(name: &str) -> Result<(), Rejection> {
    let bytes = name.as_bytes();
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if bytes.len() <= 63 && inner_ok && edge(bytes.first()) && edge(bytes.last()) {
        return Ok(());
    }
    Err(Rejection {
        code: INVALID_ARGUMENT,
        message: format!(
            "invalid service name {}: must be a DNS label (lowercase letters, digits and '-', \
             at most 63 characters, starting and ending with a letter or digit)",
            py_repr(name)
        ),
    })
}

/// A string as Python's `repr` writes it, so messages read the same as the control plane's.
pub fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A poisoned lock only means another thread panicked mid-update of plain
/// counters; the data is still usable, and a data plane must keep serving.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_service_of_paths() {
        assert_eq!(grpc_service_of("/pkg.Svc/Method"), "pkg.Svc");
        assert_eq!(grpc_service_of("pkg.Svc/Method"), "");
        assert_eq!(grpc_service_of("/a/b/c"), "");
        assert_eq!(grpc_service_of(""), "");
    }

    #[test]
    fn service_names_are_dns_labels() {
        for ok in ["a", "echo", "a-b", "0", &"a".repeat(63)] {
            assert!(validate_service(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Bad_Name", "A", "a.b", &"a".repeat(64), "é"] {
            let err = validate_service(bad).unwrap_err();
            assert_eq!(err.code, INVALID_ARGUMENT);
            assert!(err.message.contains(&py_repr(bad)), "{}", err.message);
        }
    }

    #[test]
    fn repr_matches_python() {
        assert_eq!(py_repr("echo"), "'echo'");
        assert_eq!(py_repr("it's"), "\"it's\"");
        assert_eq!(py_repr("a\nb"), "'a\\nb'");
    }

    fn snapshot() -> Snapshot {
        let mut s = Snapshot::default();
        s.known.insert("echo".into());
        s.known.insert("gone".into());
        s.declared_by.insert("pkg.Echo".into(), vec!["echo".into()]);
        s.declared_by
            .insert("pkg.Both".into(), vec!["b".into(), "a".into()]);
        s
    }

    #[test]
    fn resolution_follows_the_contract() {
        let s = snapshot();
        assert_eq!(s.resolve(Some("echo"), "/x/y"), Ok("echo"));
        assert_eq!(s.resolve(None, "/pkg.Echo/Say"), Ok("echo"));
        let unknown = s.resolve(Some("nosuch"), "/x/y").unwrap_err();
        assert_eq!(unknown.code, UNIMPLEMENTED);
        assert_eq!(unknown.message, "unknown service 'nosuch'");
        let both = s.resolve(None, "/pkg.Both/M").unwrap_err();
        assert!(both.message.contains("(a, b)"), "{}", both.message);
        let none = s.resolve(None, "/pkg.None/M").unwrap_err();
        assert!(none
            .message
            .starts_with("unknown service for '/pkg.None/M'"));
        let gone = s.routes("gone").err().unwrap();
        assert_eq!(
            (gone.code, gone.message.as_str()),
            (UNAVAILABLE, "no live instance of service 'gone'")
        );
        assert_eq!(s.routes("nosuch").err().unwrap().code, UNIMPLEMENTED);
    }

    #[test]
    fn a_scoped_sidecar_names_what_it_watches_for_an_unknown_service() {
        let mut s = snapshot();
        s.watching = vec!["echo".into(), "gone".into()];
        let unknown = s.resolve(Some("nosuch"), "/x/y").unwrap_err();
        assert_eq!(
            unknown.message,
            "unknown service 'nosuch': this sidecar watches only 'echo', 'gone' (--watch)"
        );
        assert_eq!(s.resolve(Some("echo"), "/x/y"), Ok("echo"));
    }
}
