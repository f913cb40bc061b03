//! The fp8 codec: every element as an OCP e4m3 byte, with a power-of-two scale per token and
//! head.
//!
//! e4m3 keeps 3 mantissa bits over exponents -9..8 (largest finite 448), so what matters is
//! that each head's values sit in its range: the scale `2^s` of a (token, head) row is the
//! smallest power of two with `max |x| / 2^s <= 448`. A power of two makes scaling exact and
//! costs one signed byte; because e4m3's relative precision is the same across its normal
//! range, a finer (non power-of-two) scale does not round values any better. Measured on
//! SmolLM2 (docs/BENCHMARKS.md, "Codecs"): a scale byte with 3 mantissa bits (the row's
//! largest value within 1/8 of 448), a per-channel scale for keys, and an exact `absmax / 448`
//! scale changed which values round which way, not how well: none beat the power of two over
//! the prompts measured. A scale per token and head (rather than per channel) follows the rows
//! engines write: each row is encoded from itself alone. Rounding is to nearest, ties to even.
//!
//! Stored group: `tokens * heads` scale exponents (`i8`), then `tokens * heads * head_dim`
//! e4m3 bytes, token-major like the raw plane.

use super::GroupShape;

/// Largest finite e4m3 magnitude.
const E4M3_MAX: f32 = 448.0;

pub(super) fn stored_len(shape: &GroupShape) -> usize {
    shape.tokens * shape.heads * (1 + shape.head_dim)
}

pub(super) fn encode(shape: &GroupShape, values: &[f32], out: &mut Vec<u8>) {
    let rows = shape.tokens * shape.heads;
    let d = shape.head_dim;
    let at = out.len();
    out.resize(at + stored_len(shape), 0);
    let (scales, codes) = out[at..].split_at_mut(rows);
    for ((row, s), c) in values
        .chunks_exact(d)
        .zip(scales.iter_mut())
        .zip(codes.chunks_exact_mut(d))
    {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let exp = if amax > 0.0 && amax.is_finite() {
            (amax / E4M3_MAX).log2().ceil().clamp(-126.0, 127.0) as i32
        } else {
            0
        };
        *s = exp as i8 as u8;
        let inv = f32::powi(2.0, -exp);
        for (o, v) in c.iter_mut().zip(row) {
            *o = f32_to_e4m3(v * inv);
        }
    }
}

pub(super) fn decode(shape: &GroupShape, stored: &[u8], values: &mut [f32]) {
    let rows = shape.tokens * shape.heads;
    let d = shape.head_dim;
    let (scales, codes) = stored.split_at(rows);
    let lut = lut();
    for ((row, &s), c) in values
        .chunks_exact_mut(d)
        .zip(scales.iter())
        .zip(codes.chunks_exact(d))
    {
        let scale = f32::powi(2.0, s as i8 as i32);
        for (v, &b) in row.iter_mut().zip(c) {
            *v = lut[b as usize] * scale;
        }
    }
}

/// e4m3 byte -> value, for all 256 bytes.
fn lut() -> &'static [f32; 256] {
    static LUT: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| std::array::from_fn(|b| e4m3_to_f32(b as u8)))
}

/// The value of an e4m3 byte (NaN for 0x7F and 0xFF).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0x0F) as i32;
    let m = (b & 0x07) as f32;
    if e == 0x0F && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m * f32::powi(2.0, -9)
    } else {
        (1.0 + m / 8.0) * f32::powi(2.0, e - 7)
    };
    sign * mag
}

/// Rounds to the nearest e4m3 value (ties to even), saturating at ±448; NaN stays NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7F;
    }
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127;
    if exp < -6 {
        // Subnormal: multiples of 2^-9.
        let m = (a * 512.0).round_ties_even() as u8;
        return sign | m.min(8);
    }
    let mant = bits & 0x7F_FFFF;
    let mut m = mant >> 20;
    let rem = mant & 0xF_FFFF;
    if rem > 0x8_0000 || (rem == 0x8_0000 && m & 1 == 1) {
        m += 1;
    }
    let mut e = exp + 7;
    if m == 8 {
        m = 0;
        e += 1;
    }
    if e > 15 || (e == 15 && m == 7) {
        return sign | 0x7E;
    }
    sign | ((e as u8) << 3) | m as u8
}
