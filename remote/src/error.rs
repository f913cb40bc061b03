//! Errors of the remote tier.
//!
//! A remote failure never makes a local read or write fail by itself: the store treats a
//! failed fetch as a miss and a failed upload stays queued. These variants exist so that
//! callers can tell a misconfiguration (fix it) from an outage (wait) from a bad object
//! (counted, treated as a miss).

use kvfs_loader::FormatError;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid S3 URL `{url}`: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("S3 configuration: {0}")]
    Config(String),
    #[error("S3 request failed: {0}")]
    Store(#[from] object_store::Error),
    #[error("S3 is unreachable (failing fast after a recent failure: {0})")]
    Unavailable(String),
    #[error("object {path} in S3 is not a valid chunk: {source}")]
    Corrupt {
        path: String,
        #[source]
        source: FormatError,
    },
    #[error("upload queue is full ({pending} uploads pending)")]
    QueueFull { pending: usize },
    #[error("the upload queue is not running (remote tier opened without a cache directory)")]
    NoQueue,
    #[error("local I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local chunk {path} is invalid: {source}")]
    LocalChunk {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("invalid name: {0}")]
    Name(#[source] FormatError),
    #[error("a blocking remote-tier call was made from inside an async runtime thread")]
    InsideRuntime,
    #[error("{0}")]
    Shared(Arc<RemoteError>),
}

impl RemoteError {
    /// The error itself, looking through [`RemoteError::Shared`] (an error another caller's
    /// coalesced fetch produced).
    pub fn unshared(&self) -> &RemoteError {
        match self {
            RemoteError::Shared(e) => e.unshared(),
            e => e,
        }
    }

    /// True when the bucket could not be reached or answered with a server error (worth
    /// retrying later), as opposed to a configuration or naming mistake.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.unshared(),
            RemoteError::Store(_) | RemoteError::Unavailable(_) | RemoteError::QueueFull { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> RemoteError {
        RemoteError::Io {
            path: path.into(),
            source,
        }
    }
}
