//! kvfs-remote: the S3 remote tier of kvfs.
//!
//! A prefix computed on one host becomes a cache hit on every host that reads the same
//! bucket. This crate owns everything S3: the daemon links it, engines never do (the loader
//! stays free of async runtimes and SDKs).
//!
//! - [`config`]: `s3://bucket/prefix`, endpoint, credentials (redacted in `Debug`), timeouts,
//!   retries and the tier's behaviour;
//! - [`client`]: object names, per-operation timeouts, verified reads, verified writes
//!   (size + payload digest in the object's metadata), conditional read-repair;
//! - [`error`]: typed errors, with a missing bucket and refused credentials told apart;
//! - [`listing`]: listings that step over names they cannot parse;
//! - [`nsjson`]: `namespace.json` checked before it is committed or uploaded;
//! - [`queue`]: the write-behind upload queue, persisted as marker files on local disk;
//! - [`lookup`]: how many leading chunks of a prompt exist remotely, in a few round trips;
//! - [`metrics`]: S3 requests by operation and outcome with latency, and the tier's counters
//!   and queue as Prometheus metrics;
//! - [`sync`]: bulk `push` / `pull` between a cache directory and the bucket, and the
//!   bucket scrub of `push --verify`.
//!
//! [`Remote`] ties them together behind a **synchronous** API, because the store is
//! synchronous: it owns one multi-thread tokio runtime (2 workers) created at open, and
//! bridges with `block_on` from the caller's thread. Calling it from inside an async runtime
//! is refused with [`RemoteError::InsideRuntime`] instead of deadlocking or panicking.
//!
//! On a local miss, [`Remote::fetch`] first consults a short-lived negative cache (moka,
//! `negative_ttl`), then joins an in-flight fetch of the same key if there is one
//! (single-flight: N concurrent misses cost one GET), else GETs and verifies the object.

pub mod client;
mod codec;
pub mod config;
pub mod error;
mod listing;
pub mod lookup;
pub mod metrics;
pub mod nsjson;
pub mod queue;
mod stream;
pub mod sync;

pub use client::{
    DIGEST_METADATA, PutOutcome, RAW_DIGEST_METADATA, RemoteStats, S3Store, verify_object,
};
pub use config::{Backpressure, S3Config, Secret};
pub use error::RemoteError;
pub use lookup::PrefixLookup;
pub use sync::{SyncEvent, SyncReport};

use bytes::Bytes;
use client::Bucket;
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ChunkKey, ChunkView, Verify};
use queue::Queue;
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type FlightResult = Result<Option<Bytes>, Arc<RemoteError>>;

/// One in-progress fetch that later callers of the same key wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<FlightResult>>,
    done: Condvar,
}

type FlightKey = (String, ChunkKey);

/// The remote tier: a bucket, a runtime, a negative cache, single-flight fetches and
/// (when opened with a cache directory) the persistent upload queue and its worker.
pub struct Remote {
    bucket: Arc<Bucket>,
    queue: Option<Arc<Queue>>,
    negative: moka::sync::Cache<FlightKey, ()>,
    flights: Mutex<HashMap<FlightKey, Arc<Flight>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.bucket.cfg.url())
            .field("endpoint", &self.bucket.cfg.endpoint)
            .field("queue", &self.queue.is_some())
            .finish()
    }
}

impl Remote {
    /// Connects to the bucket of `cfg`. With `cache_root`, also opens the upload queue under
    /// `<cache_root>/.uploads` and starts uploading what earlier runs left queued.
    pub fn open(cfg: S3Config, cache_root: Option<&Path>) -> Result<Remote, RemoteError> {
        let store = Arc::new(cfg.build_store()?);
        Remote::with_object_store(cfg, store, cache_root)
    }

    /// Like [`Remote::open`] over any object store (tests wrap one to inject faults).
    pub fn with_object_store(
        cfg: S3Config,
        store: Arc<dyn S3Store>,
        cache_root: Option<&Path>,
    ) -> Result<Remote, RemoteError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvfs-remote")
            .enable_all()
            .build()
            .map_err(|e| RemoteError::io("tokio runtime", e))?;
        let negative = moka::sync::Cache::builder()
            .max_capacity(1 << 20)
            .time_to_live(cfg.negative_ttl.max(Duration::from_millis(1)))
            .build();
        let bucket = Arc::new(Bucket::new(cfg, store));
        let queue = match cache_root {
            Some(root) => {
                let q = Arc::new(Queue::open(root, bucket.clone())?);
                rt.spawn(q.clone().run());
                Some(q)
            }
            None => None,
        };
        tracing::info!(url = %bucket.cfg.url(), endpoint = ?bucket.cfg.endpoint, "remote tier open");
        Ok(Remote {
            bucket,
            queue,
            negative,
            flights: Mutex::new(HashMap::new()),
            rt: Some(rt),
        })
    }

    pub fn config(&self) -> &S3Config {
        &self.bucket.cfg
    }

    pub fn stats(&self) -> RemoteStats {
        self.bucket.counters.snapshot()
    }

    /// Runs `f` on the tier's runtime and waits for it from this (non-runtime) thread.
    pub(crate) fn block_on<F: Future>(&self, f: F) -> Result<F::Output, RemoteError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(RemoteError::InsideRuntime);
        }
        Ok(self
            .rt
            .as_ref()
            .expect("runtime lives until drop")
            .block_on(f))
    }

    fn check_ns(ns_dir: &str) -> Result<(), RemoteError> {
        validate_namespace_dir(ns_dir).map_err(RemoteError::Name)
    }

    /// Fetches and fully verifies `<ns_dir>/<key>.kvc`. `Ok(None)` is a miss (absent, or
    /// present but invalid: never served). `Err` means the bucket could not be asked.
    pub fn fetch(&self, ns_dir: &str, key: &ChunkKey) -> Result<Option<Vec<u8>>, RemoteError> {
        Ok(self.fetch_bytes(ns_dir, key)?.map(Vec::from))
    }

    /// [`Remote::fetch`] without the copy into a `Vec`.
    pub fn fetch_bytes(&self, ns_dir: &str, key: &ChunkKey) -> Result<Option<Bytes>, RemoteError> {
        Self::check_ns(ns_dir)?;
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(RemoteError::InsideRuntime);
        }
        let fk: FlightKey = (ns_dir.to_string(), *key);
        if self.negative.contains_key(&fk) {
            client::bump(&self.bucket.counters.negative_hits, 1);
            return Ok(None);
        }
        let (flight, leader) = {
            let mut map = self.flights.lock().unwrap();
            match map.get(&fk) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    map.insert(fk.clone(), f.clone());
                    (f, true)
                }
            }
        };
        if !leader {
            client::bump(&self.bucket.counters.coalesced, 1);
            let mut g = flight.result.lock().unwrap();
            while g.is_none() {
                g = flight.done.wait(g).unwrap();
            }
            return g.clone().unwrap().map_err(RemoteError::Shared);
        }
        // The leader: whatever happens (even a panic), waiters get a result and the flight
        // is removed.
        struct Finish<'a> {
            remote: &'a Remote,
            fk: &'a FlightKey,
            flight: &'a Flight,
            result: Option<FlightResult>,
        }
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                let r = self.result.take().unwrap_or_else(|| {
                    Err(Arc::new(RemoteError::Unavailable(
                        "fetch was abandoned".into(),
                    )))
                });
                *self.flight.result.lock().unwrap() = Some(r);
                self.flight.done.notify_all();
                self.remote.flights.lock().unwrap().remove(self.fk);
            }
        }
        let mut finish = Finish {
            remote: self,
            fk: &fk,
            flight: &flight,
            result: None,
        };
        let r = self
            .block_on(self.bucket.get_verified(ns_dir, key))
            .and_then(|r| r);
        if let Ok(None) = r {
            self.negative.insert(fk.clone(), ());
        }
        let shared: FlightResult = match r {
            Ok(v) => Ok(v),
            Err(e) => Err(Arc::new(e)),
        };
        finish.result = Some(shared.clone());
        drop(finish);
        shared.map_err(|e| Arc::try_unwrap(e).unwrap_or_else(RemoteError::Shared))
    }

    /// Forgets remembered misses (after this process learns a key now exists).
    pub fn forget_miss(&self, ns_dir: &str, key: &ChunkKey) {
        self.negative.invalidate(&(ns_dir.to_string(), *key));
    }

    /// The store committed `<ns_dir>/<key>` locally at `path`: queue its upload (durably),
    /// and with write-through upload it before returning.
    pub fn committed(&self, ns_dir: &str, key: &ChunkKey, path: &Path) -> Result<(), RemoteError> {
        Self::check_ns(ns_dir)?;
        self.forget_miss(ns_dir, key);
        let q = self.queue.as_ref().ok_or(RemoteError::NoQueue)?;
        let name = q.enqueue(ns_dir, key, path)?;
        if self.bucket.cfg.write_through {
            self.block_on(q.upload_marker(&name))??;
        }
        Ok(())
    }

    /// Uploads bytes directly, bypassing the queue. A valid chunk for `ns_dir/key` is
    /// uploaded with its digest and repairs a damaged object in its place; other bytes (tests,
    /// tools) are put if absent, replacing only an object of another size.
    pub fn upload(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        bytes: Vec<u8>,
    ) -> Result<PutOutcome, RemoteError> {
        Self::check_ns(ns_dir)?;
        let digest = ChunkView::parse(&bytes, Verify::Full)
            .ok()
            .filter(|v| client::check_identity(&v.header, ns_dir, key).is_ok())
            .map(|v| v.header.payload_digest);
        let bytes = Bytes::from(bytes);
        let r = self.block_on(async {
            match digest {
                Some(d) => self.bucket.upload_verified(ns_dir, key, bytes, d).await,
                None => {
                    let path = self.bucket.chunk_path(ns_dir, key);
                    self.bucket.put_if_absent(&path, bytes).await
                }
            }
        })?;
        self.forget_miss(ns_dir, key);
        r
    }

    /// Size of the remote object, or None when it does not exist.
    pub fn object_size(&self, ns_dir: &str, key: &ChunkKey) -> Result<Option<u64>, RemoteError> {
        Self::check_ns(ns_dir)?;
        let path = self.bucket.chunk_path(ns_dir, key);
        self.block_on(self.bucket.head(&path))?
    }

    /// Namespace directories in the bucket.
    pub fn list_namespaces(&self) -> Result<Vec<String>, RemoteError> {
        self.block_on(self.bucket.list_namespaces())?
    }

    /// Chunks (key, size) of one namespace in the bucket.
    pub fn list_chunks(&self, ns_dir: &str) -> Result<Vec<(ChunkKey, u64)>, RemoteError> {
        self.block_on(self.bucket.list_chunks(ns_dir))?
    }

    /// Calls `f` with the chunks (key, size) of one namespace in the bucket as LIST pages
    /// arrive, in key order: memory of one page, first chunk after one request. `f`
    /// returning `Break` stops the listing.
    pub fn for_each_chunk(
        &self,
        ns_dir: &str,
        f: impl FnMut(ChunkKey, u64) -> std::ops::ControlFlow<()>,
    ) -> Result<(), RemoteError> {
        self.block_on(self.bucket.for_each_chunk(ns_dir, f))?
    }

    /// The bucket's `namespace.json` of `ns_dir`, if any.
    pub fn namespace_json(&self, ns_dir: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        Self::check_ns(ns_dir)?;
        Ok(self
            .block_on(self.bucket.namespace_json(ns_dir))??
            .map(Vec::from))
    }

    /// How many leading `keys` exist remotely (see [`lookup`]).
    pub fn prefix_lookup(
        &self,
        ns_dir: &str,
        keys: &[ChunkKey],
    ) -> Result<PrefixLookup, RemoteError> {
        Self::check_ns(ns_dir)?;
        self.block_on(lookup::prefix_lookup(&self.bucket, ns_dir, keys))?
    }

    /// Whether `ns_dir/key` is queued for upload and not yet in the bucket: the local copy is
    /// then the only one, and the disk tier must not evict it.
    pub fn upload_pending(&self, ns_dir: &str, key: &ChunkKey) -> bool {
        self.queue
            .as_ref()
            .is_some_and(|q| q.is_pending(ns_dir, key))
    }

    /// Uploads waiting in the persistent queue.
    pub fn pending_uploads(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.pending())
    }

    /// Waits until the upload queue is empty; false when `timeout` passed first.
    pub fn wait_uploaded(&self, timeout: Duration) -> bool {
        self.queue.as_ref().is_none_or(|q| q.wait_drained(timeout))
    }

    /// Like [`Remote::wait_uploaded`], but gives up as soon as a batch of uploads fails
    /// (the bucket is down or refuses): what a short command does at exit for uploads that
    /// earlier runs left, so that an outage does not hold it for the whole timeout.
    pub fn wait_uploaded_unless_failing(&self, timeout: Duration) -> bool {
        let Some(q) = self.queue.as_ref() else {
            return true;
        };
        let failed = q.failed_batches();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let now = std::time::Instant::now();
            let step = (deadline.saturating_duration_since(now)).min(Duration::from_millis(100));
            if q.wait_drained(step) {
                return true;
            }
            if q.failed_batches() > failed || std::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Registers the tier's Prometheus metrics (S3 requests, fetch and upload results, the
    /// upload queue) with `registry`; see [`metrics`].
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        metrics::register(registry, &self.bucket, self.queue.as_ref());
    }

    /// S3 requests counted so far under `op` and `outcome`.
    pub fn request_count(&self, op: metrics::S3Op, outcome: metrics::Outcome) -> u64 {
        self.bucket.metrics.count(op, outcome)
    }

    pub(crate) fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(q) = &self.queue {
            q.stop();
        }
        if let Some(rt) = self.rt.take() {
            // Uploads in flight are abandoned; their markers stay and resume at next open.
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}
