//! Errors of the remote tier.
//!
//! A remote failure never makes a local read or write fail by itself: the store treats a
//! failed fetch as a miss and a failed upload stays queued. These variants exist so that
//! callers can tell a misconfiguration (fix it) from an outage (wait) from a bad object
//! (counted, treated as a miss).
//!
//! [`classify`] turns a failed request into the error a user can act on: a missing bucket
//! ([`RemoteError::NoSuchBucket`]) and refused credentials ([`RemoteError::AccessDenied`])
//! are told apart from outages on every path (reads, writes, listings, sync). It reads the
//! HTTP status with [`http_status`], which looks at the status line object_store renders
//! from the response (`Server returned non-2xx status code: 501 ...`) and never at the
//! request's URL (a chunk key may well contain `501`).

use kvfs_loader::FormatError;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid S3 URL `{url}`: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("S3 configuration: {0}")]
    Config(String),
    #[error("S3 request failed: {0}")]
    Store(#[from] object_store::Error),
    #[error(
        "S3 bucket `{bucket}` does not exist at {endpoint} (create it, or fix the bucket in --s3 / [s3] url)"
    )]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error(
        "S3 access denied to bucket `{bucket}` (HTTP {status}): check the access key, the secret and the key's permissions on the bucket"
    )]
    AccessDenied { bucket: String, status: u16 },
    #[error(
        "S3 {op} got no answer within {after:?} (raise `{key}` in [s3] if the server is just slow)"
    )]
    Timeout {
        op: &'static str,
        after: Duration,
        key: &'static str,
    },
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
            RemoteError::Store(_)
                | RemoteError::Unavailable(_)
                | RemoteError::QueueFull { .. }
                | RemoteError::Timeout { .. }
        )
    }

    /// True for a misconfiguration no retry fixes (a missing bucket, refused credentials).
    pub fn is_config(&self) -> bool {
        matches!(
            self.unshared(),
            RemoteError::NoSuchBucket { .. }
                | RemoteError::AccessDenied { .. }
                | RemoteError::Config(_)
                | RemoteError::BadUrl { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> RemoteError {
        RemoteError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The HTTP status of a failed request, when the server answered one. object_store does not
/// export its request error type, so this reads the status line it renders for a non-2xx
/// answer (`Server returned non-2xx status code: 404 Not Found: <body>`), at the start of an
/// error in the source chain: that text comes from the status code, never from the URL.
pub fn http_status(e: &object_store::Error) -> Option<u16> {
    const LINE: &str = "Server returned non-2xx status code: ";
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if let Some(rest) = s.strip_prefix(LINE) {
            return rest.get(..3).and_then(|d| d.parse().ok());
        }
        cur = err.source();
    }
    None
}

/// The S3 error code in a failed request's XML body (`<Code>NoSuchBucket</Code>`), if any.
fn s3_error_code(e: &object_store::Error) -> Option<String> {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if let Some(i) = s.find("<Code>") {
            let rest = &s[i + 6..];
            if let Some(j) = rest.find("</Code>") {
                return Some(rest[..j].to_string());
            }
        }
        cur = err.source();
    }
    None
}

/// True for an error that means the server does not implement the request (HTTP 501).
pub fn is_not_implemented(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotImplemented { .. }) || http_status(e) == Some(501)
}

/// The error a user can act on for a failed request to `bucket` at `endpoint`.
pub fn classify(e: object_store::Error, bucket: &str, endpoint: &str) -> RemoteError {
    let status = http_status(&e);
    let denied = match &e {
        object_store::Error::PermissionDenied { .. } => Some(403),
        object_store::Error::Unauthenticated { .. } => Some(401),
        _ => status.filter(|s| *s == 401 || *s == 403),
    };
    if let Some(status) = denied {
        return RemoteError::AccessDenied {
            bucket: bucket.to_string(),
            status,
        };
    }
    if s3_error_code(&e).as_deref() == Some("NoSuchBucket") {
        return RemoteError::NoSuchBucket {
            bucket: bucket.to_string(),
            endpoint: endpoint.to_string(),
        };
    }
    RemoteError::Store(e)
}
