//! Eviction on demand: [`Store::gc`] enforces the capacity and free-space bounds now, and
//! [`Store::set_priority`] is the engine's hint of what to keep longer.

use super::{EvictReason, Store, StoreError};
use kvfs_loader::ChunkKey;
use serde::Serialize;

/// Result of [`Store::gc`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub evicted: u64,
    pub freed_bytes: u64,
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

impl Store {
    /// Eviction hint: chunks with a higher priority are evicted later (0 = default). Kept in
    /// the disk tier's index, so it survives a restart and every process sharing the cache
    /// evicts by it. A chunk not held locally is ignored.
    pub fn set_priority(&self, ns_dir: &str, key: &ChunkKey, priority: u8) {
        if !self.contains(ns_dir, key) {
            return;
        }
        if let Err(e) = self.inner.disk.index().set_priority(ns_dir, key, priority) {
            tracing::warn!(ns_dir, %key, error = %e, "priority not recorded");
        }
    }

    /// Brings the index into agreement with the files (a full pass), then evicts until the
    /// capacity and free-space bounds hold.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let disk = &self.inner.disk;
        disk.resync()?;
        let victims = disk.enforce()?;
        self.forget_victims(&victims, EvictReason::Gc);
        let space = disk.space()?;
        let (limit, _) = disk.bounds(space);
        Ok(GcReport {
            evicted: victims.len() as u64,
            freed_bytes: victims.iter().map(|v| v.len).sum(),
            used_bytes: disk.index().used(),
            limit_bytes: limit,
        })
    }
}
