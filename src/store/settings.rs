//! The settings of a [`Store`](super::Store) and their defaults: the defaults live here, on
//! the types, and the configuration layer (`crate::config`) starts from them.

use super::RemoteTier;
use crate::units::{GIB, Limit};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

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

/// Settings of a [`Store`](super::Store). [`StoreConfig::new`] gives the documented defaults.
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
    /// Who besides the owner may read the cache directory (private by default).
    pub access: kvfs_loader::dir::Access,
}

impl StoreConfig {
    /// Default bound on chunk bytes on disk: 80% of the cache file system.
    pub const DEFAULT_CAPACITY: Limit = Limit::Percent(80.0);
    /// Default memory tier size: 1 GiB.
    pub const DEFAULT_MEMORY_BYTES: u64 = GIB;
    /// Default free space left on the file system: 5% of it.
    pub const DEFAULT_MIN_FREE: Limit = Limit::Percent(5.0);

    /// The documented defaults for a store at `root`, with no remote tier.
    pub fn new(root: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            root: root.into(),
            capacity: Self::DEFAULT_CAPACITY,
            memory_bytes: Self::DEFAULT_MEMORY_BYTES,
            min_free: Self::DEFAULT_MIN_FREE,
            fsync: FsyncPolicy::default(),
            verify_reads: false,
            remote: None,
            access: kvfs_loader::dir::Access::Private,
        }
    }
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<FsyncPolicy, String> {
        match s.trim() {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!("`{other}` is not a fsync policy (always, never)")),
        }
    }
}
