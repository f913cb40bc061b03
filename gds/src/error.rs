//! Typed errors of kvfs-gds.
//!
//! Every failure a caller can act on has its own variant: a forced GPU path that this machine
//! cannot provide, a plan that does not fit the extents or the destination, an I/O error with
//! the operation and offset that failed, and CUDA / cuFile / NVRTC errors carrying the call
//! that failed. CUDA errors are kept as strings so that this type does not expose cudarc types
//! in the public API (and can be built and matched on machines without CUDA).

use std::io;

/// Result alias for this crate.
pub type Result<T, E = GdsError> = std::result::Result<T, E>;

/// Errors of GPU file I/O.
#[derive(Debug, thiserror::Error)]
pub enum GdsError {
    /// `KVFS_GPU_PATH` (or the option) holds a value that is not a path name.
    #[error("invalid GPU path {value:?}: expected one of gds, compat, staging, host")]
    InvalidForcedPath {
        /// The rejected value.
        value: String,
    },
    /// A path was forced but this machine cannot provide it.
    #[error("GPU path {wanted} was forced but is unavailable: {}", reasons.join("; "))]
    PathUnavailable {
        /// The forced path, as spelt in `KVFS_GPU_PATH`.
        wanted: &'static str,
        /// Why each prerequisite failed, in probe order.
        reasons: Vec<String>,
    },
    /// An operation that needs CUDA was called on a host-only loader.
    #[error("{op} needs a CUDA device, but the selected path is host-only")]
    NoDevice {
        /// The operation.
        op: &'static str,
    },
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
    /// The file ended before the extent did.
    #[error("short read: extent wants {wanted} bytes at offset {offset}, file gave {got}")]
    ShortRead {
        /// File offset of the extent.
        offset: u64,
        /// Bytes the extent asked for.
        wanted: u64,
        /// Bytes the file had.
        got: u64,
    },
    /// The scatter plan reads source bytes past the end of the extents.
    #[error("scatter plan covers {plan_len} source bytes but the extents hold only {extents_len}")]
    PlanExceedsExtents {
        /// Highest source offset the plan reads, exclusive.
        plan_len: u64,
        /// Total bytes of the extents.
        extents_len: u64,
    },
    /// A scatter plan or its inputs are inconsistent.
    #[error("invalid scatter plan: {0}")]
    InvalidPlan(String),
    /// A destination run lies outside the memory given to a host sink.
    #[error("destination {addr:#x}+{len} lies outside the {cap}-byte destination")]
    DestinationOutOfBounds {
        /// Start of the run.
        addr: u64,
        /// Length of the run.
        len: u64,
        /// Size of the destination.
        cap: u64,
    },
    /// An extent or option breaks an alignment rule.
    #[error("{what} = {value} is not a multiple of {align}")]
    Misaligned {
        /// What was misaligned.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A CUDA driver call failed.
    #[error("CUDA {op} failed: {msg}")]
    Cuda {
        /// The driver call.
        op: &'static str,
        /// The driver's error text.
        msg: String,
    },
    /// A cuFile call failed.
    #[error("cuFile {op} failed: code {code} (cuda {cu_code}){}", if msg.is_empty() { String::new() } else { format!(": {msg}") })]
    CuFile {
        /// The cuFile call.
        op: &'static str,
        /// The `CUfileOpError` code (5000s) or a negative errno for reads and writes.
        code: i64,
        /// The CUDA driver result carried with `CU_FILE_CUDA_DRIVER_ERROR`.
        cu_code: i32,
        /// Extra text.
        msg: String,
    },
    /// NVRTC could not compile the scatter kernel.
    #[error("NVRTC failed to compile the scatter kernel: {0}")]
    Nvrtc(String),
}

impl GdsError {
    /// Wraps an OS error with the operation and offset.
    pub(crate) fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        GdsError::Io { op, offset, source }
    }
}

impl From<kvfs_direct::DirectError> for GdsError {
    fn from(e: kvfs_direct::DirectError) -> Self {
        match e {
            kvfs_direct::DirectError::Io { op, offset, source } => {
                GdsError::Io { op, offset, source }
            }
            kvfs_direct::DirectError::ShortRead {
                offset,
                wanted,
                got,
            } => GdsError::ShortRead {
                offset,
                wanted,
                got,
            },
            e @ kvfs_direct::DirectError::Alloc { .. } => GdsError::Config(e.to_string()),
        }
    }
}
