//! The lossless remote codec against a real S3 server (in-process s3s, or Garage with
//! `KVFS_TEST_S3_ENDPOINT`): objects are coded and smaller, local chunks stay raw byte for
//! byte, and a damaged coded object is never committed.

#[path = "../../tests/support/s3_server.rs"]
mod s3_server;

use hyper::Method;
use kvfs_loader::dir::{Layout, commit_file};
use kvfs_loader::format::encode_chunk;
use kvfs_loader::{ChunkHeader, ChunkKey, ChunkMeta, Codec, Dtype, ModelSpec, SaltTag};
use kvfs_remote::Remote;
use s3_server::{Fault, FaultProxy, S3Target};

fn spec() -> ModelSpec {
    let mut s = ModelSpec::new("kvfs/codec-test", Dtype::Bf16, 4, 2, 64);
    s.chunk_tokens = 64;
    s
}

fn ns() -> String {
    spec().namespace_dir()
}

/// A chain of raw chunks holding KV-like bf16 values (so the lossless codec has work to do).
fn chain(n: usize) -> Vec<(ChunkKey, Vec<u8>)> {
    let spec = spec();
    let mut parent = None;
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = (0..64).map(|t| i as u32 * 64 + t).collect();
            let meta = ChunkMeta::for_spec(&spec, parent, SaltTag::NONE, tokens);
            let bytes = encode_chunk(&meta, |l, p, dst| {
                let v: Vec<f32> = (0..dst.len() / 2)
                    .map(|j| ((j * 7 + i * 3 + (l * 2 + p) as usize) as f32 * 0.013).sin() * 2.0)
                    .collect();
                kvfs_loader::codec::from_f32(Dtype::Bf16, &v, dst);
            })
            .unwrap();
            parent = Some(meta.key);
            (meta.key, bytes)
        })
        .collect()
}

fn commit_local(root: &std::path::Path, chunks: &[(ChunkKey, Vec<u8>)]) {
    for (k, b) in chunks {
        commit_file(&Layout::Cache.chunk_path(root, &ns(), k), b, false).unwrap();
    }
    std::fs::write(root.join(ns()).join("namespace.json"), spec().to_json()).unwrap();
}

#[test]
fn lossless_remote_codec_uploads_coded_and_pulls_raw() {
    let t = S3Target::new();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c = chain(4);
    commit_local(a.path(), &c);
    let mut cfg = t.config();
    cfg.codec = Codec::Lossless;
    let coded = Remote::open(cfg, None).unwrap();
    let pushed = coded.push(a.path(), None, &|_| {}).unwrap();
    assert_eq!((pushed.transferred, pushed.failed), (4, 0));
    // The bucket holds fewer bytes than the raw chunks.
    for (k, bytes) in &c {
        let size = coded.object_size(&ns(), k).unwrap().unwrap();
        assert!(size < bytes.len() as u64, "{size} >= {}", bytes.len());
    }
    let up = coded.stats();
    let raw_total: usize = c.iter().map(|(_, b)| b.len()).sum();
    assert!(up.bytes_uploaded < raw_total as u64);
    // A second push finds every chunk there from one HEAD each: sizes differ from the local
    // raw files, and the raw digest recorded at upload matches, so nothing is planned for
    // upload (nothing is encoded again) and nothing is sent.
    let planned = std::sync::Mutex::new(None);
    let again = coded
        .push(a.path(), None, &|e| {
            if let kvfs_remote::SyncEvent::Planned {
                chunks, skipped, ..
            } = e
            {
                *planned.lock().unwrap() = Some((chunks, skipped));
            }
        })
        .unwrap();
    assert_eq!((again.transferred, again.failed), (0, 0));
    assert_eq!(planned.into_inner().unwrap(), Some((0, 4)));
    assert_eq!(coded.stats().bytes_uploaded, up.bytes_uploaded);

    // A host without the codec pulls: every local file is the raw chunk, byte for byte.
    let plain = Remote::open(t.config(), None).unwrap();
    let pulled = plain.pull(b.path(), None, &|_| {}).unwrap();
    assert_eq!((pulled.transferred, pulled.failed), (4, 0));
    for (k, bytes) in &c {
        let local = std::fs::read(Layout::Cache.chunk_path(b.path(), &ns(), k)).unwrap();
        assert_eq!(&local, bytes);
        assert_eq!(ChunkHeader::parse(&local).unwrap().codec, Codec::Raw);
        // A single fetch (a local miss) decodes too.
        assert_eq!(plain.fetch(&ns(), k).unwrap().as_deref(), Some(&bytes[..]));
    }
    assert!(plain.stats().bytes_fetched < 2 * raw_total as u64);
}

#[test]
fn a_damaged_coded_object_is_never_committed() {
    let t = S3Target::new();
    let c = chain(3);
    let mut cfg = t.config();
    cfg.codec = Codec::Lossless;
    let writer = Remote::open(cfg, None).unwrap();
    for (k, b) in &c {
        writer.upload(&ns(), k, b.clone()).unwrap();
    }
    let proxy = FaultProxy::start(&t.endpoint);
    let mut cfg = t.config_via(&proxy.endpoint);
    cfg.download_concurrency = 1;
    let reader = Remote::open(cfg, None).unwrap();
    proxy.arm_path(Some(Method::GET), ".kvc", Fault::Corrupt, 100);
    let dir = tempfile::tempdir().unwrap();
    let r = reader.pull(dir.path(), Some(&ns()), &|_| {}).unwrap();
    assert_eq!((r.transferred, r.failed), (0, 3), "{r:?}");
    for (k, _) in &c {
        assert!(!Layout::Cache.chunk_path(dir.path(), &ns(), k).exists());
        assert_eq!(
            reader.fetch(&ns(), k).unwrap(),
            None,
            "a damaged object is a miss"
        );
    }
    proxy.clear();
    let r = reader.pull(dir.path(), Some(&ns()), &|_| {}).unwrap();
    assert_eq!((r.transferred, r.failed), (3, 0));
    for (k, b) in &c {
        assert_eq!(
            &std::fs::read(Layout::Cache.chunk_path(dir.path(), &ns(), k)).unwrap(),
            b
        );
    }
}

/// A raw chunk with an importance section (issue 14) goes through the lossless remote codec
/// and comes back byte for byte, section included: the coded object carries the section
/// after its codec table (it used to be dropped on upload, so pulls lost it).
#[test]
fn the_lossless_remote_codec_keeps_importance_sections() {
    use kvfs_loader::format::encode_chunk_with;
    use kvfs_loader::importance::Importance;
    let t = S3Target::new();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let spec = spec();
    let meta = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, (0..64).collect());
    let imp = Importance::new(4, 4, 16, vec![0.2; 16]).unwrap();
    let bytes = encode_chunk_with(&meta, Some(&imp), |l, p, dst| {
        let v: Vec<f32> = (0..dst.len() / 2)
            .map(|j| ((j * 5 + (l * 2 + p) as usize) as f32 * 0.017).sin() * 2.0)
            .collect();
        kvfs_loader::codec::from_f32(Dtype::Bf16, &v, dst);
    })
    .unwrap();
    let c = vec![(meta.key, bytes)];
    commit_local(a.path(), &c);
    let mut cfg = t.config();
    cfg.codec = Codec::Lossless;
    let coded = Remote::open(cfg, None).unwrap();
    assert_eq!(coded.push(a.path(), None, &|_| {}).unwrap().transferred, 1);
    let plain = Remote::open(t.config(), None).unwrap();
    assert_eq!(plain.pull(b.path(), None, &|_| {}).unwrap().transferred, 1);
    let local = std::fs::read(Layout::Cache.chunk_path(b.path(), &ns(), &meta.key)).unwrap();
    assert_eq!(local, c[0].1);
    assert_eq!(ChunkHeader::parse(&local).unwrap().importance, Some(imp));
    assert_eq!(
        plain.fetch(&ns(), &meta.key).unwrap().as_deref(),
        Some(&c[0].1[..])
    );
}
