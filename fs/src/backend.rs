//! The store interface the FUSE adapter needs, and its error type.
//!
//! kvfs-fs knows nothing of tiers, eviction or S3: it sees a [`ChunkBackend`], a small
//! synchronous trait over namespaces and chunks (look up, stat, read, commit a verified file,
//! remove, list, local backing file, capacity, status JSON). The root crate implements it for
//! the tiered store; [`crate::testing::MemBackend`] implements it in memory for tests.
//!
//! The trait is synchronous on purpose: fuser dispatches each request on one of its worker
//! threads, so a blocking call costs one worker, and `--threads` sizes the pool for parallel
//! readers. Implementations must be `Send + Sync` and safe to call from many threads at once.
//!
//! Errors are typed ([`BackendError`]) and each maps to exactly one errno
//! ([`BackendError::errno`]), which is what the application on the other side of the mount
//! sees.

use kvfs_loader::{ChunkHeader, ChunkKey, FormatError};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What the adapter shows for one chunk (`stat`, xattrs).
#[derive(Debug, Clone)]
pub struct ChunkInfo {
    /// True size of the chunk file in bytes.
    pub len: u64,
    /// When the chunk was committed (modification time of its local file, when it has one).
    pub mtime: SystemTime,
    /// Fastest tier holding it (`memory`, `disk`, `remote`), shown as `user.kvfs.tier`.
    pub tier: String,
    /// Absolute path of the chunk file on local disk, when it has one (`user.kvfs.backing`).
    pub backing: Option<PathBuf>,
}

/// Capacity of the cache, reported by `statfs` (`df /kvfs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Bytes the cache may use (its configured limit, or the file system's size).
    pub total_bytes: u64,
    /// Bytes held by chunks.
    pub used_bytes: u64,
    /// Bytes still available to new chunks (limit minus use, never more than the free space
    /// of the file system under the cache).
    pub free_bytes: u64,
    /// Number of chunks held.
    pub chunks: u64,
}

/// Result of [`ChunkBackend::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The chunk is new.
    Created,
    /// Another writer committed the same key first; chunks are content-addressed, so the
    /// existing one is kept and the commit counts as a success.
    AlreadyExists,
}

/// Why a backend call failed. Each variant has one errno ([`BackendError::errno`]).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no such chunk or namespace")]
    NotFound,
    #[error("already exists")]
    AlreadyExists,
    #[error("invalid chunk: {0}")]
    Invalid(#[from] FormatError),
    #[error("invalid name `{0}`")]
    BadName(String),
    #[error("the cache is full")]
    NoSpace,
    #[error("the cache is read-only")]
    ReadOnly,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A chunk's local file is a symlink, device, FIFO or directory: never served.
    #[error("not a regular file: {0}")]
    NotRegular(String),
    #[error("store error: {0}")]
    Other(String),
}

impl BackendError {
    /// The errno an application sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BackendError::NotFound => libc::ENOENT,
            BackendError::AlreadyExists => libc::EEXIST,
            BackendError::Invalid(FormatError::Io(e)) | BackendError::Io(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            BackendError::Invalid(_) | BackendError::BadName(_) => libc::EINVAL,
            BackendError::NoSpace => libc::ENOSPC,
            BackendError::ReadOnly => libc::EROFS,
            BackendError::NotRegular(_) | BackendError::Other(_) => libc::EIO,
        }
    }
}

/// Opens `path` read-only if it is a regular file: `O_NOFOLLOW` (a symlink fails), and
/// `O_NONBLOCK` so that a FIFO cannot block the open; anything but a regular file is
/// [`BackendError::NotRegular`]. A missing file is `Ok(None)`.
pub fn open_regular(path: &Path) -> Result<Option<File>, BackendError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(BackendError::NotRegular(format!(
                "{} is a symbolic link",
                path.display()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(BackendError::NotRegular(format!(
            "{} is a {ft:?}",
            path.display()
        )));
    }
    Ok(Some(f))
}

/// The store behind a kvfs mount.
///
/// Namespaces are given by their directory name (`<slug>-<16 hex>`, already checked with
/// `kvfs_loader::spec::validate_namespace_dir` by the adapter).
/// The kind of a FUSE request, as [`ChunkBackend::observe_op`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsOp {
    Lookup,
    Getattr,
    Setattr,
    Mkdir,
    Unlink,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Opendir,
    Readdir,
    Statfs,
    Getxattr,
    Listxattr,
    Access,
    Create,
    /// A change the file system refuses whatever it names (mknod, rmdir, rename,
    /// setxattr, removexattr).
    Refused,
}

impl FsOp {
    /// Every kind, for tables and tests.
    pub const ALL: [FsOp; 18] = [
        FsOp::Lookup,
        FsOp::Getattr,
        FsOp::Setattr,
        FsOp::Mkdir,
        FsOp::Unlink,
        FsOp::Open,
        FsOp::Read,
        FsOp::Write,
        FsOp::Flush,
        FsOp::Release,
        FsOp::Opendir,
        FsOp::Readdir,
        FsOp::Statfs,
        FsOp::Getxattr,
        FsOp::Listxattr,
        FsOp::Access,
        FsOp::Create,
        FsOp::Refused,
    ];

    /// Lower-case name (`lookup`, `read`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FsOp::Lookup => "lookup",
            FsOp::Getattr => "getattr",
            FsOp::Setattr => "setattr",
            FsOp::Mkdir => "mkdir",
            FsOp::Unlink => "unlink",
            FsOp::Open => "open",
            FsOp::Read => "read",
            FsOp::Write => "write",
            FsOp::Flush => "flush",
            FsOp::Release => "release",
            FsOp::Opendir => "opendir",
            FsOp::Readdir => "readdir",
            FsOp::Statfs => "statfs",
            FsOp::Getxattr => "getxattr",
            FsOp::Listxattr => "listxattr",
            FsOp::Access => "access",
            FsOp::Create => "create",
            FsOp::Refused => "refused",
        }
    }
}

/// How one FUSE request went, as [`ChunkBackend::observe_op`] hears it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpReport {
    pub op: FsOp,
    /// From the request's arrival in the file system to its answer.
    pub elapsed: Duration,
    pub ok: bool,
    /// Bytes the request moved: data answered to a read, taken from a write (else 0).
    pub bytes: u64,
}

pub trait ChunkBackend: Send + Sync + 'static {
    /// Namespace directory names, in any order.
    fn namespaces(&self) -> Result<Vec<String>, BackendError>;

    /// Whether a namespace exists.
    fn namespace_exists(&self, ns: &str) -> Result<bool, BackendError> {
        Ok(self.namespaces()?.iter().any(|n| n == ns))
    }

    /// Creates an empty namespace (`mkdir`). Creating an existing one is
    /// [`BackendError::AlreadyExists`].
    fn create_namespace(&self, ns: &str) -> Result<(), BackendError>;

    /// Keys and sizes of the chunks of a namespace, in any order.
    fn chunks(&self, ns: &str) -> Result<Vec<(ChunkKey, u64)>, BackendError>;

    /// The keys of the chunks of `ns` whose first byte is `page`, sorted: one page of a
    /// streamed directory listing ([`crate::listing`]). The default filters [`Self::chunks`];
    /// a backend with a key-sharded layout lists one shard.
    fn chunk_page(&self, ns: &str, page: u8) -> Result<Vec<ChunkKey>, BackendError> {
        let mut keys: Vec<ChunkKey> = self
            .chunks(ns)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.0[0] == page)
            .collect();
        keys.sort_unstable();
        Ok(keys)
    }

    /// The chunk under `key`, or `None` when no tier has it. An implementation may fetch a
    /// chunk that is only remote here, so that a following open finds it local.
    fn stat(&self, ns: &str, key: &ChunkKey) -> Result<Option<ChunkInfo>, BackendError>;

    /// The fastest tier holding a chunk, exactly (`user.kvfs.tier`); `stat` may answer
    /// with a cheaper approximation. The default is [`ChunkInfo::tier`] from `stat`.
    fn tier(&self, ns: &str, key: &ChunkKey) -> Result<Option<String>, BackendError> {
        Ok(self.stat(ns, key)?.map(|i| i.tier))
    }

    /// The parsed header of a chunk (for the `user.kvfs.*` attributes). The default reads it
    /// through [`ChunkBackend::read_at`].
    fn header(&self, ns: &str, key: &ChunkKey) -> Result<ChunkHeader, BackendError> {
        let mut buf = vec![0u8; kvfs_loader::format::ALIGN as usize];
        let n = self.read_at(ns, key, 0, &mut buf)?;
        let header_len = ChunkHeader::peek_header_len(&buf[..n])? as usize;
        if header_len > n {
            buf.resize(header_len, 0);
            let m = self.read_at(ns, key, n as u64, &mut buf[n..])?;
            buf.truncate(n + m);
        } else {
            buf.truncate(n);
        }
        Ok(ChunkHeader::parse(&buf)?)
    }

    /// Reads chunk bytes at `offset`; returns how many were read (0 at end of file).
    fn read_at(
        &self,
        ns: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, BackendError>;

    /// The chunk's file on local disk, opened read-only, when it has one (used for FUSE
    /// passthrough and page-cache reads). The default opens [`ChunkInfo::backing`].
    ///
    /// The adapter checks the file it gets in full before serving it (once per version of
    /// the file). Open it with [`open_regular`], so a symlink, device or FIFO planted in the
    /// cache is refused ([`BackendError::NotRegular`]).
    fn open_local(&self, ns: &str, key: &ChunkKey) -> Result<Option<File>, BackendError> {
        match self.stat(ns, key)?.and_then(|i| i.backing) {
            // Gone between stat and open (evicted): serve through read_at instead.
            Some(path) => open_regular(&path),
            None => Ok(None),
        }
    }

    /// Takes a chunk whose local file failed the adapter's check out of service (the tiered
    /// store moves it to its quarantine directory, as `kvfs verify` does, and forgets it), so
    /// that it is neither served nor counted again. Returns where it went, if anywhere.
    fn quarantine(&self, ns: &str, key: &ChunkKey, reason: &str) -> Option<PathBuf> {
        let _ = (ns, key, reason);
        None
    }

    /// Directory for files being written through the mount (on the same file system as the
    /// cache, so committing one is a link, not a copy). The adapter creates it if missing.
    fn incoming_dir(&self) -> PathBuf;

    /// Whether [`ChunkBackend::commit`] checks every payload digest itself (rejecting a bad
    /// file with [`BackendError::Invalid`] and keeping nothing). When it does, the adapter
    /// checks only the header, the name and the namespace before committing, so the payload
    /// is hashed once, not twice. The default (`false`) makes the adapter verify in full.
    fn verifies_commits(&self) -> bool {
        false
    }

    /// Takes in the complete chunk file at `path`, which the adapter has already checked
    /// against `ns` and `key` (in full unless [`ChunkBackend::verifies_commits`]). The file
    /// at `path` belongs to the adapter and is removed by it afterwards; the backend copies or
    /// links it.
    fn commit(&self, ns: &str, key: &ChunkKey, path: &Path) -> Result<Committed, BackendError>;

    /// Evicts a chunk from the local tiers (`unlink`). Returns whether it was there.
    fn remove(&self, ns: &str, key: &ChunkKey) -> Result<bool, BackendError>;

    /// Capacity and use of the cache (`statfs`).
    fn capacity(&self) -> Result<Capacity, BackendError>;

    /// Store statistics as a JSON document (served as `/.kvfs/stats.json`).
    fn stats_json(&self) -> Result<String, BackendError>;

    /// Called after each FUSE request with its kind, how long the file system took to answer
    /// it, whether it succeeded and the bytes it moved: where a daemon counts operations (its
    /// metrics). Must be cheap; the default does nothing.
    fn observe_op(&self, _report: &OpReport) {}
}
