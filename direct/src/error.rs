//! The errors of the O_DIRECT stack: an OS error with the call and offset it came from, a
//! file that ended before the bytes asked for, and an aligned allocation that failed.

use std::io;

/// What a direct-I/O call failed at.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// A system call on a file failed.
    #[error("{op} at offset {offset} failed: {source}")]
    Io {
        /// The operation (`pread`, `pwrite`, `open`, ...).
        op: &'static str,
        /// The file offset of the failed call.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file ended before the wanted bytes did; nothing was invented.
    #[error("short read: wanted {wanted} bytes at offset {offset}, file gave {got}")]
    ShortRead {
        /// File offset of the read.
        offset: u64,
        /// Bytes asked for.
        wanted: u64,
        /// Bytes the file had.
        got: u64,
    },
    /// An aligned buffer could not be allocated (zero length, a size the allocator refuses,
    /// or no memory).
    #[error("cannot allocate an aligned buffer of {len} bytes: {reason}")]
    Alloc {
        /// Bytes asked for.
        len: usize,
        /// Why.
        reason: String,
    },
}

impl DirectError {
    /// Wraps an OS error with the operation and offset.
    pub fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        DirectError::Io { op, offset, source }
    }
}
