//! The int8 codec: symmetric 8-bit integers with one scale per token and head.
//!
//! Each (token, head) row of `head_dim` values gets a scale `s >= absmax / 127` and stores
//! `q = round(x / s)` (to nearest, ties to even, clamped to `-127..=127`), decoded as `q * s`:
//! a uniform grid, so every element is within `s / 2` of its value, the row's largest ones
//! included. e4m3 (the fp8 codec) spends the same byte on 3 mantissa bits, so a row's largest
//! values (the ones that decide attention) carry up to 6% error there and at most
//! `1 / 254` of the row's largest value here; on SmolLM2 that is the difference between 80%
//! and 98% identical greedy tokens at the same bytes (docs/BENCHMARKS.md, "Codecs").
//!
//! **The scale is one byte**, `2^(e - 20) * (1 + m / 8)` for the byte `e << 3 | m` (`e` in
//! 0..32, `m` in 0..8; byte 0 is a scale of 0, an all-zero row), the smallest such scale at
//! least `absmax / 127` (rounded UP, so no code clips; the grid then uses 113 to 127 of its
//! 127 steps). It was chosen by measurement against an f16 scale (2 bytes, the smallest f16
//! at least `absmax / 127`, so the grid uses nearly all 127 steps) with the quality harness
//! (examples/codec_quality.rs, variants `int8-scale-byte` and `int8-f16` beside
//! `int8-exact`, an f32 `absmax / 127`), on 20 SmolLM2 prompts: the one-byte scale's greedy
//! and teacher-forced agreement and KL were no worse than the f16 scale's (the differences
//! are within the spread between prompts; docs/BENCHMARKS.md, "Codecs", run 3) and it stores
//! a row of 64 elements in 65 bytes instead of 66: 1.97x of bf16 instead of 1.94x. The byte
//! covers scales from `2^-20 * 1.125` (rows smaller than about 1.4e-4 get that step: an
//! absolute error under 6e-7) to `2^11 * 1.875` (rows up to 487,680); a larger row, and any
//! NaN or infinity, is a typed encode error (every lossy codec refuses non-finite KV).
//!
//! Stored group: `tokens * heads` scale bytes, then
//! `tokens * heads * head_dim` codes (`i8`), token-major like the raw plane.
//!
//! Decoding writes each element's `q * s` straight into the destination in its dtype (f32,
//! bf16 by round to nearest even, f16 through `half`'s slice conversion, which uses F16C when
//! the CPU has it), with no buffer beyond a 64-value block on the stack for f16, in loops the
//! compiler vectorizes (codes widened, converted, multiplied and narrowed a vector at a
//! time: `cvtdq2ps`/`mulps` in the release build), compiled twice, for the SSE2 baseline and
//! for AVX2, picked at run time. `loader/examples/codec_speed.rs` measures it against
//! `memcpy` (docs/BENCHMARKS.md, "Codecs", run 3).

use super::{Codec, CodecError, GroupShape};
use crate::spec::Dtype;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Largest code magnitude (symmetric: -127..=127, -128 unused).
const QMAX: f32 = 127.0;
/// The scale byte's exponent bias: byte `e << 3 | m` is `2^(e - BIAS) * (1 + m / 8)`.
const BIAS: i32 = 20;

pub(super) fn stored_len(shape: &GroupShape) -> usize {
    shape.tokens * shape.heads * (1 + shape.head_dim)
}

/// The scale a byte stands for (exact in f32).
#[inline(always)]
pub(super) fn scale_value(b: u8) -> f32 {
    if b == 0 {
        return 0.0;
    }
    let (e, m) = ((b >> 3) as u32, (b & 7) as u32);
    f32::from_bits(((e + 127 - BIAS as u32) << 23) | (m << 20))
}

/// The byte of the smallest scale at least `want` (finite, >= 0), or `None` when even the
/// largest scale is smaller.
pub(super) fn scale_byte_at_least(want: f32) -> Option<u8> {
    if want == 0.0 {
        return Some(0);
    }
    let bits = want.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127 + BIAS;
    // The mantissa's top 3 bits, rounded up over the other 20.
    let mut m = ((bits & 0x7F_FFFF) + (1 << 20) - 1) >> 20;
    if m == 8 {
        m = 0;
        e += 1;
    }
    if e < 0 || (e == 0 && m == 0) {
        // Below the smallest scale (byte 1; byte 0 is 0).
        return Some(1);
    }
    (e < 32).then_some(((e as u8) << 3) | m as u8)
}

/// The scale byte of a row whose codes reach `qmax` (the smallest covering `absmax / qmax`),
/// and the scale it stands for; a typed error naming `codec` and the row's first element
/// `index` when even the largest scale is smaller. Shared with `hq4`, which stores its scale
/// the same way.
pub(super) fn row_scale(
    row: &[f32],
    qmax: f32,
    codec: Codec,
    index: usize,
) -> Result<(u8, f32), CodecError> {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let b = scale_byte_at_least(amax / qmax).ok_or_else(|| CodecError::OutOfRange {
        codec,
        index,
        reason: format!("a row reaches {amax}, beyond what the scale byte covers"),
    })?;
    Ok((b, scale_value(b)))
}

/// Appends the stored group to `out` (on an error, `Coder::encode` takes it back off).
pub(super) fn encode(
    shape: &GroupShape,
    values: &[f32],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let at = out.len();
    out.resize(at + stored_len(shape), 0);
    let rows = shape.tokens * shape.heads;
    let d = shape.head_dim;
    let (scales, codes) = out[at..].split_at_mut(rows);
    for (r, ((row, s), c)) in values
        .chunks_exact(d)
        .zip(scales.iter_mut())
        .zip(codes.chunks_exact_mut(d))
        .enumerate()
    {
        let scale;
        (*s, scale) = row_scale(row, QMAX, Codec::Int8, r * d)?;
        if scale == 0.0 {
            // An all-zero row: codes stay 0.
            continue;
        }
        for (o, v) in c.iter_mut().zip(row) {
            *o = (v / scale).round_ties_even().clamp(-QMAX, QMAX) as i8 as u8;
        }
    }
    Ok(())
}

/// Decodes a stored group (`stored_len(shape)` bytes) into `out` (`shape.raw_len()` bytes of
/// `shape.dtype`). The same loops, compiled for AVX2 where the CPU has it (8 lanes instead
/// of SSE2's 4; the build's baseline is SSE2).
pub(super) fn decode(shape: &GroupShape, stored: &[u8], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above; `decode_avx2` is `decode_rows`
        // compiled with it, nothing else.
        return unsafe { decode_avx2(shape, stored, out) };
    }
    decode_rows(shape, stored, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_avx2(shape: &GroupShape, stored: &[u8], out: &mut [u8]) {
    decode_rows(shape, stored, out)
}

#[inline(always)]
pub(super) fn decode_rows(shape: &GroupShape, stored: &[u8], out: &mut [u8]) {
    let rows = shape.tokens * shape.heads;
    let d = shape.head_dim;
    let (scales, codes) = stored.split_at(rows);
    let size = shape.dtype.size();
    for ((&s, c), o) in scales
        .iter()
        .zip(codes.chunks_exact(d))
        .zip(out.chunks_exact_mut(d * size))
    {
        let scale = scale_value(s);
        match shape.dtype {
            Dtype::F32 => row_f32(c, scale, o),
            Dtype::Bf16 => row_bf16(c, scale, o),
            Dtype::F16 => row_f16(c, scale, o),
            Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => unreachable!("lossy codecs refuse fp8 KV"),
        }
    }
}

#[inline(always)]
fn value(q: u8, scale: f32) -> f32 {
    q as i8 as f32 * scale
}

#[inline(always)]
fn row_f32(codes: &[u8], scale: f32, out: &mut [u8]) {
    for (o, &q) in out.chunks_exact_mut(4).zip(codes) {
        o.copy_from_slice(&value(q, scale).to_le_bytes());
    }
}

/// bf16 of a finite f32, rounded to nearest even (what `half::bf16::from_f32` gives for
/// finite values, without its NaN branch, so the loop vectorizes).
#[inline(always)]
pub(super) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn row_bf16(codes: &[u8], scale: f32, out: &mut [u8]) {
    for (o, &q) in out.chunks_exact_mut(2).zip(codes) {
        o.copy_from_slice(&bf16_bits(value(q, scale)).to_le_bytes());
    }
}

/// Largest finite f16: `127 * scale` can pass it by less than a scale step for a row of f16
/// KV near the top of the range; it saturates there rather than become infinite.
const F16_MAX: f32 = 65504.0;

fn row_f16(codes: &[u8], scale: f32, out: &mut [u8]) {
    const BLOCK: usize = 64;
    let mut vals = [0f32; BLOCK];
    let mut halves = [f16::ZERO; BLOCK];
    for (c, o) in codes.chunks(BLOCK).zip(out.chunks_mut(2 * BLOCK)) {
        let n = c.len();
        for (v, &q) in vals[..n].iter_mut().zip(c) {
            *v = value(q, scale).clamp(-F16_MAX, F16_MAX);
        }
        halves[..n].convert_from_f32_slice(&vals[..n]);
        for (o, h) in o.chunks_exact_mut(2).zip(&halves[..n]) {
            o.copy_from_slice(&h.to_le_bytes());
        }
    }
}
