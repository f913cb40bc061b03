//! SmolLM2 (llama architecture) on candle CPU ops, with the KV cache in [`PagedKv`].
//!
//! Weights come from a GGUF file through candle's reader and are dequantized to f32 once at
//! load (135M parameters: ~540 MB), so the forward pass is plain f32 matmuls (candle's gemm);
//! its element-wise steps (RMS norm, RoPE, the causally masked softmax) are single loops in
//! [`crate::fused`], the same arithmetic as candle's op chains without their passes. The shape is
//! read from the metadata (`llama.block_count`, `llama.attention.head_count{,_kv}`,
//! `llama.embedding_length`, `llama.rope.freq_base`, ...), never assumed.
//!
//! llama.cpp's converter permutes the Q and K projections so RoPE rotates adjacent pairs
//! (`x[2i], x[2i+1]`, "interleaved"); the forward pass does the same. Grouped-query attention
//! maps query head `h` to KV head `h / (heads / kv_heads)`. A prefill runs in windows of
//! [`PREFILL_WINDOW`] tokens (chunked prefill), each attending to everything before it through
//! the paged cache, which bounds the attention scores' memory for long prompts.

use crate::ModelError;
use crate::fused;
use crate::paged::PagedKv;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Tokens per prefill window.
pub const PREFILL_WINDOW: usize = 512;

/// What a caller may do around each layer's attention (issue 14): observe the attention
/// probabilities ([`crate::importance::ImportanceCollector`]) and hide pruned cached
/// positions ([`crate::pruned`]). The default methods do nothing, which is [`Model::forward`].
pub trait ForwardHooks {
    /// Called before layer `layer` attends. `Some((upto, kept))`: of the positions `0..upto`
    /// the layer attends only to `kept` (sorted, each below `upto`); positions from `upto` on
    /// are attended as usual. The call may block until the layer's cached rows are in place.
    fn before_attention(&mut self, _layer: usize) -> Result<Option<(usize, &[u32])>, ModelError> {
        Ok(None)
    }

    /// Layer `layer`'s attention probabilities `[kv_heads, heads per kv head, n, columns]`
    /// for queries at `positions` (ascending); `cols` names the columns' positions (`None`:
    /// `0..columns`).
    fn after_attention(
        &mut self,
        _layer: usize,
        _probs: &Tensor,
        _cols: Option<&[u32]>,
        _positions: &[usize],
    ) -> Result<(), ModelError> {
        Ok(())
    }
}

/// No hooks: a plain forward pass.
pub struct NoHooks;
impl ForwardHooks for NoHooks {}

/// Model shape from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Vec<f32>,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A loaded model: f32 weights on the CPU.
pub struct Model {
    pub cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Tensor,
    /// Per-pair inverse frequencies `theta^(-2i/d)`.
    inv_freq: Vec<f32>,
}

fn md<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, ModelError> {
    c.metadata
        .get(key)
        .ok_or_else(|| ModelError::Format(format!("GGUF metadata lacks {key}")))
}

/// A (norm weight) tensor's values.
fn values(t: Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn md_u(c: &gguf_file::Content, key: &str) -> Result<usize, ModelError> {
    let v = md(c, key)?;
    Ok(v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))?)
}

impl Model {
    /// Reads `path`: metadata, tokenizer and dequantized weights.
    pub fn load(path: &Path) -> Result<(Model, crate::Tokenizer), ModelError> {
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::Io {
            path: path.into(),
            source: e,
        })?;
        let c = gguf_file::Content::read(&mut f)
            .map_err(|e| ModelError::Format(format!("{}: {e}", path.display())))?;
        let arch = md(&c, "general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            return Err(ModelError::Format(format!(
                "architecture {arch}, expected llama"
            )));
        }
        let num_heads = md_u(&c, "llama.attention.head_count")?;
        let hidden = md_u(&c, "llama.embedding_length")?;
        let tokens: Vec<String> = md(&c, "tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()?;
        let cfg = Config {
            num_layers: md_u(&c, "llama.block_count")?,
            num_heads,
            num_kv_heads: md_u(&c, "llama.attention.head_count_kv")?,
            head_dim: hidden / num_heads,
            hidden,
            ffn: md_u(&c, "llama.feed_forward_length")?,
            vocab: tokens.len(),
            context: md_u(&c, "llama.context_length")?,
            rope_theta: md(&c, "llama.rope.freq_base")?.to_f32()?,
            rms_eps: md(&c, "llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
        };
        if cfg.num_heads % cfg.num_kv_heads != 0 || hidden % num_heads != 0 {
            return Err(ModelError::Format(format!(
                "inconsistent attention shape {cfg:?}"
            )));
        }
        let merges: Vec<String> = md(&c, "tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()?;
        let types = c
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect());
        let id = |k: &str| c.metadata.get(k).and_then(|v| v.to_u32().ok());
        let tok = crate::Tokenizer::new(
            tokens,
            &merges,
            types,
            id("tokenizer.ggml.bos_token_id"),
            id("tokenizer.ggml.eos_token_id"),
        )?;

        let dev = Device::Cpu;
        let mut get = |name: &str| -> Result<Tensor, ModelError> {
            let q = c
                .tensor(&mut f, name, &dev)
                .map_err(|e| ModelError::Format(format!("tensor {name}: {e}")))?;
            Ok(q.dequantize(&dev)?.to_dtype(DType::F32)?)
        };
        let embed = get("token_embd.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: values(get(&format!("{p}.attn_norm.weight"))?)?,
                wq: get(&format!("{p}.attn_q.weight"))?,
                wk: get(&format!("{p}.attn_k.weight"))?,
                wv: get(&format!("{p}.attn_v.weight"))?,
                wo: get(&format!("{p}.attn_output.weight"))?,
                ffn_norm: values(get(&format!("{p}.ffn_norm.weight"))?)?,
                gate: get(&format!("{p}.ffn_gate.weight"))?,
                up: get(&format!("{p}.ffn_up.weight"))?,
                down: get(&format!("{p}.ffn_down.weight"))?,
            });
        }
        let norm = values(get("output_norm.weight")?)?;
        let lm_head = if c.tensor_infos.contains_key("output.weight") {
            get("output.weight")?
        } else {
            embed.clone() // tied embeddings
        };
        let half = cfg.head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        Ok((
            Model {
                cfg,
                embed,
                layers,
                norm,
                lm_head,
                inv_freq,
            },
            tok,
        ))
    }

    /// A paged cache shaped for this model.
    pub fn new_cache(&self, block_size: usize, max_tokens: usize) -> PagedKv {
        PagedKv::new(
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            block_size,
            max_tokens,
        )
    }

    /// Runs `tokens` at positions `start..` (positions `0..start` must already be in `kv`)
    /// and returns the logits of the last token.
    pub fn forward(
        &self,
        kv: &mut PagedKv,
        tokens: &[u32],
        start: usize,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_hooked(kv, tokens, start, &mut NoHooks)
    }

    /// [`Model::forward`] with [`ForwardHooks`] around each layer's attention.
    pub fn forward_hooked(
        &self,
        kv: &mut PagedKv,
        tokens: &[u32],
        start: usize,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Invalid("no tokens to run".into()));
        }
        self.check_run(kv, tokens, start)?;
        let mut logits = Vec::new();
        let mut pos = start;
        for window in tokens.chunks(PREFILL_WINDOW) {
            logits = self.forward_window(kv, window, pos, hooks)?;
            pos += window.len();
        }
        Ok(logits)
    }

    /// The positions fit the cache and the tokens the vocabulary.
    fn check_run(&self, kv: &PagedKv, tokens: &[u32], start: usize) -> Result<(), ModelError> {
        if start + tokens.len() > kv.capacity() {
            return Err(ModelError::Invalid(format!(
                "{} positions exceed the cache's {}",
                start + tokens.len(),
                kv.capacity()
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} outside the vocabulary"
            )));
        }
        Ok(())
    }

    /// Like [`Model::forward`] for at most [`PREFILL_WINDOW`] tokens, returning the logits of
    /// every token (`tokens.len() * vocab`, token-major): teacher-forced scoring in one pass.
    pub fn forward_all(
        &self,
        kv: &mut PagedKv,
        tokens: &[u32],
        start: usize,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() || tokens.len() > PREFILL_WINDOW {
            return Err(ModelError::Invalid(format!(
                "forward_all takes 1..={PREFILL_WINDOW} tokens, not {}",
                tokens.len()
            )));
        }
        self.check_run(kv, tokens, start)?;
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let x = self.run_layers(
            kv,
            tokens,
            &positions,
            self.cfg.num_layers,
            &mut |_| Ok(None),
            &mut NoHooks,
        )?;
        Ok(self.logits_of_rows(&x.hidden)?.concat())
    }

    /// RMS norm of each row of `x` (`[n, hidden]`) scaled by `w` ([`fused::rms_norm`]).
    fn rms_norm(&self, x: &Tensor, w: &[f32]) -> Result<Tensor, ModelError> {
        let (n, d) = x.dims2()?;
        let rows = x.flatten_all()?.to_vec1::<f32>()?;
        let out = fused::rms_norm(&rows, w, self.cfg.rms_eps as f32);
        Ok(Tensor::from_vec(out, (n, d), &Device::Cpu)?)
    }

    /// `h @ w^T` shaped `[n, heads, head_dim]`, RoPE'd at the tables' positions.
    fn project_rope(
        &self,
        h: &Tensor,
        w: &Tensor,
        heads: usize,
        rope: &RopeTables,
    ) -> Result<Tensor, ModelError> {
        let n = h.dims2()?.0;
        let hd = self.cfg.head_dim;
        let mut x = h.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        fused::rope_interleaved(&mut x, heads, hd, &rope.cos, &rope.sin);
        Ok(Tensor::from_vec(x, (n, heads, hd), &Device::Cpu)?)
    }

    fn forward_window(
        &self,
        kv: &mut PagedKv,
        tokens: &[u32],
        start: usize,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Vec<f32>, ModelError> {
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let x = self.run_layers(
            kv,
            tokens,
            &positions,
            self.cfg.num_layers,
            &mut |_| Ok(None),
            hooks,
        )?;
        self.logits_of_last(&x.hidden)
    }

    /// Runs `tokens` at `positions` (ascending, not necessarily contiguous) through layers
    /// `0..layers`. In each layer the running tokens' K and V rows are written into `kv` at
    /// their positions, then each token attends to every row of `kv` at a position up to its
    /// own. Rows of other positions must already be in `kv`: this is how a prefill window
    /// attends to the cache before it, and how blending recomputes a subset of tokens among
    /// reused ones (`crate::blend`). Before a layer writes, `hook` sees its fresh K and may
    /// return which of the running tokens go on (by index, ascending); the others stop there.
    pub(crate) fn run_layers(
        &self,
        kv: &mut PagedKv,
        tokens: &[u32],
        positions: &[usize],
        layers: usize,
        hook: &mut LayerHook<'_>,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Hidden, ModelError> {
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let group = nh / nkv;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let mut positions = positions.to_vec();
        let ids = Tensor::new(tokens, &dev)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let mut rope = RopeTables::new(&self.inv_freq, &positions);
        for (li, l) in self.layers.iter().enumerate().take(layers) {
            let n = positions.len();
            let h = self.rms_norm(&x, &l.attn_norm)?;
            let mut q = self.project_rope(&h, &l.wq, nh, &rope)?;
            let mut k = self.project_rope(&h, &l.wk, nkv, &rope)?;
            let mut v = h.matmul(&l.wv.t()?)?.reshape((n, nkv, hd))?;
            // before anything touches this layer's rows: a load may be filling them until then
            let pruned = hooks
                .before_attention(li)?
                .map(|(upto, kept)| (upto, kept.to_vec()));
            if let Some(keep) = hook(LayerView {
                layer: li,
                k: &k,
                v: &v,
                kv,
                positions: &positions,
            })? {
                if keep.is_empty() {
                    return Err(ModelError::Invalid(format!(
                        "layer {li}: no token left to run"
                    )));
                }
                let idx = Tensor::new(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), &dev)?;
                x = x.index_select(&idx, 0)?;
                q = q.index_select(&idx, 0)?;
                k = k.index_select(&idx, 0)?;
                v = v.index_select(&idx, 0)?;
                positions = keep.iter().map(|&i| positions[i]).collect();
                rope = RopeTables::new(&self.inv_freq, &positions);
            }
            let n = positions.len();
            let k_rows = k.flatten_all()?.to_vec1::<f32>()?;
            let v_rows = v.flatten_all()?.to_vec1::<f32>()?;
            let row = nkv * hd;
            write_runs(kv, li, &positions, &k_rows, &v_rows, row);
            let total = positions[n - 1] + 1;
            let cols = pruned.map(|(upto, kept)| crate::pruned::columns(upto, &kept, total));
            // K and V gathered head-major ([nkv, width, hd]) straight from the blocks; query i
            // (at positions[i]) sees the columns at positions <= positions[i], a prefix of them
            let (kc, vc) = match &cols {
                None => kv.gather_heads(li, 0..total),
                Some(cols) => kv.gather_heads(li, cols.iter().map(|&c| c as usize)),
            };
            let width = cols.as_ref().map_or(total, Vec::len);
            let visible = fused::visible_counts(&positions, cols.as_deref(), width);
            let kc = Tensor::from_vec(kc, (nkv, width, hd), &dev)?;
            let vc = Tensor::from_vec(vc, (nkv, width, hd), &dev)?;
            // [nh, n, hd] -> [nkv, group * n, hd]: query heads of one KV head side by side.
            let q = q
                .transpose(0, 1)?
                .contiguous()?
                .reshape((nkv, group * n, hd))?;
            let mut probs = q.matmul(&kc.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            fused::softmax_causal(&mut probs, width, scale, &visible);
            let att = Tensor::from_vec(probs, (nkv, group, n, width), &dev)?;
            hooks.after_attention(li, &att, cols.as_deref(), &positions)?;
            let att = att.reshape((nkv, group * n, width))?;
            let o = att
                .matmul(&vc)?
                .reshape((nh, n, hd))?
                .transpose(0, 1)?
                .reshape((n, nh * hd))?;
            x = (x + o.matmul(&l.wo.t()?)?)?;
            let h = self.rms_norm(&x, &l.ffn_norm)?;
            let g = h.matmul(&l.gate.t()?)?.silu()?;
            let u = h.matmul(&l.up.t()?)?;
            x = (x + (g * u)?.matmul(&l.down.t()?)?)?;
        }
        Ok(Hidden {
            hidden: x,
            positions,
        })
    }

    /// Logits of the last row of hidden states `x` (`[n, hidden]`).
    pub(crate) fn logits_of_last(&self, x: &Tensor) -> Result<Vec<f32>, ModelError> {
        let n = x.dims2()?.0;
        Ok(self.logits_of_rows(&x.narrow(0, n - 1, 1)?)?.remove(0))
    }

    /// Logits of every row of hidden states `x` (`[n, hidden]`).
    pub(crate) fn logits_of_rows(&self, x: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
        let x = self.rms_norm(x, &self.norm)?;
        Ok(x.matmul(&self.lm_head.t()?)?.to_vec2::<f32>()?)
    }
}

/// What [`Model::run_layers`] returns: the hidden states of the tokens that ran through the
/// last layer, and their positions.
pub(crate) struct Hidden {
    pub hidden: Tensor,
    pub positions: Vec<usize>,
}

/// What a [`LayerHook`] sees of one layer: its index, the running tokens' fresh K (after
/// RoPE, `[n, kv_heads, head_dim]`) and V, the cache before this layer's rows are written, and the
/// tokens' positions.
pub(crate) struct LayerView<'a> {
    pub layer: usize,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub kv: &'a PagedKv,
    pub positions: &'a [usize],
}

/// Called by [`Model::run_layers`] in each layer; `Some(indices)` keeps only those tokens.
pub(crate) type LayerHook<'a> =
    dyn FnMut(LayerView<'_>) -> Result<Option<Vec<usize>>, ModelError> + 'a;

/// `cos` and `sin` of every (position, pair), `[n, head_dim / 2]` row-major.
struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTables {
    fn new(inv_freq: &[f32], positions: &[usize]) -> RopeTables {
        let (n, half) = (positions.len(), inv_freq.len());
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in positions {
            for f in inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTables { cos, sin }
    }
}

/// Writes rows (`row` floats each) for ascending `positions`, one call per contiguous run.
fn write_runs(
    kv: &mut PagedKv,
    layer: usize,
    positions: &[usize],
    k: &[f32],
    v: &[f32],
    row: usize,
) {
    let mut i = 0;
    while i < positions.len() {
        let mut j = i + 1;
        while j < positions.len() && positions[j] == positions[j - 1] + 1 {
            j += 1;
        }
        kv.write(
            layer,
            positions[i],
            &k[i * row..j * row],
            &v[i * row..j * row],
        );
        i = j;
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
