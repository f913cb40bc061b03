//! O_DIRECT file I/O with a logged fall back to buffered I/O: kvfs-direct's
//! [`file`](kvfs_direct::file) module, which kvfs-loader uses too (one O_DIRECT stack; see
//! docs/DESIGN.md). Its [`DirectError`](kvfs_direct::DirectError)s convert into
//! [`GdsError`](crate::GdsError)s (`Io`, `ShortRead`) with `?`.
//!
//! kvfs-gds opens its own descriptors for each load, so a transfer the kernel refuses under
//! O_DIRECT clears the flag on that descriptor and goes on buffered ([`read_at_least`],
//! [`write_all_at`]).

pub use kvfs_direct::file::*;
