//! The hq4 codec: a Hadamard rotation of each (token, head) row, then a symmetric 4-bit code
//! with a one-byte scale per row, for keys and values alike.
//!
//! KIVI (kivi.rs) quantizes keys per channel because a few key channels are large for every
//! token; its f16 min and step per channel over a 16-token group cost 2 bits per key element
//! at 4 bits (3.05x of bf16). Rotating each row first by the normalized Walsh-Hadamard
//! transform (hadamard.rs; orthonormal, so the row's norm and its dot products with the
//! query, rotated the same way, are kept) spreads those channels over all `head_dim` values,
//! so one scale per row fits them (QuaRot, SpinQuant, QuIP# rotate before quantizing for the
//! same reason). A row of 64 then stores in 32 + 1 bytes: **3.88x of bf16**.
//!
//! The scale is the int8 codec's byte (`2^(e - 20) * (1 + m / 8)`, int8.rs), the smallest at
//! least the rotated row's `absmax / 7` (rounded up, so no code clips); the codes are
//! `round(x / s)` (to nearest, ties to even) in `-7..=7`, 4-bit two's complement, two to a
//! byte from the low nibble up.
//!
//! Stored group: `tokens * heads` scale bytes, then `ceil(tokens * heads * head_dim / 2)` code
//! bytes, token-major like the raw plane. Every row is within its group, so selective loads
//! stay at read amplification 1.0.
//!
//! `head_dim` must be a power of two (the transform's size): the spec refuses hq4 for any
//! other (`Codec::supports_head_dim`, checked when a spec is validated), and the coder returns
//! a typed error rather than touch such a group.
//!
//! Decoding widens each row's codes times its scale into the coder's f32 scratch (a byte,
//! two codes, at a time), rotates the row back (the same transform) and writes it straight
//! into the destination in its dtype (bf16 rounded to nearest even without `half`'s NaN
//! branch, as int8 does; into f16 it saturates at 65504, as a row at the top of f16's range
//! can decode past it by less than its error): no allocation once the coder is warm.

use super::from_f32;
use super::hadamard::wht_in_place;
use super::int8::{bf16_bits, row_scale, scale_value};
use super::{Codec, CodecError, GroupShape};
use crate::spec::Dtype;

/// Largest code magnitude (symmetric: -7..=7, -8 unused).
const QMAX: f32 = 7.0;

pub(super) fn stored_len(shape: &GroupShape) -> usize {
    shape.tokens * shape.heads + shape.elements().div_ceil(2)
}

/// Rotates `values` (the group, f32, token-major) in place and appends the stored group to
/// `out` (on an error, `Coder::encode` takes it back off).
pub(super) fn encode(
    shape: &GroupShape,
    values: &mut [f32],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let at = out.len();
    out.resize(at + stored_len(shape), 0);
    let rows = shape.tokens * shape.heads;
    let d = shape.head_dim;
    let (scales, codes) = out[at..].split_at_mut(rows);
    for (r, (row, s)) in values
        .chunks_exact_mut(d)
        .zip(scales.iter_mut())
        .enumerate()
    {
        wht_in_place(row);
        let scale;
        (*s, scale) = row_scale(row, QMAX, Codec::Hq4, r * d)?;
        if scale == 0.0 {
            // An all-zero row: codes stay 0.
            continue;
        }
        for (k, v) in row.iter().enumerate() {
            let q = (v / scale).round_ties_even().clamp(-QMAX, QMAX) as i8 as u8 & 0xF;
            let i = r * d + k;
            codes[i / 2] |= q << ((i % 2) * 4);
        }
    }
    Ok(())
}

/// Largest finite f16: a row of f16 KV near the top of the range can decode past it by
/// less than its error; it saturates there rather than become infinite.
const F16_MAX: f32 = 65504.0;

/// Decodes a stored group (`stored_len(shape)` bytes) into `out` (`shape.raw_len()` bytes
/// of `shape.dtype`), a row at a time through `row` (scratch, resized to `head_dim`).
pub(super) fn decode(shape: &GroupShape, stored: &[u8], row: &mut Vec<f32>, out: &mut [u8]) {
    let rows = shape.tokens * shape.heads;
    let d = shape.head_dim;
    let (scales, codes) = stored.split_at(rows);
    row.resize(d, 0.0);
    let size = shape.dtype.size();
    for (r, (&s, o)) in scales
        .iter()
        .zip(out.chunks_exact_mut(d * size))
        .enumerate()
    {
        let scale = scale_value(s);
        if d % 2 == 0 {
            // Two codes a byte, low nibble first; `>>` on `i8` sign-extends.
            let bytes = &codes[r * d / 2..(r + 1) * d / 2];
            for (pair, &b) in row.chunks_exact_mut(2).zip(bytes) {
                pair[0] = (((b << 4) as i8) >> 4) as f32 * scale;
                pair[1] = ((b as i8) >> 4) as f32 * scale;
            }
        } else {
            // head_dim 1: one code per row, the byte's halves alternate between rows.
            let nibble = (codes[r / 2] >> ((r % 2) * 4)) << 4;
            row[0] = ((nibble as i8) >> 4) as f32 * scale;
        }
        wht_in_place(row);
        match shape.dtype {
            Dtype::F32 => {
                for (o, v) in o.chunks_exact_mut(4).zip(row.iter()) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                for (o, v) in o.chunks_exact_mut(2).zip(row.iter()) {
                    o.copy_from_slice(&bf16_bits(*v).to_le_bytes());
                }
            }
            Dtype::F16 => {
                for v in row.iter_mut() {
                    *v = v.clamp(-F16_MAX, F16_MAX);
                }
                from_f32(Dtype::F16, row, o);
            }
            Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => unreachable!("lossy codecs refuse fp8 KV"),
        }
    }
}
