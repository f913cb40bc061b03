//! KIVI-style low-bit codecs (`kivi4`, `kivi2`): asymmetric integer quantization with `BITS`
//! bits per element, keys per channel and values per token (Liu et al., "KIVI", 2024).
//!
//! Keys have outlier channels (a few channels are large for every token), so quantizing a key
//! along its token axis would spend the range on the outliers; KIVI quantizes keys per
//! channel across tokens instead, here across the tokens of the group (16 by default), and
//! values per token (per token and head here), as their errors mix along tokens in attention.
//! Each quantization group stores its minimum and step as f16: `x ≈ min + q * step` with
//! `q` in `0..2^BITS`.
//!
//! Stored group: the parameters (`min`, `step` as little-endian f16 pairs: per channel for
//! keys, `heads * head_dim` pairs; per token and head for values and MLA latents,
//! `tokens * heads` pairs), then the codes of every element, token-major like the raw plane,
//! packed `8 / BITS` to a byte from the least significant bits up.

use super::GroupShape;
use half::f16;

pub(super) fn stored_len<const BITS: usize>(shape: &GroupShape) -> usize {
    4 * params(shape) + (shape.elements() * BITS).div_ceil(8)
}

/// Number of quantization groups (min/step pairs).
fn params(shape: &GroupShape) -> usize {
    if shape.per_channel() {
        shape.heads * shape.head_dim
    } else {
        shape.tokens * shape.heads
    }
}

/// The quantization group of element `i` (token-major index).
#[inline]
fn group_of(shape: &GroupShape, i: usize) -> usize {
    if shape.per_channel() {
        i % (shape.heads * shape.head_dim)
    } else {
        i / shape.head_dim
    }
}

pub(super) fn encode<const BITS: usize>(shape: &GroupShape, values: &[f32], out: &mut Vec<u8>) {
    let levels = ((1u32 << BITS) - 1) as f32;
    let np = params(shape);
    let at = out.len();
    out.resize(at + stored_len::<BITS>(shape), 0);
    let (par, codes) = out[at..].split_at_mut(4 * np);
    // min and max per group, over the plane in token-major order.
    let mut lo = vec![f32::INFINITY; np];
    let mut hi = vec![f32::NEG_INFINITY; np];
    for (i, &v) in values.iter().enumerate() {
        let g = group_of(shape, i);
        lo[g] = lo[g].min(v);
        hi[g] = hi[g].max(v);
    }
    for g in 0..np {
        let min = f16::from_f32(lo[g]);
        let step = f16::from_f32((hi[g] - min.to_f32()).max(0.0) / levels);
        par[4 * g..4 * g + 2].copy_from_slice(&min.to_le_bytes());
        par[4 * g + 2..4 * g + 4].copy_from_slice(&step.to_le_bytes());
        lo[g] = min.to_f32();
        hi[g] = step.to_f32();
    }
    let per_byte = 8 / BITS;
    for (i, &v) in values.iter().enumerate() {
        let g = group_of(shape, i);
        let (min, step) = (lo[g], hi[g]);
        let q = if step > 0.0 {
            ((v - min) / step).round().clamp(0.0, levels) as u8
        } else {
            0
        };
        codes[i / per_byte] |= q << ((i % per_byte) * BITS);
    }
}

pub(super) fn decode<const BITS: usize>(shape: &GroupShape, stored: &[u8], values: &mut [f32]) {
    let np = params(shape);
    let (par, codes) = stored.split_at(4 * np);
    let per_byte = 8 / BITS;
    let mask = ((1u16 << BITS) - 1) as u8;
    let param = |g: usize| {
        let p = &par[4 * g..4 * g + 4];
        (
            f16::from_le_bytes([p[0], p[1]]).to_f32(),
            f16::from_le_bytes([p[2], p[3]]).to_f32(),
        )
    };
    if shape.per_channel() {
        let c = shape.heads * shape.head_dim;
        for (t, row) in values.chunks_exact_mut(c).enumerate() {
            for (ch, v) in row.iter_mut().enumerate() {
                let i = t * c + ch;
                let q = (codes[i / per_byte] >> ((i % per_byte) * BITS)) & mask;
                let (min, step) = param(ch);
                *v = min + q as f32 * step;
            }
        }
    } else {
        let d = shape.head_dim;
        for (r, row) in values.chunks_exact_mut(d).enumerate() {
            let (min, step) = param(r);
            for (k, v) in row.iter_mut().enumerate() {
                let i = r * d + k;
                let q = (codes[i / per_byte] >> ((i % per_byte) * BITS)) & mask;
                *v = min + q as f32 * step;
            }
        }
    }
}
