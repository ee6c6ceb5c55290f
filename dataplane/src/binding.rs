//! The Python binding: the only module that knows Python.
//!
//! Python drives; the data plane never calls back. Control-plane facts come
//! in as whole snapshots (`install`), counters go out as one read (`stats`),
//! and blocking work (the drain) runs with the GIL released.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::balance::PeerLoad;
use crate::call::Direction;
use crate::driver::Driver;
use crate::eject::EjectionPolicy;
use crate::log;
use crate::plane::{Plane, PlaneConfig};
use crate::retry::RetryPolicy;
use crate::ring::{Ring, DEFAULT_VNODES};
use crate::server::{self, Server, Side};
use crate::snapshot::{lock, Peer, ServiceRoutes, Snapshot};
use crate::stats::{SeriesReading, DURATION_BUCKETS_MS};
use crate::tls::Tls;

/// One service of a snapshot as Python sends it: its name, its serving
/// instances (id, address, weight), and their ring (built by `RingLookup.build`
/// from the same instances in the same order).
type ServiceArg<'py> = (String, Vec<(String, String, u32)>, PyRef<'py, RingLookup>);

#[pyclass(frozen)]
struct DataPlane {
    plane: Arc<Plane>,
    runtime: Mutex<Option<Driver>>,
    servers: Mutex<Vec<Server>>,
}

#[pymethods]
impl DataPlane {
    #[new]
    #[pyo3(signature = (*, service, app=None, idempotent=Vec::new(), tracing=false, log_level=30, tls_dir=None))]
    fn new(
        service: String,
        app: Option<String>,
        idempotent: Vec<String>,
        tracing: bool,
        log_level: u8,
        tls_dir: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let retry = RetryPolicy::new(&idempotent)
            .map_err(|e| PyValueError::new_err(format!("invalid --idempotent glob: {e}")))?;
        log::set_level(log_level);
        let tls = match tls_dir {
            None => None,
            Some(dir) => {
                let tls = Tls::load(&dir)
                    .map_err(|e| PyValueError::new_err(format!("--tls-dir: {e}")))?;
                let named = tls.current().service.clone();
                if named != service {
                    return Err(PyValueError::new_err(format!(
                        "--tls-dir {}: the certificate is for service '{named}', not '{service}'",
                        dir.display()
                    )));
                }
                Some(Arc::new(tls))
            }
        };
        let config = PlaneConfig {
            service,
            app,
            retry,
            ejection: EjectionPolicy::default(),
            load_factor_pct: 125,
            tracing,
            tls,
        };
        Ok(DataPlane {
            plane: Plane::new(config),
            runtime: Mutex::new(None),
            servers: Mutex::new(Vec::new()),
        })
    }

    /// Bind the ports and serve (the runtime starts here, never at import).
    /// Returns the bound ports: (outbound, inbound or None).
    #[pyo3(signature = (outbound, inbound=None, threads=1))]
    fn start(
        &self,
        outbound: &str,
        inbound: Option<&str>,
        threads: usize,
    ) -> PyResult<(u16, Option<u16>)> {
        let mut runtime_slot = lock(&self.runtime);
        if runtime_slot.is_some() {
            return Err(PyRuntimeError::new_err("the data plane is already started"));
        }
        let inbound_listener = inbound
            .map(server::bind)
            .transpose()
            .map_err(PyOSError::new_err)?;
        let outbound_listener = server::bind(outbound).map_err(PyOSError::new_err)?;
        let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
        let ports = (
            port(&outbound_listener),
            inbound_listener.as_ref().map(port),
        );
        let runtime = Driver::start(threads)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the data plane: {e}")))?;
        let mut servers = Vec::new();
        {
            let _entered = runtime.handle().enter();
            let start = |l, side| {
                Server::start(l, self.plane.clone(), side)
                    .map_err(|e| PyOSError::new_err(e.to_string()))
            };
            servers.push(start(outbound_listener, Side::Outbound)?);
            if let Some(listener) = inbound_listener {
                servers.push(start(listener, Side::Inbound)?);
            }
            runtime.handle().spawn(server::probes(self.plane.clone()));
        }
        *lock(&self.servers) = servers;
        *runtime_slot = Some(runtime);
        Ok(ports)
    }

    /// Swap in a routing snapshot (built by the control plane from etcd).
    /// `services`: the services whose routes are new; `keep`: the services whose
    /// routes stay as the snapshot in force has them (shared, not rebuilt: a change
    /// in one service of a large mesh costs that service only). A service in
    /// neither is gone. `watching`: the services a scoped sidecar watches (empty:
    /// all), named in the error for a call to any other.
    #[pyo3(signature = (services, known, declared_by, draining_addresses, revision, watching = Vec::new(), keep = Vec::new()))]
    #[allow(clippy::too_many_arguments)] // one per part of the snapshot, as Python names them
    fn install(
        &self,
        services: Vec<ServiceArg<'_>>,
        known: Vec<String>,
        declared_by: HashMap<String, Vec<String>>,
        draining_addresses: Vec<String>,
        revision: u64,
        watching: Vec<String>,
        keep: Vec<String>,
    ) -> PyResult<()> {
        let mut snapshot = Snapshot {
            known: known.into_iter().collect(),
            declared_by,
            draining_addresses,
            revision,
            watching,
            ..Snapshot::default()
        };
        let current = self.plane.routes.load();
        for name in keep {
            let Some(routes) = current.services.get(&name) else {
                return Err(PyValueError::new_err(format!(
                    "cannot keep the routes of service {name}: the snapshot in force has none"
                )));
            };
            snapshot.known.insert(name.clone());
            snapshot.services.insert(name, Arc::clone(routes));
        }
        for (name, instances, lookup) in services {
            if lookup.ring.peers() != instances.len() {
                return Err(PyValueError::new_err(format!(
                    "the ring of service {name} has {} peers but {} instances were given",
                    lookup.ring.peers(),
                    instances.len()
                )));
            }
            let ring = Arc::clone(&lookup.ring);
            let state = self.plane.service_state(&name);
            let mut peers = Vec::with_capacity(instances.len());
            let mut loads = Vec::with_capacity(instances.len());
            for (id, address, weight) in instances {
                loads.push(PeerLoad {
                    weight,
                    inflight: state.counter(&id),
                });
                peers.push(Peer { id, address });
            }
            snapshot.known.insert(name.clone());
            snapshot.services.insert(
                name.clone(),
                Arc::new(ServiceRoutes {
                    name,
                    peers,
                    loads,
                    ring,
                    state,
                }),
            );
        }
        self.plane.install(snapshot);
        Ok(())
    }

    /// The authz/ records in force: service -> the callers it allows.
    fn set_authz(&self, rules: HashMap<String, Vec<String>>) {
        let rules = rules
            .into_iter()
            .map(|(service, callers)| (service, callers.into_iter().collect()))
            .collect();
        self.plane.authz.store(Arc::new(rules));
    }

    fn set_registered(&self, registered: bool) {
        self.plane.set_registered(registered);
    }

    fn set_draining(&self) {
        self.plane.set_draining();
    }

    fn app_up(&self) -> bool {
        self.plane.app_up()
    }

    /// Calls not answered yet, both directions (the drain waits for 0).
    fn calls_in_progress(&self) -> u64 {
        self.plane.calls_in_progress()
    }

    /// Seconds since the last inbound call arrived (0 while any is in flight).
    fn quiet_for(&self) -> f64 {
        self.plane.inbound.quiet_for(Instant::now())
    }

    /// Inbound call-seconds in flight since start (the load record's average).
    fn busy_seconds(&self) -> f64 {
        self.plane.inbound.busy_seconds(Instant::now())
    }

    fn revision(&self) -> u64 {
        self.plane.routes.load().revision
    }

    /// Every counter and histogram, read once.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let plane = &self.plane;
        let s = &plane.stats;
        let d = PyDict::new(py);
        d.set_item("calls", s.calls.load(Relaxed))?;
        d.set_item("failed_calls", s.failed_calls.load(Relaxed))?;
        d.set_item("attempts", s.attempts.load(Relaxed))?;
        let retries = PyDict::new(py);
        for (reason, n) in s.retries() {
            retries.set_item(reason, n)?;
        }
        d.set_item("retries", retries)?;
        d.set_item("retry_budget_waits", s.retry_budget_waits.load(Relaxed))?;
        d.set_item(
            "retry_budget_exhausted",
            s.retry_budget_exhausted.load(Relaxed),
        )?;
        d.set_item(
            "retries_in_flight_peak",
            s.retries_in_flight_peak.load(Relaxed),
        )?;
        d.set_item("ejections", s.ejections.load(Relaxed))?;
        d.set_item("authz_denied", s.authz_denied.load(Relaxed))?;
        let inflight = PyDict::new(py);
        inflight.set_item("inbound", plane.inbound.inflight())?;
        inflight.set_item("outbound", plane.outbound_inflight())?;
        d.set_item("inflight", inflight)?;
        let ejected = PyDict::new(py);
        for (service, ids) in plane.ejected(Instant::now()) {
            ejected.set_item(service, ids)?;
        }
        d.set_item("ejected", ejected)?;
        d.set_item("server", series(py, &s.server.read())?)?;
        d.set_item("client", series(py, &s.client.read())?)?;
        d.set_item("spans_dropped", plane.spans.dropped.load(Relaxed))?;
        Ok(d)
    }

    /// The spans recorded since the last call, for export.
    #[allow(clippy::type_complexity)]
    fn take_spans<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for span in self.plane.spans.take() {
            let kind = match span.direction {
                Direction::Inbound => "server",
                Direction::Outbound => "client",
            };
            out.append((
                PyBytes::new(py, &span.trace_id),
                PyBytes::new(py, &span.span_id),
                span.parent_span_id.map(|p| PyBytes::new(py, &p)),
                span.name,
                kind,
                span.start_unix_ns,
                span.end_unix_ns,
                span.code,
                span.message,
            ))?;
        }
        Ok(out)
    }

    /// Drain: GOAWAY on every connection, wait for their calls (at most
    /// `grace` seconds), then stop the runtime. Idempotent.
    fn shutdown(&self, py: Python<'_>, grace: f64) {
        let servers = std::mem::take(&mut *lock(&self.servers));
        let runtime = lock(&self.runtime).take();
        let Some(mut runtime) = runtime else { return };
        let grace = Duration::from_secs_f64(if grace.is_finite() {
            grace.max(0.0)
        } else {
            0.0
        });
        py.detach(|| {
            let drain = async move {
                for server in &servers {
                    server.stop();
                }
                let drained = async {
                    for server in servers {
                        server.drained().await;
                    }
                };
                let _ = tokio::time::timeout(grace, drained).await;
            };
            runtime.run_blocking(drain, grace + Duration::from_secs(1));
            self.plane.peers.clear();
            self.plane.app.clear();
            runtime.stop();
        });
    }
}

fn series<'py>(py: Python<'py>, readings: &[SeriesReading]) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for r in readings {
        out.append((
            r.method.as_str(),
            r.code,
            r.count,
            r.sum_ms,
            r.buckets.clone(),
        ))?;
    }
    Ok(out)
}

/// A service's ring: built here (uhashring's construction, see ring.rs) and
/// handed whole to `DataPlane.install`; `ringmesh route` and `ringmesh
/// topology` look keys up and read shares on the same value.
#[pyclass(frozen)]
struct RingLookup {
    ring: Arc<Ring>,
}

#[pymethods]
impl RingLookup {
    /// Node `i` of `nodes` (name, weight) is peer `i`. The GIL is released
    /// meanwhile: a large ring never holds up the control plane's other threads.
    #[staticmethod]
    #[pyo3(signature = (nodes, vnodes = DEFAULT_VNODES))]
    fn build(py: Python<'_>, nodes: Vec<(String, u32)>, vnodes: u32) -> RingLookup {
        let ring = py.detach(|| {
            let nodes: Vec<(&str, u32)> = nodes.iter().map(|(n, w)| (n.as_str(), *w)).collect();
            Ring::build(&nodes, vnodes)
        });
        RingLookup {
            ring: Arc::new(ring),
        }
    }

    fn owner(&self, key: &str) -> Option<u32> {
        self.ring.owner(key)
    }

    /// Every peer once, owner first, then the failover order.
    fn order(&self, key: &str) -> Vec<u32> {
        self.ring.order(key)
    }

    /// Each peer's fraction of the hash space, by peer index.
    fn shares(&self) -> Vec<f64> {
        self.ring.shares()
    }

    /// How many points the ring has.
    fn __len__(&self) -> usize {
        self.ring.len()
    }
}

/// "release" or "debug": which build a benchmark measured.
#[pyfunction]
fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

#[pyfunction]
fn duration_buckets_ms() -> Vec<f64> {
    DURATION_BUCKETS_MS.to_vec()
}

#[pymodule(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DataPlane>()?;
    m.add_class::<RingLookup>()?;
    m.add_function(wrap_pyfunction!(build_profile, m)?)?;
    m.add_function(wrap_pyfunction!(duration_buckets_ms, m)?)?;
    Ok(())
}
