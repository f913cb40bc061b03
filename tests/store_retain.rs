//! Retention by importance in the memory tier (issue 14): a chunk's header and important
//! groups held in memory without the rest serve a pruned reuse's reads, with the disk file
//! gone; what is not held is not served; chunks without importance are refused.

use kvfs::store::{Store, StoreConfig, StoreError};
use kvfs_loader::format::{ChunkHeader, encode_chunk, encode_chunk_with, synth_fill};
use kvfs_loader::importance::{Importance, top_groups};
use kvfs_loader::{ChunkMeta, FormatError, ModelSpec, SaltTag};

mod support {
    pub mod store;
}

fn cfg(root: &std::path::Path) -> StoreConfig {
    support::store::config(root, 1 << 30, 64 << 20)
}

/// A SmolLM2-shaped chunk (30 layers, 16 groups of 16 tokens) with uneven importance that
/// differs per layer.
fn chunk_with_importance(spec: &ModelSpec) -> (ChunkMeta, Importance, Vec<u8>) {
    let meta = ChunkMeta::for_spec(spec, None, SaltTag::NONE, (0..256).map(|t| t * 7).collect());
    let scores: Vec<f32> = (0..30 * 16)
        .map(|i| ((i * 37 + i / 16 * 11) % 16) as f32 / 200.0)
        .collect();
    let imp = Importance::new(30, 16, 32, scores).unwrap();
    let bytes =
        encode_chunk_with(&meta, Some(&imp), |l, p, d| synth_fill(&meta.key, l, p, d)).unwrap();
    (meta, imp, bytes)
}

#[test]
fn important_groups_are_served_from_memory_without_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(dir.path())).unwrap();
    let spec = ModelSpec::preset("smollm2-135m").unwrap();
    let ns = spec.namespace_dir();
    store.create_namespace(&ns, Some(&spec)).unwrap();
    let (meta, imp, bytes) = chunk_with_importance(&spec);
    store.put(&ns, &bytes).unwrap();
    let header = ChunkHeader::parse(&bytes).unwrap();
    let g = header.geometry;

    let report = store.retain_important(&ns, &meta.key, 0.25).unwrap();
    assert_eq!((report.groups_per_layer, report.groups), (4, 16));
    // header + 30 layers x 2 planes x 4 groups x 16 tokens x 768 bytes
    assert_eq!(report.bytes, g.header_len + 30 * 2 * 4 * 16 * 768);
    assert_eq!(report.chunk_bytes, bytes.len() as u64);

    // the disk copy is gone: whatever is served now comes from memory
    std::fs::remove_file(store.backing_path(&ns, &meta.key)).unwrap();
    let before = store.stats();
    // a pruned reuse: the header, then each layer's top groups, K and V
    let mut head = vec![0u8; g.header_len as usize];
    assert_eq!(
        store.read_at(&ns, &meta.key, 0, &mut head).unwrap(),
        head.len()
    );
    assert_eq!(
        ChunkHeader::parse(&head).unwrap().importance,
        Some(imp.clone())
    );
    let mut reads = 1;
    for layer in 0..30 {
        for grp in top_groups(imp.layer(layer), 0.25) {
            for plane in 0..2 {
                let r = g.token_range(layer, plane, g.group_tokens_range(grp));
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                store.read_at(&ns, &meta.key, r.start, &mut buf).unwrap();
                assert_eq!(
                    buf,
                    bytes[r.start as usize..r.end as usize],
                    "layer {layer} group {grp}"
                );
                reads += 1;
            }
        }
    }
    let after = store.stats();
    assert_eq!(after.memory_hits - before.memory_hits, reads);
    assert_eq!(after.disk_hits, before.disk_hits);

    // a group that was not kept is not in memory (and its file is gone)
    let dropped = (0..16)
        .find(|x| !top_groups(imp.layer(0), 0.25).contains(x))
        .unwrap();
    let r = g.token_range(0, 0, g.group_tokens_range(dropped));
    let mut buf = vec![0u8; (r.end - r.start) as usize];
    assert!(matches!(
        store.read_at(&ns, &meta.key, r.start, &mut buf),
        Err(StoreError::NotFound { .. })
    ));
    // nor is the chunk as a whole
    assert!(matches!(
        store.get(&ns, &meta.key),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn retention_needs_importance_and_a_share() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(dir.path())).unwrap();
    let spec = ModelSpec::preset("smollm2-135m").unwrap();
    let ns = spec.namespace_dir();
    store.create_namespace(&ns, Some(&spec)).unwrap();
    let meta = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, (0..256).collect());
    let v1 = encode_chunk(&meta, |l, p, d| synth_fill(&meta.key, l, p, d)).unwrap();
    store.put(&ns, &v1).unwrap();
    let e = store.retain_important(&ns, &meta.key, 0.5).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Format {
                source: FormatError::BadField {
                    field: "importance",
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    // nothing changed: the chunk is still whole and readable
    assert_eq!(store.get(&ns, &meta.key).unwrap().as_ref(), &v1[..]);

    let (meta2, _, bytes2) = chunk_with_importance(&spec);
    store.put(&ns, &bytes2).unwrap();
    for bad in [0.0, 1.01, f64::NAN] {
        assert!(
            store.retain_important(&ns, &meta2.key, bad).is_err(),
            "{bad}"
        );
    }
    let missing = kvfs_loader::ChunkKey([3; 32]);
    assert!(matches!(
        store.retain_important(&ns, &missing, 0.5),
        Err(StoreError::NotFound { .. })
    ));
}
