//! The file system itself, apart from FUSE: [`KvFs`] decides every request and returns a
//! `Result`, so it is tested directly (no kernel, no mount) over `MemBackend` and
//! `FaultyBackend`; [`crate::fuse`] is one call per kernel callback plus the errno mapping,
//! and [`crate::session`] mounts it. (The split follows mountpoint-s3's `fs.rs` / `fuse.rs`.)
//!
//! ```text
//! /                          root (namespaces; `mkdir` creates one)
//! /.kvfs/stats.json          the store's statistics (read-only, fresh on every open)
//! /.kvfs/mount.json          this mount: passthrough negotiated, options, counters
//! /<namespace>/<key>.kvc     chunks, read-only once committed
//! ```
//!
//! **Reads never serve a byte that does not verify.** A chunk with a file on local disk is
//! opened as a regular file only (`O_NOFOLLOW`, no symlink, device or FIFO) and that open file
//! is checked in full (header, key against the name, namespace id against the directory,
//! every layer digest, size) before passthrough is enabled or a read is served. The result is
//! remembered per file identity (device, inode, size, mtime, ctime), so an unchanged file is
//! hashed once per mount, not per open; a file that changed is checked again. A failed check
//! is `EIO`, counted (`verify_failures` in `mount.json`), logged, and the file is quarantined
//! through [`ChunkBackend::quarantine`] (the store moves it aside as `kvfs verify` does).
//! What remains: a byte that rots *after* its check on a file whose identity did not change is
//! not seen by the mount; `kvfs verify` finds it (docs/MOUNT.md gives a systemd timer).
//!
//! Once checked, a chunk is opened with FUSE passthrough when the kernel offered it (the
//! FUSE layer registers the backing file; see [`KvFs::open`]), else with `FOPEN_KEEP_CACHE`
//! (chunks never change) and reads are `pread`s of the checked file, or of the backend for a
//! chunk that is not local (the backend verifies what it fetches).
//!
//! **Writes.** See [`crate::incoming`]: create, write, close; checked and committed at the
//! close of the last descriptor (see [`KvFs::flush`]).
//!
//! **Refused operations**, with the error an application sees (the errno is chosen in
//! [`crate::fuse`]):
//! - rename, link, symlink, mknod, rmdir, chmod/chown/truncate/utimes of a committed chunk or a
//!   directory, setting or removing xattrs, writing a committed chunk: **EPERM**;
//! - opening a committed chunk for writing with `O_TRUNC` (overwriting it, as `cp` and
//!   `open(.., "wb")` do) and creating an existing name: **EEXIST**;
//! - a chunk that is not valid for its name at close: **EINVAL** (from `close()`); one the
//!   store cannot keep within its bounds: **ENOSPC**;
//! - a file name that is not `<64 hex>.kvc`, or a namespace name that
//!   `validate_namespace_dir` refuses: **EINVAL** (**ENAMETOOLONG** over 255 bytes);
//! - anything that modifies a `--read-only` mount: **EROFS**.
//!
//! Directory TTLs are short (1 s): namespaces and listings change behind the mount's back.
//! Chunk entries and attributes live 60 s: a chunk's bytes and size never change, new chunks
//! are never negatively cached, and an evicted one still fails `open` with ENOENT.

use crate::backend::{BackendError, ChunkBackend, ChunkInfo, OpReport};
use crate::incoming::Incoming;
use crate::inode::{
    Inodes, MOUNT_INFO_FILE, MOUNT_INFO_INO, Node, ROOT_INO, STATS_FILE, STATS_INO, STATUS_DIR,
    STATUS_DIR_INO,
};
use crate::listing::{ChunkListing, Listed};
use crate::options::MountOptions;
use fuser::{FileAttr, FileType, INodeNo};
use kvfs_loader::{ChunkKey, FormatError};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How long the kernel may cache directory names and attributes (namespaces come and go).
pub const TTL: Duration = Duration::from_secs(1);
/// How long the kernel may cache a chunk's name and attributes. A chunk never changes; only
/// eviction by another process can make a cached entry stale, and then `open` still answers
/// ENOENT. Long enough that `find`/`ls -l` over 100,000 chunks (which reads the whole
/// directory before it stats) finds every entry still cached from READDIRPLUS.
pub const CHUNK_TTL: Duration = Duration::from_secs(60);
/// No caching (status files, files being written).
pub const NO_TTL: Duration = Duration::ZERO;
/// `st_blksize` of chunks: `cp` and friends size their buffers by it, and big requests are
/// what FUSE is fast at.
const CHUNK_BLKSIZE: u32 = 1 << 20;
/// Longest file name (bytes), as `statfs` reports it.
pub const NAME_MAX: usize = 255;
/// The extended attributes of a chunk.
pub const XATTR_TOKENS: &str = "user.kvfs.tokens";
pub const XATTR_PARENT: &str = "user.kvfs.parent";
pub const XATTR_DIGEST: &str = "user.kvfs.digest";
pub const XATTR_TIER: &str = "user.kvfs.tier";
/// The chunk's codec (`raw`, `lossless`, `fp8`, `int8`, `kivi4`, `kivi2`).
pub const XATTR_CODEC: &str = "user.kvfs.codec";
/// Bytes of the chunk file as stored (its size).
pub const XATTR_STORED_BYTES: &str = "user.kvfs.stored_bytes";
/// Bytes of the chunk decoded to raw (equal to the stored bytes for a raw chunk).
pub const XATTR_RAW_BYTES: &str = "user.kvfs.raw_bytes";
/// The one name kvfs-loader and tools read the backing path by.
pub const XATTR_BACKING: &str = kvfs_loader::identity::BACKING_XATTR;

/// Why a request failed. [`crate::fuse`] maps each to one errno.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("the mount is read-only")]
    ReadOnly,
    #[error("already exists")]
    Exists,
    #[error("invalid name")]
    InvalidName,
    #[error("name longer than {NAME_MAX} bytes")]
    NameTooLong,
    #[error("no such open file")]
    BadHandle,
    #[error("no such extended attribute")]
    NoXattr,
    /// The chunk file on disk failed its open-time check (it has been quarantined).
    #[error("chunk failed its check: {0}")]
    Corrupt(String),
    /// A file being written was refused at close (the backend's error, once per file).
    #[error("{0}")]
    Rejected(Arc<BackendError>),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A name and its attributes, as LOOKUP, GETATTR, MKDIR and CREATE return them.
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: FileAttr,
    pub ttl: Duration,
}

/// How an open file is to be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The kernel reads the backing file itself (FUSE passthrough).
    Passthrough,
    /// Reads come here; the page cache stays valid across opens (`FOPEN_KEEP_CACHE`).
    KeepCache,
    /// Reads and writes come here unbuffered (`FOPEN_DIRECT_IO`: status files, new files).
    Direct,
}

/// An opened file: its handle and how it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    pub mode: OpenMode,
}

/// One directory entry of a listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileType,
    pub name: String,
}

/// `statfs` in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// What [`KvFs::release`] leaves for the FUSE layer to undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// The handle used the inode's passthrough backing file: drop one use of it.
    Passthrough,
    Other,
}

/// An open file or directory.
enum Handle {
    /// A committed chunk opened for reading. `file` is its checked local file when it has
    /// one (and passthrough was not used); `passthrough` says a backing id is held for `ino`.
    Chunk {
        ns: Arc<str>,
        key: ChunkKey,
        file: Option<File>,
        passthrough: bool,
    },
    /// A status file: its content as of the open.
    Status(Vec<u8>),
    /// A new chunk being written.
    Write(Mutex<Incoming>),
    /// A directory listing as of the opendir (the root and the status directory: a few
    /// entries).
    Dir(Arc<Vec<DirEntry>>),
    /// A namespace directory, listed a page at a time as READDIRs come ([`ChunkListing`]).
    Chunks(ChunkListing),
}

/// Counters shown in `/.kvfs/mount.json`.
#[derive(Default)]
struct Counters {
    opens_passthrough: AtomicU64,
    opens_cached: AtomicU64,
    opens_remote: AtomicU64,
    commits: AtomicU64,
    rejected: AtomicU64,
    verified: AtomicU64,
    verify_failures: AtomicU64,
}

/// What identifies one version of a file on disk: a file whose stamp is unchanged since its
/// check needs no new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(md: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

thread_local! {
    /// Read buffer of each worker thread, reused across requests.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The kvfs file system over a [`ChunkBackend`].
pub struct KvFs {
    backend: Arc<dyn ChunkBackend>,
    opts: MountOptions,
    inodes: Inodes,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Write handles per chunk inode (a file being written has no committed chunk yet).
    pending: Mutex<HashMap<u64, Vec<u64>>>,
    /// Set at INIT when the kernel offered passthrough and the options asked for it; cleared
    /// if registering a backing file fails (for example without CAP_SYS_ADMIN).
    passthrough: AtomicBool,
    kernel_abi: Mutex<String>,
    started: SystemTime,
    counters: Counters,
    /// Chunk files that passed their open-time check, by (device, inode), with the stamp
    /// they had then.
    checked: Mutex<HashMap<(u64, u64), FileStamp>>,
}

impl KvFs {
    /// Tells the backend how a request went ([`ChunkBackend::observe_op`]).
    pub fn observe(&self, report: &OpReport) {
        self.backend.observe_op(report);
    }

    /// A file system over `backend`. Temporary files older than ten minutes left in the
    /// backend's incoming directory by a crashed daemon are removed.
    pub fn new(backend: Arc<dyn ChunkBackend>, opts: MountOptions) -> KvFs {
        let incoming = backend.incoming_dir();
        match kvfs_loader::dir::sweep_temporaries(&incoming, Duration::from_secs(600)) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(removed = n, dir = %incoming.display(), "swept stale incoming files")
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %incoming.display(), "cannot sweep incoming files")
            }
        }
        KvFs {
            backend,
            opts,
            inodes: Inodes::new(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(false),
            kernel_abi: Mutex::new(String::new()),
            started: SystemTime::now(),
            counters: Counters::default(),
            checked: Mutex::new(HashMap::new()),
        }
    }

    pub fn options(&self) -> &MountOptions {
        &self.opts
    }

    /// Records what the kernel offered at INIT: its protocol version, and whether
    /// passthrough was negotiated.
    pub fn set_kernel(&self, abi: String, passthrough: bool) {
        *self.kernel_abi.lock().unwrap() = abi;
        self.passthrough.store(passthrough, Ordering::Relaxed);
    }

    /// Whether opens currently try passthrough.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, mtime: SystemTime, perm: u16) -> FileAttr {
        let (nlink, blksize) = match kind {
            FileType::Directory => (2, 4096),
            _ => (1, CHUNK_BLKSIZE),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: perm & !(self.opts.umask as u16),
            nlink,
            uid: self.opts.uid,
            gid: self.opts.gid,
            rdev: 0,
            blksize,
            flags: 0,
        }
    }

    fn dir_attr(&self, ino: u64) -> FileAttr {
        let perm = if ino == STATUS_DIR_INO { 0o555 } else { 0o777 };
        self.attr(ino, FileType::Directory, 0, self.started, perm)
    }

    fn chunk_attr(&self, ino: u64, info: &ChunkInfo) -> FileAttr {
        self.attr(ino, FileType::RegularFile, info.len, info.mtime, 0o444)
    }

    fn status_content(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        if ino == STATS_INO {
            let mut s = self.backend.stats_json()?;
            if !s.ends_with('\n') {
                s.push('\n');
            }
            Ok(s.into_bytes())
        } else {
            Ok(self.mount_info().into_bytes())
        }
    }

    /// `/.kvfs/mount.json`.
    pub fn mount_info(&self) -> String {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            concat!(
                "{{\n  \"passthrough\": {},\n  \"passthrough_requested\": {},\n",
                "  \"read_only\": {},\n  \"allow_other\": {},\n  \"threads\": {},\n",
                "  \"kernel_abi\": \"{}\",\n  \"opens_passthrough\": {},\n  \"opens_cached\": {},\n",
                "  \"opens_remote\": {},\n  \"commits\": {},\n  \"rejected\": {},\n",
                "  \"verified\": {},\n  \"verify_failures\": {}\n}}\n"
            ),
            self.passthrough(),
            self.opts.passthrough,
            self.opts.read_only,
            self.opts.allow_other,
            self.opts.threads,
            self.kernel_abi.lock().unwrap(),
            n(&c.opens_passthrough),
            n(&c.opens_cached),
            n(&c.opens_remote),
            n(&c.commits),
            n(&c.rejected),
            n(&c.verified),
            n(&c.verify_failures),
        )
    }

    /// Size of the largest file being written under `ino`, if any is.
    fn pending_len(&self, ino: u64) -> Option<u64> {
        let fhs = self.pending.lock().unwrap().get(&ino).cloned()?;
        let mut len = None;
        for fh in fhs {
            if let Ok(h) = self.handle(fh)
                && let Handle::Write(w) = &*h
            {
                let l = w.lock().unwrap().written_len();
                len = Some(len.map_or(l, |m: u64| m.max(l)));
            }
        }
        len
    }

    fn is_pending(&self, ino: u64) -> bool {
        self.pending.lock().unwrap().contains_key(&ino)
    }

    /// A name as UTF-8, refusing names longer than any file system allows.
    fn name_str(name: &OsStr) -> Result<&str, FsError> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        name.to_str().ok_or(FsError::InvalidName)
    }

    fn chunk_name(name: &OsStr) -> Result<ChunkKey, FsError> {
        ChunkKey::from_file_name(Self::name_str(name)?).map_err(|_| FsError::InvalidName)
    }

    fn modifiable(&self) -> Result<(), FsError> {
        if self.opts.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The error for a change kvfs never makes (rename, link, mknod, rmdir, xattr changes):
    /// EROFS on a read-only mount, EPERM otherwise.
    pub fn refuse_change(&self) -> FsError {
        self.modifiable().err().unwrap_or(FsError::NotPermitted)
    }

    /// Attributes of an inode (GETATTR).
    pub fn getattr(&self, ino: u64) -> Result<Entry, FsError> {
        let entry = |attr, ttl| Ok(Entry { attr, ttl });
        match self.inodes.get(ino).ok_or(FsError::NotFound)? {
            Node::Root | Node::StatusDir => entry(self.dir_attr(ino), TTL),
            Node::StatusFile(i) => {
                let len = self.status_content(i)?.len() as u64;
                entry(
                    self.attr(i, FileType::RegularFile, len, SystemTime::now(), 0o444),
                    NO_TTL,
                )
            }
            Node::Namespace(ns) => match self.backend.namespace_exists(&ns)? {
                true => entry(self.dir_attr(ino), TTL),
                false => Err(FsError::NotFound),
            },
            Node::Chunk { ns, key } => {
                if let Some(len) = self.pending_len(ino) {
                    let attr = self.attr(ino, FileType::RegularFile, len, SystemTime::now(), 0o644);
                    return entry(attr, NO_TTL);
                }
                match self.backend.stat(&ns, &key)? {
                    Some(info) => entry(self.chunk_attr(ino, &info), CHUNK_TTL),
                    None => Err(FsError::NotFound),
                }
            }
        }
    }

    /// Looks up `name` in the directory `parent` (LOOKUP).
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry, FsError> {
        let name_str = Self::name_str(name).map_err(|e| match e {
            FsError::NameTooLong => e,
            _ => FsError::NotFound,
        })?;
        let (ino, ttl) = match self.inodes.get(parent).ok_or(FsError::NotFound)? {
            Node::Root if name_str == STATUS_DIR => (STATUS_DIR_INO, TTL),
            Node::Root => {
                if kvfs_loader::spec::validate_namespace_dir(name_str).is_err()
                    || !self.backend.namespace_exists(name_str)?
                {
                    return Err(FsError::NotFound);
                }
                (self.inodes.namespace(name_str).0, TTL)
            }
            Node::StatusDir => match name_str {
                STATS_FILE => (STATS_INO, NO_TTL),
                MOUNT_INFO_FILE => (MOUNT_INFO_INO, NO_TTL),
                _ => return Err(FsError::NotFound),
            },
            Node::Namespace(ns) => {
                let key = Self::chunk_name(name).map_err(|_| FsError::NotFound)?;
                // A file being written is not visible under its name until committed.
                // One backend stat per lookup: the reply's attributes come from it.
                let info = self.backend.stat(&ns, &key)?.ok_or(FsError::NotFound)?;
                let ino = self.inodes.chunk(&ns, &key);
                if self.pending_len(ino).is_none() {
                    return Ok(Entry {
                        attr: self.chunk_attr(ino, &info),
                        ttl: CHUNK_TTL,
                    });
                }
                (ino, NO_TTL)
            }
            Node::StatusFile(_) | Node::Chunk { .. } => return Err(FsError::NotADirectory),
        };
        let attr = self.getattr(ino)?.attr;
        Ok(Entry { attr, ttl })
    }

    /// SETATTR. A file still being written may be truncated (`O_TRUNC`, `ftruncate`) and
    /// have its times and mode "set" (ignored: a committed chunk is 0444 with its commit
    /// time); any change to anything else is refused.
    pub fn setattr(
        &self,
        ino: u64,
        size: Option<u64>,
        other_changes: bool,
    ) -> Result<Entry, FsError> {
        if self.is_pending(ino) {
            if let Some(len) = size {
                let fhs = self.pending.lock().unwrap().get(&ino).cloned();
                for fh in fhs.unwrap_or_default() {
                    if let Ok(h) = self.handle(fh)
                        && let Handle::Write(w) = &*h
                    {
                        w.lock().unwrap().set_len(len)?;
                    }
                }
            }
            return self.getattr(ino);
        }
        if size.is_some() || other_changes {
            return Err(self.refuse_change());
        }
        self.getattr(ino)
    }

    /// Creates a namespace (MKDIR).
    pub fn mkdir(&self, parent: u64, name: &OsStr) -> Result<Entry, FsError> {
        self.modifiable()?;
        if parent != ROOT_INO {
            return Err(FsError::NotPermitted);
        }
        let name = Self::name_str(name)?;
        if name == STATUS_DIR {
            return Err(FsError::Exists);
        }
        if let Err(e) = kvfs_loader::spec::validate_namespace_dir(name) {
            tracing::debug!(error = %e, "mkdir refused");
            return Err(FsError::InvalidName);
        }
        match self.backend.create_namespace(name) {
            Ok(()) => {
                let (ino, _) = self.inodes.namespace(name);
                Ok(Entry {
                    attr: self.dir_attr(ino),
                    ttl: TTL,
                })
            }
            Err(BackendError::AlreadyExists) => Err(FsError::Exists),
            Err(e) => Err(e.into()),
        }
    }

    /// Evicts a chunk (UNLINK).
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.modifiable()?;
        let Some(Node::Namespace(ns)) = self.inodes.get(parent) else {
            return Err(FsError::NotPermitted);
        };
        let key = Self::chunk_name(name).map_err(|e| match e {
            FsError::NameTooLong => e,
            _ => FsError::NotFound,
        })?;
        match self.backend.remove(&ns, &key)? {
            true => Ok(()),
            false => Err(FsError::NotFound),
        }
    }

    /// Opens a file (OPEN). `register_backing(ino, file)` asks the kernel for a passthrough
    /// backing id for `ino` (the FUSE layer keeps one per inode); it is called only when
    /// passthrough is negotiated, with a file that passed its check. If it fails, passthrough
    /// is turned off for the mount and the file is served through the page cache.
    pub fn open(
        &self,
        ino: u64,
        flags: i32,
        register_backing: &dyn Fn(u64, &File) -> io::Result<()>,
    ) -> Result<Opened, FsError> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        match self.inodes.get(ino).ok_or(FsError::NotFound)? {
            Node::Chunk { ns, key } => {
                if write {
                    return Err(if self.opts.read_only {
                        FsError::ReadOnly
                    } else if flags & libc::O_TRUNC != 0 {
                        FsError::Exists
                    } else {
                        FsError::NotPermitted
                    });
                }
                if self.is_pending(ino) && self.backend.stat(&ns, &key)?.is_none() {
                    // Not committed yet: invisible, whatever the kernel's dentry says.
                    return Err(FsError::NotFound);
                }
                self.open_chunk(ino, ns, key, register_backing)
            }
            Node::StatusFile(i) => {
                if write {
                    return Err(FsError::NotPermitted);
                }
                let data = self.status_content(i)?;
                Ok(Opened {
                    fh: self.add_handle(Handle::Status(data)),
                    mode: OpenMode::Direct,
                })
            }
            Node::Root | Node::StatusDir | Node::Namespace(_) => Err(FsError::IsADirectory),
        }
    }

    /// Opens a committed chunk for reading: its checked local file, or the backend.
    fn open_chunk(
        &self,
        ino: u64,
        ns: Arc<str>,
        key: ChunkKey,
        register_backing: &dyn Fn(u64, &File) -> io::Result<()>,
    ) -> Result<Opened, FsError> {
        let local = match self.backend.open_local(&ns, &key) {
            Ok(f) => f,
            Err(BackendError::NotRegular(what)) => {
                return Err(self.failed_check(&ns, &key, &format!("not a regular file: {what}")));
            }
            Err(e) => return Err(e.into()),
        };
        let Some(file) = local else {
            // Not on local disk: served through the backend (which may fetch it, and
            // verifies what it fetches).
            if self.backend.stat(&ns, &key)?.is_none() {
                return Err(FsError::NotFound);
            }
            self.counters.opens_remote.fetch_add(1, Ordering::Relaxed);
            let fh = self.add_handle(Handle::Chunk {
                ns,
                key,
                file: None,
                passthrough: false,
            });
            return Ok(Opened {
                fh,
                mode: OpenMode::KeepCache,
            });
        };
        self.check_local(&ns, &key, &file)?;
        if self.passthrough() {
            match register_backing(ino, &file) {
                Ok(()) => {
                    self.counters
                        .opens_passthrough
                        .fetch_add(1, Ordering::Relaxed);
                    let fh = self.add_handle(Handle::Chunk {
                        ns,
                        key,
                        file: None,
                        passthrough: true,
                    });
                    return Ok(Opened {
                        fh,
                        mode: OpenMode::Passthrough,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "FUSE passthrough unavailable (registering a backing file failed); falling back to cached reads");
                    self.passthrough.store(false, Ordering::Relaxed);
                }
            }
        }
        self.counters.opens_cached.fetch_add(1, Ordering::Relaxed);
        let fh = self.add_handle(Handle::Chunk {
            ns,
            key,
            file: Some(file),
            passthrough: false,
        });
        Ok(Opened {
            fh,
            mode: OpenMode::KeepCache,
        })
    }

    /// Checks an open local chunk file in full unless this very version of it (same
    /// identity and stamp) was already checked.
    fn check_local(&self, ns: &str, key: &ChunkKey, file: &File) -> Result<(), FsError> {
        let md = file.metadata()?;
        let stamp = FileStamp::of(&md);
        let id = (stamp.dev, stamp.ino);
        if self.checked.lock().unwrap().get(&id) == Some(&stamp) {
            return Ok(());
        }
        match crate::incoming::check_chunk_file(file, ns, key, true) {
            Ok(_) => {
                // Stamp as of before the check: a change during it makes the next open check
                // again.
                self.checked.lock().unwrap().insert(id, stamp);
                self.counters.verified.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(FormatError::Io(e)) => Err(FsError::Io(e)),
            Err(e) => {
                self.checked.lock().unwrap().remove(&id);
                Err(self.failed_check(ns, key, &e.to_string()))
            }
        }
    }

    /// Counts, logs and quarantines a chunk file that failed its check; the error to return.
    fn failed_check(&self, ns: &str, key: &ChunkKey, why: &str) -> FsError {
        self.counters
            .verify_failures
            .fetch_add(1, Ordering::Relaxed);
        let moved = self.backend.quarantine(ns, key, why);
        tracing::error!(%ns, %key, error = %why, quarantined = ?moved, "chunk file failed its check at open; refusing to serve it");
        FsError::Corrupt(why.to_string())
    }

    /// Reads from an open file (READ) and hands the bytes (or the error) to `f`, from a
    /// buffer reused across requests.
    pub fn read_with<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        f: impl FnOnce(Result<&[u8], FsError>) -> R,
    ) -> R {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return f(Err(e)),
        };
        match &*h {
            Handle::Status(data) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                f(Ok(&data[start..end]))
            }
            Handle::Chunk { ns, key, file, .. } => READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < size as usize {
                    buf.resize(size as usize, 0);
                }
                let dst = &mut buf[..size as usize];
                let r = match file {
                    Some(file) => {
                        kvfs_loader::format::read_full_at(file, dst, offset).map_err(FsError::Io)
                    }
                    None => self
                        .backend
                        .read_at(ns, key, offset, dst)
                        .map_err(FsError::from),
                };
                match r {
                    Ok(n) => f(Ok(&dst[..n])),
                    Err(e) => f(Err(e)),
                }
            }),
            // A file being written is write-only until it is committed.
            Handle::Write(_) => f(Err(FsError::BadHandle)),
            Handle::Dir(_) | Handle::Chunks(_) => f(Err(FsError::IsADirectory)),
        }
    }

    /// [`KvFs::read_with`] into a new buffer.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        self.read_with(fh, offset, size, |r| r.map(<[u8]>::to_vec))
    }

    /// Writes to a file being written (WRITE).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        match &*self.handle(fh)? {
            Handle::Write(w) => Ok(w.lock().unwrap().write_at(offset, data)? as u32),
            _ => Err(FsError::NotPermitted),
        }
    }

    /// A descriptor of `fh` is closed (FLUSH; its error is what `close()` returns).
    ///
    /// A file being written is checked and committed here when the writer is done with it:
    /// when it is already complete (a whole chunk by its header's size), or when the process
    /// closing it (`pid`) holds no other descriptor of it. So `cat > F` and `dd of=F`, whose
    /// shell or `dd` close a duplicate of the empty file before writing, commit at the last
    /// close, and the flush of a duplicate never commits (or rejects) a half-written file.
    /// The outcome of the commit is repeated to any later flush.
    pub fn flush(&self, ino: u64, fh: u64, pid: u32) -> Result<(), FsError> {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(_) => return Ok(()),
        };
        let Handle::Write(w) = &*h else {
            return Ok(());
        };
        let mut w = w.lock().unwrap();
        if w.state.is_open()
            && !w.is_complete()
            && crate::incoming::held_elsewhere(pid, &w.ns, &w.key)
        {
            tracing::debug!(ns = %w.ns, key = %w.key, pid, "flush of a duplicate of a file still being written");
            return Ok(());
        }
        self.finish(ino, fh, &mut w)
    }

    /// Checks and commits a file being written (first call), or repeats the first outcome.
    fn finish(&self, ino: u64, fh: u64, w: &mut Incoming) -> Result<(), FsError> {
        let first = w.state.is_open();
        let r = w.finish(&*self.backend);
        // Checked: no longer a file being written, whatever the outcome (a `getattr` racing
        // with the RELEASE must see the committed chunk, not the discarded temporary file).
        self.unpend(ino, fh);
        if first {
            let c = if r.is_ok() {
                &self.counters.commits
            } else {
                &self.counters.rejected
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        r.map_err(FsError::Rejected)
    }

    /// The last descriptor of `fh` is gone (RELEASE). A file being written that no flush
    /// committed is checked and committed now (its outcome can only be logged: release
    /// reports nothing to the application).
    pub fn release(&self, ino: u64, fh: u64) -> Released {
        let h = self.handles.lock().unwrap().remove(&fh);
        match h.as_deref() {
            Some(Handle::Chunk {
                passthrough: true, ..
            }) => Released::Passthrough,
            Some(Handle::Write(w)) => {
                let mut w = w.lock().unwrap();
                if w.state.is_open() {
                    let _ = self.finish(ino, fh, &mut w);
                }
                w.discard();
                self.unpend(ino, fh);
                Released::Other
            }
            _ => Released::Other,
        }
    }

    /// Opens a directory (OPENDIR): the root and the status directory are listed now; a
    /// namespace is listed a page at a time by [`KvFs::dir_entries`].
    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        if let Some(Node::Namespace(ns)) = self.inodes.get(ino) {
            if !self.backend.namespace_exists(&ns)? {
                return Err(FsError::NotFound);
            }
            return Ok(self.add_handle(Handle::Chunks(ChunkListing::new(ns))));
        }
        let entries = self.list_dir(ino)?;
        Ok(self.add_handle(Handle::Dir(Arc::new(entries))))
    }

    /// The entries of an open directory after READDIR cookie `offset`, each with its own
    /// cookie; empty at the end. A namespace gives one page (see [`crate::listing`]).
    pub fn dir_entries(&self, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>, FsError> {
        let handle = self.handle(fh)?;
        match &*handle {
            Handle::Dir(entries) => Ok(entries
                .iter()
                .enumerate()
                .skip(offset as usize)
                .map(|(i, e)| (i as u64 + 1, e.clone()))
                .collect()),
            Handle::Chunks(listing) => {
                let ns = listing.namespace().clone();
                let (ns_ino, _) = self.inodes.namespace(&ns);
                let dir = |ino, name: &str| DirEntry {
                    ino,
                    kind: FileType::Directory,
                    name: name.to_string(),
                };
                Ok(listing
                    .after(self.backend.as_ref(), offset)?
                    .into_iter()
                    .map(|(cookie, l)| {
                        let e = match l {
                            Listed::Dot => dir(ns_ino, "."),
                            Listed::DotDot => dir(ROOT_INO, ".."),
                            Listed::Chunk(key) => DirEntry {
                                ino: self.inodes.chunk(&ns, &key),
                                kind: FileType::RegularFile,
                                name: key.file_name(),
                            },
                        };
                        (cookie, e)
                    })
                    .collect())
            }
            _ => Err(FsError::NotADirectory),
        }
    }

    /// RELEASEDIR.
    pub fn releasedir(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    fn list_dir(&self, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        let node = self.inodes.get(ino).ok_or(FsError::NotFound)?;
        let e = |ino, kind, name: &str| DirEntry {
            ino,
            kind,
            name: name.to_string(),
        };
        // Every directory's parent is the root (the view is two levels deep).
        let mut out = vec![
            e(ino, FileType::Directory, "."),
            e(ROOT_INO, FileType::Directory, ".."),
        ];
        match node {
            Node::Root => {
                out.push(e(STATUS_DIR_INO, FileType::Directory, STATUS_DIR));
                let mut names = self.backend.namespaces()?;
                names.sort();
                for ns in names {
                    let (i, _) = self.inodes.namespace(&ns);
                    out.push(e(i, FileType::Directory, &ns));
                }
            }
            Node::StatusDir => {
                out.push(e(STATS_INO, FileType::RegularFile, STATS_FILE));
                out.push(e(MOUNT_INFO_INO, FileType::RegularFile, MOUNT_INFO_FILE));
            }
            // Listed a page at a time (`Handle::Chunks`), never whole.
            Node::Namespace(_) | Node::StatusFile(_) | Node::Chunk { .. } => {
                return Err(FsError::NotADirectory);
            }
        }
        Ok(out)
    }

    /// STATFS: what the cache can hold now: its limit, or less when the file system under it
    /// has less room; so `df` shows the cache's own use as Used.
    pub fn statfs(&self) -> Result<StatFs, FsError> {
        const BSIZE: u64 = 4096;
        let c = self.backend.capacity()?;
        Ok(StatFs {
            blocks: c.total_bytes.min(c.used_bytes + c.free_bytes) / BSIZE,
            bfree: c.free_bytes / BSIZE,
            bavail: c.free_bytes / BSIZE,
            files: c.chunks,
            ffree: u32::MAX as u64,
            bsize: BSIZE as u32,
            namelen: NAME_MAX as u32,
        })
    }

    /// The value of an extended attribute (GETXATTR).
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, FsError> {
        let (Some(Node::Chunk { ns, key }), Some(name)) = (self.inodes.get(ino), name.to_str())
        else {
            return Err(FsError::NoXattr);
        };
        let info = || self.backend.stat(&ns, &key)?.ok_or(FsError::NotFound);
        let v = match name {
            XATTR_TOKENS => self
                .backend
                .header(&ns, &key)?
                .meta
                .tokens
                .len()
                .to_string(),
            XATTR_PARENT => self
                .backend
                .header(&ns, &key)?
                .meta
                .parent
                .map(|p| p.to_hex())
                .unwrap_or_default(),
            XATTR_DIGEST => {
                let d = self.backend.header(&ns, &key)?.payload_digest;
                d.iter().map(|b| format!("{b:02x}")).collect()
            }
            XATTR_TIER => self.backend.tier(&ns, &key)?.ok_or(FsError::NotFound)?,
            XATTR_CODEC => self.backend.header(&ns, &key)?.codec.name().to_string(),
            XATTR_STORED_BYTES => self.backend.header(&ns, &key)?.file_len().to_string(),
            XATTR_RAW_BYTES => self
                .backend
                .header(&ns, &key)?
                .geometry
                .file_len
                .to_string(),
            XATTR_BACKING => match info()?.backing {
                Some(p) => p.to_string_lossy().into_owned(),
                None => return Err(FsError::NoXattr),
            },
            _ => return Err(FsError::NoXattr),
        };
        Ok(v.into_bytes())
    }

    /// The names of the extended attributes, NUL-separated (LISTXATTR).
    pub fn listxattr(&self, ino: u64) -> Vec<u8> {
        let mut names = Vec::new();
        if let Some(Node::Chunk { ns, key }) = self.inodes.get(ino)
            && !self.is_pending(ino)
        {
            let local = matches!(
                self.backend.stat(&ns, &key),
                Ok(Some(ChunkInfo {
                    backing: Some(_),
                    ..
                }))
            );
            for n in [
                XATTR_TOKENS,
                XATTR_PARENT,
                XATTR_DIGEST,
                XATTR_TIER,
                XATTR_CODEC,
                XATTR_STORED_BYTES,
                XATTR_RAW_BYTES,
                XATTR_BACKING,
            ] {
                if n != XATTR_BACKING || local {
                    names.extend_from_slice(n.as_bytes());
                    names.push(0);
                }
            }
        }
        names
    }

    /// ACCESS (asked only without `default_permissions`): existence, and no writing on a
    /// read-only mount. (With it, the kernel checks the modes itself.)
    pub fn access(&self, ino: u64, write: bool) -> Result<(), FsError> {
        if self.inodes.get(ino).is_none() {
            return Err(FsError::NotFound);
        }
        if write {
            self.modifiable()?;
        }
        Ok(())
    }

    /// Creates a new chunk file to write (CREATE). It is served with direct I/O: every write
    /// goes straight to the temporary file in large requests, and nothing of an uncommitted
    /// file lingers in the page cache.
    pub fn create(&self, parent: u64, name: &OsStr) -> Result<(Entry, Opened), FsError> {
        self.modifiable()?;
        let Some(Node::Namespace(ns)) = self.inodes.get(parent) else {
            return Err(FsError::NotPermitted);
        };
        let key = Self::chunk_name(name)?;
        if self.backend.stat(&ns, &key)?.is_some() {
            return Err(FsError::Exists);
        }
        let incoming = Incoming::create(&self.backend.incoming_dir(), ns.clone(), key)?;
        let ino = self.inodes.chunk(&ns, &key);
        let fh = self.add_handle(Handle::Write(Mutex::new(incoming)));
        self.pending
            .lock()
            .unwrap()
            .entry(ino)
            .or_default()
            .push(fh);
        let attr = self.attr(ino, FileType::RegularFile, 0, SystemTime::now(), 0o644);
        Ok((
            Entry { attr, ttl: NO_TTL },
            Opened {
                fh,
                mode: OpenMode::Direct,
            },
        ))
    }

    /// Forgets the write handle `fh` of `ino`.
    fn unpend(&self, ino: u64, fh: u64) {
        let mut pending = self.pending.lock().unwrap();
        if let Some(fhs) = pending.get_mut(&ino) {
            fhs.retain(|f| *f != fh);
            if fhs.is_empty() {
                pending.remove(&ino);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core driven directly: no kernel, no mount.
    use super::*;
    use crate::testing::conformance::{chunk, namespace};
    use crate::testing::{FaultyBackend, MemBackend};
    use std::path::Path;

    struct Fixture {
        _dir: tempfile::TempDir,
        incoming: std::path::PathBuf,
        backend: Arc<FaultyBackend<MemBackend>>,
        fs: KvFs,
    }

    fn fixture(opts: MountOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("incoming");
        let backend = Arc::new(FaultyBackend::new(MemBackend::new(&incoming, 1 << 30)));
        let fs = KvFs::new(backend.clone(), opts);
        Fixture {
            _dir: dir,
            incoming,
            backend,
            fs,
        }
    }

    fn no_backing(_: u64, _: &File) -> io::Result<()> {
        panic!("passthrough was not negotiated")
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    impl Fixture {
        fn ns_ino(&self) -> u64 {
            self.fs
                .lookup(ROOT_INO, os(&namespace()))
                .unwrap()
                .attr
                .ino
                .0
        }

        fn open_read(&self, ino: u64) -> Result<Opened, FsError> {
            self.fs.open(ino, libc::O_RDONLY, &no_backing)
        }

        fn read_all(&self, fh: u64) -> Vec<u8> {
            let mut out = Vec::new();
            loop {
                let b = self.fs.read(fh, out.len() as u64, 1 << 16).unwrap();
                if b.is_empty() {
                    return out;
                }
                out.extend_from_slice(&b);
            }
        }

        /// create + write + flush by a process holding no other descriptor.
        fn write_file(&self, key: &ChunkKey, bytes: &[u8]) -> Result<(), FsError> {
            let ns = self.ns_ino();
            let (e, o) = self.fs.create(ns, os(&key.file_name()))?;
            assert_eq!(o.mode, OpenMode::Direct);
            self.fs.write(o.fh, 0, bytes)?;
            let r = self.fs.flush(e.attr.ino.0, o.fh, 0);
            self.fs.release(e.attr.ino.0, o.fh);
            r
        }

        fn incoming_is_empty(&self) -> bool {
            std::fs::read_dir(&self.incoming).map_or(true, |d| d.count() == 0)
        }

        fn info(&self) -> String {
            self.fs.mount_info()
        }
    }

    fn errno_of(e: &FsError) -> i32 {
        crate::fuse::errno(e).code()
    }

    #[test]
    fn view_lookup_list_read_and_xattrs() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        let (key, bytes) = chunk(1);
        f.backend.inner.insert(&ns, key, bytes.clone());
        let root = f.fs.opendir(ROOT_INO).unwrap();
        let names: Vec<String> =
            f.fs.dir_entries(root, 0)
                .unwrap()
                .iter()
                .map(|e| e.1.name.clone())
                .collect();
        assert_eq!(names, [".", "..", STATUS_DIR, ns.as_str()]);
        f.fs.releasedir(root);

        let ns_ino = f.ns_ino();
        let e = f.fs.lookup(ns_ino, os(&key.file_name())).unwrap();
        assert_eq!(e.attr.size, bytes.len() as u64);
        assert_eq!(e.attr.perm, 0o444 & !0o022);
        assert_eq!(e.ttl, CHUNK_TTL);
        let listing = f.fs.opendir(ns_ino).unwrap();
        let entries = f.fs.dir_entries(listing, 0).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].1.name, key.file_name());
        assert!(f.fs.dir_entries(listing, entries[2].0).unwrap().is_empty());

        let o = f.open_read(e.attr.ino.0).unwrap();
        assert_eq!(o.mode, OpenMode::KeepCache);
        assert!(f.read_all(o.fh) == bytes, "read other bytes");
        assert_eq!(f.fs.release(e.attr.ino.0, o.fh), Released::Other);

        let tokens = f.fs.getxattr(e.attr.ino.0, os(XATTR_TOKENS)).unwrap();
        assert_eq!(tokens, b"64");
        let xattr =
            |n: &str| String::from_utf8(f.fs.getxattr(e.attr.ino.0, os(n)).unwrap()).unwrap();
        assert_eq!(xattr(XATTR_CODEC), "raw");
        assert_eq!(xattr(XATTR_STORED_BYTES), bytes.len().to_string());
        assert_eq!(xattr(XATTR_RAW_BYTES), bytes.len().to_string());
        assert!(matches!(
            f.fs.getxattr(e.attr.ino.0, os(XATTR_BACKING)),
            Err(FsError::NoXattr)
        ));
        let names = f.fs.listxattr(e.attr.ino.0);
        assert!(names.starts_with(b"user.kvfs.tokens\0"), "{names:?}");

        // Absent names, bad names, too-long names.
        let absent = chunk(2).0.file_name();
        assert!(matches!(
            f.fs.lookup(ns_ino, os(&absent)),
            Err(FsError::NotFound)
        ));
        assert!(matches!(
            f.fs.lookup(ns_ino, os("README")),
            Err(FsError::NotFound)
        ));
        let long = "a".repeat(300);
        for r in [
            f.fs.lookup(ns_ino, os(&long)).map(|_| ()),
            f.fs.lookup(ROOT_INO, os(&long)).map(|_| ()),
            f.fs.create(ns_ino, os(&long)).map(|_| ()),
            f.fs.mkdir(ROOT_INO, os(&long)).map(|_| ()),
            f.fs.unlink(ns_ino, os(&long)),
        ] {
            let e = r.unwrap_err();
            assert_eq!(errno_of(&e), libc::ENAMETOOLONG, "{e}");
        }
        let stats = f.fs.open(STATS_INO, libc::O_RDONLY, &no_backing).unwrap();
        assert_eq!(stats.mode, OpenMode::Direct);
        assert!(
            String::from_utf8(f.read_all(stats.fh))
                .unwrap()
                .contains("\"hits\"")
        );
        let s = f.fs.statfs().unwrap();
        assert_eq!(s.blocks * s.bsize as u64, 1 << 30);
        assert_eq!(s.files, 1);
        assert_eq!(s.namelen, 255);
    }

    #[test]
    fn write_once_commit_and_rejections() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        f.fs.mkdir(ROOT_INO, os(&ns)).unwrap();
        assert!(matches!(
            f.fs.mkdir(ROOT_INO, os(&ns)),
            Err(FsError::Exists)
        ));
        assert!(matches!(
            f.fs.mkdir(ROOT_INO, os("Not A Namespace")),
            Err(FsError::InvalidName)
        ));
        let (key, bytes) = chunk(3);
        f.write_file(&key, &bytes).unwrap();
        assert!(f.backend.inner.bytes(&ns, &key).unwrap().as_slice() == bytes.as_slice());
        let ino =
            f.fs.lookup(f.ns_ino(), os(&key.file_name()))
                .unwrap()
                .attr
                .ino
                .0;
        // Writing, truncating, re-creating a committed chunk.
        for (flags, want) in [
            (libc::O_WRONLY | libc::O_TRUNC, libc::EEXIST),
            (libc::O_WRONLY | libc::O_APPEND, libc::EPERM),
        ] {
            let e = f.fs.open(ino, flags, &no_backing).unwrap_err();
            assert_eq!(errno_of(&e), want);
        }
        assert!(matches!(
            f.fs.create(f.ns_ino(), os(&key.file_name())),
            Err(FsError::Exists)
        ));
        assert!(matches!(
            f.fs.setattr(ino, Some(10), false),
            Err(FsError::NotPermitted)
        ));
        assert_eq!(errno_of(&f.fs.refuse_change()), libc::EPERM);

        // Invalid content: EINVAL at close, nothing kept, nothing left in incoming.
        let (k5, b5) = chunk(5);
        let mut corrupt = b5.clone();
        let at = corrupt.len() - 100;
        corrupt[at] ^= 1;
        for bad in [&b"not a chunk"[..], &b5[..b5.len() - 100], &corrupt, &bytes] {
            let e = f.write_file(&k5, bad).unwrap_err();
            assert_eq!(errno_of(&e), libc::EINVAL, "{e}");
        }
        assert!(f.backend.inner.bytes(&ns, &k5).is_none());
        // A valid chunk in the wrong namespace directory.
        let other = "other-0123456789abcdef";
        f.fs.mkdir(ROOT_INO, os(other)).unwrap();
        let other_ino = f.fs.lookup(ROOT_INO, os(other)).unwrap().attr.ino.0;
        let (e, o) = f.fs.create(other_ino, os(&k5.file_name())).unwrap();
        f.fs.write(o.fh, 0, &b5).unwrap();
        let err = f.fs.flush(e.attr.ino.0, o.fh, 0).unwrap_err();
        assert_eq!(errno_of(&err), libc::EINVAL);
        f.fs.release(e.attr.ino.0, o.fh);
        // Names that are not chunk names; files outside a namespace.
        assert!(matches!(
            f.fs.create(f.ns_ino(), os("x.txt")),
            Err(FsError::InvalidName)
        ));
        assert!(matches!(
            f.fs.create(ROOT_INO, os(&k5.file_name())),
            Err(FsError::NotPermitted)
        ));
        assert!(f.incoming_is_empty(), "temporary files remain");
        // The right chunk still goes in afterwards; unlink evicts it.
        f.write_file(&k5, &b5).unwrap();
        f.fs.unlink(f.ns_ino(), os(&k5.file_name())).unwrap();
        assert!(matches!(
            f.fs.unlink(f.ns_ino(), os(&k5.file_name())),
            Err(FsError::NotFound)
        ));
        let info = f.info();
        assert!(info.contains("\"commits\": 2"), "{info}");
        assert!(info.contains("\"rejected\": 5"), "{info}");
    }

    #[test]
    fn flush_of_a_duplicate_does_not_commit_a_half_written_file() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        f.fs.mkdir(ROOT_INO, os(&ns)).unwrap();
        let (key, bytes) = chunk(6);
        let (e, o) = f.fs.create(f.ns_ino(), os(&key.file_name())).unwrap();
        let ino = e.attr.ino.0;
        // This process holds another descriptor of `<ns>/<key>.kvc` (as the shell's `>`
        // does after it closes its duplicate).
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(elsewhere.path().join(&ns)).unwrap();
        let held = File::create(elsewhere.path().join(&ns).join(key.file_name())).unwrap();
        let pid = std::process::id();
        // Empty, then half-written: the flushes of duplicates neither commit nor reject.
        f.fs.flush(ino, o.fh, pid).unwrap();
        f.fs.write(o.fh, 0, &bytes[..bytes.len() / 2]).unwrap();
        f.fs.flush(ino, o.fh, pid).unwrap();
        assert!(f.backend.inner.bytes(&ns, &key).is_none());
        assert_eq!(f.fs.getattr(ino).unwrap().attr.size, bytes.len() as u64 / 2);
        // The rest, and the last close.
        f.fs.write(o.fh, bytes.len() as u64 / 2, &bytes[bytes.len() / 2..])
            .unwrap();
        drop(held);
        f.fs.flush(ino, o.fh, pid).unwrap();
        assert!(f.backend.inner.bytes(&ns, &key).unwrap().as_slice() == bytes.as_slice());
        // A later flush repeats the outcome; writes after the commit are refused.
        f.fs.flush(ino, o.fh, pid).unwrap();
        assert!(matches!(
            f.fs.write(o.fh, 0, b"x"),
            Err(FsError::Io(e)) if e.raw_os_error() == Some(libc::EPERM)
        ));
        f.fs.release(ino, o.fh);
        assert!(f.incoming_is_empty());

        // A complete file is committed by any flush, even with other descriptors open.
        let (k2, b2) = chunk(7);
        let held = File::create(elsewhere.path().join(&ns).join(k2.file_name())).unwrap();
        let (e, o) = f.fs.create(f.ns_ino(), os(&k2.file_name())).unwrap();
        f.fs.write(o.fh, 0, &b2).unwrap();
        f.fs.flush(e.attr.ino.0, o.fh, pid).unwrap();
        assert!(f.backend.inner.bytes(&ns, &k2).is_some());
        drop(held);
        f.fs.release(e.attr.ino.0, o.fh);
    }

    #[test]
    fn release_commits_what_no_flush_did_and_drops_an_incomplete_file() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        f.fs.mkdir(ROOT_INO, os(&ns)).unwrap();
        let (key, bytes) = chunk(8);
        let (e, o) = f.fs.create(f.ns_ino(), os(&key.file_name())).unwrap();
        f.fs.write(o.fh, 0, &bytes).unwrap();
        assert_eq!(f.fs.release(e.attr.ino.0, o.fh), Released::Other);
        assert!(f.backend.inner.bytes(&ns, &key).unwrap().as_slice() == bytes.as_slice());

        let (k2, b2) = chunk(9);
        let (e, o) = f.fs.create(f.ns_ino(), os(&k2.file_name())).unwrap();
        f.fs.write(o.fh, 0, &b2[..100]).unwrap();
        f.fs.release(e.attr.ino.0, o.fh);
        assert!(f.backend.inner.bytes(&ns, &k2).is_none());
        assert!(matches!(f.fs.getattr(e.attr.ino.0), Err(FsError::NotFound)));
        assert!(f.incoming_is_empty());
        assert!(f.info().contains("\"rejected\": 1"), "{}", f.info());
    }

    #[test]
    fn a_commit_the_backend_refuses_fails_close_with_its_errno() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        f.fs.mkdir(ROOT_INO, os(&ns)).unwrap();
        let (key, bytes) = chunk(10);
        f.backend.fail_commits.store(true, Ordering::Relaxed);
        let e = f.write_file(&key, &bytes).unwrap_err();
        assert_eq!(errno_of(&e), libc::ENOSPC);
        assert!(f.backend.inner.bytes(&ns, &key).is_none());
        assert!(f.incoming_is_empty());
        f.backend.fail_commits.store(false, Ordering::Relaxed);
        f.write_file(&key, &bytes).unwrap();
    }

    #[test]
    fn read_only_refuses_every_change() {
        let f = fixture(MountOptions {
            read_only: true,
            ..MountOptions::default()
        });
        let ns = namespace();
        let (key, bytes) = chunk(11);
        f.backend.inner.insert(&ns, key, bytes);
        let ns_ino = f.ns_ino();
        let ino =
            f.fs.lookup(ns_ino, os(&key.file_name()))
                .unwrap()
                .attr
                .ino
                .0;
        assert!(matches!(
            f.fs.unlink(ns_ino, os(&key.file_name())),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            f.fs.create(ns_ino, os(&chunk(12).0.file_name())),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            f.fs.mkdir(ROOT_INO, os("x-0123456789abcdef")),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(
            f.fs.open(ino, libc::O_WRONLY, &no_backing),
            Err(FsError::ReadOnly)
        ));
        assert!(matches!(f.fs.access(ino, true), Err(FsError::ReadOnly)));
        assert_eq!(errno_of(&f.fs.refuse_change()), libc::EROFS);
        f.fs.access(ino, false).unwrap();
    }

    /// Plants `bytes` as the local file of `key` and opens the chunk.
    fn open_planted(
        f: &Fixture,
        dir: &Path,
        key: &ChunkKey,
        bytes: &[u8],
    ) -> Result<Opened, FsError> {
        let path = dir.join(key.file_name());
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, bytes).unwrap();
        f.backend.plant_local(*key, &path);
        let ino = f.fs.lookup(f.ns_ino(), os(&key.file_name()))?.attr.ino.0;
        f.open_read(ino)
    }

    #[test]
    fn a_local_file_that_does_not_verify_is_never_served() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        let files = tempfile::tempdir().unwrap();
        let (key, bytes) = chunk(13);
        let (other_key, other_bytes) = chunk(14);
        let mut flipped_payload = bytes.clone();
        let at = bytes.len() - 10;
        flipped_payload[at] ^= 0x40;
        let mut flipped_header = bytes.clone();
        flipped_header[100] ^= 1;
        let mut appended = bytes.clone();
        appended.push(0);
        let bad: [(&str, &[u8]); 6] = [
            ("payload flip", &flipped_payload),
            ("header flip", &flipped_header),
            ("truncated", &bytes[..bytes.len() - 1]),
            ("appended", &appended),
            ("empty", b""),
            ("another chunk's bytes", &other_bytes),
        ];
        for (i, (what, content)) in bad.iter().enumerate() {
            f.backend.inner.insert(&ns, key, bytes.clone());
            let e = open_planted(&f, files.path(), &key, content).unwrap_err();
            assert!(matches!(e, FsError::Corrupt(_)), "{what}: {e}");
            assert_eq!(errno_of(&e), libc::EIO, "{what}");
            assert_eq!(f.backend.quarantined.lock().unwrap().len(), i + 1, "{what}");
            // Quarantined: the backend no longer has it.
            assert!(f.backend.inner.bytes(&ns, &key).is_none(), "{what}");
        }
        assert!(f.info().contains("\"verify_failures\": 6"), "{}", f.info());
        let _ = other_key;

        // A symlink to a valid copy, and a FIFO, are not regular files.
        f.backend.inner.insert(&ns, key, bytes.clone());
        let good = files.path().join("good.kvc");
        std::fs::write(&good, &bytes).unwrap();
        let link = files.path().join("link.kvc");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        f.backend.plant_local(key, &link);
        let ino =
            f.fs.lookup(f.ns_ino(), os(&key.file_name()))
                .unwrap()
                .attr
                .ino
                .0;
        assert!(matches!(f.open_read(ino), Err(FsError::Corrupt(_))));
        f.backend.inner.insert(&ns, key, bytes.clone());
        let fifo = files.path().join("fifo.kvc");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        f.backend.plant_local(key, &fifo);
        assert!(matches!(f.open_read(ino), Err(FsError::Corrupt(_))));
        assert!(f.info().contains("\"verify_failures\": 8"), "{}", f.info());
    }

    #[test]
    fn an_unchanged_file_is_checked_once_and_a_changed_one_again() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        let files = tempfile::tempdir().unwrap();
        let (key, bytes) = chunk(15);
        f.backend.inner.insert(&ns, key, bytes.clone());
        let o = open_planted(&f, files.path(), &key, &bytes).unwrap();
        assert_eq!(o.mode, OpenMode::KeepCache);
        assert!(f.read_all(o.fh) == bytes);
        let ino =
            f.fs.lookup(f.ns_ino(), os(&key.file_name()))
                .unwrap()
                .attr
                .ino
                .0;
        for _ in 0..3 {
            let o = f.open_read(ino).unwrap();
            f.fs.release(ino, o.fh);
        }
        assert!(f.info().contains("\"verified\": 1,"), "{}", f.info());
        // Changed in place (same inode, new mtime/ctime): checked again, and caught.
        let path = files.path().join(key.file_name());
        std::thread::sleep(Duration::from_millis(20));
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(f.open_read(ino), Err(FsError::Corrupt(_))));
        // Put right again: checked again, served.
        f.backend.inner.insert(&ns, key, bytes.clone());
        std::fs::write(&path, &bytes).unwrap();
        f.backend.plant_local(key, &path);
        let o = f.open_read(ino).unwrap();
        assert!(f.read_all(o.fh) == bytes);
        assert!(f.info().contains("\"verified\": 2,"), "{}", f.info());
    }

    #[test]
    fn passthrough_registers_a_checked_file_and_falls_back_when_refused() {
        let f = fixture(MountOptions::default());
        let ns = namespace();
        let files = tempfile::tempdir().unwrap();
        let (key, bytes) = chunk(16);
        f.backend.inner.insert(&ns, key, bytes.clone());
        f.fs.set_kernel("7.41".into(), true);
        let path = files.path().join(key.file_name());
        std::fs::write(&path, &bytes).unwrap();
        f.backend.plant_local(key, &path);
        let ino =
            f.fs.lookup(f.ns_ino(), os(&key.file_name()))
                .unwrap()
                .attr
                .ino
                .0;
        let registered = Mutex::new(Vec::new());
        let ok = |i: u64, _: &File| {
            registered.lock().unwrap().push(i);
            Ok(())
        };
        let o = f.fs.open(ino, libc::O_RDONLY, &ok).unwrap();
        assert_eq!(o.mode, OpenMode::Passthrough);
        assert_eq!(*registered.lock().unwrap(), [ino]);
        assert_eq!(f.fs.release(ino, o.fh), Released::Passthrough);
        // A corrupt file is never registered.
        let mut bad = bytes.clone();
        bad[bytes.len() - 1] ^= 1;
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            f.fs.open(ino, libc::O_RDONLY, &ok),
            Err(FsError::Corrupt(_))
        ));
        assert_eq!(registered.lock().unwrap().len(), 1);
        // Registration refused: served through the page cache, passthrough off.
        f.backend.inner.insert(&ns, key, bytes.clone());
        std::fs::write(&path, &bytes).unwrap();
        f.backend.plant_local(key, &path);
        let refuse = |_: u64, _: &File| Err(io::Error::from_raw_os_error(libc::EPERM));
        let o = f.fs.open(ino, libc::O_RDONLY, &refuse).unwrap();
        assert_eq!(o.mode, OpenMode::KeepCache);
        assert!(!f.fs.passthrough());
        assert!(f.read_all(o.fh) == bytes);
    }
}
