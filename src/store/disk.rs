//! The disk tier's bookkeeping: an index of the chunk files under the cache root, their
//! recency and priority, the space they use, and the choice of what to evict.
//!
//! Files are the truth; the index is this process's view of them. It is built by scanning the
//! directory at open (`<root>/<ns>/<key[0..2]>/<key>.kvc`, the [`Layout::Cache`] layout), with
//! each file's atime/mtime (whichever is later) as its initial recency, so the least recently
//! used chunks of the last run go first after a restart. Several processes may share one root:
//! each keeps its own index, a miss stats the path and adopts a chunk another process
//! committed ([`DiskIndex::insert`]), a file that vanished is dropped, and [`DiskTier::rescan`]
//! (run by `gc` and the listings) re-syncs the whole view.
//!
//! Eviction order is lowest priority first, then least recently used. A put first *reserves*
//! its bytes ([`DiskTier::reserve`]): the reservation counts against both bounds (capacity,
//! and free space above `min_free` as `statvfs` reports it) while the file is written, so
//! concurrent puts cannot overshoot together. If evicting every evictable chunk would still
//! not make room, nothing is evicted and the put fails with `NoSpace` before writing a byte.
//!
//! [`Layout::Cache`]: kvfs_loader::dir::Layout::Cache

use super::StoreError;
use super::remote_seam::RemoteTier;
use crate::units::Limit;
use kvfs_loader::ChunkKey;
use kvfs_loader::dir::{Layout, TMP_PREFIX};
use kvfs_loader::spec::validate_namespace_dir;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
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

#[derive(Debug, Default)]
pub(crate) struct DiskIndex {
    pub namespaces: HashMap<String, HashMap<ChunkKey, DiskEntry>>,
    pub used: u64,
    pub reserved: u64,
}

impl DiskIndex {
    pub fn get(&self, ns: &str, key: &ChunkKey) -> Option<DiskEntry> {
        self.namespaces.get(ns)?.get(key).copied()
    }

    /// Adds (or refreshes) an entry, keeping the priority of an existing one.
    pub fn insert(&mut self, ns: &str, key: ChunkKey, len: u64, last_use: u64) {
        let chunks = self.namespaces.entry(ns.to_string()).or_default();
        match chunks.get_mut(&key) {
            Some(e) => {
                self.used = self.used - e.len + len;
                e.len = len;
                e.last_use = e.last_use.max(last_use);
            }
            None => {
                self.used += len;
                chunks.insert(
                    key,
                    DiskEntry {
                        len,
                        last_use,
                        priority: 0,
                    },
                );
            }
        }
    }

    pub fn remove(&mut self, ns: &str, key: &ChunkKey) -> Option<DiskEntry> {
        let e = self.namespaces.get_mut(ns)?.remove(key)?;
        self.used -= e.len;
        Some(e)
    }

    pub fn touch(&mut self, ns: &str, key: &ChunkKey) {
        if let Some(e) = self.namespaces.get_mut(ns).and_then(|c| c.get_mut(key)) {
            e.last_use = e.last_use.max(now_nanos());
        }
    }

    /// Replaces the entries of `ns` by what a scan found, keeping known priorities and
    /// recencies.
    fn replace_namespace(&mut self, ns: &str, found: Vec<(ChunkKey, u64, u64)>) {
        let old = self.namespaces.remove(ns).unwrap_or_default();
        self.used -= old.values().map(|e| e.len).sum::<u64>();
        let mut fresh = HashMap::with_capacity(found.len());
        for (key, len, recency) in found {
            let e = match old.get(&key) {
                Some(o) => DiskEntry {
                    len,
                    last_use: o.last_use.max(recency),
                    priority: o.priority,
                },
                None => DiskEntry {
                    len,
                    last_use: recency,
                    priority: 0,
                },
            };
            self.used += len;
            fresh.insert(key, e);
        }
        self.namespaces.insert(ns.to_string(), fresh);
    }
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

/// Every chunk file of `ns`: key, length, recency. Files whose names are not chunk names, or
/// that sit in the wrong fan-out directory, are skipped (`verify` reports them).
pub(crate) fn scan_namespace(root: &Path, ns: &str) -> io::Result<Vec<(ChunkKey, u64, u64)>> {
    let mut out = Vec::new();
    let dir = root.join(ns);
    let fans = match fs::read_dir(&dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for fan in fans {
        let fan = fan?;
        let fan_name = fan.file_name();
        let Some(fan_name) = fan_name.to_str() else {
            continue;
        };
        if fan_name.len() != 2 || !fan.file_type()?.is_dir() {
            continue;
        }
        let files = match fs::read_dir(fan.path()) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
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
            if !key.to_hex().starts_with(fan_name) {
                continue;
            }
            let md = match f.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if md.is_file() {
                out.push((key, md.len(), file_recency(&md)));
            }
        }
    }
    Ok(out)
}

/// The disk tier: root, bounds and index.
#[derive(Debug)]
pub(crate) struct DiskTier {
    pub root: PathBuf,
    pub capacity: Limit,
    pub min_free: Limit,
    /// Asked which chunks still wait for their upload (never evicted).
    remote: Option<Arc<dyn RemoteTier>>,
    index: Mutex<DiskIndex>,
}

/// Bytes held back for a put in progress; released on drop.
pub(crate) struct Reservation<'a> {
    tier: &'a DiskTier,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.tier.index().reserved -= self.bytes;
    }
}

/// A chunk chosen for eviction.
#[derive(Debug, Clone)]
pub(crate) struct Victim {
    pub ns: String,
    pub key: ChunkKey,
    pub len: u64,
}

impl DiskTier {
    /// `remote`, when given, pins chunks whose upload is still queued (see
    /// [`RemoteTier::upload_pending`]): eviction passes over them.
    pub fn new(
        root: PathBuf,
        capacity: Limit,
        min_free: Limit,
        remote: Option<Arc<dyn RemoteTier>>,
    ) -> DiskTier {
        DiskTier {
            root,
            capacity,
            min_free,
            remote,
            index: Mutex::new(DiskIndex::default()),
        }
    }

    pub fn index(&self) -> MutexGuard<'_, DiskIndex> {
        // A panic while holding the lock leaves the index consistent (every update is a few
        // field writes), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Re-syncs the index of one namespace with the files on disk.
    pub fn rescan_namespace(&self, ns: &str) -> Result<(), StoreError> {
        let found =
            scan_namespace(&self.root, ns).map_err(|e| self.io_err(&self.root.join(ns), e))?;
        self.index().replace_namespace(ns, found);
        Ok(())
    }

    /// Re-syncs the whole index with the files on disk.
    pub fn rescan(&self) -> Result<(), StoreError> {
        let dirs = list_namespace_dirs(&self.root).map_err(|e| self.io_err(&self.root, e))?;
        for ns in &dirs {
            self.rescan_namespace(ns)?;
        }
        let mut idx = self.index();
        let gone: Vec<String> = idx
            .namespaces
            .keys()
            .filter(|k| !dirs.contains(k))
            .cloned()
            .collect();
        for ns in gone {
            if let Some(old) = idx.namespaces.remove(&ns) {
                idx.used -= old.values().map(|e| e.len).sum::<u64>();
            }
        }
        Ok(())
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

    /// Chooses what to evict so that `needed` more bytes fit, or says how much could fit.
    /// Returns the victims (already removed from the index) and must be followed by deleting
    /// their files.
    fn plan(
        &self,
        idx: &mut DiskIndex,
        needed: u64,
        space: FsSpace,
    ) -> Result<Vec<Victim>, StoreError> {
        let (limit, min_free) = self.bounds(space);
        let pending = idx.used + idx.reserved;
        let cap_deficit = (pending + needed).saturating_sub(limit);
        let free_deficit = if min_free > 0 {
            (min_free + idx.reserved + needed).saturating_sub(space.free)
        } else {
            0
        };
        let want = cap_deficit.max(free_deficit);
        if want == 0 {
            return Ok(Vec::new());
        }
        let mut all: Vec<(u8, u64, &str, ChunkKey, u64)> = idx
            .namespaces
            .iter()
            .flat_map(|(ns, chunks)| {
                chunks
                    .iter()
                    .map(move |(k, e)| (e.priority, e.last_use, ns.as_str(), *k, e.len))
            })
            .collect();
        let evictable: u64 = all.iter().map(|v| v.4).sum();
        if evictable < want || needed > limit {
            let room_cap = limit.saturating_sub(pending);
            let room_free = if min_free > 0 {
                space.free.saturating_sub(min_free + idx.reserved)
            } else {
                space.free.saturating_sub(idx.reserved)
            };
            return Err(StoreError::NoSpace {
                needed,
                available: room_cap.min(room_free) + evictable.min(limit),
            });
        }
        all.sort_unstable_by_key(|v| (v.0, v.1));
        let mut freed = 0;
        let mut victims = Vec::new();
        for (_, _, ns, key, len) in all {
            if freed >= want {
                break;
            }
            if self
                .remote
                .as_ref()
                .is_some_and(|r| r.upload_pending(ns, &key))
            {
                continue; // its only copy until the upload lands
            }
            freed += len;
            victims.push(Victim {
                ns: ns.to_string(),
                key,
                len,
            });
        }
        if freed < want {
            // Pinned chunks (uploads still queued) make up the difference: nothing is evicted.
            return Err(StoreError::NoSpace {
                needed,
                available: freed,
            });
        }
        for v in &victims {
            idx.remove(&v.ns, &v.key);
        }
        Ok(victims)
    }

    /// Makes room for `needed` bytes and holds them until the returned reservation drops.
    /// Evicted chunks are returned so the caller can drop them from faster tiers too.
    pub fn reserve(&self, needed: u64) -> Result<(Reservation<'_>, Vec<Victim>), StoreError> {
        let space = self.space()?;
        let victims = {
            let mut idx = self.index();
            let v = self.plan(&mut idx, needed, space)?;
            idx.reserved += needed;
            v
        };
        let res = Reservation {
            tier: self,
            bytes: needed,
        };
        self.delete_victims(&victims);
        Ok((res, victims))
    }

    /// Evicts until both bounds hold (`gc`). Returns what was evicted.
    pub fn enforce(&self) -> Result<Vec<Victim>, StoreError> {
        let space = self.space()?;
        let victims = {
            let mut idx = self.index();
            match self.plan(&mut idx, 0, space) {
                Ok(v) => v,
                // Even an empty cache cannot satisfy min_free (the file system is full of
                // other data): evict everything we hold, which is the best gc can do.
                Err(StoreError::NoSpace { .. }) => {
                    let all: Vec<Victim> = idx
                        .namespaces
                        .iter()
                        .flat_map(|(ns, c)| {
                            c.iter().map(move |(k, e)| Victim {
                                ns: ns.clone(),
                                key: *k,
                                len: e.len,
                            })
                        })
                        .collect();
                    for v in &all {
                        idx.remove(&v.ns, &v.key);
                    }
                    all
                }
                Err(e) => return Err(e),
            }
        };
        self.delete_victims(&victims);
        Ok(victims)
    }

    /// Evicts up to `bytes` of the coldest chunks regardless of bounds (used to retry a write
    /// the file system refused with ENOSPC).
    pub fn evict_bytes(&self, bytes: u64) -> Vec<Victim> {
        let victims = {
            let mut idx = self.index();
            let mut all: Vec<(u8, u64, String, ChunkKey, u64)> = idx
                .namespaces
                .iter()
                .flat_map(|(ns, c)| {
                    c.iter()
                        .map(move |(k, e)| (e.priority, e.last_use, ns.clone(), *k, e.len))
                })
                .collect();
            all.sort_unstable_by_key(|v| (v.0, v.1));
            let mut freed = 0;
            let mut out = Vec::new();
            for (_, _, ns, key, len) in all {
                if freed >= bytes {
                    break;
                }
                freed += len;
                idx.remove(&ns, &key);
                out.push(Victim { ns, key, len });
            }
            out
        };
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
