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
//! ## Files
//! One job per file: [`settings`](StoreConfig) and [`error`](StoreError); `put` (writes);
//! `read` (the one memory → disk → remote fall-through, and get, read_at, stat, contains);
//! `namespace` (namespace directories); `gc` (eviction on demand); `verify` (whole-cache
//! verification and quarantine); `parallel` (payload checks across cores); `stats`
//! (counters, capacity); `metrics` (the same as Prometheus metrics, by namespace, tier
//! and reason); [`disk`] and `memory` (the tiers); `priority` (the eviction priority a
//! chunk's importance implies, issue 14); `retain` (holding a chunk's important groups in
//! memory without the rest, issue 14); [`remote_seam`] (the remote tier's trait). The identity check itself (key == name, namespace id == directory suffix)
//! is kvfs-loader's [`identity::check_identity`].
//!
//! ## The index, and several processes
//! Files are the shared truth; what capacity and eviction need about them is kept in one
//! persistent index per cache root (`index`: SQLite beside the chunks), shared by every
//! process that opens the root, so that opening a store reads no directory and every process
//! sees one usage figure. A miss stats the path and adopts a chunk another process (or an
//! engine's loader) committed; a chunk another process evicted is dropped from the index and
//! reported as [`StoreError::NotFound`]. A background pass (`maintenance`) rebuilds a missing
//! or damaged index and removes temporary files of dead writers (and any older than an hour)
//! without delaying a read.

mod admission;
pub mod disk;
mod error;
mod gc;
mod index;
mod ingest;
mod maintenance;
mod memory;
mod metrics;
mod namespace;
mod parallel;
mod priority;
mod put;
mod read;
pub mod remote_seam;
mod retain;
mod settings;
mod stats;
mod verify;

use disk::DiskTier;
use kvfs_loader::dir;
use kvfs_loader::identity;
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ChunkKey, FormatError, NamespaceId};
use memory::MemoryTier;
use metrics::StoreMetrics;
use stats::{Counters, bump};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::StoreError;
pub use gc::GcReport;
pub use ingest::ChunkStream;
pub use metrics::EvictReason;
pub use namespace::NamespaceInfo;
pub use parallel::{verify_payload_parallel, verify_payload_threads};
pub use put::PutOutcome;
pub use read::{ChunkStat, Tier};
pub use remote_seam::RemoteTier;
pub use retain::RetainReport;
pub use settings::{FsyncPolicy, StoreConfig};
pub use stats::{CapacityInfo, StoreStats};
pub use verify::{BadChunk, QUARANTINE_DIR, VerifyReport};

/// Name of the spec file written into a namespace directory.
pub use kvfs_loader::identity::NAMESPACE_JSON;

struct Inner {
    cfg: StoreConfig,
    disk: DiskTier,
    memory: MemoryTier,
    counters: Counters,
    metrics: StoreMetrics,
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

/// Checks that namespace `id` belongs in `ns_dir` ([`identity::check_namespace`]).
fn check_ns_id(ns_dir: &str, id: &NamespaceId) -> Result<(), StoreError> {
    identity::check_namespace(ns_dir, id).map_err(|_| StoreError::NamespaceMismatch {
        ns_dir: ns_dir.to_string(),
        chunk_namespace: id.to_hex(),
    })
}

/// Creates the cache root if needed with the permissions `access` asks for, tightening an
/// existing root that grants more (see `kvfs_loader::dir::prepare_root`), with a warning when
/// it already held a cache. [`Store::open`] calls it; so does whoever creates anything under
/// the root before the store opens (the S3 tier's upload queue), so that it is created
/// private too.
pub fn prepare_root(root: &Path, access: dir::Access) -> Result<(), StoreError> {
    let was = dir::prepare_root(root, access).map_err(|e| StoreError::io(root, e))?;
    // A new, empty root made by hand (`mkdir`) is set quietly; an existing cache that
    // others could read is worth a warning.
    let populated = || fs::read_dir(root).is_ok_and(|mut d| d.next().is_some());
    if let Some(old) = was.filter(|_| populated()) {
        tracing::warn!(
            root = %root.display(),
            old = format_args!("{old:o}"),
            new = format_args!("{:o}", access.root_mode()),
            "changed the cache directory's permissions: chunk headers hold prompts' token ids"
        );
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store at `cfg.root`. Reads no chunk directory: the
    /// disk tier's index is opened, and rebuilt in the background if it is missing or
    /// damaged (see the module docs).
    pub fn open(cfg: StoreConfig) -> Result<Store, StoreError> {
        let root = cfg.root.clone();
        prepare_root(&root, cfg.access)?;
        let disk = DiskTier::open(root, cfg.capacity, cfg.min_free, cfg.remote.clone())?;
        let memory = MemoryTier::new(cfg.memory_bytes);
        Ok(Store {
            inner: Arc::new(Inner {
                cfg,
                disk,
                memory,
                counters: Counters::default(),
                metrics: StoreMetrics::default(),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.cfg.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// Waits until the index maintenance pass this process started (when it opened an index
    /// that was new, damaged or due a check) is done: usage and namespace totals count every
    /// file after it. Reads never need to wait.
    pub fn wait_for_index(&self) {
        self.inner.disk.wait_maintenance();
    }

    /// Where the disk tier keeps (or would keep) a chunk.
    pub fn backing_path(&self, ns_dir: &str, key: &ChunkKey) -> PathBuf {
        self.inner.disk.path(ns_dir, key)
    }

    /// A chunk that failed a check: a namespace mismatch is the caller's error
    /// ([`StoreError::NamespaceMismatch`]); anything else is a bad chunk, counted and tied to
    /// the file it came from.
    fn rejected(&self, path: Option<&Path>, e: FormatError) -> StoreError {
        match e {
            FormatError::NamespaceMismatch { expected, found } => StoreError::NamespaceMismatch {
                ns_dir: expected,
                chunk_namespace: found,
            },
            e => {
                bump(&self.inner.counters.verify_failures, 1);
                match path {
                    Some(p) => StoreError::format(p, e),
                    None => StoreError::from(e),
                }
            }
        }
    }

    /// Removes a chunk from every local tier. Returns whether a file was removed.
    pub fn remove(&self, ns_dir: &str, key: &ChunkKey) -> Result<bool, StoreError> {
        let inner = &*self.inner;
        check_ns(ns_dir)?;
        inner.memory.remove(key);
        inner.disk.index().forget(ns_dir, key);
        let path = inner.disk.path(ns_dir, key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }
}
