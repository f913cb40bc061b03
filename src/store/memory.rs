//! The memory tier: a moka cache of whole, verified chunk files, weighted by their bytes.
//!
//! Entries are keyed by chunk key alone (a key already commits to its namespace id) and carry
//! the namespace directory they were read from, so a lookup under another namespace misses.
//! Values are [`Bytes`]: a hit hands out a reference-counted view, never a copy. Only bytes
//! whose payload digest was just checked are inserted (on `put` and on promotion from disk),
//! so the memory tier never holds unverified data. moka's TinyLFU admission and LRU eviction
//! keep the hot set; a chunk heavier than the whole tier is simply not kept.
//!
//! An entry may also hold only part of a chunk: its header and the byte ranges of its most
//! important groups ([`Retained`], issue 14, made by `Store::retain_important`). Such an entry
//! serves ranged reads inside what it holds ([`MemoryTier::read_retained`]) and is never
//! handed out as a whole chunk.

use super::retain::Retained;
use bytes::Bytes;
use kvfs_loader::ChunkKey;
use std::sync::Arc;

#[derive(Clone)]
enum Held {
    Whole(Bytes),
    Part(Arc<Retained>),
}

impl Held {
    fn len(&self) -> u64 {
        match self {
            Held::Whole(b) => b.len() as u64,
            Held::Part(r) => r.held_bytes(),
        }
    }
}

#[derive(Clone)]
struct Entry {
    ns_dir: Arc<str>,
    held: Held,
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
                .weigher(|_k: &ChunkKey, v: &Entry| u32::try_from(v.held.len()).unwrap_or(u32::MAX))
                .build()
        });
        MemoryTier { cache }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    pub(crate) fn get(&self, ns_dir: &str, key: &ChunkKey) -> Option<Bytes> {
        let e = self.cache.as_ref()?.get(key)?;
        match e.held {
            Held::Whole(b) if &*e.ns_dir == ns_dir => Some(b),
            _ => None,
        }
    }

    /// Copies `[offset, offset + buf.len())` of a chunk held in part, when the part holds the
    /// whole range; returns the bytes copied.
    pub(crate) fn read_retained(
        &self,
        ns_dir: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<usize> {
        let e = self.cache.as_ref()?.get(key)?;
        match e.held {
            Held::Part(r) if &*e.ns_dir == ns_dir => r.read(offset, buf),
            _ => None,
        }
    }

    /// Holds part of a chunk (verified), replacing any entry of the key.
    pub(crate) fn insert_retained(&self, ns_dir: &str, key: ChunkKey, part: Retained) {
        if let Some(c) = &self.cache {
            c.insert(
                key,
                Entry {
                    ns_dir: Arc::from(ns_dir),
                    held: Held::Part(Arc::new(part)),
                },
            );
        }
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
                    held: Held::Whole(bytes),
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
