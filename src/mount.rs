//! The tiered store as the backend of a kvfs mount.
//!
//! [`StoreBackend`] implements kvfs-fs's [`ChunkBackend`] for the [`Store`]; the FUSE adapter
//! itself (the view, write-once commits, passthrough) lives in the `kvfs-fs` crate, which knows
//! nothing of tiers. The `kvfs mount` and `kvfs umount` commands (foreground serving, the
//! daemon, signals) are in [`crate::cli::mount`].
//!
//! Files written through the mount are buffered in `<cache-dir>/.incoming/` (same file
//! system as the disk tier) and checked in full at close by kvfs-fs; a valid one is then
//! taken in by `Store::adopt_file`: room is reserved first (a chunk that cannot be kept within
//! the bounds fails the writer's `close()` with ENOSPC, and nothing is evicted for it or
//! after it), then it is hard-linked into the disk tier (create-once, fsync per policy),
//! never copied, indexed, and handed to the remote tier's write-behind queue. Such commits
//! are counted in `/.kvfs/mount.json` (`commits`), not in the store's `puts`.
//!
//! Chunk files are opened regular files only (`kvfs_fs::open_regular`: no symlink, device or
//! FIFO), and kvfs-fs checks each in full at open before serving it; one that fails is
//! quarantined through `Store::quarantine_chunk`.
//!
//! Reads served by passthrough never reach this process, so they are not counted in
//! `stats.json`; reads that do (no passthrough, or chunks that are not local) are counted by
//! the store when it serves them.

use crate::store::{Store, StoreError, Tier};
use kvfs_fs::{
    BackendError, Capacity, ChunkBackend, ChunkInfo, Committed, FsMetrics, OpReport, open_regular,
};
use kvfs_loader::dir::Commit;
use kvfs_loader::{ChunkHeader, ChunkKey, FormatError};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Directory under the cache root where files written through the mount are buffered.
pub const INCOMING_DIR: &str = ".incoming";

/// The tiered store as the backend of a mount.
pub struct StoreBackend {
    store: Store,
    incoming: PathBuf,
    fs_metrics: FsMetrics,
}

impl StoreBackend {
    pub fn new(store: Store) -> StoreBackend {
        let incoming = store.root().join(INCOMING_DIR);
        StoreBackend {
            store,
            incoming,
            fs_metrics: FsMetrics::default(),
        }
    }

    /// Registers the mount's metrics (FUSE operations) and the store's (with its remote
    /// tier's) with `registry`: what `kvfs mount --metrics-addr` serves.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.store.register_metrics(registry);
        self.fs_metrics.register(registry);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn has_remote(&self) -> bool {
        self.store.config().remote.is_some()
    }

    /// Stat, fetching a chunk that is only remote (so that the open that follows a lookup
    /// finds it local). With `count`, a chunk found locally or nowhere is counted as a
    /// lookup (a fetch is counted by the store's `get` either way).
    fn stat_or_fetch(
        &self,
        ns: &str,
        key: &ChunkKey,
        count: bool,
    ) -> Result<Option<crate::ChunkStat>, BackendError> {
        match self.store.stat(ns, key) {
            Ok(s) => {
                if count {
                    self.store.count_lookup(ns, Some(s.tier));
                }
                Ok(Some(s))
            }
            Err(StoreError::NotFound { .. }) if self.has_remote() => {
                match self.store.get(ns, key) {
                    Ok(_) => self.store.stat(ns, key).map(Some).map_err(to_backend),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(to_backend(e)),
                }
            }
            Err(StoreError::NotFound { .. }) => {
                if count {
                    self.store.count_lookup(ns, None);
                }
                Ok(None)
            }
            Err(e) => Err(to_backend(e)),
        }
    }
}

/// The store's errors as the adapter's (each becomes one errno).
fn to_backend(e: StoreError) -> BackendError {
    match e {
        StoreError::NotFound { .. } => BackendError::NotFound,
        StoreError::Format { source, .. } => BackendError::Invalid(source),
        StoreError::BadNamespace(n) => BackendError::BadName(n),
        StoreError::NamespaceMismatch {
            ns_dir,
            chunk_namespace,
        } => BackendError::Invalid(FormatError::NamespaceMismatch {
            expected: ns_dir,
            found: chunk_namespace,
        }),
        StoreError::NoSpace { .. } => BackendError::NoSpace,
        StoreError::Io { source, .. } => BackendError::Io(source),
        e @ StoreError::Remote(_) => BackendError::Other(e.to_string()),
    }
}

impl ChunkBackend for StoreBackend {
    fn namespaces(&self) -> Result<Vec<String>, BackendError> {
        Ok(self
            .store
            .namespaces()
            .map_err(to_backend)?
            .into_iter()
            .map(|n| n.dir)
            .collect())
    }

    fn namespace_exists(&self, ns: &str) -> Result<bool, BackendError> {
        // One stat, not a rescan of the whole cache (this runs on every lookup). With a remote
        // tier, a namespace this host has never seen may hold chunks in the bucket: it must
        // resolve so that a lookup of `<ns>/<key>.kvc` under it can fetch (a fresh host).
        Ok(kvfs_loader::spec::validate_namespace_dir(ns).is_ok()
            && (self.has_remote() || self.store.root().join(ns).is_dir()))
    }

    fn create_namespace(&self, ns: &str) -> Result<(), BackendError> {
        if self.namespace_exists(ns)? {
            return Err(BackendError::AlreadyExists);
        }
        self.store.create_namespace(ns, None).map_err(to_backend)
    }

    fn chunks(&self, ns: &str) -> Result<Vec<(ChunkKey, u64)>, BackendError> {
        self.store.chunks(ns).map_err(to_backend)
    }

    /// One fan-out directory: a listing page costs a 1/256th of the namespace.
    fn chunk_page(&self, ns: &str, page: u8) -> Result<Vec<ChunkKey>, BackendError> {
        self.store.chunk_page(ns, page).map_err(to_backend)
    }

    /// The disk tier's file metadata when it has the chunk (no header read: `find` over
    /// 100,000 chunks must not read 100,000 headers); the store's `stat` otherwise (a chunk
    /// only in memory, or only remote, which it fetches). Each call (the kernel's lookup or
    /// getattr of a chunk name) is counted as a lookup in the store's metrics.
    fn stat(&self, ns: &str, key: &ChunkKey) -> Result<Option<ChunkInfo>, BackendError> {
        let path = self.store.backing_path(ns, key);
        // Not followed: a symlink planted in the cache is not a disk-tier chunk (its open
        // is refused, and it is quarantined).
        match std::fs::symlink_metadata(&path) {
            Ok(md) if md.is_file() => {
                self.store.count_lookup(ns, Some(Tier::Disk));
                return Ok(Some(ChunkInfo {
                    len: md.len(),
                    mtime: md.modified().unwrap_or_else(|_| SystemTime::now()),
                    tier: Tier::Disk.to_string(),
                    // Absolute, whatever the cache directory was given as.
                    backing: Some(std::path::absolute(&path).unwrap_or(path)),
                }));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(self.stat_or_fetch(ns, key, true)?.map(|s| {
            let local = s.tier != Tier::Remote && s.path.is_file();
            ChunkInfo {
                len: s.len,
                mtime: s.mtime.unwrap_or_else(SystemTime::now),
                tier: s.tier.to_string(),
                // Absolute, whatever the cache directory was given as.
                backing: local.then(|| std::path::absolute(&s.path).unwrap_or(s.path)),
            }
        }))
    }

    fn tier(&self, ns: &str, key: &ChunkKey) -> Result<Option<String>, BackendError> {
        Ok(self
            .stat_or_fetch(ns, key, false)?
            .map(|s| s.tier.to_string()))
    }

    fn header(&self, ns: &str, key: &ChunkKey) -> Result<ChunkHeader, BackendError> {
        match self.stat_or_fetch(ns, key, false)? {
            Some(s) => Ok(s.header),
            None => Err(BackendError::NotFound),
        }
    }

    fn read_at(
        &self,
        ns: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, BackendError> {
        self.store.read_at(ns, key, offset, buf).map_err(to_backend)
    }

    fn open_local(&self, ns: &str, key: &ChunkKey) -> Result<Option<File>, BackendError> {
        let path = self.store.backing_path(ns, key);
        match open_regular(&path)? {
            Some(f) => Ok(Some(f)),
            // Only remote (or only in memory): fetch it to disk, then open that.
            None if self.stat_or_fetch(ns, key, false)?.is_some() => open_regular(&path),
            None => Ok(None),
        }
    }

    fn quarantine(&self, ns: &str, key: &ChunkKey, reason: &str) -> Option<PathBuf> {
        self.store.quarantine_chunk(ns, key, reason)
    }

    fn incoming_dir(&self) -> PathBuf {
        self.incoming.clone()
    }

    /// The adapter has verified the file in full (one pass over bytes still in the page
    /// cache); the store reserves room for it, then links it into the disk tier.
    fn commit(&self, ns: &str, key: &ChunkKey, path: &Path) -> Result<Committed, BackendError> {
        match self.store.adopt_file(ns, key, path).map_err(to_backend)? {
            Commit::Created => Ok(Committed::Created),
            Commit::AlreadyExists => Ok(Committed::AlreadyExists),
        }
    }

    fn remove(&self, ns: &str, key: &ChunkKey) -> Result<bool, BackendError> {
        self.store.remove(ns, key).map_err(to_backend)
    }

    fn capacity(&self) -> Result<Capacity, BackendError> {
        let c = self.store.capacity();
        let chunks = self
            .store
            .namespaces()
            .map_err(to_backend)?
            .iter()
            .map(|n| n.chunks)
            .sum();
        let within_limit = c.limit_bytes.saturating_sub(c.used_bytes);
        let on_fs = c.fs_free_bytes.saturating_sub(c.min_free_bytes);
        Ok(Capacity {
            total_bytes: c.limit_bytes,
            used_bytes: c.used_bytes,
            free_bytes: within_limit.min(on_fs),
            chunks,
        })
    }

    fn stats_json(&self) -> Result<String, BackendError> {
        let doc = serde_json::json!({
            "stats": self.store.stats(),
            "capacity": self.store.capacity(),
        });
        serde_json::to_string_pretty(&doc).map_err(|e| BackendError::Other(e.to_string()))
    }

    fn observe_op(&self, report: &OpReport) {
        self.fs_metrics.observe(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_keep_their_errno() {
        let nf = StoreError::NotFound {
            ns_dir: "x".into(),
            key: ChunkKey([0; 32]),
        };
        assert_eq!(to_backend(nf).errno(), libc::ENOENT);
        let ns = StoreError::NoSpace {
            needed: 1,
            available: 0,
        };
        assert_eq!(to_backend(ns).errno(), libc::ENOSPC);
        let bad = StoreError::from(FormatError::HeaderChecksum);
        assert_eq!(to_backend(bad).errno(), libc::EINVAL);
    }
}
