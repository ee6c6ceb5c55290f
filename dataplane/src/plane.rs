//! The data plane's shared state: configuration, the routing snapshot, and
//! what every call reads or counts. Built by the binding, read by the servers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::budget::RetryBudget;
use crate::eject::EjectionPolicy;
use crate::pool::Pool;
use crate::retry::RetryPolicy;
use crate::snapshot::{lock, ServiceState, Snapshot};
use crate::stats::Stats;
use crate::tls::Tls;
use crate::trace::Spans;

/// What the sidecar tells the data plane once, at start.
pub struct PlaneConfig {
    pub service: String,
    /// The app's address; None for a client-only sidecar (nothing inbound).
    pub app: Option<String>,
    pub retry: RetryPolicy,
    pub ejection: EjectionPolicy,
    /// Bounded loads: no instance takes more than this percentage of the average.
    pub load_factor_pct: u64,
    /// Record a span per hop (only when the control plane exports them).
    pub tracing: bool,
    /// Mutual TLS between sidecars (None: plaintext).
    pub tls: Option<Arc<Tls>>,
}

/// What grpc.health.v1 says for the inbound side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Serving,
    NotServing,
}

/// The inbound side's load, in one place: in flight now, the integral of it
/// over time (the load record's average), and when the last call arrived.
pub struct InboundLoad {
    state: Mutex<InboundState>,
    started: Instant,
}

struct InboundState {
    inflight: u64,
    area: f64,
    since: Instant,
    last_started: Option<Instant>,
}

impl InboundLoad {
    fn new() -> Self {
        let now = Instant::now();
        InboundLoad {
            state: Mutex::new(InboundState {
                inflight: 0,
                area: 0.0,
                since: now,
                last_started: None,
            }),
            started: now,
        }
    }

    pub fn started(&self, now: Instant) {
        let mut s = lock(&self.state);
        s.advance(now);
        s.inflight += 1;
        s.last_started = Some(now);
    }

    pub fn finished(&self, now: Instant) {
        let mut s = lock(&self.state);
        s.advance(now);
        s.inflight = s.inflight.saturating_sub(1);
    }

    pub fn inflight(&self) -> u64 {
        lock(&self.state).inflight
    }

    /// Call-seconds spent in flight since start.
    pub fn busy_seconds(&self, now: Instant) -> f64 {
        let s = lock(&self.state);
        s.area + s.inflight as f64 * now.saturating_duration_since(s.since).as_secs_f64()
    }

    /// Seconds since the last call arrived (0 while any is in flight).
    pub fn quiet_for(&self, now: Instant) -> f64 {
        let s = lock(&self.state);
        if s.inflight > 0 {
            return 0.0;
        }
        let since = s.last_started.unwrap_or(self.started);
        now.saturating_duration_since(since).as_secs_f64()
    }
}

impl InboundState {
    fn advance(&mut self, now: Instant) {
        self.area += self.inflight as f64 * now.saturating_duration_since(self.since).as_secs_f64();
        self.since = now;
    }
}

pub struct Plane {
    pub config: PlaneConfig,
    pub routes: ArcSwap<Snapshot>,
    services: Mutex<HashMap<String, Arc<ServiceState>>>,
    pub stats: Stats,
    pub budget: RetryBudget,
    pub inbound: InboundLoad,
    pub peers: Pool,
    pub app: Pool,
    pub spans: Spans,
    /// authz/<service> records: service -> the callers it allows (no entry: every peer).
    pub authz: ArcSwap<HashMap<String, HashSet<String>>>,
    registered: AtomicBool,
    draining: AtomicBool,
    app_up: AtomicBool,
    health: watch::Sender<Health>,
    pub app_state_changes: AtomicU64,
}

impl Plane {
    pub fn new(config: PlaneConfig) -> Arc<Plane> {
        let budget = RetryBudget::new(config.retry.budget_ratio, config.retry.budget_min);
        let peers = Pool::new(config.tls.clone());
        let (health, _) = watch::channel(Health::NotServing);
        Arc::new(Plane {
            config,
            routes: ArcSwap::from_pointee(Snapshot::default()),
            services: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            budget,
            inbound: InboundLoad::new(),
            peers,
            app: Pool::new(None),
            spans: Spans::default(),
            authz: ArcSwap::from_pointee(HashMap::new()),
            registered: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            app_up: AtomicBool::new(true),
            health,
            app_state_changes: AtomicU64::new(0),
        })
    }

    /// The state of a service that outlives snapshots (made on first use).
    pub fn service_state(&self, service: &str) -> Arc<ServiceState> {
        let mut services = lock(&self.services);
        services
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(ServiceState::new(self.config.ejection)))
            .clone()
    }

    /// Swap in a new snapshot; forget peers no longer in it. A service whose
    /// routes are the very ones in force (shared by `install`'s `keep`) keeps its
    /// counters without a look; the pool is pruned only when some routes changed.
    pub fn install(&self, snapshot: Snapshot) {
        let old = self.routes.load_full();
        let unchanged = |name: &str| match (old.services.get(name), snapshot.services.get(name)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        for (name, state) in lock(&self.services).iter() {
            if unchanged(name) {
                continue;
            }
            let keep: HashSet<String> = snapshot
                .services
                .get(name)
                .map(|r| r.peers.iter().map(|p| p.id.clone()).collect())
                .unwrap_or_default();
            state.retain(&keep);
        }
        let same_services = old.services.len() == snapshot.services.len()
            && snapshot.services.keys().all(|name| unchanged(name));
        let prune = !same_services || old.draining_addresses != snapshot.draining_addresses;
        self.routes.store(Arc::new(snapshot));
        if prune {
            let routes = self.routes.load();
            let addresses: HashSet<&str> = routes
                .services
                .values()
                .flat_map(|r| r.peers.iter().map(|p| p.address.as_str()))
                .chain(routes.draining_addresses.iter().map(String::as_str))
                .collect();
            self.peers.retain(&addresses);
        }
    }

    /// Who may call this sidecar's service: a caller outside a record's list is denied.
    pub fn authorize(&self, caller: Option<&str>) -> Result<(), String> {
        let rules = self.authz.load();
        let Some(allowed) = rules.get(&self.config.service) else {
            return Ok(()); // no record: every mesh peer
        };
        let rule = format!("authz/{}", self.config.service);
        match caller {
            Some(caller) if allowed.contains(caller) => Ok(()),
            Some(caller) => {
                let mut list: Vec<&str> = allowed.iter().map(String::as_str).collect();
                list.sort_unstable();
                Err(format!(
                    "caller '{caller}' may not call service '{}': {rule} allows [{}]",
                    self.config.service,
                    list.join(", ")
                ))
            }
            None => Err(format!(
                "{rule} limits who may call service '{}', and this caller has no mesh identity \
                 (mutual TLS, --tls-dir, names callers)",
                self.config.service
            )),
        }
    }

    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Relaxed);
        self.refresh_health();
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
        self.refresh_health();
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub fn app_up(&self) -> bool {
        self.app_up.load(Relaxed)
    }

    /// What a call or a probe learnt about the app.
    pub fn note_app(&self, up: bool) {
        if self.app_up.swap(up, Relaxed) != up {
            self.app_state_changes.fetch_add(1, Relaxed);
            if self.registered.load(Relaxed) {
                crate::log::warning(&format!(
                    "app at {} is {}",
                    self.config.app.as_deref().unwrap_or("-"),
                    if up { "reachable again" } else { "unreachable" }
                ));
            }
            self.refresh_health();
        }
    }

    fn refresh_health(&self) {
        let serving = self.registered.load(Relaxed)
            && !self.draining.load(Relaxed)
            && self.app_up.load(Relaxed);
        let health = if serving {
            Health::Serving
        } else {
            Health::NotServing
        };
        self.health.send_if_modified(|h| {
            let changed = *h != health;
            *h = health;
            changed
        });
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Calls not answered yet, both directions, outbound calls between attempts included.
    pub fn calls_in_progress(&self) -> u64 {
        self.inbound.inflight() + u64::from(self.budget.active())
    }

    /// Attempts in flight at peers (what `ringmesh.inflight` reports as outbound).
    pub fn outbound_inflight(&self) -> u64 {
        let routes = self.routes.load();
        routes
            .services
            .values()
            .flat_map(|r| r.loads.iter())
            .map(|l| u64::from(l.inflight.load(Relaxed)))
            .sum()
    }

    /// Peers ejected now, by service.
    pub fn ejected(&self, now: Instant) -> Vec<(String, Vec<String>)> {
        let routes = self.routes.load();
        let mut out: Vec<(String, Vec<String>)> = routes
            .services
            .values()
            .map(|r| {
                let mut ids = lock(&r.state.ejector).ejected(now);
                ids.sort();
                (r.name.clone(), ids)
            })
            .collect();
        out.sort();
        out
    }

    /// A connect to a peer that has not completed in this long is a connect failure.
    pub fn connect_wait(&self, remaining: Option<Duration>) -> Duration {
        const MAX: Duration = Duration::from_secs(1);
        remaining.map_or(MAX, |left| MAX.min(left / 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::PeerLoad;
    use crate::ring::Ring;
    use crate::snapshot::{Peer, ServiceRoutes};

    fn plane() -> Arc<Plane> {
        Plane::new(PlaneConfig {
            service: "client".into(),
            app: None,
            retry: RetryPolicy::default(),
            ejection: EjectionPolicy::default(),
            load_factor_pct: 125,
            tracing: false,
            tls: None,
        })
    }

    fn routes(plane: &Plane, name: &str, ids: &[&str]) -> Arc<ServiceRoutes> {
        let state = plane.service_state(name);
        let nodes: Vec<(&str, u32)> = ids.iter().map(|id| (*id, 1)).collect();
        Arc::new(ServiceRoutes {
            name: name.into(),
            peers: ids
                .iter()
                .map(|id| Peer {
                    id: (*id).into(),
                    address: format!("127.0.0.1:{}", 1000 + id.len()),
                })
                .collect(),
            loads: ids
                .iter()
                .map(|id| PeerLoad {
                    weight: 1,
                    inflight: state.counter(id),
                })
                .collect(),
            ring: Arc::new(Ring::build(&nodes, 160)),
            state,
        })
    }

    fn install(plane: &Plane, services: &[&Arc<ServiceRoutes>]) {
        let mut snapshot = Snapshot::default();
        for routes in services {
            snapshot
                .services
                .insert(routes.name.clone(), Arc::clone(routes));
        }
        plane.install(snapshot);
    }

    #[test]
    fn an_install_leaves_untouched_services_as_they_were_and_prunes_the_changed_one() {
        let plane = plane();
        let a = routes(&plane, "a", &["a1", "a2"]);
        let b = routes(&plane, "b", &["b1", "b2"]);
        install(&plane, &[&a, &b]);
        let a1 = plane.service_state("a").counter("a1");
        let b1 = plane.service_state("b").counter("b1");
        let b2 = plane.service_state("b").counter("b2");

        // b2 leaves; a's routes are shared as they are (the control plane's `keep`).
        let b_now = routes(&plane, "b", &["b1"]);
        install(&plane, &[&a, &b_now]);
        let routes_now = plane.routes.load();
        assert!(Arc::ptr_eq(&routes_now.services["a"], &a));
        assert!(Arc::ptr_eq(&plane.service_state("a").counter("a1"), &a1));
        assert!(Arc::ptr_eq(&plane.service_state("b").counter("b1"), &b1));
        // b2 was forgotten: asking again makes a new counter.
        assert!(!Arc::ptr_eq(&plane.service_state("b").counter("b2"), &b2));

        // a gone altogether: its counters go too.
        install(&plane, &[&b_now]);
        assert!(!Arc::ptr_eq(&plane.service_state("a").counter("a1"), &a1));
    }
}
