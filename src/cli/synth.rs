//! `kvfs synth`: deterministic synthetic chunks for a model shape and a token count.
//!
//! Prints the namespace directory, the chunk count, the bytes and the recipe of the token ids
//! ([`crate::synth::prompt_tokens`]), so a loader or a test can recompute every key.

use super::chunks::preset;
use super::{CliError, Ctx};
use crate::units::human_bytes;
use clap::Args;
use kvfs_loader::Codec;

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Model preset: llama-3-8b, llama-3-70b-tp8, qwen2.5-7b, smollm2-135m, deepseek-v2-lite,
    /// tiny.
    #[arg(long, value_name = "PRESET")]
    pub model: String,
    /// Prompt length in tokens; only full chunks (256 tokens by default) are written.
    #[arg(long, value_name = "N")]
    pub tokens: usize,
    /// Seed of the token ids (kvfs::synth::prompt_tokens(seed, n)).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// Tenant salt mixed into every key (empty: none).
    #[arg(long, default_value = "", value_name = "S")]
    pub salt: String,
    /// How chunks are written: raw, lossless, fp8, int8, kivi4, kivi2. A lossy codec (fp8,
    /// int8, kivi4, kivi2) is part of the model spec, so its chunks go to a namespace of
    /// their own.
    #[arg(long, default_value = "raw", value_name = "NAME")]
    pub codec: String,
}

pub fn synth(ctx: &Ctx, a: SynthArgs) -> Result<i32, CliError> {
    let mut spec = preset(&a.model)?;
    spec.codec = Codec::parse(&a.codec).map_err(|e| CliError::Usage(e.to_string()))?;
    spec.validate()
        .map_err(|e| CliError::Usage(format!("--codec {}: {e}", a.codec)))?;
    if a.tokens < spec.chunk_tokens as usize {
        return Err(CliError::Usage(format!(
            "--tokens {} is less than one chunk ({} tokens)",
            a.tokens, spec.chunk_tokens
        )));
    }
    let store = ctx.open_store()?;
    // Refuse before allocating anything that grows with --tokens: the chunks must fit in the
    // cache's bounds, which also bounds the token vector (4 bytes a token, far below a chunk's
    // bytes per token).
    let chunks = (a.tokens / spec.chunk_tokens as usize) as u64;
    let needed = chunks
        .checked_mul(spec.chunk_tokens as u64)
        .and_then(|t| t.checked_mul(spec.bytes_per_token()))
        .unwrap_or(u64::MAX);
    let cap = store.capacity();
    let room = cap
        .limit_bytes
        .min(cap.fs_total_bytes.saturating_sub(cap.min_free_bytes));
    if needed > room {
        return Err(CliError::Usage(format!(
            "--tokens {} needs {} of chunks, more than the cache can hold ({} within its capacity and free-space bounds)",
            a.tokens,
            human_bytes(needed),
            human_bytes(room)
        )));
    }
    let bar = indicatif::ProgressBar::new((a.tokens / spec.chunk_tokens as usize) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} chunks {elapsed}")
            .expect("static template"),
    );
    let r = crate::synth::synth_into(&store, &spec, a.tokens, a.seed, &a.salt, &|done, _| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();
    outln!("namespace: {}", store.root().join(&r.ns_dir).display());
    outln!("chunks: {} ({} new)", r.chunks, r.created);
    outln!("bytes: {} ({})", r.bytes, human_bytes(r.bytes));
    outln!("codec: {}", spec.codec);
    outln!(
        "tokens: kvfs::synth::prompt_tokens(seed={}, n={}) = first {} SplitMix64 outputs of seed {} mod {}",
        a.seed,
        a.tokens,
        a.tokens,
        a.seed,
        crate::synth::VOCAB
    );
    outln!(
        "salt: {}",
        if a.salt.is_empty() {
            "none".to_string()
        } else {
            format!("{:?}", a.salt)
        }
    );
    if r.leftover_tokens > 0 {
        outln!(
            "note: the last {} tokens do not fill a chunk and were not stored",
            r.leftover_tokens
        );
    }
    if let (Some(first), Some(last)) = (r.keys.first(), r.keys.last()) {
        outln!("first key: {first}");
        outln!("last key: {last}");
    }
    Ok(0)
}
