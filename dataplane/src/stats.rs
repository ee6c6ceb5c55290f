//! Counters and call-duration histograms, recorded with atomics on the hot path.
//!
//! Python reads them as one snapshot per scrape, export or load report (the
//! one counting path for `/metrics`, OTLP, `/stats` and the `load/` records);
//! nothing here calls into Python.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::retry::Outcome;

/// Milliseconds; fine enough below 1 ms, where a sidecar hop lives (as the README's metrics).
pub const DURATION_BUCKETS_MS: [f64; 21] = [
    0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 75.0, 100.0, 250.0,
    500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
/// Method names come from callers: past this many (method, status) series, calls
/// are recorded under the method "_other" instead of growing without bound.
const MAX_SERIES: usize = 4096;
pub const OTHER_METHOD: &str = "_other";

/// One (method, status) series of a duration histogram.
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS_MS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn record(&self, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1000.0;
        // Upper bounds are inclusive, as in OpenTelemetry's explicit buckets.
        let index = DURATION_BUCKETS_MS.partition_point(|bound| *bound < ms);
        self.buckets[index].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
    }
}

/// A read of one series: cumulative since the start.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesReading {
    pub method: String,
    pub code: u32,
    pub count: u64,
    pub sum_ms: f64,
    pub buckets: Vec<u64>,
}

/// The duration histograms of one direction, by method path, then gRPC status
/// (looked up by `&str`: recording a call allocates nothing once its series exists).
#[derive(Default)]
pub struct Durations {
    series: RwLock<HashMap<String, ByCode>>,
}

/// One method's histograms, by status code (a handful at most).
type ByCode = Vec<(u32, Arc<Histogram>)>;

fn find(codes: &[(u32, Arc<Histogram>)], code: u32) -> Option<&Arc<Histogram>> {
    codes.iter().find(|(c, _)| *c == code).map(|(_, h)| h)
}

impl Durations {
    pub fn record(&self, method: &str, code: u32, elapsed: Duration) {
        if let Some(h) = read(&self.series)
            .get(method)
            .and_then(|codes| find(codes, code))
        {
            h.record(elapsed);
            return;
        }
        let mut series = write(&self.series);
        let count: usize = series.values().map(Vec::len).sum();
        let method =
            if count < MAX_SERIES || series.get(method).is_some_and(|c| find(c, code).is_some()) {
                method
            } else {
                OTHER_METHOD
            };
        let codes = series.entry(method.to_owned()).or_default();
        match find(codes, code) {
            Some(h) => h.record(elapsed),
            None => {
                let h = Arc::new(Histogram::new());
                h.record(elapsed);
                codes.push((code, h));
            }
        }
    }

    pub fn read(&self) -> Vec<SeriesReading> {
        let series = read(&self.series);
        let mut out: Vec<SeriesReading> = series
            .iter()
            .flat_map(|(method, codes)| codes.iter().map(move |(code, h)| (method, code, h)))
            .map(|(method, code, h)| SeriesReading {
                method: method.clone(),
                code: *code,
                count: h.count.load(Relaxed),
                sum_ms: h.sum_ns.load(Relaxed) as f64 / 1e6,
                buckets: h.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.method, a.code).cmp(&(&b.method, b.code)));
        out
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Every counter of the data plane: one atomic per fact.
#[derive(Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub failed_calls: AtomicU64,
    pub attempts: AtomicU64,
    retries: [AtomicU64; Outcome::ALL.len()],
    pub retry_budget_waits: AtomicU64,
    pub retry_budget_exhausted: AtomicU64,
    pub retries_in_flight_peak: AtomicU64,
    pub ejections: AtomicU64,
    /// Inbound calls refused by an authz/ record.
    pub authz_denied: AtomicU64,
    pub server: Durations,
    pub client: Durations,
}

impl Stats {
    pub fn retried(&self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.retries[i].fetch_add(1, Relaxed);
        }
    }

    /// Retries by reason (the `Outcome` label values), only those that happened.
    pub fn retries(&self) -> Vec<(&'static str, u64)> {
        Outcome::ALL
            .iter()
            .zip(&self.retries)
            .map(|(o, n)| (o.as_str(), n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn note_retrying(&self, retrying: u64) {
        self.retries_in_flight_peak.fetch_max(retrying, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        let d = Durations::default();
        d.record("/a/b", 0, Duration::from_micros(250));
        d.record("/a/b", 0, Duration::from_micros(251));
        d.record("/a/b", 0, Duration::from_secs(20));
        let r = &d.read()[0];
        assert_eq!(r.count, 3);
        assert_eq!(r.buckets[0], 1);
        assert_eq!(r.buckets[1], 1);
        assert_eq!(r.buckets[DURATION_BUCKETS_MS.len()], 1);
        assert!((r.sum_ms - 20000.501).abs() < 1e-6);
    }

    #[test]
    fn series_are_bounded() {
        let d = Durations::default();
        for i in 0..(MAX_SERIES + 10) {
            d.record(&format!("/m/{i}"), 0, Duration::from_millis(1));
        }
        let r = d.read();
        assert_eq!(r.len(), MAX_SERIES + 1);
        let other = r.iter().find(|s| s.method == OTHER_METHOD).unwrap();
        assert_eq!(other.count, 10);
    }
}
