//! In-memory [`ChunkBackend`] for tests (of this crate and of the root crate's mount tests).
//!
//! [`MemBackend`] keeps namespaces and chunk bytes in a map and counts hits, misses, commits
//! and removals, so a test can mount the FUSE adapter without the tiered store. Files being
//! written still go to a real incoming directory on disk (the adapter's contract), which the
//! test passes in. [`FaultyBackend`] wraps any backend and fails chosen calls, to test the error
//! paths (a commit that fails must fail `close()` and leave nothing).
//!
//! Compiled for this crate's tests, and for other crates with the `testing` feature.

use crate::backend::{BackendError, Capacity, ChunkBackend, ChunkInfo, Committed};
use kvfs_loader::ChunkKey;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

type Chunks = BTreeMap<ChunkKey, (Arc<Vec<u8>>, SystemTime)>;

/// Chunks in memory.
pub struct MemBackend {
    incoming: PathBuf,
    limit: u64,
    namespaces: Mutex<BTreeMap<String, Chunks>>,
    hits: AtomicU64,
    misses: AtomicU64,
    commits: AtomicU64,
    removals: AtomicU64,
}

impl MemBackend {
    /// An empty store with room for `limit` bytes, buffering writes in `incoming`.
    pub fn new(incoming: &Path, limit: u64) -> MemBackend {
        MemBackend {
            incoming: incoming.to_path_buf(),
            limit,
            namespaces: Mutex::new(BTreeMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            removals: AtomicU64::new(0),
        }
    }

    /// Adds a chunk directly (creating its namespace), as another writer would.
    pub fn insert(&self, ns: &str, key: ChunkKey, bytes: Vec<u8>) {
        self.namespaces
            .lock()
            .unwrap()
            .entry(ns.to_string())
            .or_default()
            .insert(key, (Arc::new(bytes), SystemTime::now()));
    }

    /// The bytes of a chunk, if held.
    pub fn bytes(&self, ns: &str, key: &ChunkKey) -> Option<Arc<Vec<u8>>> {
        self.namespaces
            .lock()
            .unwrap()
            .get(ns)?
            .get(key)
            .map(|(b, _)| b.clone())
    }

    fn used(&self) -> (u64, u64) {
        let n = self.namespaces.lock().unwrap();
        n.values()
            .flat_map(|c| c.values())
            .fold((0, 0), |(b, c), (v, _)| (b + v.len() as u64, c + 1))
    }
}

impl ChunkBackend for MemBackend {
    fn namespaces(&self) -> Result<Vec<String>, BackendError> {
        Ok(self.namespaces.lock().unwrap().keys().cloned().collect())
    }

    fn create_namespace(&self, ns: &str) -> Result<(), BackendError> {
        let mut n = self.namespaces.lock().unwrap();
        if n.contains_key(ns) {
            return Err(BackendError::AlreadyExists);
        }
        n.insert(ns.to_string(), BTreeMap::new());
        Ok(())
    }

    fn chunks(&self, ns: &str) -> Result<Vec<(ChunkKey, u64)>, BackendError> {
        let n = self.namespaces.lock().unwrap();
        let c = n.get(ns).ok_or(BackendError::NotFound)?;
        Ok(c.iter().map(|(k, (v, _))| (*k, v.len() as u64)).collect())
    }

    fn stat(&self, ns: &str, key: &ChunkKey) -> Result<Option<ChunkInfo>, BackendError> {
        let n = self.namespaces.lock().unwrap();
        let found = n.get(ns).and_then(|c| c.get(key));
        match found {
            Some((v, t)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(ChunkInfo {
                    len: v.len() as u64,
                    mtime: *t,
                    tier: "memory".to_string(),
                    backing: None,
                }))
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    fn read_at(
        &self,
        ns: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, BackendError> {
        let bytes = self.bytes(ns, key).ok_or(BackendError::NotFound)?;
        let start = (offset as usize).min(bytes.len());
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn incoming_dir(&self) -> PathBuf {
        self.incoming.clone()
    }

    fn commit(&self, ns: &str, key: &ChunkKey, path: &Path) -> Result<Committed, BackendError> {
        let bytes = std::fs::read(path)?;
        if self.used().0 + bytes.len() as u64 > self.limit {
            return Err(BackendError::NoSpace);
        }
        let mut n = self.namespaces.lock().unwrap();
        let c = n.get_mut(ns).ok_or(BackendError::NotFound)?;
        if c.contains_key(key) {
            return Ok(Committed::AlreadyExists);
        }
        c.insert(*key, (Arc::new(bytes), SystemTime::now()));
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(Committed::Created)
    }

    fn remove(&self, ns: &str, key: &ChunkKey) -> Result<bool, BackendError> {
        let mut n = self.namespaces.lock().unwrap();
        let removed = n.get_mut(ns).and_then(|c| c.remove(key)).is_some();
        if removed {
            self.removals.fetch_add(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    fn capacity(&self) -> Result<Capacity, BackendError> {
        let (used, chunks) = self.used();
        Ok(Capacity {
            total_bytes: self.limit,
            used_bytes: used,
            free_bytes: self.limit.saturating_sub(used),
            chunks,
        })
    }

    fn stats_json(&self) -> Result<String, BackendError> {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(format!(
            "{{\"memory\": {{\"hits\": {}, \"misses\": {}}}, \"commits\": {}, \"removals\": {}}}",
            n(&self.hits),
            n(&self.misses),
            n(&self.commits),
            n(&self.removals)
        ))
    }
}

/// Wraps a backend and makes `commit` fail with [`BackendError::NoSpace`] while
/// `fail_commits` is set.
pub struct FaultyBackend<B> {
    pub inner: B,
    pub fail_commits: AtomicBool,
}

impl<B: ChunkBackend> FaultyBackend<B> {
    pub fn new(inner: B) -> Self {
        FaultyBackend {
            inner,
            fail_commits: AtomicBool::new(false),
        }
    }
}

impl<B: ChunkBackend> ChunkBackend for FaultyBackend<B> {
    fn namespaces(&self) -> Result<Vec<String>, BackendError> {
        self.inner.namespaces()
    }
    fn create_namespace(&self, ns: &str) -> Result<(), BackendError> {
        self.inner.create_namespace(ns)
    }
    fn chunks(&self, ns: &str) -> Result<Vec<(ChunkKey, u64)>, BackendError> {
        self.inner.chunks(ns)
    }
    fn stat(&self, ns: &str, key: &ChunkKey) -> Result<Option<ChunkInfo>, BackendError> {
        self.inner.stat(ns, key)
    }
    fn read_at(
        &self,
        ns: &str,
        key: &ChunkKey,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, BackendError> {
        self.inner.read_at(ns, key, offset, buf)
    }
    fn incoming_dir(&self) -> PathBuf {
        self.inner.incoming_dir()
    }
    fn commit(&self, ns: &str, key: &ChunkKey, path: &Path) -> Result<Committed, BackendError> {
        if self.fail_commits.load(Ordering::Relaxed) {
            return Err(BackendError::NoSpace);
        }
        self.inner.commit(ns, key, path)
    }
    fn remove(&self, ns: &str, key: &ChunkKey) -> Result<bool, BackendError> {
        self.inner.remove(ns, key)
    }
    fn capacity(&self) -> Result<Capacity, BackendError> {
        self.inner.capacity()
    }
    fn stats_json(&self) -> Result<String, BackendError> {
        self.inner.stats_json()
    }
}
