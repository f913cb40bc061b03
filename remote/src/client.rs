//! The bucket side of the remote tier: object names, verified reads, verified writes,
//! read-repair.
//!
//! Objects live at `<prefix>/<namespace dir>/<key>.kvc`, with a readable
//! `<prefix>/<namespace dir>/namespace.json` beside them. Everything here is async and runs
//! on the tier's own runtime (see [`crate::Remote`], which bridges to the synchronous store).
//! Every request goes through one wrapper that applies its per-operation timeout (LIST/HEAD,
//! first byte, body; see [`crate::config`]) and turns failures into errors a user can act on
//! ([`crate::error::classify`]): a missing bucket and refused credentials are reported as
//! such on every path. A 404 on a chunk is only a miss once the bucket is known to exist
//! (one LIST confirms it, once per process), so a misconfigured bucket never looks like a
//! cold cache.
//!
//! - **Reads** ([`Bucket::get_verified`]) fully verify a fetched object (header checksum,
//!   shape, key recomputed from its tokens, every payload digest) and check it is the object
//!   its name claims (key == name, namespace id suffix == the namespace dir). Anything else is
//!   counted in [`RemoteStats::corrupt`], logged with the key and the cause, remembered as
//!   damaged (with the ETag it had) and reported as a miss: a damaged object is never served.
//! - **Writes of a verified chunk** ([`Bucket::upload_verified`]) carry the chunk's payload
//!   digest as object metadata (`x-amz-meta-kvfs-payload-digest`). HEAD first (an object
//!   another host uploaded is not sent again), then put with `PutMode::Create`
//!   (`If-None-Match: *`). An existing object is accepted without a download when its size
//!   and digest metadata match; otherwise (wrong size, no or another digest, or an object this
//!   process found damaged) it is read back and verified, and replaced only if it fails: two
//!   hosts holding different valid bytes for one key (engines are not bit-exact) therefore
//!   agree instead of overwriting each other.
//! - **Read-repair** ([`Bucket::repair`]) is conditional: the object is fetched and verified
//!   again right before the overwrite, and the overwrite carries `If-Match` with the ETag of
//!   the damaged object just read, so a good upload that lands in between is never replaced
//!   (412: re-check). A server without `If-Match` (501) gets the verified re-check alone.
//! - **Raw writes** ([`Bucket::put_if_absent`], bytes that are not a valid chunk: tests and
//!   tools) keep the size-only rule: an existing object of another size is replaced.
//!
//! A server answering 501 to a conditional put is remembered and from then on gets
//! HEAD-then-PUT (racy only between two writers of one key, harmless since either object is
//! valid). Garage 2.x ignores If-None-Match (it overwrites); the HEAD keeps that harmless too.
//! 501 is recognised by the HTTP status ([`crate::error::is_not_implemented`]), never by
//! searching the error text (which holds the URL and so the key).

use crate::config::S3Config;
use crate::error::{RemoteError, classify, is_not_implemented};
use crate::metrics::{RequestMetrics, S3Op};
use bytes::Bytes;
use kvfs_loader::{ChunkKey, ChunkView, FormatError, Verify};
use object_store::list::PaginatedListStore;
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, ObjectStore, PutMode, PutOptions,
    PutPayload, UpdateVersion,
};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Name of the readable namespace description beside the chunks.
pub use kvfs_loader::identity::NAMESPACE_JSON;

/// Object metadata key (`x-amz-meta-…`) holding the chunk's payload digest, in hex.
pub const DIGEST_METADATA: &str = "kvfs-payload-digest";

/// Object metadata key holding the payload digest of the raw chunk an object was coded from
/// by the remote codec, in hex: lets `sync push` see that a coded object holds its local raw
/// chunk without encoding the chunk again.
pub const RAW_DIGEST_METADATA: &str = "kvfs-raw-payload-digest";

/// The digests an upload records as object metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ObjectDigests {
    /// The payload digest of the bytes stored.
    pub stored: [u8; 32],
    /// The raw chunk's payload digest, when the stored bytes were coded from it.
    pub raw: Option<[u8; 32]>,
}

impl ObjectDigests {
    /// An object stored as the chunk it is.
    pub fn stored(digest: [u8; 32]) -> ObjectDigests {
        ObjectDigests {
            stored: digest,
            raw: None,
        }
    }
}

/// What the remote tier needs of an object store: objects, and raw paginated listings (so a
/// listing can step over a name it cannot parse instead of failing whole; see `listing`).
pub trait S3Store: ObjectStore + PaginatedListStore {}
impl<T: ObjectStore + PaginatedListStore> S3Store for T {}

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
    pub repaired: AtomicU64,
    pub repair_races: AtomicU64,
    pub skipped_names: AtomicU64,
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
    /// Objects that failed verification (never served; remembered as damaged).
    pub corrupt: u64,
    pub fetch_errors: u64,
    pub bytes_fetched: u64,
    /// Objects this process created or replaced.
    pub uploads: u64,
    /// Uploads that found the object already there (another host wrote it).
    pub already_present: u64,
    pub upload_errors: u64,
    pub bytes_uploaded: u64,
    /// Conditional puts that fell back to HEAD-then-PUT (server lacks If-None-Match).
    pub conditional_fallbacks: u64,
    /// Existing objects that were replaced (wrong size on a raw write, or damaged).
    pub overwritten: u64,
    /// HEAD requests (prefix lookups, put-if-absent checks).
    pub heads: u64,
    /// Damaged objects replaced from a verified local copy (read-repair).
    pub repaired: u64,
    /// Repairs that found the object already good again (another host repaired it first).
    pub repair_races: u64,
    /// Listed names skipped because they are not valid object names.
    pub skipped_names: u64,
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
            repaired: g(&self.repaired),
            repair_races: g(&self.repair_races),
            skipped_names: g(&self.skipped_names),
        }
    }
}

pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The object was already there and good (idempotent success).
    AlreadyPresent,
    /// A wrong or damaged object was there and was replaced.
    Replaced,
}

/// What a HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub size: u64,
    pub e_tag: Option<String>,
    /// The payload digest the uploader recorded, when it did.
    pub digest: Option<[u8; 32]>,
    /// The raw chunk's payload digest, when the remote codec coded the object from it.
    pub raw_digest: Option<[u8; 32]>,
}

impl Head {
    /// Whether the uploader recorded `payload_digest` (a local chunk's) for this object, as
    /// the object's own digest or as the raw chunk it was coded from.
    pub fn records(&self, payload_digest: &[u8; 32]) -> bool {
        self.digest.as_ref() == Some(payload_digest)
            || self.raw_digest.as_ref() == Some(payload_digest)
    }
}

/// A damaged object this process saw: why it failed verification.
#[derive(Debug, Clone)]
pub(crate) struct Damage {
    pub cause: String,
}

/// The bucket, the key prefix, and the state shared by every request.
pub(crate) struct Bucket {
    pub cfg: S3Config,
    pub store: Arc<dyn S3Store>,
    pub counters: Counters,
    /// S3 requests by operation and outcome, with latency (see [`crate::metrics`]).
    pub metrics: RequestMetrics,
    /// False once the server answered 501 to a conditional put.
    conditional: AtomicBool,
    /// True once a LIST showed that the bucket exists (a 404 is then a miss).
    bucket_seen: AtomicBool,
    /// Read failures make later reads fail fast until this instant.
    down_until: Mutex<Option<(Instant, String)>>,
    /// Namespaces whose namespace.json this process has already ensured.
    ns_written: Mutex<HashSet<String>>,
    /// Objects found damaged and not repaired yet (by object path).
    damaged: Mutex<HashMap<String, Damage>>,
    endpoint: String,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("url", &self.cfg.url())
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

pub(crate) fn hex(d: &[u8; 32]) -> String {
    ChunkKey(*d).to_hex()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    ChunkKey::from_hex(s.trim()).ok().map(|k| k.0)
}

impl Bucket {
    pub fn new(cfg: S3Config, store: Arc<dyn S3Store>) -> Bucket {
        Bucket {
            conditional: AtomicBool::new(cfg.conditional_put),
            endpoint: cfg.endpoint_display(),
            cfg,
            store,
            counters: Counters::default(),
            metrics: RequestMetrics::default(),
            bucket_seen: AtomicBool::new(false),
            down_until: Mutex::new(None),
            ns_written: Mutex::new(HashSet::new()),
            damaged: Mutex::new(HashMap::new()),
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

    /// The raw listing prefix of the bucket's root (`<prefix>/`, or empty).
    pub fn root_prefix(&self) -> String {
        if self.cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.cfg.prefix)
        }
    }

    /// The raw listing prefix of one namespace (`<prefix>/<ns_dir>/`).
    pub fn namespace_prefix(&self, ns_dir: &str) -> String {
        format!("{}{ns_dir}/", self.root_prefix())
    }

    /// The error a user can act on for a failed request.
    pub fn classify(&self, e: object_store::Error) -> RemoteError {
        classify(e, &self.cfg.bucket, &self.endpoint)
    }

    /// Runs one request under `limit`: a stall becomes [`RemoteError::Timeout`], a failure
    /// a classified error.
    pub async fn timed<T>(
        &self,
        op: &'static str,
        limit: Duration,
        key: &'static str,
        f: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, RemoteError> {
        match self
            .metrics
            .observe(S3Op::of(op), tokio::time::timeout(limit, f))
            .await
        {
            Ok(r) => r.map_err(|e| self.classify(e)),
            Err(_) => Err(RemoteError::Timeout {
                op,
                after: limit,
                key,
            }),
        }
    }

    /// Like [`Bucket::timed`], keeping `NotFound` apart: `Ok(None)` once the bucket is known
    /// to exist; a missing bucket is [`RemoteError::NoSuchBucket`].
    async fn timed_found<T>(
        &self,
        op: &'static str,
        limit: Duration,
        key: &'static str,
        f: impl Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>, RemoteError> {
        match self
            .metrics
            .observe(S3Op::of(op), tokio::time::timeout(limit, f))
            .await
        {
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(object_store::Error::NotFound { .. })) => {
                self.confirm_bucket().await?;
                Ok(None)
            }
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => Err(RemoteError::Timeout {
                op,
                after: limit,
                key,
            }),
        }
    }

    /// One LIST of at most one key, once per process: a HEAD or GET of a missing bucket
    /// answers 404 like a missing object; a LIST says `NoSuchBucket`.
    pub async fn confirm_bucket(&self) -> Result<(), RemoteError> {
        if self.bucket_seen.load(Ordering::Relaxed) {
            return Ok(());
        }
        let opts = object_store::list::PaginatedListOptions {
            max_keys: Some(1),
            ..Default::default()
        };
        let prefix = self.root_prefix();
        let r = self
            .metrics
            .observe(
                S3Op::List,
                tokio::time::timeout(
                    self.cfg.list_timeout,
                    self.store
                        .list_paginated((!prefix.is_empty()).then_some(prefix.as_str()), opts),
                ),
            )
            .await;
        match r {
            // Names that do not parse still prove the bucket is there.
            Ok(Ok(_)) | Ok(Err(object_store::Error::InvalidPath { .. })) => {
                self.bucket_seen.store(true, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(self.classify(e)),
            Err(_) => Err(RemoteError::Timeout {
                op: "LIST",
                after: self.cfg.list_timeout,
                key: "list_timeout_s",
            }),
        }
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
        if self.cfg.outage_backoff.is_zero() || why.is_config() {
            return;
        }
        *self.down_until.lock().unwrap() =
            Some((Instant::now() + self.cfg.outage_backoff, why.to_string()));
    }

    /// GET of a whole object: its bytes and ETag, or None when absent.
    pub async fn get_object(
        &self,
        path: &Path,
    ) -> Result<Option<(Bytes, Option<String>)>, RemoteError> {
        let Some(r) = self
            .timed_found(
                "GET",
                self.cfg.first_byte_timeout,
                "first_byte_timeout_s",
                self.store.get_opts(path, GetOptions::default()),
            )
            .await?
        else {
            return Ok(None);
        };
        let e_tag = r.meta.e_tag.clone();
        let bytes = self
            .timed(
                "GET body",
                self.cfg.request_timeout,
                "body_timeout_s",
                r.bytes(),
            )
            .await?;
        Ok(Some((bytes, e_tag)))
    }

    /// Remembers a damaged object (logged with its key and cause) until it is repaired.
    pub fn note_damage(&self, path: &Path, cause: &str) {
        tracing::warn!(object = %path, cause,
            "remote object is damaged; treating it as a miss until a host with a verified copy repairs it");
        self.damaged.lock().unwrap().insert(
            path.to_string(),
            Damage {
                cause: cause.to_string(),
            },
        );
    }

    fn forget_damage(&self, path: &Path) {
        self.damaged.lock().unwrap().remove(path.as_ref());
    }

    /// The damage this process recorded for `path`, if any.
    pub fn damage(&self, path: &Path) -> Option<Damage> {
        self.damaged.lock().unwrap().get(path.as_ref()).cloned()
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
        let (bytes, _) = match self.get_object(&path).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                bump(&self.counters.misses, 1);
                return Ok(None);
            }
            Err(e) => {
                bump(&self.counters.fetch_errors, 1);
                tracing::warn!(%path, error = %e, "remote fetch failed");
                self.note_outage(&e);
                return Err(e);
            }
        };
        bump(&self.counters.bytes_fetched, bytes.len() as u64);
        let (ns, k, b) = (ns_dir.to_string(), *key, bytes.clone());
        let checked = tokio::task::spawn_blocking(move || {
            verify_object(&b, &ns, &k)?;
            crate::codec::decode_download(b)
        })
        .await
        .expect("verification task panicked");
        match checked {
            Ok(local) => {
                bump(&self.counters.hits, 1);
                Ok(Some(local))
            }
            Err(source) => {
                bump(&self.counters.corrupt, 1);
                bump(&self.counters.misses, 1);
                self.note_damage(&path, &source.to_string());
                Ok(None)
            }
        }
    }

    /// Full verification is a pass of blake3 over the object: keep it off the async workers.
    pub(crate) async fn verify_off_thread(
        &self,
        bytes: Bytes,
        ns_dir: &str,
        key: &ChunkKey,
    ) -> Result<(), FormatError> {
        let ns_dir = ns_dir.to_string();
        let key = *key;
        tokio::task::spawn_blocking(move || verify_object(&bytes, &ns_dir, &key))
            .await
            .expect("verification task panicked")
    }

    /// HEAD: the object's size, or None when absent.
    pub async fn head(&self, path: &Path) -> Result<Option<u64>, RemoteError> {
        Ok(self.head_meta(path).await?.map(|h| h.size))
    }

    /// HEAD with the object's ETag and digest metadata, or None when absent.
    pub async fn head_meta(&self, path: &Path) -> Result<Option<Head>, RemoteError> {
        bump(&self.counters.heads, 1);
        let opts = GetOptions {
            head: true,
            ..Default::default()
        };
        let r = self
            .timed_found(
                "HEAD",
                self.cfg.list_timeout,
                "list_timeout_s",
                self.store.get_opts(path, opts),
            )
            .await?;
        Ok(r.map(|r| {
            let digest_of = |name: &'static str| {
                r.attributes
                    .get(&Attribute::Metadata(name.into()))
                    .and_then(|v| unhex(v.as_ref()))
            };
            Head {
                size: r.meta.size,
                e_tag: r.meta.e_tag.clone(),
                digest: digest_of(DIGEST_METADATA),
                raw_digest: digest_of(RAW_DIGEST_METADATA),
            }
        }))
    }

    /// One PUT under the first-byte + body timeout, with the digests as metadata when known.
    async fn put(
        &self,
        path: &Path,
        bytes: Bytes,
        mode: PutMode,
        digests: Option<&ObjectDigests>,
    ) -> object_store::Result<()> {
        let mut attributes = Attributes::new();
        if let Some(d) = digests {
            attributes.insert(
                Attribute::Metadata(DIGEST_METADATA.into()),
                AttributeValue::from(hex(&d.stored)),
            );
            if let Some(raw) = &d.raw {
                attributes.insert(
                    Attribute::Metadata(RAW_DIGEST_METADATA.into()),
                    AttributeValue::from(hex(raw)),
                );
            }
        }
        let opts = PutOptions {
            mode,
            attributes,
            ..Default::default()
        };
        let limit = self.cfg.first_byte_timeout + self.cfg.request_timeout;
        let put = self.store.put_opts(path, PutPayload::from(bytes), opts);
        match self
            .metrics
            .observe(S3Op::Put, tokio::time::timeout(limit, put))
            .await
        {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(object_store::Error::Generic {
                store: "S3",
                source: format!(
                    "PUT got no answer within {limit:?} (first_byte_timeout_s + body_timeout_s)"
                )
                .into(),
            }),
        }
    }

    /// Creates `path` unless it exists: `Ok(true)` created, `Ok(false)` it exists.
    async fn create(
        &self,
        path: &Path,
        bytes: Bytes,
        digests: Option<&ObjectDigests>,
    ) -> Result<bool, RemoteError> {
        if self.conditional.load(Ordering::Relaxed) {
            match self
                .put(path, bytes.clone(), PutMode::Create, digests)
                .await
            {
                Ok(()) => return Ok(true),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => return Ok(false),
                Err(e) if is_not_implemented(&e) => {
                    self.conditional.store(false, Ordering::Relaxed);
                    tracing::warn!(%path, error = %e,
                        "server lacks conditional put (If-None-Match); falling back to HEAD-then-PUT");
                }
                Err(e) => return Err(self.classify(e)),
            }
        }
        bump(&self.counters.conditional_fallbacks, 1);
        self.put(path, bytes, PutMode::Overwrite, digests)
            .await
            .map_err(|e| self.classify(e))?;
        Ok(true)
    }

    fn count_upload(&self, r: &Result<PutOutcome, RemoteError>, len: u64) {
        match r {
            Ok(PutOutcome::Created | PutOutcome::Replaced) => {
                bump(&self.counters.uploads, 1);
                bump(&self.counters.bytes_uploaded, len);
            }
            Ok(PutOutcome::AlreadyPresent) => bump(&self.counters.already_present, 1),
            Err(_) => bump(&self.counters.upload_errors, 1),
        }
    }

    /// Raw upload of bytes that need not be a valid chunk: put-if-absent, and an existing
    /// object of another size is replaced (see the module docs).
    pub async fn put_if_absent(
        &self,
        path: &Path,
        bytes: Bytes,
    ) -> Result<PutOutcome, RemoteError> {
        let len = bytes.len() as u64;
        let r = async {
            if self.head(path).await?.is_none() && self.create(path, bytes.clone(), None).await? {
                return Ok(PutOutcome::Created);
            }
            match self.head(path).await? {
                Some(size) if size == len => Ok(PutOutcome::AlreadyPresent),
                found => {
                    tracing::warn!(%path, ?found, expected = len,
                        "existing remote object has the wrong size; replacing it");
                    self.put(path, bytes, PutMode::Overwrite, None)
                        .await
                        .map_err(|e| self.classify(e))?;
                    bump(&self.counters.overwritten, 1);
                    Ok(PutOutcome::Replaced)
                }
            }
        }
        .await;
        self.count_upload(&r, len);
        r
    }

    /// Uploads a chunk this host verified in full (`digest` is its payload digest), repairing
    /// a damaged object in its place (see the module docs).
    pub async fn upload_verified(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        bytes: Bytes,
        digest: [u8; 32],
    ) -> Result<PutOutcome, RemoteError> {
        let path = self.chunk_path(ns_dir, key);
        let codec = self.cfg.codec;
        let (bytes, digests) = tokio::task::spawn_blocking(move || {
            crate::codec::encode_for_upload(codec, bytes, digest)
        })
        .await
        .expect("encoding task panicked")
        .map_err(|source| RemoteError::Corrupt {
            path: path.to_string(),
            source,
        })?;
        let len = bytes.len() as u64;
        let r = async {
            if self.damage(&path).is_none() {
                let found = match self.head_meta(&path).await? {
                    None if self.create(&path, bytes.clone(), Some(&digests)).await? => {
                        return Ok(PutOutcome::Created);
                    }
                    // Created by another writer meanwhile.
                    None => self.head_meta(&path).await?,
                    found => found,
                };
                if let Some(h) = found
                    && h.size == len
                    && h.digest == Some(digests.stored)
                {
                    return Ok(PutOutcome::AlreadyPresent);
                }
            }
            // Wrong size, no or another digest, or known damaged: read it back, verify it,
            // and replace it only if it fails.
            self.repair_object(ns_dir, key, bytes.clone(), digests)
                .await
        }
        .await;
        self.count_upload(&r, len);
        r
    }

    /// Replaces the object at `ns_dir/key` with `bytes` (verified by the caller) if, read
    /// again now, it is absent or fails verification. Conditional on the ETag just read.
    pub async fn repair(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        bytes: Bytes,
        digest: [u8; 32],
    ) -> Result<PutOutcome, RemoteError> {
        self.repair_object(ns_dir, key, bytes, ObjectDigests::stored(digest))
            .await
    }

    /// [`Self::repair`] with the digests to record.
    async fn repair_object(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        bytes: Bytes,
        digests: ObjectDigests,
    ) -> Result<PutOutcome, RemoteError> {
        let path = self.chunk_path(ns_dir, key);
        for _ in 0..4 {
            let Some((current, e_tag)) = self.get_object(&path).await? else {
                if self.create(&path, bytes.clone(), Some(&digests)).await? {
                    self.forget_damage(&path);
                    return Ok(PutOutcome::Created);
                }
                continue;
            };
            let cause = match self.verify_off_thread(current, ns_dir, key).await {
                Ok(()) => {
                    if let Some(d) = self.damage(&path) {
                        bump(&self.counters.repair_races, 1);
                        tracing::info!(%path, was = d.cause,
                            "damaged remote object was already repaired by another host");
                    }
                    self.forget_damage(&path);
                    return Ok(PutOutcome::AlreadyPresent);
                }
                Err(e) => e.to_string(),
            };
            let mode = match (&e_tag, self.conditional.load(Ordering::Relaxed)) {
                (Some(t), true) => PutMode::Update(UpdateVersion {
                    e_tag: Some(t.clone()),
                    version: None,
                }),
                _ => PutMode::Overwrite,
            };
            match self.put(&path, bytes.clone(), mode, Some(&digests)).await {
                Ok(()) => {}
                // Someone replaced it since the read: look again.
                Err(object_store::Error::Precondition { .. }) => continue,
                Err(e) if is_not_implemented(&e) => {
                    // No If-Match: the verified re-check just done is the guard.
                    self.put(&path, bytes.clone(), PutMode::Overwrite, Some(&digests))
                        .await
                        .map_err(|e| self.classify(e))?;
                }
                Err(e) => return Err(self.classify(e)),
            }
            bump(&self.counters.repaired, 1);
            bump(&self.counters.overwritten, 1);
            self.forget_damage(&path);
            tracing::warn!(%path, cause, "repaired a damaged remote object from a verified local copy");
            return Ok(PutOutcome::Replaced);
        }
        Err(RemoteError::Unavailable(format!(
            "{path} kept changing while it was being repaired"
        )))
    }

    /// Makes sure `<ns_dir>/namespace.json` in the bucket is valid for `ns_dir` (once per
    /// process per namespace): written when absent, replaced (with a warning) when it does
    /// not parse or describes another namespace. `json` must already be checked.
    pub async fn ensure_namespace_json(
        &self,
        ns_dir: &str,
        json: Bytes,
    ) -> Result<(), RemoteError> {
        if self.ns_written.lock().unwrap().contains(ns_dir) {
            return Ok(());
        }
        let path = self.namespace_json_path(ns_dir);
        match self.get_object(&path).await? {
            None => {
                self.create(&path, json, None).await?;
            }
            Some((found, e_tag)) => {
                if let Err(e) = crate::nsjson::check(&found, ns_dir, None) {
                    tracing::warn!(object = %path, error = %e,
                        "namespace.json in the bucket is invalid; replacing it with a checked one");
                    let mode = match e_tag {
                        Some(t) if self.conditional.load(Ordering::Relaxed) => {
                            PutMode::Update(UpdateVersion {
                                e_tag: Some(t),
                                version: None,
                            })
                        }
                        _ => PutMode::Overwrite,
                    };
                    match self.put(&path, json.clone(), mode, None).await {
                        Ok(()) | Err(object_store::Error::Precondition { .. }) => {}
                        Err(e) if is_not_implemented(&e) => self
                            .put(&path, json, PutMode::Overwrite, None)
                            .await
                            .map_err(|e| self.classify(e))?,
                        Err(e) => return Err(self.classify(e)),
                    }
                }
            }
        }
        self.ns_written.lock().unwrap().insert(ns_dir.to_string());
        Ok(())
    }

    /// The bucket's `namespace.json` of `ns_dir`, if any (unchecked).
    pub async fn namespace_json(&self, ns_dir: &str) -> Result<Option<Bytes>, RemoteError> {
        let path = self.namespace_json_path(ns_dir);
        Ok(self.get_object(&path).await?.map(|(b, _)| b))
    }
}

/// Checks that `bytes` is a whole, valid chunk named `key` in namespace dir `ns_dir`.
pub fn verify_object(bytes: &[u8], ns_dir: &str, key: &ChunkKey) -> Result<(), FormatError> {
    let view = ChunkView::parse(bytes, Verify::Full)?;
    check_identity(&view.header, ns_dir, key)
}

/// Checks that a (valid) header is the chunk named `key` in namespace dir `ns_dir`.
pub(crate) use kvfs_loader::check_identity;
