//! Typed errors of the CUDA back end.
//!
//! [`CudaError::Unavailable`] is the answer of a machine that has no usable device path: it
//! carries the probe's reasons (no `libcuda`, no device, `KVFS_GPU_PATH=host`), so the
//! caller can print why and use the host path. A forced path the machine cannot provide stays
//! kvfs-gds's [`GdsError::PathUnavailable`] (inside [`CudaError::Gpu`]): forcing never falls
//! back silently. Request and chunk errors are the loader's own [`LoaderError`], so an engine
//! handles a failed device load exactly as a failed host load (valid prefix included).

use kvfs_gds::GdsError;
use kvfs_loader::LoaderError;

/// Errors of the CUDA back end.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No device path is usable on this machine; `reasons` are the probe's findings.
    #[error("no CUDA device path: {}", reasons.join("; "))]
    Unavailable {
        /// The probe's findings, in probe order.
        reasons: Vec<String>,
    },
    /// Device I/O failed, or a forced GPU path is unavailable or invalid.
    #[error(transparent)]
    Gpu(#[from] GdsError),
    /// The request is malformed, or a chunk is missing, corrupt or unreadable.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The device path cannot serve this request as asked (the host path through
    /// [`CudaBackend`](crate::CudaBackend)'s `Backend` impl can).
    #[error("the device load path cannot serve this request: {0}")]
    Unsupported(String),
    /// Device I/O failed during a load that was already running (shared by every waiter of
    /// that load).
    #[error("device load failed: {0}")]
    LoadFailed(std::sync::Arc<GdsError>),
    /// The load's thread died.
    #[error("device load: {0}")]
    Handle(&'static str),
}

/// Result alias for this crate.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;
