//! Blending (CacheBlend, EuroSys'25) in the SmolLM2 engine: reuse the KV of documents that
//! are not a prefix, and recompute only the tokens whose KV deviates most.
//!
//! A blended prompt is a system prefix, a list of documents and a fresh question, laid out in
//! that order. The prefix is an ordinary prefix (prefix-chained chunks, exact). Each document
//! is stored as position-independent chunks (format v2): every chunk of up to
//! `chunk_tokens` tokens is prefilled alone at positions `0..` and stored with origin 0
//! ([`Engine::store_documents`]). A request loads each document's chunks at the positions where
//! the document lands, the keys rotated there by the loader ([`kvfs_loader::RopeParams`]);
//! this is "naive reuse": right positions, but no attention across documents or chunks.
//!
//! [`Engine::blend`] then repairs the cache selectively, in two passes over the model:
//! 1. **Check** (on a scratch copy of the first layers, so the cache is untouched): all
//!    document tokens run through layers `0..=check_layer` as a full prefill would run them.
//!    At the check layer each token's deviation `sum((k_new - k_reused)^2)` over heads and
//!    dimensions is scored, and the top `ratio` share of document tokens is chosen.
//! 2. **Recompute**: the chosen tokens and the question run through every layer at their
//!    positions; in each layer their fresh K/V rows are scattered into the blocks before
//!    attention, and each attends to the whole cache up to its position (prefix, reused rows,
//!    recomputed rows). Tokens not chosen keep their reused KV in every layer.
//!
//! A per-layer schedule (the paper's gradual filtering, which LMCache does not do) narrows the
//! recomputed set further: at each later layer of the schedule the running document tokens
//! are scored again, fresh K against the reused K of that layer, and only the top share of
//! all document tokens goes on; a token dropped at layer `l` keeps its fresh KV below `l`
//! and the reused KV from `l` on.
//!
//! Two ends of the dial are exact by construction, and the tests check them: a ratio of 1
//! recomputes every document token in every layer over an exact prefix, which is a full
//! prefill; a ratio of 0 runs only the question over the reused cache, which is naive reuse.

use crate::model::{LayerView, NoHooks, PREFILL_WINDOW};
use crate::{Engine, ModelError, PagedKv};
use candle_core::Tensor;
use kvfs_loader::{Dest, LoadStats, Loader, RopePairing, RopeParams, StoreStats};
use std::time::{Duration, Instant};

/// How much to recompute, and where to decide it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlendConfig {
    /// Layer whose K deviation chooses the tokens (1 by default, as LMCache).
    pub check_layer: usize,
    /// Share of document tokens recomputed after the check layer, in `[0, 1]` (0.15 default).
    pub ratio: f64,
    /// Later `(layer, share)` steps narrowing the set (layers ascending, after the check
    /// layer; shares not above the previous one). Empty: one selection at the check layer.
    pub schedule: Vec<(usize, f64)>,
}

impl Default for BlendConfig {
    fn default() -> Self {
        BlendConfig {
            check_layer: 1,
            ratio: 0.15,
            schedule: Vec::new(),
        }
    }
}

/// A blended prompt: prefix, then the documents in this order, then the question.
#[derive(Debug, Clone, Copy)]
pub struct BlendPrompt<'a> {
    pub prefix: &'a [u32],
    pub documents: &'a [Vec<u32>],
    pub question: &'a [u32],
}

impl BlendPrompt<'_> {
    /// All tokens in prompt order (what a full prefill runs).
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = self.prefix.to_vec();
        for d in self.documents {
            t.extend_from_slice(d);
        }
        t.extend_from_slice(self.question);
        t
    }

    /// Start position of each document.
    pub fn document_starts(&self) -> Vec<usize> {
        let mut at = self.prefix.len();
        self.documents
            .iter()
            .map(|d| {
                let s = at;
                at += d.len();
                s
            })
            .collect()
    }

    /// Positions `[prefix.len(), prefix.len() + document tokens)`.
    fn document_span(&self) -> std::ops::Range<usize> {
        let n: usize = self.documents.iter().map(Vec::len).sum();
        self.prefix.len()..self.prefix.len() + n
    }
}

/// What a blend did.
#[derive(Debug, Clone)]
pub struct BlendOutcome {
    /// Logits of the question's last token.
    pub logits: Vec<f32>,
    /// Document tokens in the prompt.
    pub document_tokens: usize,
    /// Positions of the document tokens recomputed after the check layer (ascending).
    pub selected: Vec<usize>,
    /// Deviation of every document token at the check layer, in prompt order.
    pub deviations: Vec<f32>,
    /// Document tokens still recomputed in the last layer (the schedule may narrow the set).
    pub final_recomputed: usize,
    pub check_time: Duration,
    pub recompute_time: Duration,
}

impl BlendOutcome {
    /// Share of document tokens recomputed after the check layer.
    pub fn recompute_share(&self) -> f64 {
        self.selected.len() as f64 / self.document_tokens.max(1) as f64
    }
}

/// Indices of the `count` largest values (ties: the earlier index), ascending.
pub fn top_indices(values: &[f32], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(count);
    order.sort_unstable();
    order
}

/// Per-token `sum((k_new - k_old)^2)` of fresh keys `k` (`[n, heads, dim]`) against the rows
/// `kv` holds at `positions` in `layer`.
fn deviations(
    k: &Tensor,
    kv: &PagedKv,
    layer: usize,
    positions: &[usize],
) -> Result<Vec<f32>, ModelError> {
    let fresh = k.flatten_all()?.to_vec1::<f32>()?;
    let row = fresh.len() / positions.len().max(1);
    Ok(positions
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let old = kv.k_row(layer, p);
            fresh[i * row..(i + 1) * row]
                .iter()
                .zip(old)
                .map(|(a, b)| (a - b) * (a - b))
                .sum()
        })
        .collect())
}

/// `log softmax(logits)[index]`, computed in f64.
pub fn log_softmax_at(logits: &[f32], index: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[index as usize] as f64 - max - sum.ln()
}

/// Number of tokens a share of `n` means (rounded, at most `n`).
fn share_of(n: usize, share: f64) -> usize {
    ((n as f64 * share).round() as usize).min(n)
}

impl Engine {
    /// RoPE parameters of this model for re-encoding its cached keys: the spec's theta over
    /// the whole head, interleaved pairs (llama.cpp's permuted Q/K, see `model.rs`).
    pub fn rope_params(&self) -> Result<RopeParams, ModelError> {
        Ok(RopeParams::from_spec(&self.spec, RopePairing::Interleaved)?)
    }

    /// Stores each document as position-independent chunks: every chunk prefilled alone at
    /// positions `0..`, skipping documents already cached whole.
    pub fn store_documents(
        &self,
        loader: &Loader,
        documents: &[Vec<u32>],
    ) -> Result<StoreStats, ModelError> {
        let ct = self.spec.chunk_tokens as usize;
        let mut total = StoreStats::default();
        let mut kv = self.new_cache(ct);
        for doc in documents {
            if doc.is_empty() {
                return Err(ModelError::Invalid("empty document".into()));
            }
            if loader.lookup_document(doc) {
                total.present += loader.document_chunks(doc).len();
                continue;
            }
            for chunk in doc.chunks(ct) {
                self.model.forward(&mut kv, chunk, 0)?;
                let layout = kv.layout()?;
                let s = loader.store_document(chunk, &Dest::host(&layout, kv.block_map()), 0)?;
                total.written += s.written;
                total.present += s.present;
                total.bytes_written += s.bytes_written;
            }
        }
        Ok(total)
    }

    /// Loads every document of `prompt` into `kv` at its position (keys re-encoded); the
    /// documents must be cached ([`Engine::store_documents`]).
    pub fn load_documents(
        &self,
        loader: &Loader,
        kv: &mut PagedKv,
        prompt: &BlendPrompt<'_>,
    ) -> Result<Vec<LoadStats>, ModelError> {
        let rope = self.rope_params()?;
        let layout = kv.layout()?;
        let dest = Dest::host(&layout, kv.block_map());
        prompt
            .documents
            .iter()
            .zip(prompt.document_starts())
            .map(|(doc, at)| Ok(loader.load_document(doc, at, &rope, &dest)?))
            .collect()
    }

    /// Naive reuse: the question run over the cache as it is (prefix and reused documents).
    pub fn naive_reuse(
        &self,
        kv: &mut PagedKv,
        prompt: &BlendPrompt<'_>,
    ) -> Result<Vec<f32>, ModelError> {
        self.model
            .forward(kv, prompt.question, prompt.document_span().end)
    }

    /// Selective recompute (module doc). `kv` must hold the prefix's exact KV and the
    /// documents' reused KV at their positions; on return it holds the blended cache of the
    /// whole prompt, ready for decoding at `prompt.tokens().len()`.
    pub fn blend(
        &self,
        kv: &mut PagedKv,
        prompt: &BlendPrompt<'_>,
        cfg: &BlendConfig,
    ) -> Result<BlendOutcome, ModelError> {
        self.check_blend(kv, prompt, cfg)?;
        let span = prompt.document_span();
        let doc_tokens: Vec<u32> = prompt.documents.concat();
        let doc_positions: Vec<usize> = span.clone().collect();
        let check = cfg.check_layer;

        // 1. Check pass on a scratch copy of layers 0..=check: fresh K of every document
        //    token at the check layer against the reused one.
        let t0 = Instant::now();
        let mut scratch = kv.clone_layers(check + 1);
        let mut devs = Vec::with_capacity(doc_tokens.len());
        for (toks, pos) in doc_tokens
            .chunks(PREFILL_WINDOW)
            .zip(doc_positions.chunks(PREFILL_WINDOW))
        {
            let mut hook = |v: LayerView<'_>| {
                if v.layer == check {
                    devs.extend(deviations(v.k, v.kv, v.layer, v.positions)?);
                }
                Ok(None)
            };
            self.model
                .run_layers(&mut scratch, toks, pos, check + 1, &mut hook, &mut NoHooks)?;
        }
        drop(scratch);
        let keep = top_indices(&devs, share_of(devs.len(), cfg.ratio));
        let selected: Vec<usize> = keep.iter().map(|&i| doc_positions[i]).collect();
        let check_time = t0.elapsed();

        // 2. Recompute pass: the chosen tokens and the question, every layer.
        let t1 = Instant::now();
        let mut tokens: Vec<u32> = keep.iter().map(|&i| doc_tokens[i]).collect();
        let mut positions = selected.clone();
        tokens.extend_from_slice(prompt.question);
        positions.extend(span.end..span.end + prompt.question.len());
        let n_docs_total = doc_tokens.len();
        let mut schedule = cfg.schedule.iter().peekable();
        let mut hook = |v: LayerView<'_>| {
            let Some(&&(layer, share)) = schedule.peek() else {
                return Ok(None);
            };
            if v.layer != layer {
                return Ok(None);
            }
            schedule.next();
            // Running document tokens come first (positions below the question's).
            let running = v.positions.iter().filter(|&&p| p < span.end).count();
            let dev = deviations(
                &v.k.narrow(0, 0, running)?,
                v.kv,
                v.layer,
                &v.positions[..running],
            )?;
            let mut keep = top_indices(&dev, share_of(n_docs_total, share).min(running));
            keep.extend(running..v.positions.len());
            Ok(Some(keep))
        };
        let out = self.model.run_layers(
            kv,
            &tokens,
            &positions,
            self.model.cfg.num_layers,
            &mut hook,
            &mut NoHooks,
        )?;
        let logits = self.model.logits_of_last(&out.hidden)?;
        let final_recomputed = out.positions.iter().filter(|&&p| p < span.end).count();
        Ok(BlendOutcome {
            logits,
            document_tokens: n_docs_total,
            selected,
            deviations: devs,
            final_recomputed,
            check_time,
            recompute_time: t1.elapsed(),
        })
    }

    /// Log-likelihood (nats) of `continuation` after a prompt of `prompt_len` tokens in `kv`
    /// whose last logits are `logits`: teacher-forced, one pass over the continuation.
    pub fn continuation_log_likelihood(
        &self,
        kv: &mut PagedKv,
        prompt_len: usize,
        logits: &[f32],
        continuation: &[u32],
    ) -> Result<f64, ModelError> {
        if let Some(t) = continuation
            .iter()
            .find(|&&t| t as usize >= self.model.cfg.vocab)
        {
            return Err(ModelError::Invalid(format!(
                "token id {t} outside the vocabulary"
            )));
        }
        let Some((&first, rest)) = continuation.split_first() else {
            return Ok(0.0);
        };
        let mut total = log_softmax_at(logits, first);
        if rest.is_empty() {
            return Ok(total);
        }
        let feed = &continuation[..continuation.len() - 1];
        if prompt_len + feed.len() > kv.capacity() {
            return Err(ModelError::Invalid(format!(
                "{} positions exceed the cache's {}",
                prompt_len + feed.len(),
                kv.capacity()
            )));
        }
        let positions: Vec<usize> = (prompt_len..prompt_len + feed.len()).collect();
        let out = self.model.run_layers(
            kv,
            feed,
            &positions,
            self.model.cfg.num_layers,
            &mut |_| Ok(None),
            &mut NoHooks,
        )?;
        for (row, &next) in self.model.logits_of_rows(&out.hidden)?.iter().zip(rest) {
            total += log_softmax_at(row, next);
        }
        Ok(total)
    }

    fn check_blend(
        &self,
        kv: &PagedKv,
        prompt: &BlendPrompt<'_>,
        cfg: &BlendConfig,
    ) -> Result<(), ModelError> {
        let layers = self.model.cfg.num_layers;
        let bad = |m: String| Err(ModelError::Invalid(m));
        if !(0.0..=1.0).contains(&cfg.ratio) {
            return bad(format!("recompute ratio {} is outside [0, 1]", cfg.ratio));
        }
        if cfg.check_layer >= layers {
            return bad(format!(
                "check layer {} is not below the model's {layers} layers",
                cfg.check_layer
            ));
        }
        let (mut last_layer, mut last_share) = (cfg.check_layer, cfg.ratio);
        for &(layer, share) in &cfg.schedule {
            if layer <= last_layer || layer >= layers {
                return bad(format!(
                    "schedule layer {layer} must come after layer {last_layer} and below {layers}"
                ));
            }
            if !(0.0..=last_share).contains(&share) {
                return bad(format!(
                    "schedule share {share} at layer {layer} must be in [0, {last_share}]"
                ));
            }
            (last_layer, last_share) = (layer, share);
        }
        if prompt.question.is_empty() {
            return bad("the question is empty: blending needs a token to compute".into());
        }
        if prompt.documents.iter().any(Vec::is_empty) || prompt.documents.is_empty() {
            return bad("blending needs at least one document, none empty".into());
        }
        let total = prompt.document_span().end + prompt.question.len();
        if total > kv.capacity() {
            return bad(format!(
                "{total} positions exceed the cache's {}",
                kv.capacity()
            ));
        }
        if let Some(t) = prompt
            .tokens()
            .iter()
            .find(|&&t| t as usize >= self.model.cfg.vocab)
        {
            return bad(format!("token id {t} outside the vocabulary"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_indices_takes_the_largest_in_order() {
        let v = [0.5, 3.0, 1.0, 3.0, -1.0, 2.0];
        assert_eq!(top_indices(&v, 3), vec![1, 3, 5]);
        assert_eq!(top_indices(&v, 0), Vec::<usize>::new());
        assert_eq!(top_indices(&v, 10), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(share_of(200, 0.15), 30);
        assert_eq!(share_of(3, 1.0), 3);
    }
}
