//! Counters since open ([`StoreStats`], served as `/kvfs/.kvfs/stats.json` and by
//! `kvfs info --json`) and the bounds and use of the tiers ([`CapacityInfo`]).
//!
//! Counters are relaxed atomics bumped on the hot paths; a snapshot is consistent per counter,
//! not across counters.

use super::{Store, disk};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

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
pub(super) struct Counters {
    pub(super) memory_hits: AtomicU64,
    pub(super) disk_hits: AtomicU64,
    pub(super) remote_hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) puts: AtomicU64,
    pub(super) puts_existing: AtomicU64,
    pub(super) put_bytes: AtomicU64,
    pub(super) read_bytes: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) evicted_bytes: AtomicU64,
    pub(super) verify_failures: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
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

impl Store {
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
            disk_bytes: self.inner.disk.index().used(),
        }
    }

    /// Bounds and use of the disk and memory tiers.
    pub fn capacity(&self) -> CapacityInfo {
        let disk = &self.inner.disk;
        let space = disk.space().unwrap_or(disk::FsSpace { total: 0, free: 0 });
        let (limit, min_free) = disk.bounds(space);
        CapacityInfo {
            limit_bytes: limit,
            used_bytes: disk.index().used(),
            min_free_bytes: min_free,
            fs_total_bytes: space.total,
            fs_free_bytes: space.free,
            memory_limit_bytes: self.inner.cfg.memory_bytes,
            memory_used_bytes: self.inner.memory.weighted_size(),
        }
    }
}
