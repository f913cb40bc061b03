//! The tiered store against real files: round trips, tiers, rescans, several stores (as
//! several processes would) on one directory, eviction order, capacity, gc, verify and the
//! remote-tier seam.

use kvfs::config::Limit;
use kvfs::store::{RemoteTier, Store, StoreConfig, StoreError, Tier};
use kvfs_loader::{ChunkKey, ModelSpec};
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

mod support {
    pub mod store;
}

use support::store::{chunks, ns, temporaries, tiny};

fn cfg(root: &Path) -> StoreConfig {
    support::store::config(root, 1 << 30, 64 << 20)
}

#[test]
fn put_get_stat_read_at_remove() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(d.path())).unwrap();
    let ns = ns();
    let (key, bytes) = chunks(1, 1).remove(0);

    let out = store.put(&ns, &bytes).unwrap();
    assert!(out.created);
    assert_eq!(out.key, key);
    assert_eq!(out.path, store.backing_path(&ns, &key));
    assert_eq!(
        out.path,
        d.path()
            .join(&ns)
            .join(&key.to_hex()[..2])
            .join(key.file_name())
    );
    assert_eq!(fs::read(&out.path).unwrap(), bytes);
    assert!(
        !store.put(&ns, &bytes).unwrap().created,
        "second put keeps the file"
    );

    assert_eq!(&store.get(&ns, &key).unwrap()[..], &bytes[..]);
    assert!(store.contains(&ns, &key));
    let st = store.stat(&ns, &key).unwrap();
    assert_eq!(st.tier, Tier::Memory);
    assert_eq!(st.len, bytes.len() as u64);
    assert_eq!(st.header.key(), key);
    assert!(st.mtime.is_some());

    let mut buf = vec![0u8; 10_000];
    let n = store.read_at(&ns, &key, 5000, &mut buf).unwrap();
    assert_eq!(n, 10_000);
    assert_eq!(buf, bytes[5000..15_000]);
    let n = store
        .read_at(&ns, &key, bytes.len() as u64 - 10, &mut buf)
        .unwrap();
    assert_eq!(n, 10, "short read at the end");
    assert_eq!(
        store
            .read_at(&ns, &key, bytes.len() as u64 + 5, &mut buf)
            .unwrap(),
        0
    );

    assert_eq!(store.chunks(&ns).unwrap(), vec![(key, bytes.len() as u64)]);
    let nss = store.namespaces().unwrap();
    assert_eq!(nss.len(), 1);
    assert_eq!((nss[0].dir.as_str(), nss[0].chunks), (ns.as_str(), 1));
    assert_eq!(nss[0].bytes, bytes.len() as u64);

    let s = store.stats();
    assert_eq!(s.puts, 1);
    assert_eq!(s.puts_existing, 1);
    assert!(s.memory_hits >= 1);

    assert!(store.remove(&ns, &key).unwrap());
    assert!(!store.contains(&ns, &key));
    assert!(matches!(
        store.get(&ns, &key),
        Err(StoreError::NotFound { .. })
    ));
    assert!(!store.remove(&ns, &key).unwrap());
    assert!(temporaries(d.path()).is_empty());
}

#[test]
fn reopen_rescans_and_reads_from_disk() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(3, 2);
    {
        let store = Store::open(cfg(d.path())).unwrap();
        for (_, b) in &cs {
            store.put(&ns, b).unwrap();
        }
    }
    let mut c = cfg(d.path());
    c.memory_bytes = 0;
    let store = Store::open(c).unwrap();
    assert_eq!(store.chunks(&ns).unwrap().len(), 3);
    assert_eq!(store.capacity().used_bytes, 3 * cs[0].1.len() as u64);
    for (k, b) in &cs {
        assert_eq!(store.stat(&ns, k).unwrap().tier, Tier::Disk);
        assert_eq!(&store.get(&ns, k).unwrap()[..], &b[..]);
    }
    assert_eq!(store.stats().disk_hits, 3);
    assert_eq!(store.stats().memory_hits, 0);
}

#[test]
fn get_promotes_to_memory() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let (k, b) = chunks(1, 3).remove(0);
    Store::open(cfg(d.path())).unwrap().put(&ns, &b).unwrap();
    let store = Store::open(cfg(d.path())).unwrap();
    assert_eq!(store.stat(&ns, &k).unwrap().tier, Tier::Disk);
    store.get(&ns, &k).unwrap();
    assert_eq!(store.stat(&ns, &k).unwrap().tier, Tier::Memory);
    store.get(&ns, &k).unwrap();
    let s = store.stats();
    assert_eq!((s.disk_hits, s.memory_hits), (1, 1));
}

/// Two stores on one directory behave as two processes: each adopts what the other commits
/// and drops what the other removes.
#[test]
fn two_stores_share_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let a = Store::open(cfg(d.path())).unwrap();
    let mut cb = cfg(d.path());
    cb.memory_bytes = 0;
    let b = Store::open(cb).unwrap();
    let (k, bytes) = chunks(1, 4).remove(0);
    a.put(&ns, &bytes).unwrap();
    assert!(b.contains(&ns, &k));
    assert_eq!(&b.get(&ns, &k).unwrap()[..], &bytes[..]);
    assert_eq!(b.chunks(&ns).unwrap().len(), 1);
    assert!(b.remove(&ns, &k).unwrap());
    // `a` still holds the bytes in memory (verified, immutable); its disk view drops the file.
    let mut ca = cfg(d.path());
    ca.memory_bytes = 0;
    let a2 = Store::open(ca).unwrap();
    assert!(!a2.contains(&ns, &k));
    assert!(matches!(a2.get(&ns, &k), Err(StoreError::NotFound { .. })));
}

#[test]
fn concurrent_writers_of_one_key_leave_one_file() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let (k, bytes) = chunks(1, 5).remove(0);
    let created: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let st = Store::open(cfg(d.path())).unwrap();
                    st.put(&ns, &bytes).unwrap().created as usize
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(created, 1, "exactly one writer creates the file");
    let store = Store::open(cfg(d.path())).unwrap();
    assert_eq!(fs::read(store.backing_path(&ns, &k)).unwrap(), bytes);
    assert!(temporaries(d.path()).is_empty());
    let fan = store.backing_path(&ns, &k).parent().unwrap().to_path_buf();
    assert_eq!(fs::read_dir(fan).unwrap().count(), 1);
}

fn bounded(root: &Path, chunks_room: u64, chunk_len: u64) -> Store {
    let mut c = cfg(root);
    c.memory_bytes = 0;
    c.capacity = Limit::Bytes(chunks_room * chunk_len);
    Store::open(c).unwrap()
}

#[test]
fn eviction_is_least_recently_used() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(4, 6);
    let len = cs[0].1.len() as u64;
    let store = bounded(d.path(), 3, len);
    for (_, b) in &cs[..3] {
        store.put(&ns, b).unwrap();
    }
    store.get(&ns, &cs[0].0).unwrap(); // chunk 1 is now the least recently used
    let out = store.put(&ns, &cs[3].1).unwrap();
    assert_eq!(out.evicted, 1);
    assert!(!store.contains(&ns, &cs[1].0));
    for i in [0, 2, 3] {
        assert!(store.contains(&ns, &cs[i].0), "chunk {i} kept");
    }
    assert_eq!(store.stats().evictions, 1);
    assert!(store.capacity().used_bytes <= 3 * len);
}

#[test]
fn priority_outranks_recency() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(5, 7);
    let len = cs[0].1.len() as u64;
    let store = bounded(d.path(), 3, len);
    for (_, b) in &cs[..3] {
        store.put(&ns, b).unwrap();
    }
    store.set_priority(&ns, &cs[0].0, 9); // oldest, but kept
    store.put(&ns, &cs[3].1).unwrap();
    store.put(&ns, &cs[4].1).unwrap();
    assert!(store.contains(&ns, &cs[0].0));
    assert!(!store.contains(&ns, &cs[1].0));
    assert!(!store.contains(&ns, &cs[2].0));
    assert_eq!(store.stat(&ns, &cs[0].0).unwrap().priority, 9);
}

#[test]
fn a_rebuilt_index_takes_recency_from_file_times() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(4, 8);
    let len = cs[0].1.len() as u64;
    {
        let store = Store::open(cfg(d.path())).unwrap();
        for (_, b) in &cs[..3] {
            store.put(&ns, b).unwrap();
        }
        // Chunk 2 was last used long ago.
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let f = fs::File::options()
            .write(true)
            .open(store.backing_path(&ns, &cs[2].0))
            .unwrap();
        f.set_times(fs::FileTimes::new().set_accessed(old).set_modified(old))
            .unwrap();
    }
    // The index is lost: the rebuild (a background pass) reads recency from the files.
    fs::remove_file(d.path().join(".kvfs-index.sqlite")).unwrap();
    let store = bounded(d.path(), 3, len);
    store.wait_for_index();
    store.put(&ns, &cs[3].1).unwrap();
    assert!(!store.contains(&ns, &cs[2].0), "the oldest file went first");
    assert!(store.contains(&ns, &cs[0].0) && store.contains(&ns, &cs[1].0));
}

#[test]
fn put_larger_than_capacity_is_no_space_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(2, 9);
    let len = cs[0].1.len() as u64;
    let mut c = cfg(d.path());
    c.capacity = Limit::Bytes(len + len / 2);
    let store = Store::open(c).unwrap();
    store.put(&ns, &cs[0].1).unwrap();
    // Two chunks do not fit: the first is evicted for the second.
    store.put(&ns, &cs[1].1).unwrap();
    assert!(!store.contains(&ns, &cs[0].0));
    // A chunk larger than the whole capacity fails before any I/O and evicts nothing.
    let mut c = cfg(d.path());
    c.capacity = Limit::Bytes(len - 1);
    let small = Store::open(c).unwrap();
    let e = small.put(&ns, &cs[0].1).unwrap_err();
    assert!(
        matches!(e, StoreError::NoSpace { needed, .. } if needed == len),
        "{e}"
    );
    assert!(!small.contains(&ns, &cs[0].0));
    assert!(small.contains(&ns, &cs[1].0), "nothing evicted in vain");
    assert!(temporaries(d.path()).is_empty());
}

#[test]
fn gc_enforces_a_smaller_capacity() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(5, 10);
    let len = cs[0].1.len() as u64;
    let store = Store::open(cfg(d.path())).unwrap();
    for (i, (k, b)) in cs.iter().enumerate() {
        store.put(&ns, b).unwrap();
        // File times are the recency a new process starts from; kernel timestamps are
        // coarse (a few ms), so give each file a distinct one, oldest first.
        let t = std::time::SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(1 << 30)
            + std::time::Duration::from_secs(i as u64);
        fs::File::options()
            .write(true)
            .open(store.backing_path(&ns, k))
            .unwrap()
            .set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
            .unwrap();
    }
    let small = bounded(d.path(), 2, len);
    let r = small.gc().unwrap();
    assert_eq!(r.evicted, 3);
    assert_eq!(r.freed_bytes, 3 * len);
    assert_eq!(r.used_bytes, 2 * len);
    assert!(small.contains(&ns, &cs[3].0) && small.contains(&ns, &cs[4].0));
    assert_eq!(small.gc().unwrap().evicted, 0);
}

#[test]
fn capacity_percent_resolves_against_the_file_system() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path());
    c.capacity = Limit::Percent(50.0);
    let store = Store::open(c).unwrap();
    let cap = store.capacity();
    assert!(cap.fs_total_bytes > 0);
    assert_eq!(cap.limit_bytes, cap.fs_total_bytes / 2);
}

#[test]
fn verify_all_quarantines_bad_files() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(3, 11);
    let store = Store::open(cfg(d.path())).unwrap();
    for (_, b) in &cs {
        store.put(&ns, b).unwrap();
    }
    let bad_path = store.backing_path(&ns, &cs[1].0);
    let mut b = cs[1].1.clone();
    b[8192] ^= 1;
    fs::remove_file(&bad_path).unwrap();
    fs::write(&bad_path, &b).unwrap();
    // A stray file with a name that is not a key.
    let stray = d.path().join(&ns).join("00").join("not-a-key.kvc");
    fs::create_dir_all(stray.parent().unwrap()).unwrap();
    fs::write(&stray, b"junk").unwrap();

    let seen = Mutex::new(Vec::new());
    let r = store
        .verify_all(&|done, total| seen.lock().unwrap().push((done, total)))
        .unwrap();
    assert_eq!((r.checked, r.ok), (4, 2));
    assert_eq!(r.bad.len(), 2);
    assert_eq!(seen.lock().unwrap().last(), Some(&(4, 4)));
    let q = d.path().join(".quarantine").join(&ns);
    assert!(q.join(cs[1].0.file_name()).is_file());
    assert!(q.join("not-a-key.kvc").is_file());
    assert!(!bad_path.exists() && !stray.exists());
    assert!(!store.contains(&ns, &cs[1].0));
    assert_eq!(&store.get(&ns, &cs[0].0).unwrap()[..], &cs[0].1[..]);
    let again = store.verify_all(&|_, _| {}).unwrap();
    assert_eq!((again.checked, again.ok, again.bad.len()), (2, 2, 0));
    // The quarantine is not a namespace.
    assert_eq!(store.namespaces().unwrap().len(), 1);
}

#[test]
fn create_namespace_writes_spec_and_checks_identity() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(d.path())).unwrap();
    let spec = tiny();
    store
        .create_namespace(&spec.namespace_dir(), Some(&spec))
        .unwrap();
    store
        .create_namespace(&spec.namespace_dir(), Some(&spec))
        .unwrap();
    let json =
        fs::read_to_string(d.path().join(spec.namespace_dir()).join("namespace.json")).unwrap();
    assert_eq!(json, spec.to_json());
    let other = ModelSpec::preset("llama-3-8b").unwrap();
    assert!(matches!(
        store.create_namespace(&spec.namespace_dir(), Some(&other)),
        Err(StoreError::NamespaceMismatch { .. })
    ));
    let nss = store.namespaces().unwrap();
    assert!(nss[0].has_spec);
}

/// A remote tier kept in memory: the seam's contract (consulted on a miss, told about
/// commits, never trusted) is what is under test here, not S3.
#[derive(Debug, Default)]
struct MapRemote {
    objects: Mutex<HashMap<(String, ChunkKey), Vec<u8>>>,
    committed: Mutex<Vec<ChunkKey>>,
}

impl RemoteTier for MapRemote {
    fn fetch(&self, ns_dir: &str, key: &ChunkKey) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .get(&(ns_dir.to_string(), *key))
            .cloned())
    }
    fn committed(&self, _ns_dir: &str, key: &ChunkKey, path: &Path) {
        assert!(path.is_file(), "notified after the file is visible");
        self.committed.lock().unwrap().push(*key);
    }
}

#[test]
fn remote_seam_fills_local_tiers_and_is_verified() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let cs = chunks(3, 12);
    let remote = Arc::new(MapRemote::default());
    let mut c = cfg(d.path());
    c.remote = Some(remote.clone());
    let store = Store::open(c).unwrap();

    store.put(&ns, &cs[0].1).unwrap();
    assert_eq!(*remote.committed.lock().unwrap(), vec![cs[0].0]);

    remote
        .objects
        .lock()
        .unwrap()
        .insert((ns.clone(), cs[1].0), cs[1].1.clone());
    assert_eq!(&store.get(&ns, &cs[1].0).unwrap()[..], &cs[1].1[..]);
    assert!(store.backing_path(&ns, &cs[1].0).is_file());
    assert_eq!(store.stats().remote_hits, 1);
    assert_eq!(
        remote.committed.lock().unwrap().len(),
        1,
        "a fetch is not echoed back"
    );

    // Corrupt bytes from the remote are refused and not stored.
    let mut bad = cs[2].1.clone();
    bad[9000] ^= 4;
    remote
        .objects
        .lock()
        .unwrap()
        .insert((ns.clone(), cs[2].0), bad);
    assert!(matches!(
        store.get(&ns, &cs[2].0),
        Err(StoreError::Format { .. })
    ));
    assert!(!store.backing_path(&ns, &cs[2].0).exists());
    // Bytes of another chunk under this key are refused too.
    remote
        .objects
        .lock()
        .unwrap()
        .insert((ns.clone(), cs[2].0), cs[0].1.clone());
    assert!(store.get(&ns, &cs[2].0).is_err());
    assert!(!store.backing_path(&ns, &cs[2].0).exists());
}

#[test]
fn remote_chunk_without_room_on_disk_is_served_uncached() {
    let d = tempfile::tempdir().unwrap();
    let ns = ns();
    let (k, b) = chunks(1, 13).remove(0);
    let remote = Arc::new(MapRemote::default());
    remote
        .objects
        .lock()
        .unwrap()
        .insert((ns.clone(), k), b.clone());
    let mut c = cfg(d.path());
    c.capacity = Limit::Bytes(b.len() as u64 - 1);
    c.remote = Some(remote);
    let store = Store::open(c).unwrap();
    assert_eq!(&store.get(&ns, &k).unwrap()[..], &b[..]);
    assert!(!store.backing_path(&ns, &k).exists());
}
