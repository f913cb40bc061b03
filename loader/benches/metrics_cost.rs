//! What the loader's metrics cost (issue 16): the counters a lookup and a load record
//! (`metrics::global().lookup`, `.loaded`), per call, against a warm lookup and a warm load
//! (page cache, buffered reads) of the same prefix measured in the same run.
//!
//! The counters cannot be switched off (they are a few relaxed atomic adds per call, always
//! on), so the comparison is the recording's own time against the operation it is part of.
//! Run with `scripts/bench-metrics` (or `cargo bench -p kvfs-loader --bench metrics_cost`).
//! Env: `CHUNKS` (prefix length in 256-token Llama-3-8B chunks of 32 MiB, 8), `RUNS` (5).

use kvfs_loader::dir::{self, Layout};
use kvfs_loader::format::synth_chunk;
use kvfs_loader::layout::{BlockMap, KvLayout, RawRegion};
use kvfs_loader::loader::{Dest, LoadStats, Loader, LoaderOptions};
use kvfs_loader::metrics::global;
use kvfs_loader::{IoMode, ModelSpec, SaltTag};
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let chunks = env("CHUNKS", 8);
    let runs = env("RUNS", 5);
    let spec = ModelSpec::preset("llama-3-8b").unwrap();
    let ct = spec.chunk_tokens as usize;
    let d = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..(chunks * ct) as u32).collect();
    let mut parent = None;
    for c in tokens.chunks_exact(ct) {
        let (meta, bytes) = synth_chunk(&spec, parent, SaltTag::NONE, c.to_vec()).unwrap();
        let path = Layout::Cache.chunk_path(d.path(), &spec.namespace_dir(), &meta.key);
        dir::commit_file(&path, &bytes, false).unwrap();
        parent = Some(meta.key);
    }
    let opts = LoaderOptions {
        io: IoMode::Buffered,
        ..LoaderOptions::default()
    };
    let loader = Loader::open_with(d.path(), spec.clone(), b"", opts).unwrap();
    let (block_size, blocks) = (16usize, chunks * ct / 16);
    let row = spec.num_kv_heads as usize * spec.head_dim as usize * spec.dtype.size();
    let mut bufs: Vec<Vec<u8>> = (0..spec.num_layers)
        .map(|_| vec![0u8; 2 * blocks * block_size * row])
        .collect();
    let regions: Vec<_> = bufs.iter_mut().map(|b| RawRegion::of(b)).collect();
    // SAFETY: the buffers outlive every load and are not touched while loads run.
    let layout = unsafe {
        KvLayout::vllm_flash_attn(
            &regions,
            blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            spec.dtype,
        )
        .unwrap()
    };
    let table: Vec<u32> = (0..blocks as u32).collect();
    let dest = Dest::host(&layout, BlockMap::Blocks(&table));
    let load = || -> LoadStats { loader.load(&tokens, &dest).unwrap().wait().unwrap() };
    load(); // warm the page cache
    let mut best_load = Duration::MAX;
    let mut stats = load();
    for _ in 0..runs {
        let t = Instant::now();
        stats = load();
        best_load = best_load.min(t.elapsed());
    }
    let mut best_lookup = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        assert_eq!(loader.lookup(&tokens), tokens.len());
        best_lookup = best_lookup.min(t.elapsed());
    }
    // The recording alone, per call.
    let m = global();
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        m.loaded(std::hint::black_box(&stats));
    }
    let per_load = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        m.lookup(
            std::hint::black_box(tokens.len()),
            std::hint::black_box(tokens.len()),
        );
    }
    let per_lookup = t.elapsed() / n;
    let pct = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64() * 100.0;
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| warm load, {chunks} chunks ({} MiB), best of {runs} | {:.2} ms; recording it ({} layers): {} ns = {:.4}% |",
        stats.bytes_read >> 20,
        best_load.as_secs_f64() * 1e3,
        spec.num_layers,
        per_load.as_nanos(),
        pct(per_load, best_load)
    );
    println!(
        "| warm lookup, {chunks} chunks, best of {runs} | {:.1} us; recording it: {} ns = {:.3}% |",
        best_lookup.as_secs_f64() * 1e6,
        per_lookup.as_nanos(),
        pct(per_lookup, best_lookup)
    );
}
