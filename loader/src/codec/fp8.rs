//! The fp8 codec: every element as an OCP e4m3 byte, with a scale per token and head stored
//! in one byte as a small float (5-bit exponent, 3-bit mantissa).
//!
//! e4m3 keeps 3 mantissa bits over exponents -9..8 (largest finite 448). The scale of a
//! (token, head) row is the smallest representable scale with `max |x| / scale <= 448`, so the
//! row's largest value lands within 1/8 of 448. The first form used a power-of-two scale
//! (exact scaling, the largest value anywhere in (224, 448]); measured on SmolLM2 against an
//! exact `absmax / 448` scale it lost agreement (docs/BENCHMARKS.md, "Codecs"), so the scale
//! byte now carries 3 mantissa bits at the same cost: `scale = 2^(e - 20) * (1 + m / 8)`,
//! byte `e << 3 | m`, covering 2^-20 (rows smaller than that keep every value above 1.5e-8
//! normal) to 3840 (rows above 448 * 3840 = 1.7e6 saturate). A scale per token and head
//! (rather than per channel) follows the rows engines write: each row is encoded from itself
//! alone (a per-channel key scale was measured too, and was worse).
//!
//! Stored group: `tokens * heads` scale bytes, then `tokens * heads * head_dim` e4m3 bytes,
//! token-major like the raw plane.

use super::GroupShape;

/// Largest finite e4m3 magnitude.
const E4M3_MAX: f32 = 448.0;
/// Scale byte: `2^(e - SCALE_BIAS) * (1 + m / 8)`.
const SCALE_BIAS: i32 = 20;

pub(super) fn stored_len(shape: &GroupShape) -> usize {
    shape.tokens * shape.heads * (1 + shape.head_dim)
}

/// The scale a scale byte stands for.
pub(super) fn scale_of(b: u8) -> f32 {
    f32::powi(2.0, (b >> 3) as i32 - SCALE_BIAS) * (1.0 + (b & 7) as f32 / 8.0)
}

/// The smallest scale byte whose scale is at least `amax / 448` (saturating at both ends).
pub(super) fn scale_byte(amax: f32) -> u8 {
    if amax.is_nan() || amax <= 0.0 {
        return 0;
    }
    if amax.is_infinite() {
        return 0xFF;
    }
    let want = amax / E4M3_MAX;
    let e = want.log2().floor() as i32;
    if e < -SCALE_BIAS {
        return 0;
    }
    if e > 31 - SCALE_BIAS {
        return 0xFF;
    }
    let m = ((want / f32::powi(2.0, e) - 1.0) * 8.0)
        .ceil()
        .clamp(0.0, 8.0) as u32;
    let mut b = ((e + SCALE_BIAS) as u32 * 8 + m).min(0xFF) as u8;
    // Float rounding in log2 or the division may leave the scale a step short.
    while b < 0xFF && scale_of(b) < want {
        b += 1;
    }
    b
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
        *s = scale_byte(amax);
        let scale = scale_of(*s);
        for (o, v) in c.iter_mut().zip(row) {
            *o = f32_to_e4m3(v / scale);
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
        let scale = scale_of(s);
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
