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

/// How a document token's deviation is measured at a scoring layer (the check layer and each
/// step of a schedule): its fresh row against the reused one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deviation {
    /// `sum((k_new - k_reused)^2)` over heads and dimensions, as LMCache scores.
    #[default]
    K,
    /// The K term plus `sum((v_new - v_reused)^2)`: what the token contributes to attention
    /// outputs changes with V too.
    KV,
    /// The K term divided by `sum(k_new^2)`: the relative change, so that tokens whose keys are
    /// simply large do not win on size alone.
    KRelative,
}

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
    /// How the deviation is measured ([`Deviation::K`] by default).
    pub deviation: Deviation,
    /// The first this many tokens of every stored chunk (each document's start and every
    /// chunk boundary inside it) are always recomputed, counted in `ratio`. A chunk prefilled
    /// alone makes its first tokens its own attention sink; in the prompt they are the most
    /// wrong rows and the ones every later token of the chunk attended to. 0: none forced.
    pub chunk_head_tokens: usize,
    /// Weight each token's deviation by the attention the question pays it at the check
    /// layer (summed over heads and question tokens, measured over the fresh rows of the check
    /// pass): a deviation matters in proportion to how much the answer reads the token.
    pub question_weighted: bool,
    /// Keep the check pass's fresh KV of every document token in layers `0..=check_layer`
    /// (LMCache does: it is computed anyway) instead of discarding the scratch copy. Layer 0
    /// is exact after re-encoding either way; from layer 1 on this repairs every token's rows
    /// up to the check layer at no extra compute. Off, ratio 0 is exactly naive reuse.
    pub keep_check_kv: bool,
}

impl Default for BlendConfig {
    fn default() -> Self {
        BlendConfig {
            check_layer: 1,
            ratio: 0.15,
            schedule: Vec::new(),
            deviation: Deviation::K,
            chunk_head_tokens: 0,
            question_weighted: false,
            keep_check_kv: false,
        }
    }
}

impl BlendConfig {
    /// LMCache's selection at `ratio`: K deviation at layer 1 alone, nothing forced, no
    /// question weight, the check pass's KV discarded (the baseline of docs/BENCHMARKS.md).
    pub fn lmcache(ratio: f64) -> BlendConfig {
        BlendConfig {
            ratio,
            check_layer: 1,
            schedule: Vec::new(),
            deviation: Deviation::K,
            chunk_head_tokens: 0,
            question_weighted: false,
            keep_check_kv: false,
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
    /// What the choice ranked, in prompt order: the deviation, times the question's
    /// attention when `question_weighted`, infinite for forced chunk heads.
    pub scores: Vec<f32>,
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

/// Deviation (`measure`) of the first `running` tokens of a layer's view: their fresh K (and
/// V) against the rows the cache holds at their positions in that layer.
fn deviations(
    v: &LayerView<'_>,
    running: usize,
    measure: Deviation,
) -> Result<Vec<f32>, ModelError> {
    if running == 0 {
        return Ok(Vec::new());
    }
    let rows = |t: &Tensor| -> Result<Vec<f32>, ModelError> {
        Ok(t.narrow(0, 0, running)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let fresh_k = rows(v.k)?;
    let fresh_v = match measure {
        Deviation::KV => rows(v.v)?,
        Deviation::K | Deviation::KRelative => Vec::new(),
    };
    let row = fresh_k.len() / running;
    let sq =
        |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum() };
    Ok(v.positions[..running]
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let k = &fresh_k[i * row..(i + 1) * row];
            let dk = sq(k, v.kv.k_row(v.layer, p));
            match measure {
                Deviation::K => dk,
                Deviation::KV => dk + sq(&fresh_v[i * row..(i + 1) * row], v.kv.v_row(v.layer, p)),
                Deviation::KRelative => {
                    dk / k.iter().map(|x| x * x).sum::<f32>().max(f32::MIN_POSITIVE)
                }
            }
        })
        .collect())
}

/// Indices (into the document tokens) of the first `head` tokens of every stored chunk of
/// every document, ascending: chunks are cut at `chunk_tokens` from each document's start.
fn chunk_heads(documents: &[Vec<u32>], chunk_tokens: usize, head: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut base = 0;
    for d in documents {
        for c in (0..d.len()).step_by(chunk_tokens.max(1)) {
            out.extend(base + c..base + (c + head).min(d.len()));
        }
        base += d.len();
    }
    out
}

/// Collects, at one layer, the attention the running queries pay each position (summed over
/// heads and queries).
struct AttentionMass {
    layer: usize,
    mass: Vec<f32>,
}

impl crate::model::ForwardHooks for AttentionMass {
    fn after_attention(
        &mut self,
        layer: usize,
        probs: &Tensor,
        cols: Option<&[u32]>,
        _positions: &[usize],
    ) -> Result<(), ModelError> {
        if layer != self.layer {
            return Ok(());
        }
        let per_col = probs.sum(0)?.sum(0)?.sum(0)?.to_vec1::<f32>()?;
        for (i, m) in per_col.into_iter().enumerate() {
            let p = cols.map_or(i, |c| c[i] as usize);
            if self.mass.len() <= p {
                self.mass.resize(p + 1, 0.0);
            }
            self.mass[p] += m;
        }
        Ok(())
    }
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
                    devs.extend(deviations(&v, v.positions.len(), cfg.deviation)?);
                }
                Ok(None)
            };
            self.model
                .run_layers(&mut scratch, toks, pos, check + 1, &mut hook, &mut NoHooks)?;
        }
        let mut scores = devs.clone();
        if cfg.question_weighted {
            // The question over the fresh rows, as far as the check layer.
            let q_positions: Vec<usize> = (span.end..span.end + prompt.question.len()).collect();
            let mut mass = AttentionMass {
                layer: check,
                mass: Vec::new(),
            };
            self.model.run_layers(
                &mut scratch,
                prompt.question,
                &q_positions,
                check + 1,
                &mut |_| Ok(None),
                &mut mass,
            )?;
            mass.mass.resize(span.end, 0.0);
            for (s, m) in scores.iter_mut().zip(&mass.mass[span.clone()]) {
                *s *= m;
            }
        }
        if cfg.keep_check_kv {
            for layer in 0..=check {
                let (k, v) = scratch.gather_rows(layer, span.clone());
                kv.write(layer, span.start, &k, &v);
            }
        }
        drop(scratch);
        let ct = self.spec.chunk_tokens as usize;
        for i in chunk_heads(prompt.documents, ct, cfg.chunk_head_tokens) {
            scores[i] = f32::INFINITY;
        }
        let keep = top_indices(&scores, share_of(devs.len(), cfg.ratio));
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
            let dev = deviations(&v, running, cfg.deviation)?;
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
            scores,
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

    #[test]
    fn each_deviation_measure_scores_as_documented() {
        // One layer, one head of 2 dims; cached rows at positions 0 and 1.
        let mut kv = PagedKv::new(1, 1, 2, 4, 4);
        kv.write(0, 0, &[1.0, 0.0, 0.0, 2.0], &[0.0, 0.0, 1.0, 1.0]);
        let dev = candle_core::Device::Cpu;
        let k = Tensor::from_vec(vec![1.0f32, 1.0, 0.0, 4.0, 9.0, 9.0], (3, 1, 2), &dev).unwrap();
        let v = Tensor::from_vec(vec![3.0f32, 0.0, 1.0, 1.0, 9.0, 9.0], (3, 1, 2), &dev).unwrap();
        let view = LayerView {
            layer: 0,
            k: &k,
            v: &v,
            kv: &kv,
            positions: &[0, 1, 2],
        };
        // Only the first two run (the third stands for a question token).
        // K: (1-1)^2 + (1-0)^2 = 1; (0-0)^2 + (4-2)^2 = 4.
        assert_eq!(deviations(&view, 2, Deviation::K).unwrap(), vec![1.0, 4.0]);
        // K and V: + (3-0)^2 + 0 = 9; + 0 + 0.
        assert_eq!(
            deviations(&view, 2, Deviation::KV).unwrap(),
            vec![10.0, 4.0]
        );
        // Relative to |k_new|^2: 1 / 2; 4 / 16.
        assert_eq!(
            deviations(&view, 2, Deviation::KRelative).unwrap(),
            vec![0.5, 0.25]
        );
        assert!(deviations(&view, 0, Deviation::K).unwrap().is_empty());
    }

    #[test]
    fn chunk_heads_are_the_first_tokens_of_every_chunk_of_every_document() {
        let docs = vec![vec![0; 10], vec![0; 3], vec![0; 4]];
        // chunks of 4: [0..4, 4..8, 8..10], [10..13], [13..17]
        assert_eq!(
            chunk_heads(&docs, 4, 2),
            vec![0, 1, 4, 5, 8, 9, 10, 11, 13, 14]
        );
        // a head longer than a chunk's tail stops at the document's end
        assert_eq!(
            chunk_heads(&docs, 4, 3)[6..],
            [8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(chunk_heads(&docs, 4, 0), Vec::<usize>::new());
    }
}
