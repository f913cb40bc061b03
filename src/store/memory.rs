//! The memory tier: a moka cache of whole, verified chunk files, weighted by their bytes.
//!
//! Entries are keyed by chunk key alone (a key already commits to its namespace id) and carry
//! the namespace directory they were read from, so a lookup under another namespace misses.
//! Values are [`Bytes`]: a hit hands out a reference-counted view, never a copy. Only bytes
//! whose payload digest was just checked are inserted (on `put` and on promotion from disk),
//! so the memory tier never holds unverified data. moka's TinyLFU admission and LRU eviction
//! keep the hot set; a chunk heavier than the whole tier is simply not kept.

use bytes::Bytes;
use kvfs_loader::ChunkKey;
use std::sync::Arc;

#[derive(Clone)]
struct Entry {
    ns_dir: Arc<str>,
    bytes: Bytes,
}

/// Weighted in-memory chunk cache; disabled when its capacity is 0.
pub(crate) struct MemoryTier {
    cache: Option<moka::sync::Cache<ChunkKey, Entry>>,
}

impl MemoryTier {
    pub(crate) fn new(capacity_bytes: u64) -> MemoryTier {
        let cache = (capacity_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|_k: &ChunkKey, v: &Entry| {
                    u32::try_from(v.bytes.len()).unwrap_or(u32::MAX)
                })
                .build()
        });
        MemoryTier { cache }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    pub(crate) fn get(&self, ns_dir: &str, key: &ChunkKey) -> Option<Bytes> {
        let e = self.cache.as_ref()?.get(key)?;
        (&*e.ns_dir == ns_dir).then_some(e.bytes)
    }

    pub(crate) fn contains(&self, ns_dir: &str, key: &ChunkKey) -> bool {
        self.get(ns_dir, key).is_some()
    }

    /// Inserts verified bytes.
    pub(crate) fn insert(&self, ns_dir: &str, key: ChunkKey, bytes: Bytes) {
        if let Some(c) = &self.cache {
            c.insert(
                key,
                Entry {
                    ns_dir: Arc::from(ns_dir),
                    bytes,
                },
            );
        }
    }

    pub(crate) fn remove(&self, key: &ChunkKey) {
        if let Some(c) = &self.cache {
            c.invalidate(key);
        }
    }

    /// Bytes held now (approximate: moka applies writes lazily).
    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }
}
