//! The bucket side of the remote tier: object names, verified reads, put-if-absent writes.
//!
//! Objects live at `<prefix>/<namespace dir>/<key>.kvc`, with a readable
//! `<prefix>/<namespace dir>/namespace.json` beside them. Everything here is async and runs
//! on the tier's own runtime (see [`crate::Remote`], which bridges to the synchronous store).
//!
//! - **Reads** ([`Bucket::get_verified`]) fully verify a fetched object (header checksum,
//!   shape, key recomputed from its tokens, every payload digest) and check it is the object
//!   its name claims (key == name, namespace id suffix == the namespace dir). Anything else is
//!   counted in [`RemoteStats::corrupt`], logged, and reported as a miss: a damaged object is
//!   never served, and a transfer damaged in flight is simply fetched again on a later miss.
//! - **Writes** ([`Bucket::put_if_absent`]) HEAD first (an object another host uploaded is
//!   not sent again), then put with `PutMode::Create` (`If-None-Match: *`). An existing object
//!   (two hosts writing one key) is success when its size is the chunk's size; a different
//!   size (a truncated object left by a broken server) is overwritten, logged. A server
//!   answering 501 to the conditional put is remembered and from then on gets HEAD-then-PUT
//!   (racy only between two writers of identical bytes, which is harmless since keys are
//!   content addresses). Garage 2.x ignores If-None-Match (it overwrites); the HEAD keeps
//!   that harmless too.

use crate::config::S3Config;
use crate::error::RemoteError;
use bytes::Bytes;
use futures::TryStreamExt;
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ChunkKey, ChunkView, FormatError, Verify};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Name of the readable namespace description beside the chunks.
pub const NAMESPACE_JSON: &str = "namespace.json";

/// Counters of the remote tier (monotonic since open).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub fetches: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub negative_hits: AtomicU64,
    pub coalesced: AtomicU64,
    pub corrupt: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub uploads: AtomicU64,
    pub already_present: AtomicU64,
    pub upload_errors: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub conditional_fallbacks: AtomicU64,
    pub overwritten: AtomicU64,
    pub heads: AtomicU64,
}

/// A snapshot of the remote tier's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Remote GETs started (after the negative cache and single-flight).
    pub fetches: u64,
    pub hits: u64,
    pub misses: u64,
    /// Misses answered by the negative cache without a request.
    pub negative_hits: u64,
    /// Callers that waited for another caller's fetch of the same key.
    pub coalesced: u64,
    /// Objects that failed verification (never served).
    pub corrupt: u64,
    pub fetch_errors: u64,
    pub bytes_fetched: u64,
    /// Objects this process created.
    pub uploads: u64,
    /// Uploads that found the object already there (another host wrote it).
    pub already_present: u64,
    pub upload_errors: u64,
    pub bytes_uploaded: u64,
    /// Conditional puts that fell back to HEAD-then-PUT (server lacks If-None-Match).
    pub conditional_fallbacks: u64,
    /// Existing objects of the wrong size that were replaced.
    pub overwritten: u64,
    /// HEAD requests (prefix lookups, put-if-absent checks).
    pub heads: u64,
}

impl Counters {
    pub fn snapshot(&self) -> RemoteStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteStats {
            fetches: g(&self.fetches),
            hits: g(&self.hits),
            misses: g(&self.misses),
            negative_hits: g(&self.negative_hits),
            coalesced: g(&self.coalesced),
            corrupt: g(&self.corrupt),
            fetch_errors: g(&self.fetch_errors),
            bytes_fetched: g(&self.bytes_fetched),
            uploads: g(&self.uploads),
            already_present: g(&self.already_present),
            upload_errors: g(&self.upload_errors),
            bytes_uploaded: g(&self.bytes_uploaded),
            conditional_fallbacks: g(&self.conditional_fallbacks),
            overwritten: g(&self.overwritten),
            heads: g(&self.heads),
        }
    }
}

pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// What [`Bucket::put_if_absent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The object was already there with the right size (idempotent success).
    AlreadyPresent,
    /// An object of the wrong size was there and was replaced.
    Replaced,
}

/// The bucket, the key prefix, and the state shared by every request.
#[derive(Debug)]
pub(crate) struct Bucket {
    pub cfg: S3Config,
    pub store: Arc<dyn ObjectStore>,
    pub counters: Counters,
    /// False once the server answered 501 to a conditional put.
    conditional: AtomicBool,
    /// Read failures make later reads fail fast until this instant.
    down_until: Mutex<Option<(Instant, String)>>,
    /// Namespaces whose namespace.json this process has already ensured.
    ns_written: Mutex<HashSet<String>>,
}

impl Bucket {
    pub fn new(cfg: S3Config, store: Arc<dyn ObjectStore>) -> Bucket {
        Bucket {
            conditional: AtomicBool::new(cfg.conditional_put),
            cfg,
            store,
            counters: Counters::default(),
            down_until: Mutex::new(None),
            ns_written: Mutex::new(HashSet::new()),
        }
    }

    fn join(&self, rest: &str) -> Path {
        if self.cfg.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.cfg.prefix))
        }
    }

    /// `<prefix>/<ns_dir>/<key>.kvc`
    pub fn chunk_path(&self, ns_dir: &str, key: &ChunkKey) -> Path {
        self.join(&format!("{ns_dir}/{}", key.file_name()))
    }

    /// `<prefix>/<ns_dir>/namespace.json`
    pub fn namespace_json_path(&self, ns_dir: &str) -> Path {
        self.join(&format!("{ns_dir}/{NAMESPACE_JSON}"))
    }

    /// `<prefix>/<ns_dir>/`
    pub fn namespace_path(&self, ns_dir: &str) -> Path {
        self.join(ns_dir)
    }

    pub fn root_path(&self) -> Option<Path> {
        (!self.cfg.prefix.is_empty()).then(|| Path::from(self.cfg.prefix.as_str()))
    }

    /// Err(Unavailable) while a recent read failure is fresh.
    pub fn check_outage(&self) -> Result<(), RemoteError> {
        let mut g = self.down_until.lock().unwrap();
        if let Some((until, why)) = g.as_ref() {
            if Instant::now() < *until {
                return Err(RemoteError::Unavailable(why.clone()));
            }
            *g = None;
        }
        Ok(())
    }

    fn note_outage(&self, why: &RemoteError) {
        if self.cfg.outage_backoff.is_zero() {
            return;
        }
        *self.down_until.lock().unwrap() =
            Some((Instant::now() + self.cfg.outage_backoff, why.to_string()));
    }

    /// GETs and fully verifies one chunk. `Ok(None)`: absent, or present but invalid.
    pub async fn get_verified(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
    ) -> Result<Option<Bytes>, RemoteError> {
        self.check_outage()?;
        let path = self.chunk_path(ns_dir, key);
        bump(&self.counters.fetches, 1);
        let fetched = async { self.store.get(&path).await?.bytes().await }.await;
        let bytes = match fetched {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                bump(&self.counters.misses, 1);
                return Ok(None);
            }
            Err(e) => {
                bump(&self.counters.fetch_errors, 1);
                let e = RemoteError::Store(e);
                tracing::warn!(%path, error = %e, "remote fetch failed");
                self.note_outage(&e);
                return Err(e);
            }
        };
        bump(&self.counters.bytes_fetched, bytes.len() as u64);
        // Verification is a pass of blake3 over the object: keep it off the async workers.
        let (checked, bytes) = {
            let ns_dir = ns_dir.to_string();
            let key = *key;
            tokio::task::spawn_blocking(move || (verify_object(&bytes, &ns_dir, &key), bytes))
                .await
                .expect("verification task panicked")
        };
        match checked {
            Ok(()) => {
                bump(&self.counters.hits, 1);
                Ok(Some(bytes))
            }
            Err(source) => {
                bump(&self.counters.corrupt, 1);
                bump(&self.counters.misses, 1);
                tracing::warn!(%path, error = %source, len = bytes.len(),
                    "remote object failed verification; treating it as a miss");
                Ok(None)
            }
        }
    }

    /// HEAD: the object's size, or None when absent.
    pub async fn head(&self, path: &Path) -> Result<Option<u64>, RemoteError> {
        bump(&self.counters.heads, 1);
        match self.store.head(path).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Uploads `bytes` to `path` unless an object of that size is already there.
    pub async fn put_if_absent(
        &self,
        path: &Path,
        bytes: Bytes,
    ) -> Result<PutOutcome, RemoteError> {
        let len = bytes.len() as u64;
        let r = self.put_if_absent_inner(path, bytes).await;
        match &r {
            Ok(PutOutcome::Created | PutOutcome::Replaced) => {
                bump(&self.counters.uploads, 1);
                bump(&self.counters.bytes_uploaded, len);
            }
            Ok(PutOutcome::AlreadyPresent) => bump(&self.counters.already_present, 1),
            Err(_) => bump(&self.counters.upload_errors, 1),
        }
        r
    }

    async fn put_if_absent_inner(
        &self,
        path: &Path,
        bytes: Bytes,
    ) -> Result<PutOutcome, RemoteError> {
        let len = bytes.len() as u64;
        // HEAD first: when another host already uploaded the chunk (the common case for a
        // shared prefix) no payload is sent at all, and servers that ignore If-None-Match
        // (Garage 2.x) still report an existing object as such.
        if self.head(path).await?.is_some() {
            return self.check_existing(path, bytes, len).await;
        }
        if self.conditional.load(Ordering::Relaxed) {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(path, PutPayload::from(bytes.clone()), opts)
                .await
            {
                Ok(_) => return Ok(PutOutcome::Created),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return self.check_existing(path, bytes, len).await;
                }
                Err(e) if is_not_implemented(&e) => {
                    self.conditional.store(false, Ordering::Relaxed);
                    tracing::warn!(%path, error = %e,
                        "server lacks conditional put (If-None-Match); falling back to HEAD-then-PUT");
                }
                Err(e) => return Err(e.into()),
            }
        }
        bump(&self.counters.conditional_fallbacks, 1);
        self.store.put(path, PutPayload::from(bytes)).await?;
        Ok(PutOutcome::Created)
    }

    /// An object exists at `path`: fine when its size is right, replaced otherwise.
    async fn check_existing(
        &self,
        path: &Path,
        bytes: Bytes,
        len: u64,
    ) -> Result<PutOutcome, RemoteError> {
        match self.head(path).await? {
            Some(size) if size == len => Ok(PutOutcome::AlreadyPresent),
            found => {
                tracing::warn!(%path, ?found, expected = len,
                    "existing remote object has the wrong size; replacing it");
                self.store.put(path, PutPayload::from(bytes)).await?;
                bump(&self.counters.overwritten, 1);
                Ok(PutOutcome::Replaced)
            }
        }
    }

    /// Writes `<ns_dir>/namespace.json` once (put-if-absent; once per process per namespace).
    pub async fn ensure_namespace_json(
        &self,
        ns_dir: &str,
        json: Bytes,
    ) -> Result<(), RemoteError> {
        if self.ns_written.lock().unwrap().contains(ns_dir) {
            return Ok(());
        }
        let path = self.namespace_json_path(ns_dir);
        if self.head(&path).await?.is_none() {
            let opts = PutOptions {
                mode: if self.conditional.load(Ordering::Relaxed) {
                    PutMode::Create
                } else {
                    PutMode::Overwrite
                },
                ..Default::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from(json.clone()), opts)
                .await
            {
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) if is_not_implemented(&e) => {
                    self.conditional.store(false, Ordering::Relaxed);
                    self.store.put(&path, PutPayload::from(json)).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.ns_written.lock().unwrap().insert(ns_dir.to_string());
        Ok(())
    }

    /// Namespace directories present in the bucket.
    pub async fn list_namespaces(&self) -> Result<Vec<String>, RemoteError> {
        let r = self
            .store
            .list_with_delimiter(self.root_path().as_ref())
            .await?;
        let mut out: Vec<String> = r
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| validate_namespace_dir(n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Chunks of one namespace in the bucket, with their sizes, sorted by key.
    pub async fn list_chunks(&self, ns_dir: &str) -> Result<Vec<(ChunkKey, u64)>, RemoteError> {
        validate_namespace_dir(ns_dir).map_err(RemoteError::Name)?;
        let prefix = self.namespace_path(ns_dir);
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut out: Vec<(ChunkKey, u64)> = metas
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                ChunkKey::from_file_name(name).ok().map(|k| (k, m.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

/// Checks that `bytes` is a whole, valid chunk named `key` in namespace dir `ns_dir`.
pub fn verify_object(bytes: &[u8], ns_dir: &str, key: &ChunkKey) -> Result<(), FormatError> {
    let view = ChunkView::parse(bytes, Verify::Full)?;
    check_identity(&view.header, ns_dir, key)
}

/// Checks that a (valid) header is the chunk named `key` in namespace dir `ns_dir`.
pub(crate) use kvfs_loader::check_identity;

/// True for an error that means the server does not implement the request (HTTP 501).
fn is_not_implemented(e: &object_store::Error) -> bool {
    if matches!(e, object_store::Error::NotImplemented { .. }) {
        return true;
    }
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if s.contains("501") || s.contains("NotImplemented") || s.contains("Not Implemented") {
            return true;
        }
        cur = err.source();
    }
    false
}
