//! The thin FUSE layer: [`FuseFs`] implements `fuser::Filesystem` with one call into
//! [`KvFs`] per callback, and [`errno`] maps the core's [`FsError`]s to what an application
//! sees (a backend's error through `BackendError::errno`). Nothing is decided here beyond the kernel protocol: the INIT negotiation (request
//! sizes, READDIRPLUS, passthrough), the passthrough backing ids (one per inode, shared by
//! its open handles as the kernel requires, dropped with the last one), and the buffer-size
//! rules of READDIR and GETXATTR.

use crate::backend::{BackendError, FsOp, OpReport};
use crate::core::{FsError, KvFs, OpenMode, Released};
use fuser::{
    BackingId, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, SessionUnmounter, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

/// The errno an application sees for `e`.
pub fn errno(e: &FsError) -> Errno {
    let raw = match e {
        FsError::NotFound => libc::ENOENT,
        FsError::NotADirectory => libc::ENOTDIR,
        FsError::IsADirectory => libc::EISDIR,
        FsError::NotPermitted => libc::EPERM,
        FsError::ReadOnly => libc::EROFS,
        FsError::Exists => libc::EEXIST,
        FsError::InvalidName => libc::EINVAL,
        FsError::NameTooLong => libc::ENAMETOOLONG,
        FsError::BadHandle => libc::EBADF,
        FsError::NoXattr => return Errno::NO_XATTR,
        FsError::Corrupt(_) => libc::EIO,
        FsError::Rejected(b) => b.errno(),
        FsError::Backend(b) => {
            // The store returns these without logging them (its callers report): the mount
            // is where an operator must see them.
            if matches!(
                b,
                BackendError::Invalid(_) | BackendError::Io(_) | BackendError::Other(_)
            ) {
                tracing::warn!(error = %b, "request failed");
            }
            b.errno()
        }
        FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
    };
    Errno::from_i32(raw)
}

fn open_flags(mode: OpenMode) -> FopenFlags {
    match mode {
        OpenMode::Passthrough => FopenFlags::empty(),
        OpenMode::KeepCache => FopenFlags::FOPEN_KEEP_CACHE,
        OpenMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
    }
}

/// [`KvFs`] served by fuser.
pub struct FuseFs {
    core: Arc<KvFs>,
    /// Passthrough backing ids per inode, with the number of handles using each.
    backing: Mutex<HashMap<u64, (Arc<BackingId>, usize)>>,
    /// The session's own unmounter, set by [`crate::session::mount`]; see `destroy`.
    unmounter: Arc<Mutex<Option<SessionUnmounter>>>,
}

impl FuseFs {
    pub fn new(core: Arc<KvFs>) -> FuseFs {
        FuseFs {
            core,
            backing: Mutex::new(HashMap::new()),
            unmounter: Arc::new(Mutex::new(None)),
        }
    }

    /// Where the session's unmounter goes once the session exists.
    pub fn unmounter_slot(&self) -> Arc<Mutex<Option<SessionUnmounter>>> {
        self.unmounter.clone()
    }

    pub fn core(&self) -> &Arc<KvFs> {
        &self.core
    }

    /// Runs one request's call into the core, telling the backend its kind, time and
    /// outcome ([`KvFs::observe`]).
    fn op<T>(&self, op: FsOp, f: impl FnOnce() -> Result<T, FsError>) -> Result<T, FsError> {
        let started = Instant::now();
        let r = f();
        self.observe(op, started, r.is_ok(), 0);
        r
    }

    fn observe(&self, op: FsOp, started: Instant, ok: bool, bytes: u64) {
        self.core.observe(&OpReport {
            op,
            elapsed: started.elapsed(),
            ok,
            bytes,
        });
    }

    /// A refused change (mknod, rmdir, rename, setxattr, removexattr), observed as such.
    fn refused(&self) -> FsError {
        self.observe(FsOp::Refused, Instant::now(), false, 0);
        self.core.refuse_change()
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

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
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
        let mut passthrough = false;
        if self.core.options().passthrough {
            if caps.contains(InitFlags::FUSE_PASSTHROUGH) {
                // Depth 2 lets backing files live on a stacked file system (overlayfs) too.
                let depth_ok =
                    config.set_max_stack_depth(2).is_ok() || config.set_max_stack_depth(1).is_ok();
                passthrough =
                    depth_ok && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            } else {
                tracing::info!(abi = %config.kernel_abi(), "kernel offers no FUSE passthrough; reads go through the page cache");
            }
        }
        self.core
            .set_kernel(config.kernel_abi().to_string(), passthrough);
        tracing::info!(passthrough, abi = %config.kernel_abi(), "kvfs mount initialised");
        Ok(())
    }

    /// The session ends: the kernel has closed the connection, nearly always because the
    /// directory was unmounted (`kvfs umount`, `umount`, or the daemon's signal handler).
    /// fuser would unmount again when the session is dropped and log "Failed to umount
    /// filesystem: Invalid argument"; its mount is taken out here instead, where a directory
    /// that is no longer mounted is the expected case. (After a connection abort the mount is
    /// still there, and this unmounts it.)
    fn destroy(&mut self) {
        let Some(mut unmounter) = self.unmounter.lock().unwrap().take() else {
            return;
        };
        match unmounter.unmount() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!("session ended after the directory was unmounted")
            }
            Err(e) => tracing::warn!(error = %e, "cannot unmount at the end of the session"),
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.op(FsOp::Lookup, || self.core.lookup(parent.0, name)) {
            Ok(e) => reply.entry(&e.ttl, &e.attr, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.op(FsOp::Getattr, || self.core.getattr(ino.0)) {
            Ok(e) => reply.attr(&e.ttl, &e.attr),
            Err(e) => reply.error(errno(&e)),
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
        let other =
            mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some();
        match self.op(FsOp::Setattr, || self.core.setattr(ino.0, size, other)) {
            Ok(e) => reply.attr(&e.ttl, &e.attr),
            Err(e) => reply.error(errno(&e)),
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
        reply.error(errno(&self.refused()));
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
        match self.op(FsOp::Mkdir, || self.core.mkdir(parent.0, name)) {
            Ok(e) => reply.entry(&e.ttl, &e.attr, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.op(FsOp::Unlink, || self.core.unlink(parent.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.refused()));
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
        reply.error(errno(&self.refused()));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // One backing id per inode, registered by the first open that passes through.
        let id = Mutex::new(None);
        let register = |ino: u64, file: &std::fs::File| {
            let mut backing = self.backing.lock().unwrap();
            let shared = match backing.get_mut(&ino) {
                Some((id, users)) => {
                    *users += 1;
                    id.clone()
                }
                None => {
                    let new = Arc::new(reply.open_backing(file)?);
                    backing.insert(ino, (new.clone(), 1));
                    new
                }
            };
            *id.lock().unwrap() = Some(shared);
            Ok(())
        };
        match self.op(FsOp::Open, || self.core.open(ino.0, flags.0, &register)) {
            Ok(o) if o.mode == OpenMode::Passthrough => {
                let id = id
                    .into_inner()
                    .unwrap()
                    .expect("registered for passthrough");
                reply.opened_passthrough(FileHandle(o.fh), open_flags(o.mode), &id)
            }
            Ok(o) => reply.opened(FileHandle(o.fh), open_flags(o.mode)),
            Err(e) => reply.error(errno(&e)),
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
        let started = Instant::now();
        self.core.read_with(fh.0, offset, size, |r| {
            let bytes = r.as_ref().map_or(0, |d| d.len() as u64);
            self.observe(FsOp::Read, started, r.is_ok(), bytes);
            match r {
                Ok(data) => reply.data(data),
                Err(e) => reply.error(errno(&e)),
            }
        })
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
        let started = Instant::now();
        let r = self.core.write(fh.0, offset, data);
        let bytes = r.as_ref().map_or(0, |&n| u64::from(n));
        self.observe(FsOp::Write, started, r.is_ok(), bytes);
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.op(FsOp::Flush, || self.core.flush(ino.0, fh.0, req.pid())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
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
        let released = self.op(FsOp::Release, || Ok(self.core.release(ino.0, fh.0)));
        if released.ok() == Some(Released::Passthrough) {
            self.release_backing(ino.0);
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
        match self.op(FsOp::Opendir, || self.core.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
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
        let entries = match self.op(FsOp::Readdir, || self.core.dir_entries(fh.0, offset)) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        for (cookie, e) in &entries {
            if reply.add(INodeNo(e.ino), *cookie, e.kind, &e.name) {
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
        let mut offset = offset;
        loop {
            let entries = match self.op(FsOp::Readdir, || self.core.dir_entries(fh.0, offset)) {
                Ok(e) => e,
                Err(e) => return reply.error(errno(&e)),
            };
            let Some((last, _)) = entries.last() else {
                break; // the end
            };
            let mut added = false;
            for (cookie, e) in &entries {
                // An entry gone since it was listed (evicted) is skipped.
                let Ok(a) = self.core.getattr(e.ino) else {
                    continue;
                };
                if reply.add(
                    INodeNo(e.ino),
                    *cookie,
                    &e.name,
                    &a.ttl,
                    &a.attr,
                    Generation(0),
                ) {
                    return reply.ok();
                }
                added = true;
            }
            // An empty reply means "end of directory": when every entry of this batch was
            // gone, go on with the next.
            if added {
                break;
            }
            offset = *last;
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
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.op(FsOp::Statfs, || self.core.statfs()) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(errno(&e)),
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
        reply.error(errno(&self.refused()));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.op(FsOp::Getxattr, || self.core.getxattr(ino.0, name)) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = self
            .op(FsOp::Listxattr, || Ok(self.core.listxattr(ino.0)))
            .unwrap_or_default();
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&names)
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.refused()));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let write = mask.contains(fuser::AccessFlags::W_OK);
        match self.op(FsOp::Access, || self.core.access(ino.0, write)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
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
        match self.op(FsOp::Create, || self.core.create(parent.0, name)) {
            Ok((e, o)) => reply.created(
                &e.ttl,
                &e.attr,
                Generation(0),
                FileHandle(o.fh),
                open_flags(o.mode),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}
