//! `kvfs demo`: the main job end to end on the embedded default (a local cache directory).
//!
//! It plays two requests of a serving engine that share a long prefix:
//!
//! 1. **request 1** "prefills" the prompt: its paged KV blocks (vLLM flash-attn layout, 16
//!    tokens a block) are filled with deterministic pseudo-KV standing in for what the model
//!    computed, and the loader stores every full chunk into the cache directory;
//! 2. **request 2**, with fresh blocks, asks the loader how much of its prompt (the same
//!    prefix plus a new question) is cached, loads those chunks layer by layer into its own
//!    blocks, and checks every byte against request 1's blocks.
//!
//! It prints what a fleet operator cares about: tokens reused, bytes per token, time until
//! layer 0 is usable and until the whole prefix is in place, and load bandwidth. The chunks
//! stay in the cache, so `kvfs ls`, `kvfs stat`, `kvfs verify` and `kvfs mount` can look at
//! them afterwards. No S3 and no GPU are needed.

use super::{CliError, Ctx};
use kvfs_loader::format::synth_fill;
use kvfs_loader::{
    BlockMap, ChunkKey, Dest, KvLayout, Loader, LoaderOptions, ModelSpec, RawRegion,
};
use std::time::Instant;

/// Arguments of `kvfs demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Model shape (one of the presets: llama-3-8b, llama-3-70b-tp8, qwen2.5-7b,
    /// smollm2-135m, deepseek-v2-lite, tiny).
    #[arg(long, default_value = "llama-3-8b")]
    pub model: String,
    /// Tokens in the shared prefix.
    #[arg(long, default_value_t = 8192)]
    pub tokens: usize,
    /// Tokens of the new question request 2 appends to the prefix.
    #[arg(long, default_value_t = 100)]
    pub suffix: usize,
    /// Engine block size in tokens.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Seed of the synthetic prompt.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One engine's paged KV memory: a buffer per layer in the vLLM flash-attn layout.
struct EngineBlocks {
    layers: Vec<Vec<u8>>,
    layout: KvLayout,
    block_table: Vec<u32>,
}

impl EngineBlocks {
    fn new(spec: &ModelSpec, tokens: usize, block_size: usize) -> Result<EngineBlocks, CliError> {
        let num_blocks = tokens.div_ceil(block_size).max(1);
        let row = spec.num_kv_heads as usize * spec.head_dim as usize * spec.dtype.size();
        let planes = spec.kv_kind.planes();
        let mut layers: Vec<Vec<u8>> = (0..spec.num_layers)
            .map(|_| vec![0u8; planes * num_blocks * block_size * row])
            .collect();
        let regions: Vec<RawRegion> = layers.iter_mut().map(|l| RawRegion::of(l)).collect();
        // SAFETY: the regions point into `layers`, whose heap buffers live in the returned
        // struct as long as the layout and are never reallocated; loads and stores run while
        // the struct is borrowed, so nothing else touches the memory meanwhile.
        let layout = unsafe {
            match spec.kv_kind {
                kvfs_loader::KvKind::KeyValue => KvLayout::vllm_flash_attn(
                    &regions,
                    num_blocks,
                    block_size,
                    spec.num_kv_heads,
                    spec.head_dim,
                    spec.dtype,
                ),
                kvfs_loader::KvKind::MlaLatent => {
                    KvLayout::mla(&regions, num_blocks, block_size, spec.head_dim, spec.dtype)
                }
            }
        }
        .map_err(|e| CliError::Failed(format!("engine layout: {e}")))?;
        // A shuffled block table, as an engine's allocator hands out blocks.
        let mut block_table: Vec<u32> = (0..num_blocks as u32).collect();
        block_table.reverse();
        Ok(EngineBlocks {
            layers,
            layout,
            block_table,
        })
    }

    /// Stands in for the model's prefill: writes each position's K/V rows, a deterministic
    /// function of (seed, layer, plane, position) only, so any engine with any block size
    /// or block table computes the same bytes for the same prompt.
    fn prefill(&mut self, seed: u64, tokens: usize) {
        let row = self.layout.row_bytes();
        let block_size = self.layout.block_size();
        let plane_bytes = self.layout.num_blocks() * block_size * row;
        let planes = self.layout.planes();
        for (layer, buf) in self.layers.iter_mut().enumerate() {
            for plane in 0..planes {
                for pos in 0..tokens {
                    let slot =
                        self.block_table[pos / block_size] as usize * block_size + pos % block_size;
                    let at = plane * plane_bytes + slot * row;
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&seed.to_le_bytes());
                    id[8..16].copy_from_slice(&(pos as u64).to_le_bytes());
                    synth_fill(
                        &ChunkKey(id),
                        layer as u32,
                        plane as u32,
                        &mut buf[at..at + row],
                    );
                }
            }
        }
    }

    fn dest(&self) -> Dest<'_> {
        Dest::host(&self.layout, BlockMap::Blocks(&self.block_table))
    }
}

pub fn demo(ctx: &Ctx, a: DemoArgs) -> Result<i32, CliError> {
    let spec = ModelSpec::preset(&a.model).ok_or_else(|| {
        CliError::Usage(format!(
            "unknown model `{}`; one of {}",
            a.model,
            ModelSpec::PRESETS.join(", ")
        ))
    })?;
    if a.block_size == 0 || a.tokens < spec.chunk_tokens as usize {
        return Err(CliError::Usage(format!(
            "--tokens must be at least one chunk ({} tokens) and --block-size positive",
            spec.chunk_tokens
        )));
    }
    let store = ctx.open_store()?;
    let root = store.root().to_path_buf();
    let prefix = crate::synth::prompt_tokens(a.seed, a.tokens);
    let per_token = spec.bytes_per_token();
    outln!(
        "kvfs demo: {} ({} layers, {} KV heads, head dim {}, {})",
        spec.model,
        spec.num_layers,
        spec.num_kv_heads,
        spec.head_dim,
        spec.dtype
    );
    outln!("  cache directory   {}", root.display());
    outln!(
        "  KV bytes/token    {per_token} ({:.1} MiB for the {}-token prefix)",
        (per_token * a.tokens as u64) as f64 / (1 << 20) as f64,
        a.tokens
    );

    let fsync = ctx.config.fsync == crate::store::FsyncPolicy::Always;
    let options = LoaderOptions {
        fsync,
        ..LoaderOptions::default()
    };
    let loader = Loader::open_with(&root, spec.clone(), b"", options)
        .map_err(|e| CliError::Failed(e.to_string()))?;

    // Request 1: prefill (simulated) and store.
    let mut r1 = EngineBlocks::new(&spec, a.tokens, a.block_size)?;
    r1.prefill(a.seed, a.tokens);
    let t = Instant::now();
    let stored = loader
        .store(&prefix, &r1.dest())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let store_s = t.elapsed().as_secs_f64();
    outln!(
        "request 1: prefilled {} tokens; stored {} new chunks ({} already cached), {:.1} MiB in {:.3} s",
        a.tokens,
        stored.written,
        stored.present,
        stored.bytes_written as f64 / (1 << 20) as f64,
        store_s
    );

    // Request 2: same prefix, a new question.
    let mut prompt2 = prefix.clone();
    prompt2.extend(crate::synth::prompt_tokens(a.seed ^ 0xD1CE, a.suffix));
    let t = Instant::now();
    let hit = loader.lookup(&prompt2);
    let lookup_s = t.elapsed().as_secs_f64();
    let r2 = EngineBlocks::new(&spec, prompt2.len(), a.block_size)?;
    let handle = loader
        .load(&prompt2[..hit], &r2.dest())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let stats = handle.wait().map_err(|e| CliError::Failed(e.to_string()))?;
    let first = stats.layer_ready.first().copied().unwrap_or_default();
    outln!(
        "request 2: {} of {} prompt tokens cached (lookup {:.2} ms); prefill only {} tokens",
        hit,
        prompt2.len(),
        lookup_s * 1e3,
        prompt2.len() - hit
    );
    outln!(
        "  loaded {} chunks, {:.1} MiB: layer 0 ready after {:.1} ms, all {} layers after {:.1} ms ({:.2} GB/s, {} O_DIRECT / {} buffered files)",
        stats.chunks,
        stats.bytes_read as f64 / (1 << 20) as f64,
        first.as_secs_f64() * 1e3,
        spec.num_layers,
        stats.elapsed.as_secs_f64() * 1e3,
        stats.bytes_read as f64 / stats.elapsed.as_secs_f64().max(1e-9) / 1e9,
        stats.direct_files,
        stats.buffered_files,
    );

    // Every loaded slot must hold exactly what request 1 computed.
    let row = r1.layout.row_bytes();
    let mut mismatched = 0usize;
    for layer in 0..r1.layout.num_layers() {
        for plane in 0..r1.layout.planes() {
            for pos in 0..hit {
                let slot = |e: &EngineBlocks| {
                    e.block_table[pos / a.block_size] as usize * a.block_size + pos % a.block_size
                };
                let (s1, s2) = (slot(&r1), slot(&r2));
                // SAFETY: both addresses come from layouts over live buffers, and each row of
                // `row` bytes lies inside its layer buffer (checked when the layouts were built).
                let (x, y) = unsafe {
                    (
                        std::slice::from_raw_parts(
                            r1.layout.slot_addr(layer, plane, s1) as *const u8,
                            row,
                        ),
                        std::slice::from_raw_parts(
                            r2.layout.slot_addr(layer, plane, s2) as *const u8,
                            row,
                        ),
                    )
                };
                if x != y {
                    mismatched += 1;
                }
            }
        }
    }
    if mismatched > 0 {
        return Err(CliError::Failed(format!(
            "{mismatched} loaded KV rows differ from what was stored"
        )));
    }
    outln!("  every loaded KV row matches request 1's blocks byte for byte");
    outln!(
        "next: `kvfs ls`, `kvfs verify`, `kvfs info`, or `kvfs mount DIR` to see the chunks as files"
    );
    Ok(0)
}
