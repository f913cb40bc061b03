//! Pruned re-prefill (ContiguousKV, issue 14): reuse a cached prefix keeping only its
//! important groups, loaded with prefetch across layer periods.
//!
//! The stored K rows already carry RoPE at their original positions, so pruning needs no
//! re-rotation: a pruned group is simply absent from attention. For each layer the forward
//! pass gathers the kept prefix positions plus every position from the end of the reused
//! prefix on (the fresh suffix, and later the generated tokens) ([`columns`]), and masks
//! causally by true position: each query sees the columns up to its own position, a prefix of
//! them ([`crate::fused::visible_counts`]); fresh tokens get RoPE at their true positions.
//!
//! [`Engine::prefill_pruned`] picks the groups from the importance in the chunk headers
//! (`Loader::importance_selection`), loads only them through a `PrefetchingLoad` (the layers
//! of a period load while its first layer computes, the next period's first layer is
//! prefetched), waits for each layer just before the forward pass touches it, and prefills
//! the suffix. [`Engine::prefill_selected`] does the same for any selection (random groups,
//! token-granular choices: the benchmark's baselines); [`Engine::generate_pruned`] decodes
//! over the same pruned prefix.
//!
//! Memory: the loader writes the kept rows of layer `l` into the paged cache's layer-`l`
//! buffer until `wait_layer(l)` returns, and the forward pass touches that buffer only after
//! ([`ForwardHooks::before_attention`] runs before the layer's K/V write), so the two never
//! touch one buffer at once.

use crate::model::ForwardHooks;
use crate::{Engine, ModelError, PagedKv};
use kvfs_loader::prefetch::{Periods, Prefetch, PrefetchStats, PrefetchingLoad};
use kvfs_loader::{BlockMap, Dest, LoadRequest, Loader, Selection};
use std::time::{Duration, Instant};

/// Positions a layer attends to: `kept` below `upto`, then `upto..total`.
pub fn columns(upto: usize, kept: &[u32], total: usize) -> Vec<u32> {
    kept.iter()
        .copied()
        .filter(|&p| (p as usize) < upto)
        .chain(upto as u32..total as u32)
        .collect()
}

/// Which positions of a reused prefix `0..upto` each layer keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunedPrefix {
    pub upto: usize,
    /// Per layer, sorted positions below `upto`.
    pub kept: Vec<Vec<u32>>,
}

impl PrunedPrefix {
    /// The positions of the groups `selection` names (groups numbered over the prefix chunk
    /// by chunk, as [`Selection`] numbers them).
    pub fn from_selection(
        selection: &Selection,
        upto: usize,
        chunk_tokens: usize,
        group_tokens: usize,
    ) -> PrunedPrefix {
        let per_chunk = chunk_tokens.div_ceil(group_tokens);
        let kept = (0..selection.num_layers())
            .map(|l| {
                selection
                    .groups(l)
                    .iter()
                    .flat_map(|&g| {
                        let (c, local) = (g as usize / per_chunk, g as usize % per_chunk);
                        let s = c * chunk_tokens + local * group_tokens;
                        let e = (s + group_tokens).min((c + 1) * chunk_tokens).min(upto);
                        (s.min(e) as u32)..(e as u32)
                    })
                    .collect()
            })
            .collect();
        PrunedPrefix { upto, kept }
    }

    /// Kept positions summed over layers.
    pub fn kept_rows(&self) -> usize {
        self.kept.iter().map(Vec::len).sum()
    }
}

/// How a pruned re-prefill loads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneOptions {
    pub prefetch: Prefetch,
    /// Layers per period (ContiguousKV groups layers whose important groups are similar;
    /// `None` makes periods by similarity, Jaccard >= 0.5 with the period's first layer).
    pub period_layers: Option<usize>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            prefetch: Prefetch::Full,
            period_layers: Some(5),
        }
    }
}

/// What a pruned re-prefill did.
#[derive(Debug, Clone)]
pub struct PrunedOutcome {
    pub reused: usize,
    pub computed: usize,
    pub logits: Vec<f32>,
    pub prefix: PrunedPrefix,
    pub load: PrefetchStats,
    /// Reading headers and choosing groups.
    pub select_time: Duration,
    /// Loading and prefilling (overlapped), selection excluded.
    pub reprefill_time: Duration,
}

/// Hooks of a pruned pass: wait for the layer's rows (when a load runs), then hide what the
/// prefix does not keep.
struct PrunedHooks<'p, 'l, 'a> {
    prefix: &'p PrunedPrefix,
    load: Option<&'l mut PrefetchingLoad<'a>>,
}

impl ForwardHooks for PrunedHooks<'_, '_, '_> {
    fn before_attention(&mut self, layer: usize) -> Result<Option<(usize, &[u32])>, ModelError> {
        if let Some(load) = self.load.as_mut() {
            load.wait_layer(layer)?;
        }
        Ok(Some((self.prefix.upto, &self.prefix.kept[layer])))
    }
}

impl Engine {
    /// Reuses what kvfs holds of `tokens` (leaving at least one token to compute) keeping per
    /// layer the best `share` of its groups by the importance stored in the chunks, and
    /// prefills the rest attending over the kept groups only.
    pub fn prefill_pruned(
        &self,
        loader: &Loader,
        kv: &mut PagedKv,
        tokens: &[u32],
        share: f64,
        opts: PruneOptions,
    ) -> Result<PrunedOutcome, ModelError> {
        let t0 = Instant::now();
        let reused = self.reusable(loader, tokens)?;
        let selection = loader.importance_selection(tokens, reused, share)?;
        let select_time = t0.elapsed();
        let mut out = self.prefill_selected(loader, kv, tokens, reused, &selection, None, opts)?;
        out.select_time = select_time;
        Ok(out)
    }

    /// Positions of `tokens` that kvfs holds, leaving one token to compute.
    pub fn reusable(&self, loader: &Loader, tokens: &[u32]) -> Result<usize, ModelError> {
        if tokens.len() < 2 {
            return Err(ModelError::Invalid(
                "a reuse needs at least 2 tokens".into(),
            ));
        }
        match loader.lookup(tokens).min(tokens.len() - 1) {
            0 => Err(ModelError::Invalid(
                "nothing of the prompt is cached".into(),
            )),
            n => Ok(n),
        }
    }

    /// Loads the groups of `selection` for positions `0..reused` and prefills the rest,
    /// attending to `visible` (default: the selected groups' positions).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_selected(
        &self,
        loader: &Loader,
        kv: &mut PagedKv,
        tokens: &[u32],
        reused: usize,
        selection: &Selection,
        visible: Option<PrunedPrefix>,
        opts: PruneOptions,
    ) -> Result<PrunedOutcome, ModelError> {
        let spec = loader.spec();
        let prefix = visible.unwrap_or_else(|| {
            PrunedPrefix::from_selection(
                selection,
                reused,
                spec.chunk_tokens as usize,
                spec.group_tokens as usize,
            )
        });
        let periods = match opts.period_layers {
            Some(n) => Periods::uniform(self.model.cfg.num_layers, n)?,
            None => Periods::by_similarity(selection, 0.5)?,
        };
        let t0 = Instant::now();
        let layout = kv.layout()?;
        let table = kv.block_table().to_vec();
        let dest = Dest::host(&layout, BlockMap::Blocks(&table));
        let req = LoadRequest {
            tokens,
            range: Some(0..reused),
            selection: Some(selection),
            verify: None,
        };
        let mut load = loader.load_prefetching(&req, dest, periods, opts.prefetch)?;
        let logits = {
            let mut hooks = PrunedHooks {
                prefix: &prefix,
                load: Some(&mut load),
            };
            self.model
                .forward_hooked(kv, &tokens[reused..], reused, &mut hooks)?
        };
        let load = load.finish()?;
        Ok(PrunedOutcome {
            reused,
            computed: tokens.len() - reused,
            logits,
            prefix,
            load,
            select_time: Duration::ZERO,
            reprefill_time: t0.elapsed(),
        })
    }

    /// Greedy decoding after a pruned prefill: the new tokens attend to the same pruned prefix.
    pub fn generate_pruned(
        &self,
        kv: &mut PagedKv,
        prompt_len: usize,
        logits: &[f32],
        n: usize,
        prefix: &PrunedPrefix,
    ) -> Result<Vec<u32>, ModelError> {
        let mut hooks = PrunedHooks { prefix, load: None };
        self.generate_with(kv, prompt_len, logits, n, &mut hooks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::{softmax_causal, visible_counts};

    #[test]
    fn columns_and_mask() {
        assert_eq!(columns(32, &[0, 1, 20, 40], 35), vec![0, 1, 20, 32, 33, 34]);
        // the causal mask by true position: the query at 33 sees the first four columns (0,
        // 20, 32, 33) and not 34; the query at 34 sees all five
        let cols = [0, 20, 32, 33, 34];
        let seen = visible_counts(&[33, 34], Some(&cols), cols.len());
        assert_eq!(seen, vec![4, 5]);
        let mut p = vec![0.0f32; 2 * cols.len()];
        softmax_causal(&mut p, cols.len(), 1.0, &seen);
        assert_eq!(p[..4], [0.25; 4]);
        assert_eq!(p[4], 0.0);
        assert_eq!(p[5..], [0.2; 5]);
    }

    #[test]
    fn prefix_positions_of_groups() {
        // 40-token chunks in 16-token groups: 0..16, 16..32, 32..40 per chunk
        let s = Selection::new(vec![vec![0, 2, 3], vec![4]]);
        let p = PrunedPrefix::from_selection(&s, 70, 40, 16);
        let mut want: Vec<u32> = (0..16).chain(32..40).chain(40..56).collect();
        assert_eq!(p.kept[0], want);
        want = (56..70).collect(); // group 4 = 56..72, clipped at 70
        assert_eq!(p.kept[1], want);
        assert_eq!(p.kept_rows(), 40 + 14);
    }
}
