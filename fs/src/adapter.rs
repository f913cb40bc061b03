//! The FUSE file system: [`KvFs`] turns kernel requests into [`ChunkBackend`] calls.
//!
//! ```text
//! /                          root (namespaces; `mkdir` creates one)
//! /.kvfs/stats.json          the store's statistics (read-only, fresh on every open)
//! /.kvfs/mount.json          this mount: passthrough negotiated, options, counters
//! /<namespace>/<key>.kvc     chunks, read-only once committed
//! ```
//!
//! **Reads.** A chunk with a file on local disk is opened with FUSE passthrough when the kernel
//! offered `FUSE_PASSTHROUGH` at INIT (Linux 6.9+, needs CAP_SYS_ADMIN) and the mount asked for
//! it: the kernel then reads the backing file itself and this process is not involved at all.
//! One backing id is registered per inode and shared by all its open handles (the kernel
//! requires that), and dropped with the last one. Otherwise the open sets `FOPEN_KEEP_CACHE`
//! (chunks never change, so the page cache stays valid across opens) and reads are `pread`s of
//! the local file, or of the backend for a chunk that is not local.
//!
//! **Writes.** See [`crate::incoming`]: create, write, close; checked and committed in FLUSH.
//!
//! **Refused operations**, with the errno an application sees:
//! - rename, link, symlink, mknod, rmdir, chmod/chown/truncate/utimes of a committed chunk or a
//!   directory, setting or removing xattrs, writing a committed chunk: **EPERM**;
//! - opening a committed chunk for writing with `O_TRUNC` (overwriting it, as `cp` and
//!   `open(.., "wb")` do) and creating an existing name: **EEXIST**;
//! - a chunk that is not valid for its name at close: **EINVAL** (from `close()`);
//! - a file name that is not `<64 hex>.kvc`, or a namespace name that
//!   `validate_namespace_dir` refuses: **EINVAL**;
//! - anything that modifies a `--read-only` mount: **EROFS**.
//!
//! Directory TTLs are short (1 s): namespaces and listings change behind the mount's back.
//! Chunk entries and attributes live 60 s: a chunk's bytes and size never change, new chunks
//! are never negatively cached, and an evicted one still fails `open` with ENOENT; data
//! caching is unlimited.

use crate::backend::{BackendError, ChunkBackend, ChunkInfo};
use crate::incoming::{Incoming, WriteState};
use crate::inode::{
    Inodes, MOUNT_INFO_FILE, MOUNT_INFO_INO, Node, ROOT_INO, STATS_FILE, STATS_INO, STATUS_DIR,
    STATUS_DIR_INO,
};
use crate::options::MountOptions;
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use kvfs_loader::ChunkKey;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How long the kernel may cache directory names and attributes (namespaces come and go).
const TTL: Duration = Duration::from_secs(1);
/// How long the kernel may cache a chunk's name and attributes. A chunk never changes; only
/// eviction by another process can make a cached entry stale, and then `open` still answers
/// ENOENT. Long enough that `find`/`ls -l` over 100,000 chunks (which reads the whole
/// directory before it stats) finds every entry still cached from READDIRPLUS.
const CHUNK_TTL: Duration = Duration::from_secs(60);
/// No caching (status files, files being written).
const NO_TTL: Duration = Duration::ZERO;
/// `st_blksize` of chunks: `cp` and friends size their buffers by it, and big requests are
/// what FUSE is fast at.
const CHUNK_BLKSIZE: u32 = 1 << 20;
/// The extended attributes of a chunk.
pub const XATTR_TOKENS: &str = "user.kvfs.tokens";
pub const XATTR_PARENT: &str = "user.kvfs.parent";
pub const XATTR_DIGEST: &str = "user.kvfs.digest";
pub const XATTR_TIER: &str = "user.kvfs.tier";
pub const XATTR_BACKING: &str = "user.kvfs.backing";

/// An open file or directory.
enum Handle {
    /// A committed chunk opened for reading. `file` is its local file when it has one (and
    /// passthrough was not used); `passthrough` says a backing id is held for `ino`.
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
    /// A directory listing as of the opendir.
    Dir(Vec<(u64, FileType, String)>),
}

/// Counters shown in `/.kvfs/mount.json`.
#[derive(Default)]
struct Counters {
    opens_passthrough: AtomicU64,
    opens_cached: AtomicU64,
    opens_remote: AtomicU64,
    commits: AtomicU64,
    rejected: AtomicU64,
}

/// The kvfs FUSE file system over a [`ChunkBackend`].
pub struct KvFs {
    backend: Arc<dyn ChunkBackend>,
    opts: MountOptions,
    inodes: Inodes,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Write handles per chunk inode (a file being written has no committed chunk yet).
    pending: Mutex<HashMap<u64, Vec<u64>>>,
    /// Passthrough backing ids per inode, with the number of handles using each.
    backing: Mutex<HashMap<u64, (Arc<BackingId>, usize)>>,
    /// Set at INIT when the kernel offered passthrough and the options asked for it; cleared
    /// if registering a backing file fails (for example without CAP_SYS_ADMIN).
    passthrough: AtomicBool,
    kernel_abi: Mutex<String>,
    started: SystemTime,
    counters: Counters,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn backend_errno(e: &BackendError) -> Errno {
    errno(e.errno())
}

thread_local! {
    /// Read buffer of each fuser worker thread, reused across requests.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl KvFs {
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
            backing: Mutex::new(HashMap::new()),
            passthrough: AtomicBool::new(false),
            kernel_abi: Mutex::new(String::new()),
            started: SystemTime::now(),
            counters: Counters::default(),
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<Handle>> {
        self.handles.lock().unwrap().get(&fh.0).cloned()
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, mtime: SystemTime, perm: u16) -> FileAttr {
        let (perm, nlink, blksize) = match kind {
            FileType::Directory => (perm & !(self.opts.umask as u16), 2, 4096),
            _ => (perm & !(self.opts.umask as u16), 1, CHUNK_BLKSIZE),
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
            perm,
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

    fn status_content(&self, ino: u64) -> Result<Vec<u8>, BackendError> {
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
                "  \"opens_remote\": {},\n  \"commits\": {},\n  \"rejected\": {}\n}}\n"
            ),
            self.passthrough.load(Ordering::Relaxed),
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
        )
    }

    /// Size of the largest file being written under `ino`, if any is.
    fn pending_len(&self, ino: u64) -> Option<u64> {
        let fhs = self.pending.lock().unwrap().get(&ino).cloned()?;
        let mut len = None;
        for fh in fhs {
            if let Some(h) = self.handle(FileHandle(fh))
                && let Handle::Write(w) = &*h
            {
                let l = w.lock().unwrap().written_len();
                len = Some(len.map_or(l, |m: u64| m.max(l)));
            }
        }
        len
    }

    fn chunk_name(name: &OsStr) -> Option<ChunkKey> {
        ChunkKey::from_file_name(name.to_str()?).ok()
    }

    fn getattr_node(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        match self.inodes.get(ino).ok_or(Errno::ENOENT)? {
            Node::Root | Node::StatusDir => Ok((self.dir_attr(ino), TTL)),
            Node::StatusFile(i) => {
                let len = self.status_content(i).map_err(|e| backend_errno(&e))?.len() as u64;
                let attr = self.attr(i, FileType::RegularFile, len, SystemTime::now(), 0o444);
                Ok((attr, NO_TTL))
            }
            Node::Namespace(ns) => match self.backend.namespace_exists(&ns) {
                Ok(true) => Ok((self.dir_attr(ino), TTL)),
                Ok(false) => Err(Errno::ENOENT),
                Err(e) => Err(backend_errno(&e)),
            },
            Node::Chunk { ns, key } => {
                if let Some(len) = self.pending_len(ino) {
                    let attr = self.attr(ino, FileType::RegularFile, len, SystemTime::now(), 0o644);
                    return Ok((attr, NO_TTL));
                }
                match self.backend.stat(&ns, &key) {
                    Ok(Some(info)) => Ok((self.chunk_attr(ino, &info), CHUNK_TTL)),
                    Ok(None) => Err(Errno::ENOENT),
                    Err(e) => Err(backend_errno(&e)),
                }
            }
        }
    }

    fn list_dir(&self, ino: u64) -> Result<Vec<(u64, FileType, String)>, Errno> {
        let node = self.inodes.get(ino).ok_or(Errno::ENOENT)?;
        let mut out = Vec::new();
        out.push((ino, FileType::Directory, ".".to_string()));
        // Every directory's parent is the root (the view is two levels deep).
        out.push((ROOT_INO, FileType::Directory, "..".to_string()));
        match node {
            Node::Root => {
                out.push((STATUS_DIR_INO, FileType::Directory, STATUS_DIR.to_string()));
                let mut names = self.backend.namespaces().map_err(|e| backend_errno(&e))?;
                names.sort();
                for ns in names {
                    let (i, _) = self.inodes.namespace(&ns);
                    out.push((i, FileType::Directory, ns));
                }
            }
            Node::StatusDir => {
                out.push((STATS_INO, FileType::RegularFile, STATS_FILE.to_string()));
                out.push((
                    MOUNT_INFO_INO,
                    FileType::RegularFile,
                    MOUNT_INFO_FILE.to_string(),
                ));
            }
            Node::Namespace(ns) => {
                let mut chunks = self.backend.chunks(&ns).map_err(|e| backend_errno(&e))?;
                chunks.sort_unstable();
                for (key, _) in chunks {
                    let i = self.inodes.chunk(&ns, &key);
                    out.push((i, FileType::RegularFile, key.file_name()));
                }
            }
            Node::StatusFile(_) | Node::Chunk { .. } => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }

    fn xattr_value(&self, ns: &str, key: &ChunkKey, name: &str) -> Result<Vec<u8>, Errno> {
        let header = |this: &Self| this.backend.header(ns, key).map_err(|e| backend_errno(&e));
        let info = |this: &Self| match this.backend.stat(ns, key) {
            Ok(Some(i)) => Ok(i),
            Ok(None) => Err(Errno::ENOENT),
            Err(e) => Err(backend_errno(&e)),
        };
        let v = match name {
            XATTR_TOKENS => header(self)?.meta.tokens.len().to_string(),
            XATTR_PARENT => header(self)?
                .meta
                .parent
                .map(|p| p.to_hex())
                .unwrap_or_default(),
            XATTR_DIGEST => {
                let d = header(self)?.payload_digest;
                d.iter().map(|b| format!("{b:02x}")).collect()
            }
            XATTR_TIER => match self.backend.tier(ns, key) {
                Ok(Some(t)) => t,
                Ok(None) => return Err(Errno::ENOENT),
                Err(e) => return Err(backend_errno(&e)),
            },
            XATTR_BACKING => match info(self)?.backing {
                Some(p) => p.to_string_lossy().into_owned(),
                None => return Err(Errno::NO_XATTR),
            },
            _ => return Err(Errno::NO_XATTR),
        };
        Ok(v.into_bytes())
    }

    fn modifiable(&self) -> Result<(), Errno> {
        if self.opts.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Opens a committed chunk for reading.
    fn open_chunk(&self, ino: u64, ns: Arc<str>, key: ChunkKey, reply: ReplyOpen) {
        let local = match self.backend.open_local(&ns, &key) {
            Ok(f) => f,
            Err(e) => return reply.error(backend_errno(&e)),
        };
        let Some(file) = local else {
            // Not on local disk: served through the backend (which may fetch it).
            match self.backend.stat(&ns, &key) {
                Ok(Some(_)) => {}
                Ok(None) => return reply.error(Errno::ENOENT),
                Err(e) => return reply.error(backend_errno(&e)),
            }
            self.counters.opens_remote.fetch_add(1, Ordering::Relaxed);
            let fh = self.add_handle(Handle::Chunk {
                ns,
                key,
                file: None,
                passthrough: false,
            });
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
        };
        if self.passthrough.load(Ordering::Relaxed) {
            let mut backing = self.backing.lock().unwrap();
            let id = match backing.get_mut(&ino) {
                Some((id, users)) => {
                    *users += 1;
                    Some(id.clone())
                }
                None => match reply.open_backing(&file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        backing.insert(ino, (id.clone(), 1));
                        Some(id)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "FUSE passthrough unavailable (registering a backing file failed); falling back to cached reads");
                        self.passthrough.store(false, Ordering::Relaxed);
                        None
                    }
                },
            };
            drop(backing);
            if let Some(id) = id {
                self.counters
                    .opens_passthrough
                    .fetch_add(1, Ordering::Relaxed);
                let fh = self.add_handle(Handle::Chunk {
                    ns,
                    key,
                    file: None,
                    passthrough: true,
                });
                return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
            }
        }
        self.counters.opens_cached.fetch_add(1, Ordering::Relaxed);
        let fh = self.add_handle(Handle::Chunk {
            ns,
            key,
            file: Some(file),
            passthrough: false,
        });
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
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

    fn release_backing(&self, ino: u64) {
        let mut backing = self.backing.lock().unwrap();
        if let Some((_, users)) = backing.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                backing.remove(&ino);
            }
        }
    }
}

impl Filesystem for KvFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        *self.kernel_abi.lock().unwrap() = config.kernel_abi().to_string();
        // Big requests: fuser clamps to its buffer (16 MiB), the kernel to its max_pages.
        if let Err(max) = config.set_max_write(16 << 20) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Optional capabilities, each taken only if the kernel offers it.
        for flag in [
            // Always READDIRPLUS (not AUTO, whose heuristic falls back to plain READDIR and
            // one LOOKUP per chunk for `find`/`ls -l` on large namespaces).
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_ASYNC_DIO,
        ] {
            if caps.contains(flag) {
                let _ = config.add_capabilities(flag);
            }
        }
        if self.opts.passthrough {
            if caps.contains(InitFlags::FUSE_PASSTHROUGH) {
                // Depth 2 lets backing files live on a stacked file system (overlayfs) too.
                let depth_ok =
                    config.set_max_stack_depth(2).is_ok() || config.set_max_stack_depth(1).is_ok();
                if depth_ok && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() {
                    self.passthrough.store(true, Ordering::Relaxed);
                }
            } else {
                tracing::info!(abi = %config.kernel_abi(), "kernel offers no FUSE passthrough; reads go through the page cache");
            }
        }
        tracing::info!(
            passthrough = self.passthrough.load(Ordering::Relaxed),
            abi = %config.kernel_abi(),
            "kvfs mount initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name_str) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let result = match self.inodes.get(parent.0) {
            Some(Node::Root) if name_str == STATUS_DIR => Ok((STATUS_DIR_INO, TTL)),
            Some(Node::Root) => {
                if kvfs_loader::spec::validate_namespace_dir(name_str).is_err() {
                    Err(Errno::ENOENT)
                } else {
                    match self.backend.namespace_exists(name_str) {
                        Ok(true) => Ok((self.inodes.namespace(name_str).0, TTL)),
                        Ok(false) => Err(Errno::ENOENT),
                        Err(e) => Err(backend_errno(&e)),
                    }
                }
            }
            Some(Node::StatusDir) => match name_str {
                STATS_FILE => Ok((STATS_INO, NO_TTL)),
                MOUNT_INFO_FILE => Ok((MOUNT_INFO_INO, NO_TTL)),
                _ => Err(Errno::ENOENT),
            },
            Some(Node::Namespace(ns)) => match Self::chunk_name(name) {
                // A file being written is not visible under its name until committed.
                // One backend stat per lookup: the reply's attributes come from it.
                Some(key) => match self.backend.stat(&ns, &key) {
                    Ok(Some(info)) => {
                        let ino = self.inodes.chunk(&ns, &key);
                        if self.pending_len(ino).is_none() {
                            let attr = self.chunk_attr(ino, &info);
                            return reply.entry(&CHUNK_TTL, &attr, Generation(0));
                        }
                        Ok((ino, NO_TTL))
                    }
                    Ok(None) => Err(Errno::ENOENT),
                    Err(e) => Err(backend_errno(&e)),
                },
                None => Err(Errno::ENOENT),
            },
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        };
        match result.and_then(|(ino, ttl)| self.getattr_node(ino).map(|(a, _)| (a, ttl))) {
            Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_node(ino.0) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A file still being written may be truncated (O_TRUNC, ftruncate) and have its
        // times and mode "set" (ignored: a committed chunk is 0444 with its commit time).
        if self.pending.lock().unwrap().contains_key(&ino.0) {
            if let Some(len) = size {
                let fhs = self.pending.lock().unwrap().get(&ino.0).cloned();
                for fh in fhs.unwrap_or_default() {
                    if let Some(h) = self.handle(FileHandle(fh))
                        && let Handle::Write(w) = &*h
                        && let Err(e) = w.lock().unwrap().set_len(len)
                    {
                        return reply.error(errno(e));
                    }
                }
            }
            return match self.getattr_node(ino.0) {
                Ok((attr, ttl)) => reply.attr(&ttl, &attr),
                Err(e) => reply.error(e),
            };
        }
        let changes = mode.is_some()
            || uid.is_some()
            || gid.is_some()
            || size.is_some()
            || atime.is_some()
            || mtime.is_some();
        if changes {
            return reply.error(if self.opts.read_only {
                Errno::EROFS
            } else {
                Errno::EPERM
            });
        }
        match self.getattr_node(ino.0) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.modifiable().err().unwrap_or(Errno::EPERM));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        if let Err(e) = self.modifiable() {
            return reply.error(e);
        }
        if parent.0 != ROOT_INO {
            return reply.error(Errno::EPERM);
        }
        let Some(name) = name.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        if name == STATUS_DIR {
            return reply.error(Errno::EEXIST);
        }
        if let Err(e) = kvfs_loader::spec::validate_namespace_dir(name) {
            tracing::debug!(error = %e, "mkdir refused");
            return reply.error(Errno::EINVAL);
        }
        match self.backend.create_namespace(name) {
            Ok(()) => {
                let (ino, _) = self.inodes.namespace(name);
                reply.entry(&TTL, &self.dir_attr(ino), Generation(0))
            }
            Err(e) => reply.error(backend_errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = self.modifiable() {
            return reply.error(e);
        }
        let Some(Node::Namespace(ns)) = self.inodes.get(parent.0) else {
            return reply.error(Errno::EPERM);
        };
        let Some(key) = Self::chunk_name(name) else {
            return reply.error(Errno::ENOENT);
        };
        match self.backend.remove(&ns, &key) {
            Ok(true) => reply.ok(),
            Ok(false) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(backend_errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.modifiable().err().unwrap_or(Errno::EPERM));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.modifiable().err().unwrap_or(Errno::EPERM));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.inodes.get(ino.0) {
            Some(Node::Chunk { ns, key }) => {
                if write {
                    return reply.error(if self.opts.read_only {
                        Errno::EROFS
                    } else if flags.0 & libc::O_TRUNC != 0 {
                        Errno::EEXIST
                    } else {
                        Errno::EPERM
                    });
                }
                if self.pending.lock().unwrap().contains_key(&ino.0) {
                    // Not committed yet: invisible, whatever the kernel's dentry says.
                    match self.backend.stat(&ns, &key) {
                        Ok(Some(_)) => {}
                        Ok(None) => return reply.error(Errno::ENOENT),
                        Err(e) => return reply.error(backend_errno(&e)),
                    }
                }
                self.open_chunk(ino.0, ns, key, reply)
            }
            Some(Node::StatusFile(i)) => {
                if write {
                    return reply.error(Errno::EPERM);
                }
                match self.status_content(i) {
                    Ok(data) => {
                        let fh = self.add_handle(Handle::Status(data));
                        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
                    }
                    Err(e) => reply.error(backend_errno(&e)),
                }
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match &*h {
            Handle::Status(data) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end])
            }
            Handle::Chunk { ns, key, file, .. } => READ_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < size as usize {
                    buf.resize(size as usize, 0);
                }
                let dst = &mut buf[..size as usize];
                let r = match file {
                    Some(f) => kvfs_loader::format::read_full_at(f, dst, offset)
                        .map_err(|e| errno(e.raw_os_error().unwrap_or(libc::EIO))),
                    None => self
                        .backend
                        .read_at(ns, key, offset, dst)
                        .map_err(|e| backend_errno(&e)),
                };
                match r {
                    Ok(n) => reply.data(&dst[..n]),
                    Err(e) => reply.error(e),
                }
            }),
            // A file being written is write-only until it is committed.
            Handle::Write(_) => reply.error(Errno::EBADF),
            Handle::Dir(_) => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match &*h {
            Handle::Write(w) => match w.lock().unwrap().write_at(offset, data) {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(e)),
            },
            _ => reply.error(Errno::EPERM),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.ok();
        };
        let Handle::Write(w) = &*h else {
            return reply.ok();
        };
        let mut w = w.lock().unwrap();
        let first = w.state == WriteState::Open;
        let r = w.finish(&*self.backend);
        // Checked: no longer a file being written, whatever the outcome (a `getattr` racing
        // with the RELEASE must see the committed chunk, not the discarded temporary file).
        self.unpend(ino.0, fh.0);
        if first {
            let c = if r.is_ok() {
                &self.counters.commits
            } else {
                &self.counters.rejected
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = self.handles.lock().unwrap().remove(&fh.0);
        match h.as_deref() {
            Some(Handle::Chunk {
                passthrough: true, ..
            }) => self.release_backing(ino.0),
            Some(Handle::Write(w)) => {
                // Never committed here: release cannot report an error. A file that was not
                // flushed (its writer died mid-way) is dropped.
                w.lock().unwrap().discard();
                self.unpend(ino.0, fh.0);
            }
            _ => {}
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Chunks are committed (and synced per the store's policy) at close.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.list_dir(ino.0) {
            Ok(entries) => {
                let fh = self.add_handle(Handle::Dir(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let Handle::Dir(entries) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        // Names with attributes: `ls -l`, `find -printf %s` and friends then need no LOOKUP
        // round trip per entry.
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let Handle::Dir(entries) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (ino, _, name)) in entries.iter().enumerate().skip(offset as usize) {
            // An entry gone since the opendir (evicted) is skipped.
            let Ok((attr, ttl)) = self.getattr_node(*ino) else {
                continue;
            };
            if reply.add(
                INodeNo(*ino),
                i as u64 + 1,
                name,
                &ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BSIZE: u64 = 4096;
        match self.backend.capacity() {
            // Size is what the cache can hold now: its limit, or less when the file system
            // under it has less room; so `df` shows the cache's own use as Used.
            Ok(c) => reply.statfs(
                c.total_bytes.min(c.used_bytes + c.free_bytes) / BSIZE,
                c.free_bytes / BSIZE,
                c.free_bytes / BSIZE,
                c.chunks,
                u32::MAX as u64,
                BSIZE as u32,
                255,
                BSIZE as u32,
            ),
            Err(e) => reply.error(backend_errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.modifiable().err().unwrap_or(Errno::EPERM));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = match (self.inodes.get(ino.0), name.to_str()) {
            (Some(Node::Chunk { ns, key }), Some(name)) => self.xattr_value(&ns, &key, name),
            _ => Err(Errno::NO_XATTR),
        };
        match value {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut names = Vec::new();
        if let Some(Node::Chunk { ns, key }) = self.inodes.get(ino.0)
            && !self.pending.lock().unwrap().contains_key(&ino.0)
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
                XATTR_BACKING,
            ] {
                if n != XATTR_BACKING || local {
                    names.extend_from_slice(n.as_bytes());
                    names.push(0);
                }
            }
        }
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&names)
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.modifiable().err().unwrap_or(Errno::EPERM));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Without `default_permissions` the kernel asks: existence, and no writing on a
        // read-only mount. (With it, the kernel checks the modes itself.)
        if self.inodes.get(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if self.opts.read_only && mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Chunks are plain files: no ioctls (Python probes TCGETS on every open).
        reply.error(Errno::ENOTTY);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if let Err(e) = self.modifiable() {
            return reply.error(e);
        }
        let Some(Node::Namespace(ns)) = self.inodes.get(parent.0) else {
            return reply.error(Errno::EPERM);
        };
        let Some(key) = Self::chunk_name(name) else {
            return reply.error(Errno::EINVAL);
        };
        match self.backend.stat(&ns, &key) {
            Ok(Some(_)) => return reply.error(Errno::EEXIST),
            Ok(None) => {}
            Err(e) => return reply.error(backend_errno(&e)),
        }
        let incoming = match Incoming::create(&self.backend.incoming_dir(), ns.clone(), key) {
            Ok(i) => i,
            Err(e) => return reply.error(errno(e.raw_os_error().unwrap_or(libc::EIO))),
        };
        let ino = self.inodes.chunk(&ns, &key);
        let fh = self.add_handle(Handle::Write(Mutex::new(incoming)));
        self.pending
            .lock()
            .unwrap()
            .entry(ino)
            .or_default()
            .push(fh);
        let attr = self.attr(ino, FileType::RegularFile, 0, SystemTime::now(), 0o644);
        // Direct I/O: every write goes straight to the temporary file in large requests, and
        // nothing of an uncommitted file lingers in the page cache.
        reply.created(
            &NO_TTL,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO,
        );
    }
}
