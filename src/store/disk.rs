//! The disk tier: chunk files under the cache root, the bounds they must keep, and the
//! choice of what to evict.
//!
//! Files are the truth (`<root>/<ns>/<key[0..2]>/<key>.kvc`, the [`Layout::Cache`] layout);
//! what capacity accounting and eviction need about them (length, last use, priority, bytes
//! per namespace, space reserved by puts in flight) is kept in the persistent index shared by
//! every process on the root ([`super::index`]), so opening the tier costs the same at a
//! thousand and a million chunks. A file found without a row gets one with its atime/mtime
//! (whichever is later) as its recency; the background pass ([`super::maintenance`]) brings
//! the two back into agreement when needed.
//!
//! Eviction order is lowest priority first, then least recently used. A put first *reserves*
//! its bytes ([`DiskTier::reserve`]): in one index transaction, which no other process's
//! interleaves, it reads the usage and the reservations of every process, takes the coldest
//! chunks off the eviction B-tree until the bytes fit both bounds (capacity, and free space
//! above `min_free` as `statvfs` reports it), and records its reservation; concurrent puts of
//! any process cannot overshoot together. If evicting every evictable chunk would still not
//! make room, nothing is evicted and the put fails with `NoSpace` before writing a byte.
//!
//! [`Layout::Cache`]: kvfs_loader::dir::Layout::Cache

use super::StoreError;
use super::index::{ChunkIndex, Tx};
use super::maintenance;
use super::remote_seam::RemoteTier;
use crate::units::Limit;
use kvfs_loader::ChunkKey;
use kvfs_loader::dir::{Layout, TMP_PREFIX};
use kvfs_loader::spec::validate_namespace_dir;
use std::fs;
use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bookkeeping of one chunk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskEntry {
    pub len: u64,
    /// Last use, nanoseconds since the Unix epoch.
    pub last_use: u64,
    /// Eviction hint: higher is kept longer.
    pub priority: u8,
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn time_nanos(t: io::Result<SystemTime>) -> u64 {
    t.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Recency of a file found on disk: the later of its access and modification times.
pub(crate) fn file_recency(md: &fs::Metadata) -> u64 {
    time_nanos(md.accessed()).max(time_nanos(md.modified()))
}

/// Size and free space of a file system, from `statvfs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FsSpace {
    pub total: u64,
    /// Bytes available to unprivileged writers (`f_bavail`).
    pub free: u64,
}

pub(crate) fn fs_space(path: &Path) -> io::Result<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs initialises it fully when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    // The field types vary across targets (u32 on some 32-bit libcs), hence the casts.
    #[allow(clippy::unnecessary_cast)]
    let (frsize, blocks, bavail) = (st.f_frsize as u64, st.f_blocks as u64, st.f_bavail as u64);
    Ok(FsSpace {
        total: blocks * frsize,
        free: bavail * frsize,
    })
}

/// The valid namespace directories under `root`, sorted.
pub(crate) fn list_namespace_dirs(root: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(name) = entry.file_name().to_str()
            && validate_namespace_dir(name).is_ok()
        {
            out.push(name.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// The fan-out directories (`<ns>/<xx>/`) of namespace `ns`, sorted; none if `ns` is gone.
pub(crate) fn fan_dirs(root: &Path, ns: &str) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let fans = match fs::read_dir(root.join(ns)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for fan in fans {
        let fan = fan?;
        let Ok(name) = fan.file_name().into_string() else {
            continue;
        };
        let is_fan = name.len() == 2
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if is_fan && fan.file_type()?.is_dir() {
            out.push(name);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The chunk names of one fan-out directory of `ns` (`fan`, two hex digits), unsorted, with
/// their directory entries; no file is opened or stat'ed. Names that are not chunk names, or
/// that sit in the wrong fan-out directory, are skipped (`verify` reports them).
fn fan_entries(root: &Path, ns: &str, fan: &str) -> io::Result<Vec<(ChunkKey, fs::DirEntry)>> {
    let mut out = Vec::new();
    let files = match fs::read_dir(root.join(ns).join(fan)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for f in files {
        let f = f?;
        let name = f.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let Ok(key) = ChunkKey::from_file_name(name) else {
            continue;
        };
        if key.to_hex().starts_with(fan) {
            out.push((key, f));
        }
    }
    Ok(out)
}

/// The chunk keys of one fan-out directory of `ns`, sorted (names only: a listing page).
pub(crate) fn fan_keys(root: &Path, ns: &str, fan: &str) -> io::Result<Vec<ChunkKey>> {
    let mut keys: Vec<ChunkKey> = fan_entries(root, ns, fan)?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    keys.sort_unstable();
    Ok(keys)
}

/// The chunk files of one fan-out directory of `ns`: key, length, recency, sorted by key.
pub(crate) fn scan_fan(root: &Path, ns: &str, fan: &str) -> io::Result<Vec<(ChunkKey, u64, u64)>> {
    let mut out = Vec::new();
    for (key, f) in fan_entries(root, ns, fan)? {
        let md = match f.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if md.is_file() {
            out.push((key, md.len(), file_recency(&md)));
        }
    }
    out.sort_unstable_by_key(|f| f.0);
    Ok(out)
}

/// The disk tier: root, bounds, index, and the background maintenance pass.
#[derive(Debug)]
pub(crate) struct DiskTier {
    pub root: PathBuf,
    pub capacity: Limit,
    pub min_free: Limit,
    /// Asked which chunks still wait for their upload (never evicted).
    remote: Option<Arc<dyn RemoteTier>>,
    index: ChunkIndex,
    /// The maintenance pass this process started, if any.
    pass: Mutex<Option<JoinHandle<()>>>,
    /// Set when the tier is dropped: the background pass stops between two directories.
    stop_pass: Arc<AtomicBool>,
}

/// Bytes held back for a put in progress (a row in the index, seen by every process);
/// released on drop unless committed.
pub(crate) struct Reservation<'a> {
    tier: &'a DiskTier,
    id: Option<i64>,
}

impl Reservation<'_> {
    /// Turns the reservation into the chunk's row in one transaction; `priority` is the one
    /// the chunk's importance implies ([`super::priority`]), for a new row.
    pub fn commit(mut self, ns: &str, key: &ChunkKey, len: u64, priority: u8) {
        if let Some(id) = self.id.take() {
            self.tier
                .index
                .commit_reservation(id, ns, key, len, priority);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.tier.index.release(id);
        }
    }
}

/// A chunk chosen for eviction.
#[derive(Debug, Clone)]
pub(crate) struct Victim {
    pub ns: String,
    pub key: ChunkKey,
    pub len: u64,
}

fn db_err(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::io(path, io::Error::other(e))
}

impl Drop for DiskTier {
    /// Stops the background maintenance pass (between two directories) and waits for it, so
    /// no thread keeps the index or the cache's files open after the store is dropped (a
    /// remount, an unmount or a test's temporary directory would find them busy).
    fn drop(&mut self) {
        self.stop_pass.store(true, Ordering::Relaxed);
        self.wait_maintenance();
    }
}

impl DiskTier {
    /// Opens the tier's index (see [`super::index`]) and starts a maintenance pass in the
    /// background when one is due. `remote`, when given, pins chunks whose upload is still
    /// queued (see [`RemoteTier::upload_pending`]): eviction passes over them.
    pub fn open(
        root: PathBuf,
        capacity: Limit,
        min_free: Limit,
        remote: Option<Arc<dyn RemoteTier>>,
    ) -> Result<DiskTier, StoreError> {
        let index = ChunkIndex::open(&root)?;
        let tier = DiskTier {
            root,
            capacity,
            min_free,
            remote,
            index,
            pass: Mutex::new(None),
            stop_pass: Arc::new(AtomicBool::new(false)),
        };
        tier.start_maintenance();
        Ok(tier)
    }

    /// Starts a maintenance pass on a background thread if one is due and no live process
    /// runs one.
    fn start_maintenance(&self) {
        match self.index.claim_maintenance() {
            Ok(true) => {
                let root = self.root.clone();
                let stop = Arc::clone(&self.stop_pass);
                let handle = std::thread::Builder::new()
                    .name("kvfs-index".into())
                    .spawn(move || {
                        if let Err(e) = maintenance::run_pass(&root, &stop) {
                            tracing::warn!(root = %root.display(), error = %e, "chunk index maintenance failed");
                        }
                    });
                match handle {
                    Ok(h) => *self.pass.lock().unwrap_or_else(|p| p.into_inner()) = Some(h),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the chunk index maintenance")
                    }
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot claim the chunk index maintenance"),
        }
    }

    /// Waits for the maintenance pass this process started, if any.
    pub fn wait_maintenance(&self) {
        let h = self.pass.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// Runs a maintenance pass now (`gc`, `verify`): the index agrees with the files after.
    pub fn resync(&self) -> Result<(), StoreError> {
        self.wait_maintenance();
        self.index.flush_touches();
        maintenance::run_pass(&self.root, &AtomicBool::new(false)).map(|_| ())
    }

    pub fn index(&self) -> &ChunkIndex {
        &self.index
    }

    pub fn path(&self, ns: &str, key: &ChunkKey) -> PathBuf {
        Layout::Cache.chunk_path(&self.root, ns, key)
    }

    fn io_err(&self, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn space(&self) -> Result<FsSpace, StoreError> {
        fs_space(&self.root).map_err(|e| self.io_err(&self.root, e))
    }

    /// The capacity bound in bytes, and the free-space floor in bytes.
    pub fn bounds(&self, space: FsSpace) -> (u64, u64) {
        (
            self.capacity.resolve(space.total),
            self.min_free.resolve(space.total),
        )
    }

    fn pinned(&self, v: &Victim) -> bool {
        self.remote
            .as_ref()
            .is_some_and(|r| r.upload_pending(&v.ns, &v.key))
    }

    /// Chooses what to evict so that `needed` more bytes fit, or says how much could fit.
    /// Runs inside the index's write transaction: the victims' rows are removed there, and
    /// their files must be deleted after it commits. Walks the eviction B-tree from the
    /// coldest chunk and stops when enough is freed: its cost is the victims', not the
    /// cache's.
    fn plan(
        &self,
        tx: &mut Tx<'_>,
        needed: u64,
        space: FsSpace,
    ) -> Result<Vec<Victim>, StoreError> {
        let path = self.index.path().to_path_buf();
        let (limit, min_free) = self.bounds(space);
        let used = tx.used().map_err(|e| db_err(&path, e))?;
        let reserved = tx.reserved().map_err(|e| db_err(&path, e))?;
        let pending = used + reserved;
        let cap_deficit = (pending + needed).saturating_sub(limit);
        let free_deficit = if min_free > 0 {
            (min_free + reserved + needed).saturating_sub(space.free)
        } else {
            0
        };
        let want = cap_deficit.max(free_deficit);
        if want == 0 {
            return Ok(Vec::new());
        }
        let evictable = used;
        if evictable < want || needed > limit {
            let room_cap = limit.saturating_sub(pending);
            let room_free = if min_free > 0 {
                space.free.saturating_sub(min_free + reserved)
            } else {
                space.free.saturating_sub(reserved)
            };
            return Err(StoreError::NoSpace {
                needed,
                available: room_cap.min(room_free) + evictable.min(limit),
            });
        }
        let mut freed = 0;
        let mut victims = Vec::new();
        tx.coldest(|v| {
            if freed >= want {
                return ControlFlow::Break(());
            }
            if !self.pinned(&v) {
                // A pinned chunk is its only copy until the upload lands.
                freed += v.len;
                victims.push(v);
            }
            ControlFlow::Continue(())
        })
        .map_err(|e| db_err(&path, e))?;
        if freed < want {
            // Pinned chunks (uploads still queued) make up the difference: nothing is evicted.
            return Err(StoreError::NoSpace {
                needed,
                available: freed,
            });
        }
        for v in &victims {
            tx.remove(&v.ns, &v.key).map_err(|e| db_err(&path, e))?;
        }
        Ok(victims)
    }

    /// Makes room for `needed` bytes of chunk `key` in `ns` and holds them until the
    /// returned reservation is committed or dropped. Evicted chunks are returned so the
    /// caller can drop them from faster tiers too.
    pub fn reserve(
        &self,
        ns: &str,
        key: &ChunkKey,
        needed: u64,
    ) -> Result<(Reservation<'_>, Vec<Victim>), StoreError> {
        let space = self.space()?;
        let path = self.index.path().to_path_buf();
        let (id, victims) = self.index.write(|tx| {
            let v = self.plan(tx, needed, space)?;
            let id = tx
                .reserve(needed, Some((ns, key)))
                .map_err(|e| db_err(&path, e))?;
            Ok((id, v))
        })?;
        let res = Reservation {
            tier: self,
            id: Some(id),
        };
        self.delete_victims(&victims);
        Ok((res, victims))
    }

    /// Evicts until both bounds hold (`gc`). Returns what was evicted.
    pub fn enforce(&self) -> Result<Vec<Victim>, StoreError> {
        let space = self.space()?;
        let victims = match self.index.write(|tx| self.plan(tx, 0, space)) {
            Ok(v) => v,
            // Even an empty cache cannot satisfy min_free (the file system is full of
            // other data): evict everything we hold, which is the best gc can do.
            Err(StoreError::NoSpace { .. }) => return Ok(self.evict_bytes(u64::MAX)),
            Err(e) => return Err(e),
        };
        self.delete_victims(&victims);
        Ok(victims)
    }

    /// Evicts up to `bytes` of the coldest chunks regardless of bounds (used to retry a write
    /// the file system refused with ENOSPC).
    pub fn evict_bytes(&self, bytes: u64) -> Vec<Victim> {
        let path = self.index.path().to_path_buf();
        let r = self.index.write(|tx| {
            let mut freed = 0u64;
            let mut out = Vec::new();
            tx.coldest(|v| {
                if freed >= bytes {
                    return ControlFlow::Break(());
                }
                freed = freed.saturating_add(v.len);
                out.push(v);
                ControlFlow::Continue(())
            })
            .map_err(|e| db_err(&path, e))?;
            for v in &out {
                tx.remove(&v.ns, &v.key).map_err(|e| db_err(&path, e))?;
            }
            Ok(out)
        });
        let victims = r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot choose chunks to evict");
            Vec::new()
        });
        self.delete_victims(&victims);
        victims
    }

    fn delete_victims(&self, victims: &[Victim]) {
        for v in victims {
            let p = self.path(&v.ns, &v.key);
            match fs::remove_file(&p) {
                Ok(()) => tracing::debug!(path = %p.display(), bytes = v.len, "evicted chunk"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot evict chunk"),
            }
        }
    }
}
