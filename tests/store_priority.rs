//! The disk tier's eviction priority derived from the importance a chunk carries (format v2,
//! issue 14; src/store/priority.rs): chunks stored with different importance, by a put, a
//! streamed put and a file an engine's loader committed straight into the cache, are evicted
//! in importance order (then recency); an explicit `set_priority` wins; the order survives a
//! restart and a lost index.

use kvfs::store::{Store, StoreConfig};
use kvfs_loader::format::{encode_chunk, encode_chunk_with, synth_fill};
use kvfs_loader::importance::Importance;
use kvfs_loader::{ChunkKey, ChunkMeta, SaltTag};
use std::path::Path;
use support::store::tiny;

mod support {
    pub mod store;
}

const INDEX: &str = ".kvfs-index.sqlite";

fn cfg(root: &Path, capacity: u64) -> StoreConfig {
    support::store::config(root, capacity, 0)
}

/// A tiny-model chunk of 80 tokens (2 layers x 5 groups) for prompt `seed`; with importance,
/// each layer's groups hold `share` of the prompt's attention.
fn chunk(seed: u32, share: Option<f32>) -> (ChunkKey, Vec<u8>, Option<Importance>) {
    let spec = tiny();
    let meta = ChunkMeta::for_spec(
        &spec,
        None,
        SaltTag::NONE,
        (0..80).map(|t| seed * 1000 + t).collect(),
    );
    let fill = |l, p, d: &mut [u8]| synth_fill(&meta.key, l, p, d);
    let Some(share) = share else {
        return (meta.key, encode_chunk(&meta, fill).unwrap(), None);
    };
    // uneven within the chunk (the sink-like first group draws most), `share` per layer
    let row = [0.5, 0.2, 0.1, 0.1, 0.1].map(|w| w * share);
    let imp = Importance::new(2, 5, 32, [row, row].concat()).unwrap();
    let bytes = encode_chunk_with(&meta, Some(&imp), fill).unwrap();
    (meta.key, bytes, Some(imp))
}

#[test]
fn chunks_are_evicted_in_importance_order_across_restarts() {
    let d = tempfile::tempdir().unwrap();
    let ns = tiny().namespace_dir();
    // Stored most important first, so recency alone would evict them in the opposite order.
    let sink = chunk(1, Some(0.6)); // priority 10
    let middle = chunk(2, Some(0.25)); // 4
    let tail = chunk(3, Some(0.1)); // 2
    let hinted = chunk(4, Some(0.05)); // 1, but set to 20 by hand below
    let plain = chunk(5, None); // 0: no importance
    let len = sink.1.len() as u64;
    assert!(
        [&middle, &tail, &hinted, &plain]
            .iter()
            .all(|c| c.1.len() as u64 == len)
    );
    let expected: Vec<u8> = [&sink, &middle, &tail, &hinted]
        .iter()
        .map(|c| c.2.as_ref().unwrap().eviction_priority())
        .collect();
    assert_eq!(expected, vec![10, 4, 2, 1]);
    let src = tempfile::tempdir().unwrap();
    {
        let store = Store::open(cfg(d.path(), 5 * len)).unwrap();
        // three ways in: a put, a streamed put of a file, a file an engine's loader committed
        // into the cache directory itself (indexed when the store first sees it)
        store.put(&ns, &sink.1).unwrap();
        let file = src.path().join("middle.kvc");
        std::fs::write(&file, &middle.1).unwrap();
        store.put_file(&ns, &file).unwrap();
        let direct = kvfs_loader::dir::Layout::Cache.chunk_path(d.path(), &ns, &tail.0);
        std::fs::create_dir_all(direct.parent().unwrap()).unwrap();
        std::fs::write(&direct, &tail.1).unwrap();
        assert!(store.contains(&ns, &tail.0));
        store.put(&ns, &hinted.1).unwrap();
        store.put(&ns, &plain.1).unwrap();
        for (c, want) in [&sink, &middle, &tail, &hinted].iter().zip(&expected) {
            assert_eq!(store.stat(&ns, &c.0).unwrap().priority, *want);
        }
        assert_eq!(store.stat(&ns, &plain.0).unwrap().priority, 0);
        // an explicit hint wins over the derived priority, and a re-put keeps it
        store.set_priority(&ns, &hinted.0, 20);
        store.put(&ns, &hinted.1).unwrap();
        assert_eq!(store.stat(&ns, &hinted.0).unwrap().priority, 20);
        // the most recently used chunk is the least important one
        store.get(&ns, &tail.0).unwrap();
    }

    // After a restart, fill the store with chunks more important than all but the sink and
    // the hinted one, one at a time, and watch the victims.
    let store = Store::open(cfg(d.path(), 5 * len)).unwrap();
    let victims_in_order = [&plain.0, &tail.0, &middle.0, &sink.0];
    for (i, victim) in victims_in_order.iter().enumerate() {
        let newcomer = chunk(10 + i as u32, Some(0.95)); // priority 15
        let before: Vec<bool> = victims_in_order
            .iter()
            .map(|k| store.contains(&ns, k))
            .collect();
        assert!(before[i..].iter().all(|&b| b), "step {i}: {before:?}");
        store.put(&ns, &newcomer.1).unwrap();
        assert!(
            !store.contains(&ns, victim),
            "step {i}: the least important chunk left goes first"
        );
        for later in &victims_in_order[i + 1..] {
            assert!(
                store.contains(&ns, later),
                "step {i}: a more important one stays"
            );
        }
        assert!(
            store.contains(&ns, &hinted.0),
            "step {i}: the hint of 20 keeps its chunk"
        );
    }
}

#[test]
fn a_rebuilt_index_derives_the_priorities_again() {
    let d = tempfile::tempdir().unwrap();
    let ns = tiny().namespace_dir();
    let important = chunk(1, Some(0.8)); // 13
    let unimportant = chunk(2, Some(0.02)); // 0 (rounded)
    let other = chunk(3, Some(0.3)); // 5
    let len = important.1.len() as u64;
    {
        let store = Store::open(cfg(d.path(), 3 * len)).unwrap();
        store.put(&ns, &important.1).unwrap();
        store.put(&ns, &other.1).unwrap();
        store.put(&ns, &unimportant.1).unwrap();
    }
    // the index is lost: the maintenance pass (run by gc) finds the files and reads their
    // headers
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(d.path().join(format!("{INDEX}{suffix}")));
    }
    let store = Store::open(cfg(d.path(), 3 * len)).unwrap();
    store.gc().unwrap();
    assert_eq!(store.stat(&ns, &important.0).unwrap().priority, 13);
    assert_eq!(store.stat(&ns, &other.0).unwrap().priority, 5);
    assert_eq!(store.stat(&ns, &unimportant.0).unwrap().priority, 0);
    store.put(&ns, &chunk(4, Some(0.9)).1).unwrap(); // 14
    assert!(!store.contains(&ns, &unimportant.0));
    store.put(&ns, &chunk(5, Some(0.5)).1).unwrap();
    assert!(!store.contains(&ns, &other.0));
    assert!(store.contains(&ns, &important.0));
}
