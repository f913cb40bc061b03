//! In-memory [`ChunkBackend`] for tests (of this crate and of the root crate's mount tests).
//!
//! [`MemBackend`] keeps namespaces and chunk bytes in a map and counts hits, misses, commits
//! and removals, so a test can mount the FUSE adapter without the tiered store. Files being
//! written still go to a real incoming directory on disk (the adapter's contract), which the
//! test passes in. [`FaultyBackend`] wraps any backend and fails chosen calls, to test the error
//! paths (a commit that fails must fail `close()` and leave nothing), and can serve a chosen
//! file as a chunk's local file (a corrupt copy, a symlink, a FIFO), to test the open-time
//! check. [`conformance`] is the one suite every [`ChunkBackend`] must pass; it runs here
//! against [`MemBackend`] and in the root crate against the tiered store's backend.
//!
//! Compiled for this crate's tests, and for other crates with the `testing` feature.

use crate::backend::{BackendError, Capacity, ChunkBackend, ChunkInfo, Committed, OpReport};
use crate::metrics::FsMetrics;
use kvfs_loader::ChunkKey;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
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
    /// Counts the requests the file system reports, as the daemon's backend does.
    metrics: Option<FsMetrics>,
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
            metrics: None,
        }
    }

    /// Counts every request the file system reports in `metrics` (`observe_op`).
    pub fn with_metrics(mut self, metrics: FsMetrics) -> MemBackend {
        self.metrics = Some(metrics);
        self
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

    /// The chunk is dropped (there is no quarantine directory in memory).
    fn quarantine(&self, ns: &str, key: &ChunkKey, _reason: &str) -> Option<PathBuf> {
        let mut n = self.namespaces.lock().unwrap();
        n.get_mut(ns).and_then(|c| c.remove(key));
        None
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

    fn observe_op(&self, report: &OpReport) {
        if let Some(m) = &self.metrics {
            m.observe(report);
        }
    }
}

/// Wraps a backend: makes `commit` fail with [`BackendError::NoSpace`] while
/// `fail_commits` is set, serves a planted file as a chunk's local file
/// ([`FaultyBackend::plant_local`]), and records quarantines.
pub struct FaultyBackend<B> {
    pub inner: B,
    pub fail_commits: AtomicBool,
    local: Mutex<HashMap<ChunkKey, PathBuf>>,
    /// `(namespace, key, reason)` of every quarantine asked for.
    pub quarantined: Mutex<Vec<(String, ChunkKey, String)>>,
}

impl<B: ChunkBackend> FaultyBackend<B> {
    pub fn new(inner: B) -> Self {
        FaultyBackend {
            inner,
            fail_commits: AtomicBool::new(false),
            local: Mutex::new(HashMap::new()),
            quarantined: Mutex::new(Vec::new()),
        }
    }

    /// Serves the file at `path` (opened as the adapter's contract says, with
    /// [`crate::open_regular`]) as the local file of chunk `key`.
    pub fn plant_local(&self, key: ChunkKey, path: &Path) {
        self.local.lock().unwrap().insert(key, path.to_path_buf());
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
    fn open_local(&self, ns: &str, key: &ChunkKey) -> Result<Option<File>, BackendError> {
        match self.local.lock().unwrap().get(key) {
            Some(p) => crate::backend::open_regular(p),
            None => self.inner.open_local(ns, key),
        }
    }
    fn quarantine(&self, ns: &str, key: &ChunkKey, reason: &str) -> Option<PathBuf> {
        self.quarantined
            .lock()
            .unwrap()
            .push((ns.to_string(), *key, reason.to_string()));
        self.local.lock().unwrap().remove(key);
        self.inner.quarantine(ns, key, reason)
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

/// The behaviour every [`ChunkBackend`] owes the adapter, as one suite run against each
/// implementation (object_store runs its `put_get_delete_list` suite against every store the
/// same way): here against [`MemBackend`], in the root crate against the tiered store.
///
/// [`conformance::run`] takes a factory: `make(capacity)` returns a fresh, empty backend that
/// holds at most `capacity` bytes of chunks. Each case panics with what it found.
pub mod conformance {
    use super::*;
    use kvfs_loader::{ChunkHeader, ModelSpec, SaltTag};

    /// A backend made for one case, with room for `capacity` bytes.
    pub type Factory<'a> = &'a dyn Fn(u64) -> Arc<dyn ChunkBackend>;

    /// The namespace directory the suite uses, and a second one.
    pub fn namespace() -> String {
        spec().namespace_dir()
    }

    fn spec() -> ModelSpec {
        ModelSpec::preset("tiny").expect("tiny preset")
    }

    /// A valid chunk of [`namespace`] (distinct per `seed`).
    pub fn chunk(seed: u32) -> (ChunkKey, Vec<u8>) {
        let tokens: Vec<u32> = (0..64).map(|i| i * 13 + seed).collect();
        let (meta, bytes) = kvfs_loader::synth_chunk(&spec(), None, SaltTag::NONE, tokens)
            .expect("synthesise a chunk");
        (meta.key, bytes)
    }

    /// Size of every chunk [`chunk`] makes.
    pub fn chunk_len() -> u64 {
        chunk(0).1.len() as u64
    }

    /// Commits `bytes` as the adapter does: from a file in the incoming directory, which the
    /// adapter removes afterwards.
    pub fn commit(
        b: &dyn ChunkBackend,
        ns: &str,
        key: &ChunkKey,
        bytes: &[u8],
    ) -> Result<Committed, BackendError> {
        let dir = b.incoming_dir();
        std::fs::create_dir_all(&dir).expect("incoming dir");
        let path = kvfs_loader::dir::temp_path_for(&dir.join(key.file_name()));
        std::fs::write(&path, bytes).expect("write incoming file");
        let r = b.commit(ns, key, &path);
        let _ = std::fs::remove_file(&path);
        r
    }

    fn read_all(b: &dyn ChunkBackend, ns: &str, key: &ChunkKey) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1000]; // not a divisor of the chunk size: odd offsets too
        loop {
            let n = b
                .read_at(ns, key, out.len() as u64, &mut buf)
                .expect("read_at");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// Runs every case, each on a fresh backend.
    pub fn run(make: Factory) {
        namespaces(make);
        commit_stat_read_list(make);
        missing_chunks(make);
        remove(make);
        capacity_counts_chunks(make);
        too_big_is_no_space_and_keeps_everything(make);
        stats_are_json(make);
    }

    /// `create_namespace` once, then `AlreadyExists`; listed and found afterwards.
    pub fn namespaces(make: Factory) {
        let b = make(1 << 30);
        let ns = namespace();
        assert!(!b.namespaces().unwrap().contains(&ns));
        b.create_namespace(&ns).unwrap();
        assert!(matches!(
            b.create_namespace(&ns),
            Err(BackendError::AlreadyExists)
        ));
        assert!(b.namespaces().unwrap().contains(&ns));
        assert!(b.namespace_exists(&ns).unwrap());
        assert!(b.chunks(&ns).unwrap().is_empty());
    }

    /// A committed chunk is stat'ed, read (whole and at offsets), listed, and its header
    /// parsed, with the same bytes; committing it again is `AlreadyExists`.
    pub fn commit_stat_read_list(make: Factory) {
        let b = make(1 << 30);
        let ns = namespace();
        b.create_namespace(&ns).unwrap();
        let (key, bytes) = chunk(1);
        assert_eq!(commit(&*b, &ns, &key, &bytes).unwrap(), Committed::Created);
        let info = b.stat(&ns, &key).unwrap().expect("committed chunk stats");
        assert_eq!(info.len, bytes.len() as u64);
        assert!(b.tier(&ns, &key).unwrap().is_some());
        assert!(read_all(&*b, &ns, &key) == bytes, "read back other bytes");
        let mut tail = [0u8; 10];
        let off = bytes.len() as u64 - 4;
        assert_eq!(b.read_at(&ns, &key, off, &mut tail).unwrap(), 4);
        assert_eq!(&tail[..4], &bytes[bytes.len() - 4..]);
        assert_eq!(
            b.read_at(&ns, &key, bytes.len() as u64, &mut tail).unwrap(),
            0
        );
        let header = b.header(&ns, &key).unwrap();
        assert_eq!(header, ChunkHeader::parse(&bytes).unwrap());
        assert_eq!(b.chunks(&ns).unwrap(), vec![(key, bytes.len() as u64)]);
        if let Some(f) = b.open_local(&ns, &key).unwrap() {
            let mut local = vec![0u8; bytes.len() + 1];
            let n = kvfs_loader::format::read_full_at(&f, &mut local, 0).unwrap();
            assert!(local[..n] == bytes, "local file holds other bytes");
            assert!(info.backing.is_some(), "a local file but no backing path");
        }
        assert_eq!(
            commit(&*b, &ns, &key, &bytes).unwrap(),
            Committed::AlreadyExists
        );
        assert!(read_all(&*b, &ns, &key) == bytes);
    }

    /// A chunk no tier has: `stat` is `None`, reads are `NotFound`, `remove` is `false`, and
    /// a namespace that does not exist lists no chunk.
    pub fn missing_chunks(make: Factory) {
        let b = make(1 << 30);
        let ns = namespace();
        b.create_namespace(&ns).unwrap();
        let (key, _) = chunk(2);
        assert!(b.stat(&ns, &key).unwrap().is_none());
        let mut buf = [0u8; 16];
        assert!(matches!(
            b.read_at(&ns, &key, 0, &mut buf),
            Err(BackendError::NotFound)
        ));
        assert!(!b.remove(&ns, &key).unwrap());
        assert!(b.open_local(&ns, &key).unwrap().is_none());
        match b.chunks("absent-0123456789abcdef") {
            Ok(c) => assert!(c.is_empty(), "{c:?}"),
            Err(BackendError::NotFound) => {}
            Err(e) => panic!("listing an absent namespace: {e}"),
        }
    }

    /// `remove` takes a chunk out of every listing and lookup, once.
    pub fn remove(make: Factory) {
        let b = make(1 << 30);
        let ns = namespace();
        b.create_namespace(&ns).unwrap();
        let (k1, b1) = chunk(3);
        let (k2, b2) = chunk(4);
        commit(&*b, &ns, &k1, &b1).unwrap();
        commit(&*b, &ns, &k2, &b2).unwrap();
        assert!(b.remove(&ns, &k1).unwrap());
        assert!(b.stat(&ns, &k1).unwrap().is_none());
        assert!(!b.remove(&ns, &k1).unwrap());
        assert_eq!(b.chunks(&ns).unwrap(), vec![(k2, b2.len() as u64)]);
        assert!(read_all(&*b, &ns, &k2) == b2);
    }

    /// `capacity` counts what was committed, within the limit.
    pub fn capacity_counts_chunks(make: Factory) {
        let limit = 10 * chunk_len();
        let b = make(limit);
        let ns = namespace();
        b.create_namespace(&ns).unwrap();
        let before = b.capacity().unwrap();
        assert_eq!(before.used_bytes, 0);
        assert_eq!(before.chunks, 0);
        for seed in 5..7 {
            let (k, bytes) = chunk(seed);
            commit(&*b, &ns, &k, &bytes).unwrap();
        }
        let c = b.capacity().unwrap();
        assert_eq!(c.chunks, 2);
        assert_eq!(c.used_bytes, 2 * chunk_len());
        assert_eq!(c.total_bytes, limit);
        assert!(c.free_bytes <= limit - c.used_bytes, "{c:?}");
    }

    /// A chunk that cannot be kept within the bounds is `NoSpace`: it is not kept, and
    /// nothing already held is evicted for it. The chunk accepted before it stays.
    pub fn too_big_is_no_space_and_keeps_everything(make: Factory) {
        let len = chunk_len();
        let b = make(len + len / 2);
        let ns = namespace();
        b.create_namespace(&ns).unwrap();
        let (k1, b1) = chunk(8);
        assert_eq!(commit(&*b, &ns, &k1, &b1).unwrap(), Committed::Created);
        let big = {
            // A valid chunk longer than the whole limit: more tokens.
            let tokens: Vec<u32> = (0..256).collect();
            let (meta, bytes) =
                kvfs_loader::synth_chunk(&spec(), None, SaltTag::NONE, tokens).unwrap();
            assert!(bytes.len() as u64 > len + len / 2, "test chunk too small");
            (meta.key, bytes)
        };
        assert!(matches!(
            commit(&*b, &ns, &big.0, &big.1),
            Err(BackendError::NoSpace)
        ));
        assert!(b.stat(&ns, &big.0).unwrap().is_none());
        assert!(b.stat(&ns, &k1).unwrap().is_some(), "evicted for nothing");
        assert!(read_all(&*b, &ns, &k1) == b1);
        assert_eq!(b.capacity().unwrap().used_bytes, len);
    }

    /// `stats_json` is a JSON object.
    pub fn stats_are_json(make: Factory) {
        let b = make(1 << 30);
        let s = b.stats_json().unwrap();
        let t = s.trim();
        assert!(t.starts_with('{') && t.ends_with('}'), "{s}");
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn mem_backend_conforms() {
            let dir = tempfile::tempdir().unwrap();
            let incoming = dir.path().to_path_buf();
            run(&|cap| Arc::new(MemBackend::new(&incoming, cap)) as Arc<dyn ChunkBackend>);
        }

        #[test]
        fn faulty_backend_passing_through_conforms() {
            let dir = tempfile::tempdir().unwrap();
            let incoming = dir.path().to_path_buf();
            run(&|cap| {
                Arc::new(FaultyBackend::new(MemBackend::new(&incoming, cap)))
                    as Arc<dyn ChunkBackend>
            });
        }
    }
}
