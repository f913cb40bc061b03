//! Chunks that arrive as complete files (written through the mount), and chunks a reader
//! found bad: the store side of `kvfs mount`'s two promises.
//!
//! - [`Store::adopt_file`]: an acknowledged write is never lost. Room is reserved *before*
//!   the checked file is linked into the disk tier (evicting colder chunks within the bounds,
//!   never one whose upload is queued); a chunk that cannot be kept is refused with
//!   [`StoreError::NoSpace`] and nothing is evicted for it, and nothing is evicted after it
//!   is accepted, so the writer's `close()` tells the truth.
//! - [`Store::quarantine_chunk`]: a chunk file that failed the mount's open-time check is
//!   forgotten by every tier, counted in `verify_failures`, and moved to the quarantine
//!   directory, as `kvfs verify` does.
//!
//! Kept apart from the put path (mod.rs), which streams bytes it verifies itself.

use super::{EvictReason, Store, StoreError, bump, check_ns};
use crate::store::FsyncPolicy;
use kvfs_loader::ChunkKey;
use kvfs_loader::dir::{self, Commit};
use std::path::{Path, PathBuf};

impl Store {
    /// Takes in the complete, already verified chunk file `src` (on the cache's file system)
    /// as `key` in `ns_dir`: hard-linked into the disk tier, not copied; `src` is left for
    /// the caller to remove. Indexed, and handed to the remote tier's queue when new.
    pub fn adopt_file(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        src: &Path,
    ) -> Result<Commit, StoreError> {
        check_ns(ns_dir)?;
        let inner = &*self.inner;
        let target = inner.disk.path(ns_dir, key);
        if target.exists() {
            self.contains(ns_dir, key);
            return Ok(Commit::AlreadyExists);
        }
        let len = std::fs::metadata(src)
            .map_err(|e| StoreError::io(src, e))?
            .len();
        let fsync = inner.cfg.fsync == FsyncPolicy::Always;
        // Room first: NoSpace here costs nothing already held.
        let (reservation, victims) = inner.disk.reserve(ns_dir, key, len)?;
        self.forget_victims(&victims, EvictReason::Capacity);
        let outcome = dir::commit_link(src, &target, fsync).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                StoreError::NoSpace {
                    needed: len,
                    available: 0,
                }
            } else {
                StoreError::io(&target, e)
            }
        })?;
        // The reservation becomes the chunk's row in one transaction: the bytes are never
        // unaccounted.
        // The file's header (a page): this path has only the file, not its parsed header.
        reservation.commit(ns_dir, key, len, super::priority::of_chunk_file(&target));
        if outcome == Commit::Created {
            inner.metrics.committed(ns_dir, len);
        }
        if outcome == Commit::Created
            && let Some(remote) = &inner.cfg.remote
        {
            remote.committed(ns_dir, key, &target);
        }
        Ok(outcome)
    }

    /// Takes a chunk whose disk file failed a check out of service: dropped from the memory
    /// tier and the index, counted, and its file moved to `<root>/.quarantine/<ns>/`. Returns
    /// where it went (`None` if there was no file, or it could not be moved).
    pub fn quarantine_chunk(&self, ns_dir: &str, key: &ChunkKey, reason: &str) -> Option<PathBuf> {
        let inner = &*self.inner;
        bump(&inner.counters.verify_failures, 1);
        inner.memory.remove(key);
        inner.disk.index().forget(ns_dir, key);
        let path = inner.disk.path(ns_dir, key);
        // A symlink is moved as a link (rename does not follow it).
        if std::fs::symlink_metadata(&path).is_err() {
            return None;
        }
        let to = self.quarantine(ns_dir, &key.file_name(), &path);
        tracing::warn!(path = %path.display(), %reason, quarantined = ?to, "bad chunk file quarantined");
        to
    }
}
