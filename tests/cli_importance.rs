//! `kvfs stat` on chunks with and without importance (format v2, issue 14).

mod support {
    pub mod cli;
}

use kvfs_loader::format::{encode_chunk, encode_chunk_with, synth_fill};
use kvfs_loader::importance::Importance;
use kvfs_loader::{ChunkMeta, ModelSpec, SaltTag};
use std::process::Output;
use support::cli::kvfs;

fn run(args: &[&str], cache: &std::path::Path) -> Output {
    let mut c = kvfs(cache);
    c.args(args);
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn stat_shows_the_importance_summary() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let spec = ModelSpec::preset("tiny").unwrap();
    // tiny: 2 layers; 80 tokens = 5 groups of 16
    let meta = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, (1..81).collect());
    let imp = Importance::new(
        2,
        5,
        32,
        vec![0.4, 0.05, 0.05, 0.3, 0.1, 0.1, 0.5, 0.1, 0.1, 0.1],
    )
    .unwrap();
    let v2 =
        encode_chunk_with(&meta, Some(&imp), |l, p, d| synth_fill(&meta.key, l, p, d)).unwrap();
    let file = dir.path().join("v2.kvc");
    std::fs::write(&file, &v2).unwrap();
    let put = run(&["put", "--model", "tiny", file.to_str().unwrap()], &cache);
    assert!(put.status.success(), "{}", text(&put));
    let key = meta.key.to_hex();

    let st = run(&["stat", "--top", "0.4", &key], &cache);
    let out = text(&st);
    assert!(st.status.success(), "{out}");
    assert!(out.contains("format version: 2"), "{out}");
    // top 40% = 2 of 5 groups: layer 0 groups 0 and 3 (0.7), layer 1 group 1 then the
    // earliest of the ties (0.6)
    assert!(out.contains("top 40% = 2 of 5 groups"), "{out}");
    assert!(
        out.contains("layer   0:     groups 0,3 hold 0.700"),
        "{out}"
    );
    assert!(
        out.contains("layer   1:     groups 0,1 hold 0.600"),
        "{out}"
    );

    let js = run(&["stat", "--json", "--top", "0.2", &key], &cache);
    assert!(js.status.success(), "{}", text(&js));
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap();
    assert_eq!(v["version"], 2);
    assert_eq!(
        v["importance"]["layers"][0]["top_groups"],
        serde_json::json!([0])
    );
    assert_eq!(
        v["importance"]["layers"][1]["top_groups"],
        serde_json::json!([1])
    );
    assert_eq!(v["importance"]["priority"], imp.eviction_priority());
    // the disk tier's index holds the priority the importance implies (set by the put)
    assert_eq!(v["priority"], imp.eviction_priority());

    for bad in ["0", "1.5", "nan"] {
        let o = run(&["stat", "--top", bad, &key], &cache);
        assert_eq!(o.status.code(), Some(2), "--top {bad}: {}", text(&o));
    }

    // a version-1 chunk has none
    let meta1 = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, (2..82).collect());
    let v1 = encode_chunk(&meta1, |l, p, d| synth_fill(&meta1.key, l, p, d)).unwrap();
    let file1 = dir.path().join("v1.kvc");
    std::fs::write(&file1, &v1).unwrap();
    assert!(
        run(&["put", "--model", "tiny", file1.to_str().unwrap()], &cache)
            .status
            .success()
    );
    let o = run(&["stat", &meta1.key.to_hex()], &cache);
    let out = text(&o);
    assert!(
        out.contains("format version: 1") && out.contains("importance:     none"),
        "{out}"
    );
    let js = run(&["stat", "--json", &meta1.key.to_hex()], &cache);
    let v: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap();
    assert!(v["importance"].is_null());
}
