//! RoPE re-encoding: moving cached keys from the positions they were computed at to new ones.
//!
//! Rotary position embeddings rotate each pair `(x_a, x_b)` of a key's rotary dimensions by
//! the angle `position * inv_freq[i]`, with `inv_freq[i] = theta^(-2i / rotary_dim)`. Rotations
//! compose, so a key computed at position `p` becomes the key at position `q` by one more
//! rotation by `(q - p) * inv_freq[i]`: one complex multiply per pair, independent of the
//! token's content. That is what a blending engine (docs/BLEND.md) does to a
//! position-independent chunk (format v2) loaded at a new place. V has no rotation.
//!
//! [`RopeParams`] holds what the rotation needs and where it comes from: theta and the
//! scaling from the namespace's [`ModelSpec`]; the rotary dimension (the head dimension unless
//! the model rotates only part of it) and the pairing, which the engine knows from its
//! layout of the head dimension:
//! - [`RopePairing::Interleaved`]: pairs are adjacent, `(x[2i], x[2i+1])` (GPT-J, and llama.cpp,
//!   whose converter permutes the Q/K projections to get there);
//! - [`RopePairing::HalfSplit`]: pairs are `(x[i], x[i + rotary_dim/2])` (GPT-NeoX, Hugging Face
//!   and vLLM's Llama).
//!
//! Scaling: none, or `linear:<factor>` (positions divided by the factor) are pure rotations
//! and are re-encoded. Anything else in `rope_scaling` (YaRN, Llama-3's frequency-dependent
//! scaling, dynamic NTK whose frequencies depend on the sequence length) and MLA latents
//! (the rotary part of DeepSeek's key is a separate decoupled vector) are refused with
//! [`RopeError::Unsupported`] rather than re-encoded wrongly. Angles are computed in f64 and
//! the rotation in f32; f16 and bf16 rows are widened to f32, rotated and rounded back
//! (round to nearest even); fp8 rows are refused.

use crate::spec::{Dtype, KvKind, ModelSpec};

/// Which dimensions of a head form a rotated pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopePairing {
    /// `(x[2i], x[2i + 1])`.
    Interleaved,
    /// `(x[i], x[i + rotary_dim / 2])`.
    HalfSplit,
}

/// Why keys cannot be re-encoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RopeError {
    #[error("cannot re-encode RoPE: {0}")]
    Unsupported(String),
    #[error("cannot re-encode RoPE: {len} bytes are not whole rows of {row} bytes")]
    Shape { len: usize, row: usize },
}

/// Everything a key rotation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    pub theta: f64,
    pub head_dim: usize,
    /// Leading dimensions of each head that are rotated (even, at most `head_dim`).
    pub rotary_dim: usize,
    pub pairing: RopePairing,
    /// Positions are divided by this (1 without scaling).
    pub linear_factor: f64,
}

impl RopeParams {
    /// The parameters of `spec` (theta, scaling, head dimension as rotary dimension) with the
    /// engine's `pairing`; refuses what cannot be re-encoded by a plain rotation.
    pub fn from_spec(spec: &ModelSpec, pairing: RopePairing) -> Result<RopeParams, RopeError> {
        if spec.kv_kind == KvKind::MlaLatent {
            return Err(RopeError::Unsupported(
                "an MLA latent carries its rotary key apart from the latent".into(),
            ));
        }
        if !(spec.rope_theta.is_finite() && spec.rope_theta > 1.0) {
            return Err(RopeError::Unsupported(format!(
                "rope_theta {} is not a base above 1",
                spec.rope_theta
            )));
        }
        let linear_factor = parse_scaling(&spec.rope_scaling)?;
        RopeParams {
            theta: spec.rope_theta,
            head_dim: spec.head_dim as usize,
            rotary_dim: spec.head_dim as usize,
            pairing,
            linear_factor,
        }
        .with_rotary_dim(spec.head_dim as usize)
    }

    /// The same with only the first `rotary_dim` dimensions of each head rotated (partial
    /// rotary embeddings).
    pub fn with_rotary_dim(mut self, rotary_dim: usize) -> Result<RopeParams, RopeError> {
        if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > self.head_dim {
            return Err(RopeError::Unsupported(format!(
                "rotary dimension {rotary_dim} is not even and within head dimension {}",
                self.head_dim
            )));
        }
        self.rotary_dim = rotary_dim;
        Ok(self)
    }

    /// `cos` and `sin` of the rotation by `delta` positions, one per pair.
    fn angles(&self, delta: i64) -> Vec<(f32, f32)> {
        let half = self.rotary_dim / 2;
        (0..half)
            .map(|i| {
                let inv = self.theta.powf(-((2 * i) as f64) / self.rotary_dim as f64);
                let a = delta as f64 / self.linear_factor * inv;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect()
    }

    /// Index of the two dimensions of pair `i` within a head.
    fn pair(&self, i: usize) -> (usize, usize) {
        match self.pairing {
            RopePairing::Interleaved => (2 * i, 2 * i + 1),
            RopePairing::HalfSplit => (i, i + self.rotary_dim / 2),
        }
    }

    /// Rotates f32 key rows (`[tokens, heads, head_dim]`, any number of tokens) by `delta`
    /// positions: keys computed at `p` become the keys at `p + delta`.
    pub fn rotate_f32(&self, keys: &mut [f32], delta: i64) -> Result<(), RopeError> {
        if keys.len() % self.head_dim != 0 {
            return Err(RopeError::Shape {
                len: keys.len() * 4,
                row: self.head_dim * 4,
            });
        }
        if delta == 0 {
            return Ok(());
        }
        let cs = self.angles(delta);
        for head in keys.chunks_exact_mut(self.head_dim) {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = self.pair(i);
                let (x, y) = (head[a], head[b]);
                head[a] = x * c - y * s;
                head[b] = x * s + y * c;
            }
        }
        Ok(())
    }

    /// Rotates key rows held as bytes of `dtype` (little-endian, `[tokens, heads, head_dim]`)
    /// by `delta` positions.
    pub fn rotate_bytes(&self, dtype: Dtype, keys: &mut [u8], delta: i64) -> Result<(), RopeError> {
        let size = dtype.size();
        let row = self.head_dim * size;
        if keys.len() % row != 0 {
            return Err(RopeError::Shape {
                len: keys.len(),
                row,
            });
        }
        let (widen, narrow): (Widen, Narrow) = match dtype {
            Dtype::F32 => (
                |b| f32::from_le_bytes(b.try_into().unwrap()),
                |v, b| b.copy_from_slice(&v.to_le_bytes()),
            ),
            Dtype::Bf16 => (
                |b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
                |v, b| b.copy_from_slice(&f32_to_bf16(v).to_le_bytes()),
            ),
            Dtype::F16 => (
                |b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
                |v, b| b.copy_from_slice(&f32_to_f16(v).to_le_bytes()),
            ),
            Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => {
                return Err(RopeError::Unsupported(format!(
                    "{dtype} keys (rotate before quantizing to fp8)"
                )));
            }
        };
        if delta == 0 {
            return Ok(());
        }
        let mut wide: Vec<f32> = keys.chunks_exact(size).map(widen).collect();
        self.rotate_f32(&mut wide, delta)?;
        for (v, b) in wide.into_iter().zip(keys.chunks_exact_mut(size)) {
            narrow(v, b);
        }
        Ok(())
    }
}

/// Reads one element as f32.
type Widen = fn(&[u8]) -> f32;
/// Writes one f32 as an element.
type Narrow = fn(f32, &mut [u8]);

/// The linear factor of a `rope_scaling` string: 1 for none, `F` for `linear:F`.
fn parse_scaling(s: &str) -> Result<f64, RopeError> {
    if s.is_empty() {
        return Ok(1.0);
    }
    let factor = s
        .strip_prefix("linear:")
        .and_then(|f| f.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0);
    factor.ok_or_else(|| {
        RopeError::Unsupported(format!(
            "rope scaling `{s}` (only none and `linear:<factor>` are plain rotations)"
        ))
    })
}

/// bf16 of `v`, rounded to nearest even (NaN stays NaN).
fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// f32 of an IEEE half.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24, exact in f32.
            let v = m as f32 * f32::powi(2.0, -24);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// IEEE half of `v`, rounded to nearest even, overflowing to infinity.
fn f32_to_f16(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        // Subnormal half: shift the mantissa (with its implicit bit) into place, rounding.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rest = m & ((1 << shift) - 1);
        let mid = 1 << (shift - 1);
        let round = (rest > mid || (rest == mid && half & 1 == 1)) as u32;
        return sign | (half + round) as u16;
    }
    let half = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    let round = (rest > 0x1000 || (rest == 0x1000 && half & 1 == 1)) as u32;
    // A carry out of the mantissa correctly bumps the exponent (to infinity at the top).
    sign | (half + round) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairing: RopePairing) -> RopeParams {
        let mut spec = ModelSpec::preset("smollm2-135m").unwrap();
        spec.rope_theta = 10000.0;
        RopeParams::from_spec(&spec, pairing).unwrap()
    }

    /// Rotating the keys of position p by q - p gives what rotating the raw vector by q gives
    /// (the model's own RoPE), for both pairings.
    #[test]
    fn rotation_by_delta_composes_to_the_target_position() {
        for pairing in [RopePairing::Interleaved, RopePairing::HalfSplit] {
            let r = params(pairing);
            let raw: Vec<f32> = (0..2 * 64)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let at = |p: i64| {
                let mut k = raw.clone();
                r.rotate_f32(&mut k, p).unwrap();
                k
            };
            let mut moved = at(17);
            r.rotate_f32(&mut moved, 900 - 17).unwrap();
            let want = at(900);
            for (a, b) in moved.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{pairing:?}: {a} vs {b}");
            }
            // Norms of every pair are kept, and moving back restores the original.
            r.rotate_f32(&mut moved, -900).unwrap();
            for (a, b) in moved.iter().zip(&raw) {
                assert!((a - b).abs() < 1e-4, "{pairing:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn pairings_rotate_different_dimensions() {
        let mut a: Vec<f32> = vec![0.0; 64];
        a[1] = 1.0;
        let mut b = a.clone();
        params(RopePairing::Interleaved)
            .rotate_f32(&mut a, 1)
            .unwrap();
        params(RopePairing::HalfSplit)
            .rotate_f32(&mut b, 1)
            .unwrap();
        // Interleaved: dim 1 pairs with dim 0 (frequency 1); half-split: with dim 33.
        assert!((a[0] + 1f32.sin()).abs() < 1e-6 && a[33] == 0.0);
        assert!(b[0] == 0.0 && b[33] != 0.0);
    }

    #[test]
    fn partial_rotary_and_linear_scaling() {
        let mut spec = ModelSpec::preset("smollm2-135m").unwrap();
        spec.rope_scaling = "linear:4".into();
        let r = RopeParams::from_spec(&spec, RopePairing::HalfSplit)
            .unwrap()
            .with_rotary_dim(32)
            .unwrap();
        let mut k: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let before = k.clone();
        r.rotate_f32(&mut k, 8).unwrap();
        assert_eq!(
            &k[32..],
            &before[32..],
            "dimensions past rotary_dim are not rotated"
        );
        // Pair 0 (dims 0 and 16) turns by 8 / 4 = 2 radians.
        let (c, s) = (2f32.cos(), 2f32.sin());
        assert!((k[0] - (0.0 * c - 16.0 * s)).abs() < 1e-4);
        assert!((k[16] - (0.0 * s + 16.0 * c)).abs() < 1e-4);
    }

    #[test]
    fn typed_errors_for_what_cannot_be_reencoded() {
        let mut spec = ModelSpec::preset("llama-3-8b").unwrap();
        spec.rope_scaling = "llama3:8,1,4,8192".into();
        assert!(matches!(
            RopeParams::from_spec(&spec, RopePairing::HalfSplit),
            Err(RopeError::Unsupported(m)) if m.contains("llama3")
        ));
        let mla = ModelSpec::preset("deepseek-v2-lite").unwrap();
        assert!(matches!(
            RopeParams::from_spec(&mla, RopePairing::HalfSplit),
            Err(RopeError::Unsupported(_))
        ));
        let r = params(RopePairing::Interleaved);
        assert!(r.clone().with_rotary_dim(63).is_err());
        assert!(r.clone().with_rotary_dim(128).is_err());
        let mut bytes = vec![0u8; 64];
        assert!(matches!(
            r.rotate_bytes(Dtype::Fp8E4m3, &mut bytes, 3),
            Err(RopeError::Unsupported(_))
        ));
        assert!(matches!(
            r.rotate_bytes(Dtype::F16, &mut bytes[..62], 3),
            Err(RopeError::Shape { .. })
        ));
    }

    /// f16 and bf16 rows rotate like f32 rows, within their precision.
    #[test]
    fn half_precision_rows_rotate_like_f32() {
        let r = params(RopePairing::Interleaved);
        let vals: Vec<f32> = (0..3 * 64)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0)
            .collect();
        let mut want = vals.clone();
        r.rotate_f32(&mut want, 321).unwrap();
        for (dtype, tol) in [(Dtype::F16, 4e-3), (Dtype::Bf16, 3e-2), (Dtype::F32, 1e-6)] {
            let mut bytes: Vec<u8> = Vec::new();
            for &v in &vals {
                match dtype {
                    Dtype::F16 => bytes.extend_from_slice(&f32_to_f16(v).to_le_bytes()),
                    Dtype::Bf16 => bytes.extend_from_slice(&f32_to_bf16(v).to_le_bytes()),
                    _ => bytes.extend_from_slice(&v.to_le_bytes()),
                }
            }
            r.rotate_bytes(dtype, &mut bytes, 321).unwrap();
            for (i, w) in want.iter().enumerate() {
                let got = match dtype {
                    Dtype::F16 => f16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
                    Dtype::Bf16 => f32::from_bits(
                        (u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32) << 16,
                    ),
                    _ => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()),
                };
                assert!(
                    (got - w).abs() <= tol * w.abs().max(1.0),
                    "{dtype}: {got} vs {w}"
                );
            }
        }
    }

    #[test]
    fn half_conversions_round_trip() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            65504.0,
            6.1035156e-5,
            5.9604645e-8,
            3.0 / 4096.0,
            -3.0517578e-5,
        ] {
            let h = f32_to_f16(v);
            assert_eq!(f16_to_f32(h), v, "{v} -> {h:#06x}");
        }
        assert_eq!(f32_to_f16(1e6), 0x7c00);
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00, "ties to even");
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
    }
}
