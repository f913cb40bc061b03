//! kvfs-fs: the FUSE file system that shows a kvfs chunk store as a file system (`/kvfs`).
//!
//! - [`backend`]: the [`ChunkBackend`] trait this crate needs from a store, and its errors.
//!   The root crate implements it for the tiered store; this crate knows nothing of tiers.
//! - [`core`]: [`KvFs`], the file system itself (the view, open-time checks, write-once
//!   commits, xattrs, status files); every request returns a `Result`, so it is tested
//!   without a kernel.
//! - [`fuse`]: [`FuseFs`], the `fuser::Filesystem`: one call into [`KvFs`] per callback, the
//!   errno mapping, INIT negotiation and passthrough backing ids.
//! - [`session`]: mount point checks, [`mount`] / [`spawn`] / [`unmount`].
//! - [`incoming`]: files being written, checked in full when the writer is done.
//! - [`inode`]: inode numbers of namespaces and chunks.
//! - [`metrics`]: FUSE operations by kind, outcome and latency ([`FsMetrics`]), for a
//!   backend to count what `observe_op` reports.
//! - [`options`]: how a mount behaves ([`MountOptions`]).
//! - `testing` (feature `testing`): an in-memory backend, a fault-injecting wrapper, and the
//!   conformance suite every [`ChunkBackend`] must pass.
//!
//! Calls go one way: session -> fuse -> core -> (incoming, inode, backend, options). The
//! crate depends on kvfs-loader for chunk keys and the format checks, and on fuser for the
//! kernel protocol; it must not depend on the root crate.

pub mod backend;
pub mod core;
pub mod fuse;
pub mod incoming;
pub mod inode;
pub mod listing;
pub mod metrics;
pub mod options;
pub mod session;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use backend::{
    BackendError, Capacity, ChunkBackend, ChunkInfo, Committed, FsOp, OpReport, open_regular,
};
pub use core::{FsError, KvFs};
pub use fuse::FuseFs;
pub use metrics::FsMetrics;
pub use options::MountOptions;
pub use session::{MountError, is_mount_point, mount, prepare_mountpoint, spawn, unmount};
