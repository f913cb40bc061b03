//! [`StoreError`]: everything the store fails at, with the file or chunk it concerns.

use kvfs_loader::{ChunkKey, FormatError};
use std::io;
use std::path::{Path, PathBuf};

/// Everything the store failed at, with the file or chunk it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {key} not found in namespace {ns_dir}")]
    NotFound { ns_dir: String, key: ChunkKey },
    #[error("{}: {source}", path.as_ref().map_or_else(|| "invalid chunk".to_string(), |p| format!("invalid chunk {}", p.display())))]
    Format {
        /// The file the bytes came from, when they came from one.
        path: Option<PathBuf>,
        #[source]
        source: FormatError,
    },
    #[error("`{0}` is not a valid namespace directory name (`<slug>-<16 hex>`)")]
    BadNamespace(String),
    #[error(
        "chunk of namespace {chunk_namespace} cannot be stored in namespace directory {ns_dir}"
    )]
    NamespaceMismatch {
        ns_dir: String,
        chunk_namespace: String,
    },
    #[error(
        "no space for a chunk of {needed} bytes: {available} bytes available within the cache's capacity and free-space bounds"
    )]
    NoSpace { needed: u64, available: u64 },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("remote tier: {0}")]
    Remote(String),
}

impl From<FormatError> for StoreError {
    fn from(source: FormatError) -> Self {
        StoreError::Format { path: None, source }
    }
}

impl StoreError {
    pub(crate) fn format(path: &Path, e: FormatError) -> StoreError {
        match e {
            FormatError::Io(source) => StoreError::Io {
                path: path.to_path_buf(),
                source,
            },
            source => StoreError::Format {
                path: Some(path.to_path_buf()),
                source,
            },
        }
    }
    pub(crate) fn io(path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
