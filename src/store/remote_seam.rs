//! The seam where a remote tier (S3) plugs into the store, without the store knowing S3.
//!
//! The store holds an optional `Arc<dyn RemoteTier>` given at open
//! ([`StoreConfig::remote`](super::StoreConfig::remote)). It is consulted after a miss in
//! memory and on disk ([`RemoteTier::fetch`]); fetched bytes are verified in full, committed
//! to the disk tier and promoted to memory exactly as a `put` would, so a remote tier can never
//! serve bytes the store has not checked. After this process commits a chunk to disk the store
//! calls [`RemoteTier::committed`], which is where write-behind uploads are queued.
//!
//! Implementations must be cheap to call from any thread; `fetch` may block (the store's
//! callers are synchronous: the FUSE threads and the CLI).

use super::StoreError;
use kvfs_loader::ChunkKey;
use std::path::Path;

/// A slower tier behind the local disk.
pub trait RemoteTier: Send + Sync + std::fmt::Debug {
    /// The whole chunk file stored under `ns_dir/key`, or `None` if the remote has no such
    /// chunk. The store verifies what it gets; return the bytes as stored.
    fn fetch(&self, ns_dir: &str, key: &ChunkKey) -> Result<Option<Vec<u8>>, StoreError>;

    /// A chunk was committed to the disk tier at `path` by this process (by `put`, not by a
    /// fetch from this remote). Called after the file is visible; must not fail the put.
    fn committed(&self, ns_dir: &str, key: &ChunkKey, path: &Path);

    /// Whether the chunk still waits for its upload, so the local file is its only copy. The
    /// disk tier never evicts such a chunk (eviction would lose an acknowledged write). Called
    /// under the disk index lock for eviction candidates only; must be cheap.
    fn upload_pending(&self, _ns_dir: &str, _key: &ChunkKey) -> bool {
        false
    }

    /// Registers the tier's Prometheus metrics with `registry` (see
    /// [`Store::register_metrics`](super::Store::register_metrics)); the default has none.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}

    /// The namespace directories under which the remote holds `key`: how a bare `KEY` is
    /// found on a host that has never seen its namespace. One listing plus one existence
    /// check per namespace; for commands, not for hot paths.
    fn namespaces_holding(&self, _key: &ChunkKey) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}
