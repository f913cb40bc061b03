//! Delivery codecs: how the bytes of one token group of one plane are stored in a `.kvc`
//! file (docs/FORMAT.md, "Codecs").
//!
//! A codec works on one **group** at a time: `tokens` (at most the chunk's `group_tokens`)
//! rows of one plane, `[tokens, heads, head_dim]` elements of the chunk's dtype, token-major.
//! Every group is encoded on its own, so a selective or layer-wise load reads and decodes
//! exactly the groups it needs, in any order, on any thread.
//!
//! - [`Codec::Raw`]: the bytes as they are (the only codec of format version 1);
//! - [`Codec::Lossless`] (`lossless.rs`): each float's exponent as a 4-bit index into a
//!   per-group table of its 15 most frequent exponents, sign and mantissa bits as they are;
//!   decodes bit-exact, at several GB/s per core;
//! - [`Codec::Fp8`] (`fp8.rs`): e4m3 with a power-of-two scale per token and head (what
//!   engines hold natively; on SmolLM2 it does not keep 95% of greedy tokens);
//! - [`Codec::Int8`] (`int8.rs`): symmetric 8-bit integers with a one-byte scale per token
//!   and head: fp8's bytes (plus one per row) on a uniform grid, which does;
//! - [`Codec::Kivi4`], [`Codec::Kivi2`] (`kivi.rs`): KIVI-style asymmetric integer
//!   quantization, keys per channel over the group, values per token and head;
//! - [`Codec::Hq4`] (`hq4.rs`): each (token, head) row rotated by a Hadamard transform
//!   (`hadamard.rs`), then symmetric 4-bit codes with a one-byte scale per row: 3.88x of bf16.
//!
//! A lossy codec refuses NaN and infinite KV with a typed error ([`CodecError::OutOfRange`]):
//! a code of them would decode to other values, or poison a whole row's scale.
//!
//! A lossy codec changes the cache (its chunks belong to another namespace, see `spec.rs`);
//! the lossless one does not (a remote tier may store it in place of raw bytes).
//!
//! A [`Coder`] holds the per-thread state (scratch buffers), so encoding and
//! decoding allocate nothing per group once warm; [`with_group_decoded`] runs a closure on a
//! decoded group using a thread-local coder and scratch (the loader's hot path).

mod fp8;
pub mod hadamard;
mod hq4;
mod int8;
mod kivi;
mod lossless;
pub mod stored;

pub use fp8::{e4m3_to_f32, f32_to_e4m3};

use crate::spec::Dtype;
use std::cell::RefCell;
use std::fmt;

/// How payload bytes are encoded (the header's `codec` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Codec {
    /// Bytes as they are.
    #[default]
    Raw = 0,
    /// 3-bit exponent indices into a per-group table + sign/mantissa bits; bit-exact.
    Lossless = 1,
    /// fp8 e4m3, power-of-two scale per token and head.
    Fp8 = 2,
    /// 4-bit KIVI-style group quantization.
    Kivi4 = 3,
    /// 2-bit KIVI-style group quantization.
    Kivi2 = 4,
    /// Symmetric 8-bit integers, one-byte scale per token and head.
    Int8 = 5,
    /// Hadamard-rotated rows, symmetric 4-bit codes, one-byte scale per token and head.
    Hq4 = 6,
}

impl Codec {
    pub const ALL: [Codec; 7] = [
        Codec::Raw,
        Codec::Lossless,
        Codec::Fp8,
        Codec::Kivi4,
        Codec::Kivi2,
        Codec::Int8,
        Codec::Hq4,
    ];

    pub fn from_u8(v: u8) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| *c as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Lossless => "lossless",
            Codec::Fp8 => "fp8",
            Codec::Kivi4 => "kivi4",
            Codec::Kivi2 => "kivi2",
            Codec::Int8 => "int8",
            Codec::Hq4 => "hq4",
        }
    }

    /// The names of every codec this build knows, comma-separated (for messages).
    pub fn known_names() -> String {
        Codec::ALL.map(Codec::name).join(", ")
    }

    /// Parses a codec name (`raw`, `lossless`, `fp8`, `kivi4`, `kivi2`, `int8`, `hq4`).
    pub fn parse(s: &str) -> Result<Codec, CodecError> {
        let l = s.to_ascii_lowercase();
        Codec::ALL
            .into_iter()
            .find(|c| c.name() == l)
            .ok_or_else(|| CodecError::UnknownName(s.to_string()))
    }

    /// Decoding gives back the exact bytes encoded.
    pub fn is_lossless(self) -> bool {
        matches!(self, Codec::Raw | Codec::Lossless)
    }

    /// Whether this codec can encode KV of `dtype` (the lossy ones need a float wider than
    /// 8 bits).
    pub fn supports(self, dtype: Dtype) -> bool {
        self.is_lossless() || matches!(dtype, Dtype::F16 | Dtype::Bf16 | Dtype::F32)
    }

    /// Whether this codec can encode rows of `head_dim` values (hq4's rotation needs a power
    /// of two; the others take any).
    pub fn supports_head_dim(self, head_dim: usize) -> bool {
        self != Codec::Hq4 || head_dim.is_power_of_two()
    }

    /// Stored bytes of a group when they do not depend on the content (lossy codecs and raw).
    pub fn fixed_len(self, shape: &GroupShape) -> Option<usize> {
        match self {
            Codec::Raw => Some(shape.raw_len()),
            Codec::Lossless => None,
            Codec::Fp8 => Some(fp8::stored_len(shape)),
            Codec::Kivi4 => Some(kivi::stored_len::<4>(shape)),
            Codec::Kivi2 => Some(kivi::stored_len::<2>(shape)),
            Codec::Int8 => Some(int8::stored_len(shape)),
            Codec::Hq4 => Some(hq4::stored_len(shape)),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Shape of one group of one plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupShape {
    pub dtype: Dtype,
    /// Plane 0 is K (or an MLA latent), plane 1 is V.
    pub plane: u32,
    /// Whether the chunk holds K/V pairs (plane 0 is keys) rather than an MLA latent.
    pub keys_per_channel: bool,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl GroupShape {
    pub fn elements(&self) -> usize {
        self.tokens * self.heads * self.head_dim
    }
    pub fn raw_len(&self) -> usize {
        self.elements() * self.dtype.size()
    }
    /// Plane quantized per channel (KIVI keys) rather than per token.
    fn per_channel(&self) -> bool {
        self.keys_per_channel && self.plane == 0
    }
}

/// A group could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown codec `{0}` (this build knows {known})", known = Codec::known_names())]
    UnknownName(String),
    #[error("codec {codec} cannot encode {dtype} KV")]
    Unsupported { codec: Codec, dtype: Dtype },
    #[error("codec {codec} cannot code rows of {head_dim} values (it needs a power of two)")]
    HeadDim { codec: Codec, head_dim: usize },
    #[error("codec {codec}: a group decoded to {actual} bytes, its shape needs {expected}")]
    DecodedSize {
        codec: Codec,
        expected: usize,
        actual: usize,
    },
    #[error("codec {codec}: stored group is corrupt: {reason}")]
    Corrupt { codec: Codec, reason: String },
    #[error("codec {codec} cannot encode element {index} of the group: {reason}")]
    OutOfRange {
        codec: Codec,
        index: usize,
        reason: String,
    },
}

/// Per-thread encoder and decoder state: reused across groups, so warm calls allocate nothing.
pub struct Coder {
    lossless: lossless::State,
    values: Vec<f32>,
}

impl Default for Coder {
    fn default() -> Self {
        Self::new()
    }
}

impl Coder {
    pub fn new() -> Coder {
        Coder {
            lossless: lossless::State::new(),
            values: Vec::new(),
        }
    }

    /// Appends the stored form of one group (`raw`, `shape.raw_len()` bytes) to `out`; on an
    /// error `out` is left as it was, whichever codec failed.
    pub fn encode(
        &mut self,
        codec: Codec,
        shape: &GroupShape,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        assert_eq!(raw.len(), shape.raw_len(), "raw group length");
        if !codec.supports(shape.dtype) {
            return Err(CodecError::Unsupported {
                codec,
                dtype: shape.dtype,
            });
        }
        if !codec.supports_head_dim(shape.head_dim) {
            return Err(CodecError::HeadDim {
                codec,
                head_dim: shape.head_dim,
            });
        }
        if !codec.is_lossless() {
            to_f32(shape.dtype, raw, &mut self.values);
            if let Some(index) = self.values.iter().position(|v| !v.is_finite()) {
                return Err(CodecError::OutOfRange {
                    codec,
                    index,
                    reason: format!("{} is not a finite number", self.values[index]),
                });
            }
        }
        let at = out.len();
        let r = match codec {
            Codec::Raw => {
                out.extend_from_slice(raw);
                Ok(())
            }
            Codec::Lossless => self.lossless.encode(shape, raw, out),
            Codec::Fp8 => {
                fp8::encode(shape, &self.values, out);
                Ok(())
            }
            Codec::Kivi4 => {
                kivi::encode::<4>(shape, &self.values, out);
                Ok(())
            }
            Codec::Kivi2 => {
                kivi::encode::<2>(shape, &self.values, out);
                Ok(())
            }
            Codec::Int8 => int8::encode(shape, &self.values, out),
            Codec::Hq4 => hq4::encode(shape, &mut self.values, out),
        };
        if r.is_err() {
            out.truncate(at);
        }
        r
    }

    /// Decodes one stored group into `out` (`shape.raw_len()` bytes).
    pub fn decode(
        &mut self,
        codec: Codec,
        shape: &GroupShape,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<(), CodecError> {
        if out.len() != shape.raw_len() {
            return Err(CodecError::DecodedSize {
                codec,
                expected: shape.raw_len(),
                actual: out.len(),
            });
        }
        if !codec.supports_head_dim(shape.head_dim) {
            return Err(CodecError::HeadDim {
                codec,
                head_dim: shape.head_dim,
            });
        }
        if let Some(n) = codec.fixed_len(shape)
            && n != stored.len()
        {
            return Err(CodecError::Corrupt {
                codec,
                reason: format!("{} stored bytes, the shape needs {n}", stored.len()),
            });
        }
        match codec {
            Codec::Raw => out.copy_from_slice(stored),
            Codec::Lossless => self.lossless.decode(shape, stored, out)?,
            // Straight into `out`, no f32 buffer.
            Codec::Int8 => int8::decode(shape, stored, out),
            // A row at a time through the coder's f32 scratch, into `out`.
            Codec::Hq4 => hq4::decode(shape, stored, &mut self.values, out),
            Codec::Fp8 | Codec::Kivi4 | Codec::Kivi2 => {
                self.values.resize(shape.elements(), 0.0);
                match codec {
                    Codec::Fp8 => fp8::decode(shape, stored, &mut self.values),
                    Codec::Kivi4 => kivi::decode::<4>(shape, stored, &mut self.values),
                    _ => kivi::decode::<2>(shape, stored, &mut self.values),
                }
                from_f32(shape.dtype, &self.values, out);
            }
        }
        Ok(())
    }
}

thread_local! {
    static THREAD_CODER: RefCell<(Coder, Vec<u8>)> = RefCell::new((Coder::new(), Vec::new()));
}

/// Decodes one group with this thread's coder into this thread's scratch and hands the
/// decoded bytes to `f`: the loader's hot path (no allocation once the thread is warm).
pub fn with_group_decoded<R>(
    codec: Codec,
    shape: &GroupShape,
    stored: &[u8],
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, CodecError> {
    THREAD_CODER.with(|c| {
        let mut c = c.borrow_mut();
        let (coder, scratch) = &mut *c;
        scratch.resize(shape.raw_len(), 0);
        coder.decode(codec, shape, stored, scratch)?;
        Ok(f(scratch))
    })
}

/// Sets every NaN or infinite element of `dtype` in `bytes` to +0, leaving the others as
/// they are: what synthetic chunks of random bits ([`crate::format::synth_chunk`]) need
/// before a lossy codec, which refuses non-finite KV.
pub fn zero_non_finite(dtype: Dtype, bytes: &mut [u8]) {
    // Per dtype: element size and the exponent mask of its top 16 (or 32) bits.
    let (size, mask) = match dtype {
        Dtype::F32 => (4, 0x7F80_0000u32),
        Dtype::Bf16 => (2, 0x7F80),
        Dtype::F16 => (2, 0x7C00),
        Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => return,
    };
    for e in bytes.chunks_exact_mut(size) {
        let bits = e.iter().rev().fold(0u32, |a, &b| (a << 8) | b as u32);
        if bits & mask == mask {
            e.fill(0);
        }
    }
}

/// Widens elements of `dtype` to f32 into `out` (resized).
pub fn to_f32(dtype: Dtype, raw: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        Dtype::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        Dtype::Bf16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Dtype::F16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => unreachable!("lossy codecs refuse fp8 KV"),
    }
}

/// Narrows f32 values to elements of `dtype` (round to nearest even) into `out`.
pub fn from_f32(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => unreachable!("lossy codecs refuse fp8 KV"),
    }
}

#[cfg(test)]
mod tests;
