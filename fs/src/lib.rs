//! kvfs-fs: the FUSE adapter that shows a kvfs chunk store as a file system (`/kvfs`).
//!
//! - [`backend`]: the [`ChunkBackend`] trait this crate needs from a store, and its errors.
//!   The root crate implements it for the tiered store; this crate knows nothing of tiers.
//! - [`adapter`]: [`KvFs`], the `fuser::Filesystem` (the view, write-once commits,
//!   passthrough and cached reads, xattrs, status files).
//! - [`incoming`]: files being written, checked in full when they are closed.
//! - [`inode`]: inode numbers of namespaces and chunks.
//! - [`options`]: [`MountOptions`], mount point checks, [`mount`] / [`spawn`] / [`unmount`].
//! - `testing` (feature `testing`): an in-memory backend and a fault-injecting wrapper.
//!
//! The crate depends on kvfs-loader for chunk keys and the format check at close, and on
//! fuser for the kernel protocol; it must not depend on the root crate.

pub mod adapter;
pub mod backend;
pub mod incoming;
pub mod inode;
pub mod options;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use adapter::KvFs;
pub use backend::{BackendError, Capacity, ChunkBackend, ChunkInfo, Committed};
pub use options::{
    MountError, MountOptions, is_mount_point, mount, prepare_mountpoint, spawn, unmount,
};
