//! Importance during prefill (issue 14): how much attention each token group receives.
//!
//! [`ImportanceCollector`] is a [`ForwardHooks`] observer. For every layer it sums the
//! softmax probabilities that the **last [`OBSERVED_QUERIES`] queries of the prompt** put on
//! each cached position, over **all query heads**, and divides by the number of (head, query)
//! pairs: a token's score is the share of the observation window's attention it drew, and the
//! scores of one layer sum to 1 over the prompt.
//!
//! Why this choice: the prompt's last queries are the ones closest to what the model does
//! next (generation continues from them), and their attention is what SnapKV's observation
//! window, IMPRESS's importance and ContiguousKV's chunk scores use to rank prefix KV; a single
//! last query is noisy, and all queries favour early tokens by the causal mask (every query
//! sees token 0). Summing over heads (rather than taking the maximum) ranks what the layer as a
//! whole reads; per-head selection would need per-head loads, which a group-granular store does
//! not do. The window is 32 queries (SnapKV's default), fewer when the prompt is shorter.
//!
//! A group's score is the sum of its tokens' scores; [`ImportanceCollector::chunk_importance`]
//! cuts the prompt into the spec's chunks and groups and returns the
//! [`kvfs_loader::importance::Importance`] that `Engine::store_scored` writes into each chunk
//! header. [`ImportanceCollector::token_scores`] keeps the per-token scores for token-granular
//! selection (the IMPRESS-style baseline of `scripts/bench-ckv`).

use crate::ModelError;
use crate::model::ForwardHooks;
use candle_core::Tensor;
use kvfs_loader::importance::Importance;

/// Queries of the prompt's end whose attention defines importance.
pub const OBSERVED_QUERIES: usize = 32;

/// Sums attention mass per layer and position during a prefill of `prompt_len` tokens.
#[derive(Debug, Clone)]
pub struct ImportanceCollector {
    prompt_len: usize,
    window: usize,
    /// `mass[layer][position]`: summed probability from observed (head, query) pairs.
    mass: Vec<Vec<f64>>,
    /// Per layer, how many (head, query) pairs were summed.
    pairs: Vec<f64>,
}

impl ImportanceCollector {
    /// A collector for a prefill of `prompt_len` tokens over `num_layers` layers.
    pub fn new(num_layers: usize, prompt_len: usize) -> ImportanceCollector {
        ImportanceCollector {
            prompt_len,
            window: OBSERVED_QUERIES.min(prompt_len),
            mass: vec![vec![0.0; prompt_len]; num_layers],
            pairs: vec![0.0; num_layers],
        }
    }

    /// Queries the scores average over.
    pub fn observed_queries(&self) -> usize {
        self.window
    }

    /// Per layer, per token: the share of the observed attention the token drew.
    pub fn token_scores(&self) -> Vec<Vec<f32>> {
        self.mass
            .iter()
            .zip(&self.pairs)
            .map(|(m, &p)| m.iter().map(|x| (x / p.max(1.0)) as f32).collect())
            .collect()
    }

    /// The importance of each full chunk of `chunk_tokens` tokens in groups of
    /// `group_tokens` (a trailing partial chunk is never stored, so it has none).
    pub fn chunk_importance(
        &self,
        chunk_tokens: usize,
        group_tokens: usize,
    ) -> Result<Vec<Importance>, ModelError> {
        if self.pairs.contains(&0.0) {
            return Err(ModelError::Invalid(
                "no attention was observed: run a prefill of the whole prompt first".into(),
            ));
        }
        let scores = self.token_scores();
        let groups = chunk_tokens.div_ceil(group_tokens);
        (0..self.prompt_len / chunk_tokens)
            .map(|c| {
                let mut flat = Vec::with_capacity(scores.len() * groups);
                for layer in &scores {
                    let chunk = &layer[c * chunk_tokens..(c + 1) * chunk_tokens];
                    flat.extend(
                        chunk
                            .chunks(group_tokens)
                            .map(|g| g.iter().sum::<f32>().clamp(0.0, 1.0)),
                    );
                }
                Importance::new(scores.len() as u32, groups as u32, self.window as u32, flat)
                    .map_err(|e| ModelError::Invalid(format!("importance of chunk {c}: {e}")))
            })
            .collect()
    }
}

impl ForwardHooks for ImportanceCollector {
    fn after_attention(
        &mut self,
        layer: usize,
        probs: &Tensor,
        cols: Option<&[u32]>,
        positions: &[usize],
    ) -> Result<(), ModelError> {
        let (kv_heads, group, _, width) = probs.dims4()?;
        // observed: queries of the window's positions (ascending), none past the prompt
        let first_observed = self.prompt_len - self.window;
        let q0 = positions.partition_point(|&p| p < first_observed);
        let q1 = positions.partition_point(|&p| p < self.prompt_len);
        if q0 >= q1 {
            return Ok(());
        }
        let col_mass = probs
            .narrow(2, q0, q1 - q0)?
            .contiguous()?
            .reshape((kv_heads * group * (q1 - q0), width))?
            .sum(0)?
            .to_vec1::<f32>()?;
        let mass = &mut self.mass[layer];
        for (c, m) in col_mass.into_iter().enumerate() {
            let pos = cols.map_or(c, |cs| cs[c] as usize);
            if pos < self.prompt_len {
                mass[pos] += m as f64;
            }
        }
        self.pairs[layer] += (kv_heads * group * (q1 - q0)) as f64;
        Ok(())
    }
}
