//! The loader's own counters, for the process that links it: lookups and the tokens they
//! found, loads (requests, chunks, tokens, bytes, failures) with their latency per request
//! and per layer, and stores.
//!
//! One set per process ([`global`]), as the daemon keeps one per mount: an engine with
//! several [`Loader`](crate::Loader)s (one per model or rank) reports their sum, which is
//! what a dashboard of that process shows. Counters are relaxed atomics bumped once per
//! lookup, load or store (never per chunk read), so the hot path pays a few uncontended
//! atomic adds per request. Latencies go into fixed-bucket histograms ([`LATENCY_BOUNDS`],
//! the same buckets for requests and layers) that a caller turns into any exposition format:
//! the Python package hands them to vLLM's Prometheus metrics (`kvfs.vllm`), the C ABI
//! copies them out (`kvfs_metrics`).
//!
//! Nothing here serves or formats metrics: the loader pulls in no HTTP server and no
//! metrics crate.

use crate::loader::{LoadStats, StoreStats};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the latency buckets (an implicit last bucket holds the rest):
/// 0.5 ms to 10 s, about 2.5x apart (a warm chunk on NVMe loads in about a millisecond, a
/// long prompt in tens of milliseconds, a cold one through a mount's S3 fetch in seconds).
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of a latency histogram: one per bound, plus the overflow.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS.len() + 1;

/// A fixed-bucket histogram of durations.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A histogram read at one moment: per-bucket counts (not cumulative), their total and the
/// sum of the observations.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HistogramSnapshot {
    pub buckets: [u64; LATENCY_BUCKETS],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl LatencyHistogram {
    pub const fn new() -> LatencyHistogram {
        LatencyHistogram {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS.partition_point(|&b| b < s);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }
}

/// The loader's counters; see the module docs.
#[derive(Debug, Default)]
pub struct LoaderMetrics {
    lookups: AtomicU64,
    lookup_tokens: AtomicU64,
    hit_tokens: AtomicU64,
    loads: AtomicU64,
    load_failures: AtomicU64,
    chunks_loaded: AtomicU64,
    tokens_loaded: AtomicU64,
    bytes_loaded: AtomicU64,
    load_seconds: LatencyHistogram,
    layer_ready_seconds: LatencyHistogram,
    stores: AtomicU64,
    chunks_stored: AtomicU64,
    bytes_stored: AtomicU64,
}

/// [`LoaderMetrics`] read at one moment. Every field only grows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoaderMetricsSnapshot {
    /// `Loader::lookup` calls, the tokens they were asked about, and the cached prefix
    /// tokens they found.
    pub lookups: u64,
    pub lookup_tokens: u64,
    pub hit_tokens: u64,
    /// Loads that finished, and loads that failed (a missing or corrupt chunk, an I/O error).
    pub loads: u64,
    pub load_failures: u64,
    pub chunks_loaded: u64,
    pub tokens_loaded: u64,
    /// Bytes read from chunk files by finished loads.
    pub bytes_loaded: u64,
    /// From `load` to the last byte in place, per finished load.
    pub load_seconds: HistogramSnapshot,
    /// From `load` to each layer in place for every chunk, per layer of each finished load.
    pub layer_ready_seconds: HistogramSnapshot,
    /// `Loader::store` calls that succeeded, the chunks they wrote and the bytes.
    pub stores: u64,
    pub chunks_stored: u64,
    pub bytes_stored: u64,
}

static GLOBAL: LoaderMetrics = LoaderMetrics::new();

/// The counters of this process.
pub fn global() -> &'static LoaderMetrics {
    &GLOBAL
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl LoaderMetrics {
    pub const fn new() -> LoaderMetrics {
        LoaderMetrics {
            lookups: AtomicU64::new(0),
            lookup_tokens: AtomicU64::new(0),
            hit_tokens: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            load_failures: AtomicU64::new(0),
            chunks_loaded: AtomicU64::new(0),
            tokens_loaded: AtomicU64::new(0),
            bytes_loaded: AtomicU64::new(0),
            load_seconds: LatencyHistogram::new(),
            layer_ready_seconds: LatencyHistogram::new(),
            stores: AtomicU64::new(0),
            chunks_stored: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
        }
    }

    /// A lookup of `tokens` tokens that found `hit` cached.
    pub fn lookup(&self, tokens: usize, hit: usize) {
        add(&self.lookups, 1);
        add(&self.lookup_tokens, tokens as u64);
        add(&self.hit_tokens, hit as u64);
    }

    /// A load that finished.
    pub fn loaded(&self, s: &LoadStats) {
        self.load_finished(s.chunks, s.tokens, s.bytes_read, s.elapsed, &s.layer_ready);
    }

    /// A load that finished, by its figures: what a load that does not return [`LoadStats`]
    /// (a device load of kvfs-cuda) records. `layer_ready` may be empty when the time to each
    /// layer in place is not known.
    pub fn load_finished(
        &self,
        chunks: usize,
        tokens: usize,
        bytes_read: u64,
        elapsed: Duration,
        layer_ready: &[Duration],
    ) {
        add(&self.loads, 1);
        add(&self.chunks_loaded, chunks as u64);
        add(&self.tokens_loaded, tokens as u64);
        add(&self.bytes_loaded, bytes_read);
        self.load_seconds.observe(elapsed);
        for &d in layer_ready {
            self.layer_ready_seconds.observe(d);
        }
    }

    /// A load that failed.
    pub fn load_failed(&self) {
        add(&self.load_failures, 1);
    }

    /// A store that succeeded.
    pub fn stored(&self, s: &StoreStats) {
        add(&self.stores, 1);
        add(&self.chunks_stored, s.written as u64);
        add(&self.bytes_stored, s.bytes_written);
    }

    pub fn snapshot(&self) -> LoaderMetricsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoaderMetricsSnapshot {
            lookups: g(&self.lookups),
            lookup_tokens: g(&self.lookup_tokens),
            hit_tokens: g(&self.hit_tokens),
            loads: g(&self.loads),
            load_failures: g(&self.load_failures),
            chunks_loaded: g(&self.chunks_loaded),
            tokens_loaded: g(&self.tokens_loaded),
            bytes_loaded: g(&self.bytes_loaded),
            load_seconds: self.load_seconds.snapshot(),
            layer_ready_seconds: self.layer_ready_seconds.snapshot(),
            stores: g(&self.stores),
            chunks_stored: g(&self.chunks_stored),
            bytes_stored: g(&self.bytes_stored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_the_bucket_of_their_bound() {
        let h = LatencyHistogram::new();
        h.observe(Duration::from_micros(500)); // on the first bound: first bucket
        h.observe(Duration::from_micros(501));
        h.observe(Duration::from_secs(11)); // past the last bound: overflow
        let s = h.snapshot();
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[LATENCY_BUCKETS - 1], 1);
        assert_eq!(s.count, 3);
        assert!(
            (s.sum_seconds - 11.001001).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
    }
}
