//! The tiered chunk store: memory over local disk, with a seam for a remote tier.
//!
//! [`Store`] is the one entry point the CLI, the mount daemon and tests use. It is a cheap
//! `Clone` (an `Arc` inside) and is `Send + Sync`.
//!
//! ## Tiers and reads
//! Reads fall through memory ([`memory`], moka weighted by bytes) → disk ([`disk`], the
//! `<root>/<ns>/<key[0..2]>/<key>.kvc` directory) → the optional [`RemoteTier`], and fill the
//! faster tiers on the way back. Every read checks the chunk header (checksum, shape, the key
//! recomputed from namespace, parent, salt and tokens, the file size) and that the chunk is
//! the one asked for. The payload digest is checked whenever bytes *enter* a tier (`put`, a
//! disk → memory promotion, a remote fetch) and, with `verify_reads`, on every read from
//! disk. Bytes in the memory tier were verified on entry and are immutable, so a memory hit is
//! served as is. Payload verification runs one thread per core over disjoint layers.
//!
//! ## Writes
//! `put` parses the header first (a bad chunk is refused before any I/O), checks the chunk's
//! namespace id against the namespace directory's suffix, reserves space (evicting by
//! priority, then recency, or failing with [`StoreError::NoSpace`] before writing a byte),
//! then writes a temporary file while another thread verifies the payload, and hard-links it
//! into place through [`kvfs_loader::dir::commit_with`] only if verification passed. The link
//! never replaces a file, so two writers of one key (threads or processes) end with one valid
//! file, and a reader never sees a partial one. `ENOSPC` from the file system evicts and
//! retries once, then maps to `NoSpace`; nothing half-written stays visible.
//!
//! ## Several processes
//! Each process has its own index ([`disk`]); files are the shared truth. A miss stats the path
//! and adopts a chunk another process committed; a chunk another process evicted is dropped
//! from the index and reported as [`StoreError::NotFound`]. At open, temporary files of dead
//! writers (and any older than an hour) are removed.

mod admission;
pub mod disk;
mod memory;
pub mod remote_seam;

use crate::config::Limit;
use bytes::Bytes;
use disk::{DiskTier, Victim, now_nanos};
use kvfs_loader::dir::{self, Commit};
use kvfs_loader::format::{ChunkHeader, Verify, read_full_at};
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ChunkKey, FormatError, ModelSpec};
use memory::MemoryTier;
pub use remote_seam::RemoteTier;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Name of the directory under the root where `verify` moves bad files.
pub const QUARANTINE_DIR: &str = ".quarantine";
/// Name of the spec file written into a namespace directory.
pub const NAMESPACE_JSON: &str = "namespace.json";
/// Temporary files older than this are removed at open even if their writer may be alive.
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);
/// Below this size a payload is verified on the calling thread (spawning costs more).
const PARALLEL_VERIFY_MIN: usize = 4 << 20;

/// Whether a committed chunk is made durable before `put` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync the file and its directory: a chunk `put` returned for survives power loss.
    #[default]
    Always,
    /// Leave it to the kernel: a crash may lose recent chunks (never leaves a bad one
    /// visible that a read would accept: reads check the header and digest).
    Never,
}

/// Settings of a [`Store`]. [`StoreConfig::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// Bound on chunk bytes on disk.
    pub capacity: Limit,
    /// Memory tier bound in bytes; 0 disables the memory tier.
    pub memory_bytes: u64,
    /// Free space to leave on the file system; 0 leaves it to the file system.
    pub min_free: Limit,
    pub fsync: FsyncPolicy,
    /// Check the payload digest on every read from disk.
    pub verify_reads: bool,
    /// A slower tier consulted on a miss and told about commits.
    pub remote: Option<Arc<dyn RemoteTier>>,
}

impl StoreConfig {
    pub fn new(root: impl Into<PathBuf>) -> StoreConfig {
        let d = crate::config::Config::default();
        StoreConfig {
            root: root.into(),
            capacity: d.capacity,
            memory_bytes: d.memory.0,
            min_free: d.min_free,
            fsync: d.fsync,
            verify_reads: d.verify_reads,
            remote: None,
        }
    }
}

/// The tier a chunk was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Memory,
    Disk,
    Remote,
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        })
    }
}

/// Everything the store failed at, with the file or chunk it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {key} not found in namespace {ns_dir}")]
    NotFound { ns_dir: String, key: ChunkKey },
    #[error("{}: {source}", path.as_ref().map_or_else(|| "invalid chunk".to_string(), |p| format!("invalid chunk {}", p.display())))]
    Format {
        /// The file the bytes came from, when they came from one.
        path: Option<PathBuf>,
        #[source]
        source: FormatError,
    },
    #[error("`{0}` is not a valid namespace directory name (`<slug>-<16 hex>`)")]
    BadNamespace(String),
    #[error(
        "chunk of namespace {chunk_namespace} cannot be stored in namespace directory {ns_dir}"
    )]
    NamespaceMismatch {
        ns_dir: String,
        chunk_namespace: String,
    },
    #[error(
        "no space for a chunk of {needed} bytes: {available} bytes available within the cache's capacity and free-space bounds"
    )]
    NoSpace { needed: u64, available: u64 },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remote tier: {0}")]
    Remote(String),
}

impl From<FormatError> for StoreError {
    fn from(source: FormatError) -> Self {
        StoreError::Format { path: None, source }
    }
}

impl StoreError {
    fn format(path: &Path, e: FormatError) -> StoreError {
        match e {
            FormatError::Io(source) => StoreError::Io {
                path: path.to_path_buf(),
                source,
            },
            source => StoreError::Format {
                path: Some(path.to_path_buf()),
                source,
            },
        }
    }
    fn io(path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What `put` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    pub key: ChunkKey,
    pub len: u64,
    /// False when the chunk was already stored (by anyone); the existing file was kept.
    pub created: bool,
    pub path: PathBuf,
    /// Chunks evicted to make room.
    pub evicted: usize,
}

/// A chunk's header and where it is.
#[derive(Debug, Clone)]
pub struct ChunkStat {
    pub ns_dir: String,
    pub header: ChunkHeader,
    pub len: u64,
    /// The fastest tier holding it.
    pub tier: Tier,
    /// The disk tier file (absent if another process evicted it while memory still holds it).
    pub path: PathBuf,
    pub mtime: Option<SystemTime>,
    pub priority: u8,
}

/// One namespace directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    pub dir: String,
    pub chunks: u64,
    pub bytes: u64,
    /// Whether `namespace.json` (the model spec) is present.
    pub has_spec: bool,
}

/// Counters since open; serializable for `/kvfs/.kvfs/stats.json` and `kvfs info --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub remote_hits: u64,
    pub misses: u64,
    pub puts: u64,
    pub puts_existing: u64,
    pub put_bytes: u64,
    pub read_bytes: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Chunks that failed verification when read or put.
    pub verify_failures: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

#[derive(Default)]
struct Counters {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    remote_hits: AtomicU64,
    misses: AtomicU64,
    puts: AtomicU64,
    puts_existing: AtomicU64,
    put_bytes: AtomicU64,
    read_bytes: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    verify_failures: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Result of [`Store::gc`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub evicted: u64,
    pub freed_bytes: u64,
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

/// A file `verify_all` found bad.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub path: PathBuf,
    pub error: String,
    /// Where it was moved, if the move succeeded.
    pub quarantined_to: Option<PathBuf>,
}

/// Result of [`Store::verify_all`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub ok: u64,
    pub bytes: u64,
    pub bad: Vec<BadChunk>,
}

/// Bounds and use of the disk tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CapacityInfo {
    pub limit_bytes: u64,
    pub used_bytes: u64,
    pub min_free_bytes: u64,
    pub fs_total_bytes: u64,
    pub fs_free_bytes: u64,
    pub memory_limit_bytes: u64,
    pub memory_used_bytes: u64,
}

struct Inner {
    cfg: StoreConfig,
    disk: DiskTier,
    memory: MemoryTier,
    counters: Counters,
}

/// The tiered chunk store. See the module docs.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.cfg.root)
            .finish_non_exhaustive()
    }
}

fn check_ns(ns_dir: &str) -> Result<(), StoreError> {
    validate_namespace_dir(ns_dir).map_err(|_| StoreError::BadNamespace(ns_dir.to_string()))
}

/// The 16 hex digits that name a namespace directory's identity.
fn ns_suffix(ns_dir: &str) -> &str {
    ns_dir.rsplit_once('-').map_or("", |(_, s)| s)
}

fn check_chunk_ns(ns_dir: &str, header: &ChunkHeader) -> Result<(), StoreError> {
    let id = header.meta.namespace.to_hex();
    if id[..16] != *ns_suffix(ns_dir) {
        return Err(StoreError::NamespaceMismatch {
            ns_dir: ns_dir.to_string(),
            chunk_namespace: id,
        });
    }
    Ok(())
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    ) || e.kind() == io::ErrorKind::StorageFull
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Checks a whole chunk's payload, splitting the layers across the machine's cores.
pub fn verify_payload_parallel(header: &ChunkHeader, bytes: &[u8]) -> Result<(), FormatError> {
    verify_payload_threads(header, bytes, cores())
}

/// Checks a whole chunk's payload on up to `threads` threads (the caller's included).
pub fn verify_payload_threads(
    header: &ChunkHeader,
    bytes: &[u8],
    threads: usize,
) -> Result<(), FormatError> {
    header.check_len(bytes.len() as u64)?;
    let layers = header.geometry.num_layers;
    let threads = threads.min(layers as usize).min(16);
    if threads <= 1 || bytes.len() < PARALLEL_VERIFY_MIN {
        return header.verify_payload(bytes);
    }
    let per = (layers as usize).div_ceil(threads) as u32;
    let check = |range: std::ops::Range<u32>| -> Result<(), FormatError> {
        for layer in range {
            let span = header.geometry.layer_span(layer);
            header.verify_layer(layer, &bytes[span.start as usize..span.end as usize])?;
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads as u32)
            .map(|t| {
                let r = (t * per).min(layers)..((t + 1) * per).min(layers);
                s.spawn(move || check(r))
            })
            .collect();
        let first = check(0..per.min(layers));
        let mut result = first;
        for h in handles {
            let r = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// A verification failure carried through the `io::Error` of a commit closure.
#[derive(Debug)]
struct VerifyFailed(FormatError);
impl std::fmt::Display for VerifyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for VerifyFailed {}

impl Store {
    /// Opens (creating if needed) the store at `cfg.root`: removes temporaries of dead
    /// writers, then scans the disk tier.
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        let root = cfg.root.clone();
        fs::create_dir_all(&root).map_err(|e| StoreError::io(&root, e))?;
        let swept =
            dir::sweep_temporaries(&root, STALE_TMP_AGE).map_err(|e| StoreError::io(&root, e))?;
        if swept > 0 {
            tracing::info!(root = %root.display(), swept, "removed temporary files of interrupted writers");
        }
        let disk = DiskTier::new(root, cfg.capacity, cfg.min_free, cfg.remote.clone());
        disk.rescan()?;
        let memory = MemoryTier::new(cfg.memory_bytes);
        Ok(Store {
            inner: Arc::new(Inner {
                cfg,
                disk,
                memory,
                counters: Counters::default(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.cfg.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// Where the disk tier keeps (or would keep) a chunk.
    pub fn backing_path(&self, ns_dir: &str, key: &ChunkKey) -> PathBuf {
        self.inner.disk.path(ns_dir, key)
    }

    /// Stores a chunk (a whole `.kvc` file) under `ns_dir`, copying it for the memory tier.
    pub fn put(&self, ns_dir: &str, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
        self.put_inner(ns_dir, bytes, None, true)
    }

    /// Like [`Store::put`], taking ownership so the memory tier shares the buffer (no copy).
    pub fn put_bytes(&self, ns_dir: &str, bytes: Bytes) -> Result<PutOutcome, StoreError> {
        self.put_inner(ns_dir, &bytes, Some(&bytes), true)
    }

    /// Stores the chunk file at `src`.
    pub fn put_file(&self, ns_dir: &str, src: &Path) -> Result<PutOutcome, StoreError> {
        check_ns(ns_dir)?;
        let v = fs::read(src).map_err(|e| StoreError::io(src, e))?;
        self.put_bytes(ns_dir, Bytes::from(v)).map_err(|e| match e {
            StoreError::Format { path: None, source } => StoreError::Format {
                path: Some(src.to_path_buf()),
                source,
            },
            e => e,
        })
    }

    fn put_inner(
        &self,
        ns_dir: &str,
        bytes: &[u8],
        owned: Option<&Bytes>,
        notify_remote: bool,
    ) -> Result<PutOutcome, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        let fail = |e: FormatError| {
            bump(&inner.counters.verify_failures, 1);
            StoreError::from(e)
        };
        let header = ChunkHeader::parse(bytes).map_err(fail)?;
        header.check_len(bytes.len() as u64).map_err(fail)?;
        check_chunk_ns(ns_dir, &header)?;
        let key = header.key();
        let len = bytes.len() as u64;
        let path = inner.disk.path(ns_dir, &key);
        let to_memory = || {
            if inner.memory.enabled() {
                let b = owned
                    .cloned()
                    .unwrap_or_else(|| Bytes::copy_from_slice(bytes));
                inner.memory.insert(ns_dir, key, b);
            }
        };
        if path.exists() {
            verify_payload_parallel(&header, bytes).map_err(fail)?;
            inner.disk.index().insert(ns_dir, key, len, now_nanos());
            to_memory();
            bump(&inner.counters.puts_existing, 1);
            return Ok(PutOutcome {
                key,
                len,
                created: false,
                path,
                evicted: 0,
            });
        }
        let fsync = inner.cfg.fsync == FsyncPolicy::Always;
        let mut evicted = 0;
        let mut retried = false;
        let commit = loop {
            let (reservation, victims) = inner.disk.reserve(len)?;
            evicted += self.forget_victims(&victims);
            let r = dir::commit_with(&path, fsync, |f| {
                std::thread::scope(|s| {
                    // The writer keeps one core busy; verification gets the others.
                    let verifier = s.spawn(|| {
                        verify_payload_threads(&header, bytes, cores().saturating_sub(1).max(1))
                    });
                    let written = f.write_all(bytes);
                    let verified = verifier
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p));
                    verified.map_err(|e| io::Error::other(VerifyFailed(e)))?;
                    written
                })
            });
            drop(reservation);
            match r {
                Ok(c) => break c,
                Err(e) if e.get_ref().is_some_and(|i| i.is::<VerifyFailed>()) => {
                    let inner_err = e.into_inner().expect("checked above");
                    let VerifyFailed(fe) = *inner_err.downcast::<VerifyFailed>().expect("checked");
                    return Err(fail(fe));
                }
                Err(e) if is_no_space(&e) => {
                    // Evict and retry once, but only if evicting could make room at all:
                    // a hopeless put must not cost committed chunks.
                    let free = inner.disk.space().map_or(0, |s| s.free);
                    let evictable = inner.disk.index().used;
                    if !retried && free + evictable >= len {
                        retried = true;
                        let v = inner.disk.evict_bytes(len);
                        if !v.is_empty() {
                            evicted += self.forget_victims(&v);
                            tracing::info!(needed = len, "disk full: evicted and retrying");
                            continue;
                        }
                    }
                    return Err(StoreError::NoSpace {
                        needed: len,
                        available: free,
                    });
                }
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        };
        inner.disk.index().insert(ns_dir, key, len, now_nanos());
        to_memory();
        let created = commit == Commit::Created;
        if created {
            bump(&inner.counters.puts, 1);
            bump(&inner.counters.put_bytes, len);
            if notify_remote && let Some(r) = &inner.cfg.remote {
                r.committed(ns_dir, &key, &path);
            }
        } else {
            bump(&inner.counters.puts_existing, 1);
        }
        Ok(PutOutcome {
            key,
            len,
            created,
            path,
            evicted,
        })
    }

    fn forget_victims(&self, victims: &[Victim]) -> usize {
        for v in victims {
            self.inner.memory.remove(&v.key);
            bump(&self.inner.counters.evictions, 1);
            bump(&self.inner.counters.evicted_bytes, v.len);
        }
        victims.len()
    }

    /// The whole chunk file; payload verified per policy (see the module docs).
    pub fn get(&self, ns_dir: &str, key: &ChunkKey) -> Result<Bytes, StoreError> {
        self.get_with(ns_dir, key, Verify::Header)
    }

    /// Like [`Store::get`], with `Verify::Full` forcing a payload check of disk reads even
    /// when `verify_reads` is off (what `kvfs get` uses before it writes a byte).
    pub fn get_with(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        verify: Verify,
    ) -> Result<Bytes, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        if let Some(b) = inner.memory.get(ns_dir, key) {
            bump(&inner.counters.memory_hits, 1);
            bump(&inner.counters.read_bytes, b.len() as u64);
            inner.disk.index().touch(ns_dir, key);
            return Ok(b);
        }
        let path = inner.disk.path(ns_dir, key);
        match File::open(&path) {
            Ok(f) => {
                let full =
                    verify == Verify::Full || inner.cfg.verify_reads || inner.memory.enabled();
                let bytes = self.read_verified(ns_dir, key, &path, &f, full)?;
                bump(&inner.counters.disk_hits, 1);
                bump(&inner.counters.read_bytes, bytes.len() as u64);
                inner
                    .disk
                    .index()
                    .insert(ns_dir, *key, bytes.len() as u64, now_nanos());
                inner.memory.insert(ns_dir, *key, bytes.clone());
                Ok(bytes)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                inner.disk.index().remove(ns_dir, key);
                self.fetch_remote(ns_dir, key)
            }
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    fn read_verified(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        path: &Path,
        mut f: &File,
        full: bool,
    ) -> Result<Bytes, StoreError> {
        let len = f.metadata().map_err(|e| StoreError::io(path, e))?.len();
        let mut v = Vec::with_capacity(len as usize);
        f.read_to_end(&mut v).map_err(|e| StoreError::io(path, e))?;
        self.check_read(ns_dir, key, path, &v, full)?;
        Ok(Bytes::from(v))
    }

    fn check_read(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        path: &Path,
        v: &[u8],
        full: bool,
    ) -> Result<ChunkHeader, StoreError> {
        let r = (|| {
            let header = ChunkHeader::parse(v)?;
            header.check_len(v.len() as u64)?;
            if header.key() != *key {
                return Err(FormatError::NameMismatch {
                    name: key.file_name(),
                    key: header.key().to_hex(),
                });
            }
            if full {
                verify_payload_parallel(&header, v)?;
            }
            Ok(header)
        })();
        let header = r.map_err(|e| {
            bump(&self.inner.counters.verify_failures, 1);
            tracing::warn!(path = %path.display(), error = %e, "chunk failed verification");
            StoreError::format(path, e)
        })?;
        check_chunk_ns(ns_dir, &header)?;
        Ok(header)
    }

    fn fetch_remote(&self, ns_dir: &str, key: &ChunkKey) -> Result<Bytes, StoreError> {
        let inner = &*self.inner;
        let not_found = || {
            bump(&inner.counters.misses, 1);
            StoreError::NotFound {
                ns_dir: ns_dir.to_string(),
                key: *key,
            }
        };
        let Some(remote) = &inner.cfg.remote else {
            return Err(not_found());
        };
        let Some(v) = remote.fetch(ns_dir, key)? else {
            return Err(not_found());
        };
        let bytes = Bytes::from(v);
        let header = ChunkHeader::parse(&bytes).map_err(StoreError::from)?;
        if header.key() != *key {
            bump(&inner.counters.verify_failures, 1);
            return Err(StoreError::from(FormatError::NameMismatch {
                name: key.file_name(),
                key: header.key().to_hex(),
            }));
        }
        // Verifies in full, commits to disk and fills memory; not echoed back to the remote.
        match self.put_inner(ns_dir, &bytes, Some(&bytes), false) {
            Ok(_) => {}
            // No room on disk: still serve the (verified) bytes, uncached.
            Err(StoreError::NoSpace { needed, available }) => {
                verify_payload_parallel(&header, &bytes).map_err(|e| {
                    bump(&inner.counters.verify_failures, 1);
                    StoreError::from(e)
                })?;
                check_chunk_ns(ns_dir, &header)?;
                tracing::warn!(
                    ns_dir,
                    key = %key,
                    needed,
                    available,
                    "no room on disk for a fetched chunk; serving it uncached"
                );
            }
            Err(e) => return Err(e),
        }
        bump(&inner.counters.remote_hits, 1);
        bump(&inner.counters.read_bytes, bytes.len() as u64);
        Ok(bytes)
    }

    /// Reads up to `buf.len()` bytes of the chunk file at `offset` without loading the whole
    /// chunk (unless it has to come from the remote tier). The header is checked on every
    /// call; with `verify_reads`, so are the digests of the layers the range touches.
    /// Returns the bytes read; 0 at or past the end.
    pub fn read_at(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        let copy = |b: &Bytes, buf: &mut [u8]| {
            let start = (offset.min(b.len() as u64)) as usize;
            let n = buf.len().min(b.len() - start);
            buf[..n].copy_from_slice(&b[start..start + n]);
            n
        };
        if let Some(b) = inner.memory.get(ns_dir, key) {
            bump(&inner.counters.memory_hits, 1);
            return Ok(copy(&b, buf));
        }
        let path = inner.disk.path(ns_dir, key);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                inner.disk.index().remove(ns_dir, key);
                let b = self.fetch_remote(ns_dir, key)?;
                return Ok(copy(&b, buf));
            }
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let header = ChunkHeader::read_from(&f).map_err(|e| {
            bump(&inner.counters.verify_failures, 1);
            StoreError::format(&path, e)
        })?;
        if header.key() != *key {
            return Err(StoreError::format(
                &path,
                FormatError::NameMismatch {
                    name: key.file_name(),
                    key: header.key().to_hex(),
                },
            ));
        }
        check_chunk_ns(ns_dir, &header)?;
        if inner.cfg.verify_reads {
            self.verify_range(&header, &f, &path, offset, buf.len() as u64)?;
        }
        let n = read_full_at(&f, buf, offset).map_err(|e| StoreError::io(&path, e))?;
        bump(&inner.counters.disk_hits, 1);
        bump(&inner.counters.read_bytes, n as u64);
        inner.disk.index().touch(ns_dir, key);
        Ok(n)
    }

    /// Verifies the payload digests of every layer that `[offset, offset + len)` touches (the
    /// header was checked already): a ranged read with `verify_reads` costs the layers it
    /// reads, not the whole chunk.
    fn verify_range(
        &self,
        header: &ChunkHeader,
        f: &File,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        let g = &header.geometry;
        let end = offset.saturating_add(len).min(g.file_len);
        let mut span_buf = Vec::new();
        for layer in 0..g.num_layers {
            let span = g.layer_span(layer);
            if span.end <= offset || span.start >= end {
                continue;
            }
            span_buf.resize((span.end - span.start) as usize, 0);
            let n =
                read_full_at(f, &mut span_buf, span.start).map_err(|e| StoreError::io(path, e))?;
            let r = if n < span_buf.len() {
                Err(FormatError::Truncated {
                    needed: span.end,
                    have: span.start + n as u64,
                })
            } else {
                header.verify_layer(layer, &span_buf)
            };
            r.map_err(|e| {
                bump(&self.inner.counters.verify_failures, 1);
                StoreError::format(path, e)
            })?;
        }
        Ok(())
    }

    /// Header, size, tier and backing file of a chunk.
    pub fn stat(&self, ns_dir: &str, key: &ChunkKey) -> Result<ChunkStat, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        let path = inner.disk.path(ns_dir, key);
        let priority = inner
            .disk
            .index()
            .get(ns_dir, key)
            .map_or(0, |e| e.priority);
        if let Some(b) = inner.memory.get(ns_dir, key) {
            let header = ChunkHeader::parse(&b)?;
            let mtime = fs::metadata(&path).and_then(|m| m.modified()).ok();
            return Ok(ChunkStat {
                ns_dir: ns_dir.to_string(),
                header,
                len: b.len() as u64,
                tier: Tier::Memory,
                path,
                mtime,
                priority,
            });
        }
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                inner.disk.index().remove(ns_dir, key);
                return Err(StoreError::NotFound {
                    ns_dir: ns_dir.to_string(),
                    key: *key,
                });
            }
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let md = f.metadata().map_err(|e| StoreError::io(&path, e))?;
        let header = ChunkHeader::read_from(&f).map_err(|e| StoreError::format(&path, e))?;
        if header.key() != *key {
            return Err(StoreError::format(
                &path,
                FormatError::NameMismatch {
                    name: key.file_name(),
                    key: header.key().to_hex(),
                },
            ));
        }
        check_chunk_ns(ns_dir, &header)?;
        inner
            .disk
            .index()
            .insert(ns_dir, *key, md.len(), disk::file_recency(&md));
        Ok(ChunkStat {
            ns_dir: ns_dir.to_string(),
            header,
            len: md.len(),
            tier: Tier::Disk,
            path,
            mtime: md.modified().ok(),
            priority,
        })
    }

    /// Whether the chunk is held locally (memory or disk). Checks the file system, so a
    /// chunk committed or evicted by another process is seen.
    pub fn contains(&self, ns_dir: &str, key: &ChunkKey) -> bool {
        let inner = &*self.inner;
        if check_ns(ns_dir).is_err() {
            return false;
        }
        if inner.memory.contains(ns_dir, key) {
            return true;
        }
        let path = inner.disk.path(ns_dir, key);
        match fs::metadata(&path) {
            Ok(md) if md.is_file() => {
                inner
                    .disk
                    .index()
                    .insert(ns_dir, *key, md.len(), disk::file_recency(&md));
                true
            }
            _ => {
                inner.disk.index().remove(ns_dir, key);
                false
            }
        }
    }

    /// Removes a chunk from every local tier. Returns whether a file was removed.
    pub fn remove(&self, ns_dir: &str, key: &ChunkKey) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        inner.memory.remove(key);
        inner.disk.index().remove(ns_dir, key);
        let path = inner.disk.path(ns_dir, key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    /// Creates a namespace directory, writing `namespace.json` when a spec is given (its
    /// namespace id must match the directory's suffix). Idempotent.
    pub fn create_namespace(
        &self,
        ns_dir: &str,
        spec: Option<&ModelSpec>,
    ) -> Result<(), StoreError> {
        check_ns(ns_dir)?;
        let dir_path = self.root().join(ns_dir);
        if let Some(spec) = spec {
            spec.validate()?;
            let id = spec.namespace_id().to_hex();
            if id[..16] != *ns_suffix(ns_dir) {
                return Err(StoreError::NamespaceMismatch {
                    ns_dir: ns_dir.to_string(),
                    chunk_namespace: id,
                });
            }
        }
        fs::create_dir_all(&dir_path).map_err(|e| StoreError::io(&dir_path, e))?;
        if let Some(spec) = spec {
            let p = dir_path.join(NAMESPACE_JSON);
            let fsync = self.inner.cfg.fsync == FsyncPolicy::Always;
            dir::commit_file(&p, spec.to_json().as_bytes(), fsync).map_err(|e| {
                if is_no_space(&e) {
                    StoreError::NoSpace {
                        needed: spec.to_json().len() as u64,
                        available: 0,
                    }
                } else {
                    StoreError::io(&p, e)
                }
            })?;
        }
        Ok(())
    }

    /// Every namespace directory with its chunk count and bytes (rescans the disk).
    pub fn namespaces(&self) -> Result<Vec<NamespaceInfo>, StoreError> {
        let disk = &self.inner.disk;
        disk.rescan()?;
        let dirs =
            disk::list_namespace_dirs(self.root()).map_err(|e| StoreError::io(self.root(), e))?;
        let idx = disk.index();
        Ok(dirs
            .into_iter()
            .map(|dir| {
                let (chunks, bytes) = idx.namespaces.get(&dir).map_or((0, 0), |c| {
                    (c.len() as u64, c.values().map(|e| e.len).sum())
                });
                let has_spec = self.root().join(&dir).join(NAMESPACE_JSON).is_file();
                NamespaceInfo {
                    dir,
                    chunks,
                    bytes,
                    has_spec,
                }
            })
            .collect())
    }

    /// The chunks of one namespace on disk, sorted by key (rescans that namespace).
    pub fn chunks(&self, ns_dir: &str) -> Result<Vec<(ChunkKey, u64)>, StoreError> {
        check_ns(ns_dir)?;
        self.inner.disk.rescan_namespace(ns_dir)?;
        let idx = self.inner.disk.index();
        let mut out: Vec<(ChunkKey, u64)> = idx
            .namespaces
            .get(ns_dir)
            .map(|c| c.iter().map(|(k, e)| (*k, e.len)).collect())
            .unwrap_or_default();
        out.sort_unstable();
        Ok(out)
    }

    /// Eviction hint: chunks with a higher priority are evicted later (0 = default).
    pub fn set_priority(&self, ns_dir: &str, key: &ChunkKey, priority: u8) {
        if !self.contains(ns_dir, key) {
            return;
        }
        let mut idx = self.inner.disk.index();
        if let Some(e) = idx.namespaces.get_mut(ns_dir).and_then(|c| c.get_mut(key)) {
            e.priority = priority;
        }
    }

    /// Rescans the disk and evicts until the capacity and free-space bounds hold.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let disk = &self.inner.disk;
        disk.rescan()?;
        let victims = disk.enforce()?;
        self.forget_victims(&victims);
        let space = disk.space()?;
        let (limit, _) = disk.bounds(space);
        Ok(GcReport {
            evicted: victims.len() as u64,
            freed_bytes: victims.iter().map(|v| v.len).sum(),
            used_bytes: disk.index().used,
            limit_bytes: limit,
        })
    }

    /// Checks every file of the disk tier in full; moves bad ones to `<root>/.quarantine/`.
    /// `progress(done, total)` is called after each file.
    pub fn verify_all(&self, progress: &dyn Fn(u64, u64)) -> Result<VerifyReport, StoreError> {
        let root = self.root().to_path_buf();
        let mut files = Vec::new();
        for ns in disk::list_namespace_dirs(&root).map_err(|e| StoreError::io(&root, e))? {
            let ns_path = root.join(&ns);
            let fans = fs::read_dir(&ns_path).map_err(|e| StoreError::io(&ns_path, e))?;
            for fan in fans {
                let fan = fan.map_err(|e| StoreError::io(&ns_path, e))?;
                if !fan.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let fan_name = fan.file_name().to_string_lossy().into_owned();
                let entries =
                    fs::read_dir(fan.path()).map_err(|e| StoreError::io(&fan.path(), e))?;
                for f in entries {
                    let f = f.map_err(|e| StoreError::io(&fan.path(), e))?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with(dir::TMP_PREFIX) {
                        continue;
                    }
                    files.push((ns.clone(), fan_name.clone(), name, f.path()));
                }
            }
        }
        let total = files.len() as u64;
        let mut report = VerifyReport::default();
        for (i, (ns, fan, name, path)) in files.into_iter().enumerate() {
            report.checked += 1;
            match self.verify_file(&ns, &fan, &name, &path) {
                Ok(len) => {
                    report.ok += 1;
                    report.bytes += len;
                }
                Err(e) => {
                    bump(&self.inner.counters.verify_failures, 1);
                    tracing::warn!(path = %path.display(), error = %e, "bad chunk file");
                    if let Ok(key) = ChunkKey::from_file_name(&name) {
                        self.inner.memory.remove(&key);
                        self.inner.disk.index().remove(&ns, &key);
                    }
                    let quarantined_to = self.quarantine(&ns, &name, &path);
                    report.bad.push(BadChunk {
                        path,
                        error: e.to_string(),
                        quarantined_to,
                    });
                }
            }
            progress(i as u64 + 1, total);
        }
        Ok(report)
    }

    fn verify_file(
        &self,
        ns: &str,
        fan: &str,
        name: &str,
        path: &Path,
    ) -> Result<u64, FormatError> {
        let key = ChunkKey::from_file_name(name)?;
        if !key.to_hex().starts_with(fan) || fan.len() != 2 {
            return Err(FormatError::BadName(format!("{fan}/{name}")));
        }
        let f = File::open(path)?;
        let header = ChunkHeader::read_from(&f)?;
        if header.key() != key {
            return Err(FormatError::NameMismatch {
                name: name.to_string(),
                key: header.key().to_hex(),
            });
        }
        let id = header.meta.namespace.to_hex();
        if id[..16] != *ns_suffix(ns) {
            return Err(FormatError::NamespaceMismatch {
                expected: ns.to_string(),
                found: id,
            });
        }
        header.verify_file_payload(&f)?;
        Ok(header.geometry.file_len)
    }

    fn quarantine(&self, ns: &str, name: &str, path: &Path) -> Option<PathBuf> {
        let qdir = self.root().join(QUARANTINE_DIR).join(ns);
        if let Err(e) = fs::create_dir_all(&qdir) {
            tracing::error!(dir = %qdir.display(), error = %e, "cannot create quarantine directory");
            return None;
        }
        let mut target = qdir.join(name);
        let mut n = 1;
        while target.exists() {
            target = qdir.join(format!("{name}.{n}"));
            n += 1;
        }
        match fs::rename(path, &target) {
            Ok(()) => Some(target),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot quarantine");
                None
            }
        }
    }

    /// Counters since open, plus current tier sizes.
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            memory_hits: l(&c.memory_hits),
            disk_hits: l(&c.disk_hits),
            remote_hits: l(&c.remote_hits),
            misses: l(&c.misses),
            puts: l(&c.puts),
            puts_existing: l(&c.puts_existing),
            put_bytes: l(&c.put_bytes),
            read_bytes: l(&c.read_bytes),
            evictions: l(&c.evictions),
            evicted_bytes: l(&c.evicted_bytes),
            verify_failures: l(&c.verify_failures),
            memory_bytes: self.inner.memory.weighted_size(),
            disk_bytes: self.inner.disk.index().used,
        }
    }

    /// Bounds and use of the disk and memory tiers.
    pub fn capacity(&self) -> CapacityInfo {
        let disk = &self.inner.disk;
        let space = disk.space().unwrap_or(disk::FsSpace { total: 0, free: 0 });
        let (limit, min_free) = disk.bounds(space);
        CapacityInfo {
            limit_bytes: limit,
            used_bytes: disk.index().used,
            min_free_bytes: min_free,
            fs_total_bytes: space.total,
            fs_free_bytes: space.free,
            memory_limit_bytes: self.inner.cfg.memory_bytes,
            memory_used_bytes: self.inner.memory.weighted_size(),
        }
    }
}
