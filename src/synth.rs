//! Deterministic synthetic prompts and chunks (`kvfs synth`), so the loader, tests and
//! benchmarks can reproduce the exact keys a cache holds without shipping a model.
//!
//! Token ids: [`prompt_tokens`]`(seed, n)` is the first `n` outputs of SplitMix64 seeded with
//! `seed`, each reduced modulo [`VOCAB`]:
//!
//! ```text
//! token[i] = splitmix64_mix(seed + (i + 1) * 0x9E3779B97F4A7C15) % 32000     (wrapping u64)
//! splitmix64_mix(z): z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
//!                    z = (z ^ (z >> 27)) * 0x94D049BB133111EB;  z ^ (z >> 31)
//! ```
//!
//! Chunk bytes: [`kvfs_loader::format::synth_chunk`] (a xorshift stream seeded by the key).
//! Keys: [`kvfs_loader::chunk_keys`] of those tokens under the preset's namespace, with
//! `SaltTag::of(salt)`; only full chunks of `chunk_tokens` tokens are written.

use crate::store::{Store, StoreError};
use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};

/// Token ids are drawn below this (fits the vocabulary of every preset).
pub const VOCAB: u32 = 32000;
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function.
pub fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The synthetic prompt of `n` tokens for `seed` (see the module docs for the recipe).
pub fn prompt_tokens(seed: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| {
            let z = seed.wrapping_add((i + 1).wrapping_mul(GOLDEN_GAMMA));
            (splitmix64_mix(z) % VOCAB as u64) as u32
        })
        .collect()
}

/// What [`synth_into`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthReport {
    pub ns_dir: String,
    /// Full chunks of the prompt.
    pub chunks: u64,
    /// Chunks this call created (the others were already stored).
    pub created: u64,
    pub bytes: u64,
    pub keys: Vec<ChunkKey>,
    /// Trailing tokens that do not fill a chunk (not stored).
    pub leftover_tokens: usize,
}

/// Writes the chunks of `prompt_tokens(seed, tokens)` for `spec` into `store`, creating the
/// namespace directory and its `namespace.json`. `progress(done, total)` runs after each chunk.
pub fn synth_into(
    store: &Store,
    spec: &ModelSpec,
    tokens: usize,
    seed: u64,
    salt: &str,
    progress: &dyn Fn(u64, u64),
) -> Result<SynthReport, StoreError> {
    spec.validate()?;
    let ns_dir = spec.namespace_dir();
    store.create_namespace(&ns_dir, Some(spec))?;
    let prompt = prompt_tokens(seed, tokens);
    let chunk = spec.chunk_tokens as usize;
    let total = (tokens / chunk) as u64;
    let salt_tag = SaltTag::of(salt.as_bytes());
    let mut report = SynthReport {
        ns_dir: ns_dir.clone(),
        chunks: total,
        created: 0,
        bytes: 0,
        keys: Vec::with_capacity(total as usize),
        leftover_tokens: tokens % chunk,
    };
    let mut parent = None;
    for (i, toks) in prompt.chunks_exact(chunk).enumerate() {
        let (meta, bytes) = synth_chunk(spec, parent, salt_tag, toks.to_vec())?;
        let out = store.put_bytes(&ns_dir, bytes.into())?;
        report.created += out.created as u64;
        report.bytes += out.len;
        report.keys.push(meta.key);
        parent = Some(meta.key);
        progress(i as u64 + 1, total);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values: the recipe is a published contract (tests and the loader rebuild keys
    /// from it), so it must never change.
    #[test]
    fn prompt_tokens_are_pinned() {
        let t = prompt_tokens(0, 4);
        let expect: Vec<u32> = [
            0xe220a8397b1dcdafu64,
            0x6e789e6aa1b965f4,
            0x06c45d188009454f,
            0xf88bb8a8724c81ec,
        ]
        .iter()
        .map(|v| (v % 32000) as u32)
        .collect();
        assert_eq!(t, expect, "first SplitMix64 outputs for seed 0");
        assert_eq!(prompt_tokens(7, 1000)[..10], prompt_tokens(7, 10)[..]);
        assert_ne!(prompt_tokens(1, 10), prompt_tokens(2, 10));
        assert!(prompt_tokens(3, 5000).iter().all(|&t| t < VOCAB));
    }
}
