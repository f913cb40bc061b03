//! Model specs and namespaces.
//!
//! KV bytes are only reusable by the exact same model configuration: same weights, same dtype,
//! same slice of heads on this tensor-parallel rank, same RoPE, same chunking. [`ModelSpec`]
//! names all of that. Its canonical encoding (fixed field order, length-prefixed strings,
//! little-endian integers, floats as IEEE bits) hashed with blake3 in derive-key mode gives the
//! [`NamespaceId`]; the namespace's directory name is a readable slug of the model id followed
//! by the first 16 hex digits of the id, so people can tell namespaces apart with `ls` while
//! the id keeps them unambiguous.
//!
//! A namespace's **codec** (`codecs`, docs/FORMAT.md) says how its chunks are written. A lossy
//! codec (fp8, int8, kivi4, kivi2) makes different KV, so it is part of the identity: it is
//! appended to the canonical encoding (`"codec"`, then its byte) and so gives another namespace id, and
//! lossy chunks never share keys with raw ones. Raw and lossless chunks hold the same KV, so
//! those codecs leave the encoding (and every existing namespace id) as it was.
//!
//! The encoding is versioned by its derive-key context string: changing a field changes the
//! context (`kvfs namespace v1` -> `v2`), never silently the ids of existing caches.

use crate::codec::Codec;
use crate::error::FormatError;
use crate::identity::{NAMESPACE_SUFFIX_LEN, namespace_suffix};
use std::fmt;

/// Element type of KV tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Dtype {
    F16 = 1,
    Bf16 = 2,
    F32 = 3,
    Fp8E4m3 = 4,
    Fp8E5m2 = 5,
}

impl Dtype {
    pub const ALL: [Dtype; 5] = [
        Dtype::F16,
        Dtype::Bf16,
        Dtype::F32,
        Dtype::Fp8E4m3,
        Dtype::Fp8E5m2,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => 1,
        }
    }

    pub fn from_u8(v: u8) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| *d as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::Fp8E4m3 => "fp8_e4m3",
            Dtype::Fp8E5m2 => "fp8_e5m2",
        }
    }

    pub fn parse(s: &str) -> Option<Dtype> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" | "half" => Some(Dtype::F16),
            "bf16" | "bfloat16" => Some(Dtype::Bf16),
            "f32" | "fp32" | "float32" | "float" => Some(Dtype::F32),
            "fp8" | "fp8_e4m3" | "e4m3" => Some(Dtype::Fp8E4m3),
            "fp8_e5m2" | "e5m2" => Some(Dtype::Fp8E5m2),
            _ => None,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one layer of KV cache holds per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum KvKind {
    /// Separate K and V tensors, each `[heads, head_dim]` per token (two planes).
    KeyValue = 1,
    /// One compressed latent per token (DeepSeek MLA), `[1, latent_dim]` (one plane).
    MlaLatent = 2,
}

impl KvKind {
    /// Number of planes (separate extents) a layer holds: 2 for K/V, 1 for a latent.
    pub fn planes(self) -> usize {
        match self {
            KvKind::KeyValue => 2,
            KvKind::MlaLatent => 1,
        }
    }

    pub fn from_u8(v: u8) -> Option<KvKind> {
        match v {
            1 => Some(KvKind::KeyValue),
            2 => Some(KvKind::MlaLatent),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvKind::KeyValue => "kv",
            KvKind::MlaLatent => "mla",
        }
    }
}

/// Default tokens per chunk (a multiple of every common engine block size: 16, 32, 64, 128).
pub const DEFAULT_CHUNK_TOKENS: u32 = 256;
/// Default tokens per ContiguousKV group inside a chunk: the unit of selective loading.
pub const DEFAULT_GROUP_TOKENS: u32 = 16;

/// Everything that makes KV bytes valid to reuse. Two engines share cache entries exactly when
/// their specs are equal.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Model id, for example `meta-llama/Meta-Llama-3-8B-Instruct`.
    pub model: String,
    /// Weights revision (commit, file digest or version tag).
    pub revision: String,
    pub dtype: Dtype,
    pub num_layers: u32,
    /// KV heads held by this tensor-parallel rank (1 for an MLA latent).
    pub num_kv_heads: u32,
    /// Head dimension (the latent dimension for MLA).
    pub head_dim: u32,
    pub tp_size: u32,
    pub tp_rank: u32,
    pub rope_theta: f64,
    /// RoPE scaling in any canonical textual form the engine uses (empty when none).
    pub rope_scaling: String,
    pub chunk_tokens: u32,
    pub group_tokens: u32,
    pub kv_kind: KvKind,
    /// How this namespace's chunks are written; part of the identity when lossy.
    pub codec: Codec,
}

/// Blake3 identity of a [`ModelSpec`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(pub [u8; 32]);

impl NamespaceId {
    pub fn to_hex(&self) -> String {
        crate::key::hex32(&self.0)
    }
}

impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamespaceId({})", self.to_hex())
    }
}

impl fmt::Display for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Derive-key context of the canonical spec encoding. Bump with any change to the encoding.
const NAMESPACE_CONTEXT: &str = "kvfs 2026-11 namespace v1";

impl ModelSpec {
    /// A spec with the common defaults (TP 1, rank 0, theta 10000, 256-token chunks,
    /// 16-token groups, K/V pairs).
    pub fn new(
        model: &str,
        dtype: Dtype,
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
    ) -> Self {
        ModelSpec {
            model: model.to_string(),
            revision: String::new(),
            dtype,
            num_layers,
            num_kv_heads,
            head_dim,
            tp_size: 1,
            tp_rank: 0,
            rope_theta: 10000.0,
            rope_scaling: String::new(),
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
            group_tokens: DEFAULT_GROUP_TOKENS,
            kv_kind: KvKind::KeyValue,
            codec: Codec::Raw,
        }
    }

    /// Named shapes of well-known models, for `kvfs synth`, examples and benchmarks.
    pub fn preset(name: &str) -> Option<ModelSpec> {
        let mut s = match name.to_ascii_lowercase().as_str() {
            "llama-3-8b" | "llama3-8b" => {
                let mut s = ModelSpec::new("meta-llama/Meta-Llama-3-8B", Dtype::Bf16, 32, 8, 128);
                s.rope_theta = 500000.0;
                s
            }
            "llama-3-70b-tp8" | "llama3-70b-tp8" => {
                let mut s = ModelSpec::new("meta-llama/Meta-Llama-3-70B", Dtype::Bf16, 80, 1, 128);
                s.tp_size = 8;
                s.rope_theta = 500000.0;
                s
            }
            "qwen2.5-7b" => {
                let mut s = ModelSpec::new("Qwen/Qwen2.5-7B-Instruct", Dtype::Bf16, 28, 4, 128);
                s.rope_theta = 1000000.0;
                s
            }
            "smollm2-135m" => {
                let mut s =
                    ModelSpec::new("HuggingFaceTB/SmolLM2-135M-Instruct", Dtype::F32, 30, 3, 64);
                s.rope_theta = 100000.0;
                s
            }
            "deepseek-v2-lite" => {
                let mut s = ModelSpec::new("deepseek-ai/DeepSeek-V2-Lite", Dtype::Bf16, 27, 1, 576);
                s.kv_kind = KvKind::MlaLatent;
                s
            }
            "tiny" => ModelSpec::new("kvfs/tiny-test", Dtype::F16, 2, 2, 64),
            // Chunks of a few KiB (one page of header, 512 bytes of latent), so a million fit
            // on a small disk: scripts/bench-scale.
            "scale-micro" => {
                let mut s = ModelSpec::new("kvfs/scale-micro", Dtype::F16, 1, 1, 16);
                s.kv_kind = KvKind::MlaLatent;
                s.chunk_tokens = 16;
                s
            }
            _ => return None,
        };
        s.revision = "main".into();
        Some(s)
    }

    /// Names accepted by [`ModelSpec::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "llama-3-8b",
        "llama-3-70b-tp8",
        "qwen2.5-7b",
        "smollm2-135m",
        "deepseek-v2-lite",
        "tiny",
        "scale-micro",
    ];

    /// Checks the spec describes a possible cache.
    pub fn validate(&self) -> Result<(), FormatError> {
        let positive = [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("tp_size", self.tp_size),
            ("chunk_tokens", self.chunk_tokens),
            ("group_tokens", self.group_tokens),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(FormatError::field(field, "must be positive"));
            }
        }
        if self.tp_rank >= self.tp_size {
            return Err(FormatError::field("tp_rank", "must be below tp_size"));
        }
        if self.kv_kind == KvKind::MlaLatent && self.num_kv_heads != 1 {
            return Err(FormatError::field(
                "num_kv_heads",
                "an MLA latent has one head",
            ));
        }
        if self.model.is_empty() {
            return Err(FormatError::field("model", "must not be empty"));
        }
        if !self.codec.supports(self.dtype) {
            return Err(FormatError::field(
                "codec",
                format!("{} cannot encode {} KV", self.codec, self.dtype),
            ));
        }
        Ok(())
    }

    /// Canonical byte encoding: the input of the namespace hash.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.model.len() + self.revision.len());
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        put_str(&mut out, &self.model);
        put_str(&mut out, &self.revision);
        out.push(self.dtype as u8);
        out.push(self.kv_kind as u8);
        for v in [
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.tp_size,
            self.tp_rank,
            self.chunk_tokens,
            self.group_tokens,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.rope_theta.to_bits().to_le_bytes());
        put_str(&mut out, &self.rope_scaling);
        if !self.codec.is_lossless() {
            out.extend_from_slice(b"codec");
            out.push(self.codec as u8);
        }
        out
    }

    pub fn namespace_id(&self) -> NamespaceId {
        let mut h = blake3::Hasher::new_derive_key(NAMESPACE_CONTEXT);
        h.update(&self.canonical_bytes());
        NamespaceId(*h.finalize().as_bytes())
    }

    /// Directory name: `<slug>-<first 16 hex digits of the namespace id>`.
    pub fn namespace_dir(&self) -> String {
        format!(
            "{}-{}",
            slug(&self.model),
            &self.namespace_id().to_hex()[..NAMESPACE_SUFFIX_LEN]
        )
    }

    /// Bytes of KV per token for this rank (all layers, all planes).
    pub fn bytes_per_token(&self) -> u64 {
        self.num_layers as u64
            * self.kv_kind.planes() as u64
            * self.num_kv_heads as u64
            * self.head_dim as u64
            * self.dtype.size() as u64
    }

    /// A human-readable JSON object (written as `namespace.json` beside the chunks).
    pub fn to_json(&self) -> String {
        format!(
            concat!(
                "{{\n  \"namespace_id\": \"{}\",\n  \"dir\": \"{}\",\n  \"model\": {},\n  \"revision\": {},\n",
                "  \"dtype\": \"{}\",\n  \"kv_kind\": \"{}\",\n  \"num_layers\": {},\n  \"num_kv_heads\": {},\n",
                "  \"head_dim\": {},\n  \"tp_size\": {},\n  \"tp_rank\": {},\n  \"rope_theta\": {:?},\n",
                "  \"rope_scaling\": {},\n  \"chunk_tokens\": {},\n  \"group_tokens\": {}{}\n}}\n"
            ),
            self.namespace_id(),
            self.namespace_dir(),
            json_str(&self.model),
            json_str(&self.revision),
            self.dtype,
            self.kv_kind.name(),
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.tp_size,
            self.tp_rank,
            self.rope_theta,
            json_str(&self.rope_scaling),
            self.chunk_tokens,
            self.group_tokens,
            if self.codec.is_lossless() {
                String::new()
            } else {
                format!(",\n  \"codec\": \"{}\"", self.codec)
            },
        )
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Lowercase ASCII alphanumerics and `.`, everything else collapsed to `-`, at most 48 bytes.
pub fn slug(model: &str) -> String {
    let mut out = String::new();
    for c in model.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let mut out: String = out
        .trim_matches(|c| c == '-' || c == '.')
        .chars()
        .take(48)
        .collect();
    while out.ends_with('-') || out.ends_with('.') {
        out.pop();
    }
    if out.is_empty() {
        "model".to_string()
    } else {
        out
    }
}

/// Checks a namespace directory name (`<slug>-<16 hex>`) without knowing the spec. Rejects
/// anything that could escape a directory (`/`, `..`, NUL) or that kvfs would never create.
pub fn validate_namespace_dir(name: &str) -> Result<(), FormatError> {
    let bad = || FormatError::BadNamespace(name.to_string());
    let id = namespace_suffix(name).ok_or_else(bad)?;
    let slug_part = &name[..name.len() - id.len() - 1];
    if slug_part.is_empty()
        || slug_part.len() > 48
        || slug_part.starts_with('.')
        || !slug_part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        || slug_part.contains("..")
    {
        return Err(bad());
    }
    if id.len() != NAMESPACE_SUFFIX_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_dir_is_slug_and_id_prefix() {
        let s = ModelSpec::preset("llama-3-8b").unwrap();
        let dir = s.namespace_dir();
        assert!(dir.starts_with("meta-llama-meta-llama-3-8b-"), "{dir}");
        validate_namespace_dir(&dir).unwrap();
        assert_eq!(&dir[dir.len() - 16..], &s.namespace_id().to_hex()[..16]);
    }

    #[test]
    fn every_field_changes_the_namespace() {
        let base = ModelSpec::preset("llama-3-8b").unwrap();
        let id = base.namespace_id();
        #[allow(clippy::type_complexity)]
        let variants: Vec<Box<dyn Fn(&mut ModelSpec)>> = vec![
            Box::new(|s| s.model.push('x')),
            Box::new(|s| s.revision.push('x')),
            Box::new(|s| s.dtype = Dtype::F16),
            Box::new(|s| s.num_layers += 1),
            Box::new(|s| s.num_kv_heads += 1),
            Box::new(|s| s.head_dim += 1),
            Box::new(|s| s.tp_size += 1),
            Box::new(|s| {
                s.tp_size = 2;
                s.tp_rank = 1
            }),
            Box::new(|s| s.rope_theta += 1.0),
            Box::new(|s| s.rope_scaling = "linear:2".into()),
            Box::new(|s| s.chunk_tokens = 128),
            Box::new(|s| s.group_tokens = 32),
            Box::new(|s| s.kv_kind = KvKind::MlaLatent),
            Box::new(|s| s.codec = Codec::Fp8),
            Box::new(|s| s.codec = Codec::Kivi4),
            Box::new(|s| s.codec = Codec::Kivi2),
        ];
        for (i, f) in variants.iter().enumerate() {
            let mut s = base.clone();
            f(&mut s);
            assert_ne!(
                s.namespace_id(),
                id,
                "variant {i} did not change the namespace"
            );
        }
    }

    #[test]
    fn lossy_codecs_get_their_own_namespace_and_lossless_shares_raw() {
        let raw = ModelSpec::preset("llama-3-8b").unwrap();
        let mut lossless = raw.clone();
        lossless.codec = Codec::Lossless;
        assert_eq!(lossless.namespace_id(), raw.namespace_id());
        assert_eq!(lossless.to_json(), raw.to_json());
        let mut ids = std::collections::HashSet::new();
        for c in [Codec::Raw, Codec::Fp8, Codec::Kivi4, Codec::Kivi2] {
            let mut s = raw.clone();
            s.codec = c;
            assert!(ids.insert(s.namespace_id()), "{c}");
            assert_eq!(s.to_json().contains("\"codec\""), !c.is_lossless());
        }
        let mut fp8_kv = raw.clone();
        fp8_kv.dtype = Dtype::Fp8E4m3;
        fp8_kv.codec = Codec::Kivi4;
        assert!(matches!(
            fp8_kv.validate(),
            Err(FormatError::BadField { field: "codec", .. })
        ));
    }

    #[test]
    fn string_fields_are_length_prefixed() {
        let mut a = ModelSpec::preset("tiny").unwrap();
        let mut b = a.clone();
        a.model = "ab".into();
        a.revision = "c".into();
        b.model = "a".into();
        b.revision = "bc".into();
        assert_ne!(a.namespace_id(), b.namespace_id());
    }

    #[test]
    fn bad_namespace_dirs_are_rejected() {
        for bad in [
            "",
            "..",
            "../etc-0123456789abcdef",
            "a/b-0123456789abcdef",
            "x-0123",
            "x-0123456789ABCDEF",
            ".hidden-0123456789abcdef",
            "-0123456789abcdef",
        ] {
            assert!(validate_namespace_dir(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn presets_validate() {
        for p in ModelSpec::PRESETS {
            ModelSpec::preset(p).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn llama_8b_is_128_kib_per_token() {
        assert_eq!(
            ModelSpec::preset("llama-3-8b").unwrap().bytes_per_token(),
            128 * 1024
        );
    }
}
