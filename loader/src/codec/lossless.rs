//! The lossless codec: each float's exponent as a 3-bit index into a per-group table of the
//! group's 7 most frequent exponents (an escape index for the rest), its sign and mantissa
//! bits packed as they are.
//!
//! KV values of one plane share a narrow range of exponents, so an exponent carries 2-4 bits
//! of information while sign and mantissa bits are close to random (ZipNN's observation): only
//! the exponent is worth coding. The code is chosen for decode speed, by measurement
//! (docs/BENCHMARKS.md, "Codecs"):
//! - the previous form, exponent and sign/mantissa byte streams each compressed with zstd
//!   level 1, stored bf16 KV 1.42x smaller but decoded at 1.0 GB/s of one core's CPU time,
//!   83% of it inside zstd for 3 KiB frames (LZ sequence execution, and rebuilding the
//!   Huffman and FSE tables of every frame);
//! - 4-bit indices into 15 exponents decode at 5-6 GB/s per core (one `pshufb` per 16
//!   exponents) but store bf16 only 1.33x smaller: 15 exponents cover 99.98% of SmolLM2's
//!   KV, more than needed;
//! - 3-bit indices into 7 exponents (this form) cover 96% of them (the per-group exponent
//!   entropy is 2.7 bits), so an exponent costs 3.3 bits with escapes: bf16 about 1.4x
//!   smaller, as small as zstd made it, at several GB/s per core.
//!
//! Indices are stored as three bit planes (bit `b` of element `i`'s index is bit `i % 8` of
//! byte `i / 8` of plane `b`), which SSSE3 (detected at run time, with a scalar fallback)
//! expands 16 at a time with a byte broadcast, a mask and a compare per plane, then turns into
//! exponents with one `pshufb`; escapes (rare) are patched after. For bf16 an SSE2 join
//! interleaves exponent and sign/mantissa bytes. No entropy tables to build, no allocation.
//!
//! Per dtype (`mant` mantissa bits; the exponent is the field between sign and mantissa):
//! bf16 8-bit exponent, 7-bit mantissa; f16 5-bit exponent, 10-bit mantissa; f32 8-bit
//! exponent, 23-bit mantissa. The `rest` of an element is `sign << mant | mantissa`
//! (`mant + 1` bits). fp8 KV is always stored as it is (its exponent is 4-5 bits wide).
//!
//! Stored group, `n` elements, `p = ceil(n / 8)`:
//! - byte 0: the mode: 0 = the raw bytes follow as they are (chosen whenever the code below
//!   would not be smaller); 1 = coded:
//! - bytes 1..8: the table, 7 exponent values for indices 0..6 (index 7 is the escape);
//! - bytes 8..12: `u32` little-endian `E`, the number of escaped exponents;
//! - `3 * p` bytes: the index bit planes, bit 0's plane first (unused last bits are 0);
//! - `E` bytes: the escaped exponents, in element order;
//! - the rests, `mant + 1` bits per element packed LSB-first (bf16: one byte per element;
//!   f32: three), padded with zero bits to a whole byte.

use super::{Codec, CodecError, GroupShape};
use crate::spec::Dtype;

const MODE_RAW: u8 = 0;
const MODE_CODED: u8 = 1;
const TABLE: usize = 7;
const ESCAPE: u8 = 7;
const HEADER: usize = 1 + TABLE + 4;
/// Bits per index.
const WIDTH: usize = 3;

/// Bit layout of a float dtype the code applies to.
#[derive(Clone, Copy)]
struct Layout {
    /// Element width in bytes.
    size: usize,
    /// Mantissa bits; the exponent sits above them, the sign at the top.
    mant: u32,
    /// Exponent bits.
    exp: u32,
}

impl Layout {
    fn of(dtype: Dtype) -> Option<Layout> {
        match dtype {
            Dtype::Bf16 => Some(Layout {
                size: 2,
                mant: 7,
                exp: 8,
            }),
            Dtype::F16 => Some(Layout {
                size: 2,
                mant: 10,
                exp: 5,
            }),
            Dtype::F32 => Some(Layout {
                size: 4,
                mant: 23,
                exp: 8,
            }),
            Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => None,
        }
    }
    fn rest_bits(self) -> u32 {
        self.mant + 1
    }
    fn rest_len(self, n: usize) -> usize {
        (n * self.rest_bits() as usize).div_ceil(8)
    }
    fn element(self, raw: &[u8], i: usize) -> u32 {
        match self.size {
            2 => u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]) as u32,
            _ => u32::from_le_bytes(raw[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }
    /// Splits an element into (exponent, rest).
    fn split(self, x: u32) -> (u8, u32) {
        let top = self.mant + self.exp;
        let e = (x >> self.mant) & ((1 << self.exp) - 1);
        let sign = (x >> top) & 1;
        (e as u8, sign << self.mant | (x & ((1 << self.mant) - 1)))
    }
    fn join(self, e: u8, rest: u32) -> u32 {
        let top = self.mant + self.exp;
        let sign = (rest >> self.mant) & 1;
        sign << top | (e as u32) << self.mant | (rest & ((1 << self.mant) - 1))
    }
}

/// Scratch reused across groups (no allocation once warm).
pub(super) struct State {
    exponents: Vec<u8>,
}

fn corrupt(reason: impl Into<String>) -> CodecError {
    CodecError::Corrupt {
        codec: Codec::Lossless,
        reason: reason.into(),
    }
}

impl State {
    pub(super) fn new() -> State {
        State {
            exponents: Vec::new(),
        }
    }

    pub(super) fn encode(
        &mut self,
        shape: &GroupShape,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let n = shape.elements();
        let start = out.len();
        if let Some(layout) = Layout::of(shape.dtype) {
            encode_coded(layout, n, raw, &mut self.exponents, out);
            if out.len() - start < 1 + raw.len() {
                return Ok(());
            }
            out.truncate(start);
        }
        out.push(MODE_RAW);
        out.extend_from_slice(raw);
        Ok(())
    }

    pub(super) fn decode(
        &mut self,
        shape: &GroupShape,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<(), CodecError> {
        let n = shape.elements();
        match stored.first() {
            Some(&MODE_RAW) => {
                let body = &stored[1..];
                if body.len() != out.len() {
                    return Err(CodecError::DecodedSize {
                        codec: Codec::Lossless,
                        expected: out.len(),
                        actual: body.len(),
                    });
                }
                out.copy_from_slice(body);
                Ok(())
            }
            Some(&MODE_CODED) => {
                let layout = Layout::of(shape.dtype)
                    .ok_or_else(|| corrupt(format!("a coded group of {} KV", shape.dtype)))?;
                self.exponents.resize(n, 0);
                decode_coded(layout, n, stored, &mut self.exponents, out)
            }
            Some(m) => Err(corrupt(format!("unknown group mode {m}"))),
            None => Err(corrupt("an empty group")),
        }
    }
}

/// Appends the coded form of `n` elements of `raw`; `exponents` is scratch.
fn encode_coded(layout: Layout, n: usize, raw: &[u8], exponents: &mut Vec<u8>, out: &mut Vec<u8>) {
    exponents.clear();
    let mut counts = [0u32; 256];
    for i in 0..n {
        let (e, _) = layout.split(layout.element(raw, i));
        counts[e as usize] += 1;
        exponents.push(e);
    }
    // The 7 most frequent exponents, ties to the smaller value (deterministic output); when
    // fewer occur, the table is filled with the smallest values that do not.
    let mut order: Vec<(u32, u8)> = (0..=255u8)
        .filter(|&e| counts[e as usize] > 0)
        .map(|e| (counts[e as usize], e))
        .collect();
    order.sort_unstable_by_key(|&(c, e)| (std::cmp::Reverse(c), e));
    order.extend(
        (0..=255u8)
            .filter(|&e| counts[e as usize] == 0)
            .take(TABLE)
            .map(|e| (0, e)),
    );
    let mut index = [ESCAPE; 256];
    out.push(MODE_CODED);
    for (i, &(_, e)) in order[..TABLE].iter().enumerate() {
        index[e as usize] = i as u8;
        out.push(e);
    }
    let escaped: u32 = order[TABLE..].iter().map(|&(c, _)| c).sum();
    out.extend_from_slice(&escaped.to_le_bytes());
    let plane = n.div_ceil(8);
    let at = out.len();
    out.resize(at + WIDTH * plane, 0);
    let planes = &mut out[at..];
    for (k, &e) in exponents.iter().enumerate() {
        let idx = index[e as usize];
        for b in 0..WIDTH {
            planes[b * plane + k / 8] |= ((idx >> b) & 1) << (k % 8);
        }
    }
    out.extend(exponents.iter().filter(|&&e| index[e as usize] == ESCAPE));
    match layout.rest_bits() {
        // Whole bytes: bf16 one, f32 three.
        8 | 24 => {
            let width = layout.rest_bits() as usize / 8;
            for i in 0..n {
                let rest = layout.split(layout.element(raw, i)).1;
                out.extend_from_slice(&rest.to_le_bytes()[..width]);
            }
        }
        bits => {
            let mut w = BitWriter::new(out);
            for i in 0..n {
                w.put(layout.split(layout.element(raw, i)).1, bits);
            }
            w.finish();
        }
    }
}

fn decode_coded(
    layout: Layout,
    n: usize,
    stored: &[u8],
    exponents: &mut [u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    let plane = n.div_ceil(8);
    let planes_len = WIDTH * plane;
    let header = stored.get(..HEADER).ok_or_else(|| {
        corrupt(format!(
            "{} bytes, shorter than the group header",
            stored.len()
        ))
    })?;
    let mut table = [0u8; 16];
    table[..TABLE].copy_from_slice(&header[1..1 + TABLE]);
    let escaped = u32::from_le_bytes(header[1 + TABLE..].try_into().unwrap()) as usize;
    let want = HEADER as u64 + planes_len as u64 + escaped as u64 + layout.rest_len(n) as u64;
    if stored.len() as u64 != want {
        return Err(corrupt(format!(
            "{} stored bytes, {n} elements with {escaped} escapes need {want}",
            stored.len()
        )));
    }
    let planes = &stored[HEADER..HEADER + planes_len];
    if n % 8 != 0 && (0..WIDTH).any(|b| planes[(b + 1) * plane - 1] >> (n % 8) != 0) {
        return Err(corrupt("the unused last index bits are not 0"));
    }
    let escapes = &stored[HEADER + planes_len..HEADER + planes_len + escaped];
    let rests = &stored[HEADER + planes_len + escaped..];
    decode_exponents(planes, &table, escapes, exponents)?;
    if layout.size == 2 && layout.mant == 7 {
        join_bf16(exponents, rests, out);
    } else if layout.rest_bits() == 24 {
        for ((o, &e), r) in out
            .chunks_exact_mut(4)
            .zip(exponents.iter())
            .zip(rests.chunks_exact(3))
        {
            let x = layout.join(e, u32::from_le_bytes([r[0], r[1], r[2], 0]));
            o.copy_from_slice(&x.to_le_bytes());
        }
    } else {
        let mut bits = BitReader::new(rests);
        for (i, &e) in exponents.iter().enumerate() {
            let x = layout.join(e, bits.get(layout.rest_bits()));
            out[i * layout.size..(i + 1) * layout.size]
                .copy_from_slice(&x.to_le_bytes()[..layout.size]);
        }
    }
    Ok(())
}

/// Indices (`planes`: `WIDTH` bit planes of `ceil(n / 8)` bytes) to exponents: the fastest
/// form this CPU runs.
fn decode_exponents(
    planes: &[u8],
    table: &[u8; 16],
    escapes: &[u8],
    exponents: &mut [u8],
) -> Result<(), CodecError> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU has SSSE3 (checked just above).
        return unsafe { decode_exponents_ssse3(planes, table, escapes, exponents) };
    }
    decode_exponents_scalar(planes, table, escapes, exponents, 0, 0)
}

fn escape_error(escapes: &[u8]) -> CodecError {
    corrupt(format!(
        "more escaped exponents than the {} stored",
        escapes.len()
    ))
}

/// Scalar decoding of exponents `from..` with `used` escapes consumed before them; checks
/// that every escape is used.
fn decode_exponents_scalar(
    planes: &[u8],
    table: &[u8; 16],
    escapes: &[u8],
    exponents: &mut [u8],
    from: usize,
    mut used: usize,
) -> Result<(), CodecError> {
    let plane = exponents.len().div_ceil(8);
    for (i, e) in exponents.iter_mut().enumerate().skip(from) {
        let idx = (0..WIDTH).fold(0u8, |acc, b| {
            acc | ((planes[b * plane + i / 8] >> (i % 8)) & 1) << b
        });
        *e = if idx == ESCAPE {
            let v = *escapes.get(used).ok_or_else(|| escape_error(escapes))?;
            used += 1;
            v
        } else {
            table[idx as usize]
        };
    }
    if used != escapes.len() {
        return Err(corrupt(format!(
            "{} escaped exponents stored, {used} used",
            escapes.len()
        )));
    }
    Ok(())
}

/// 64 exponents per step, in four quarters: two bytes of each bit plane broadcast to 8 lanes
/// each, one bit per lane selected and compared, the three planes merged into indices, looked
/// up with `pshufb`; then the step's escapes (rare) are patched, found from one 64-bit mask.
///
/// # Safety
/// The CPU must support SSSE3.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn decode_exponents_ssse3(
    planes: &[u8],
    table: &[u8; 16],
    escapes: &[u8],
    exponents: &mut [u8],
) -> Result<(), CodecError> {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_cvtsi32_si128, _mm_loadu_si128,
        _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8, _mm_setr_epi8, _mm_shuffle_epi8,
        _mm_storeu_si128,
    };
    let n = exponents.len();
    let plane = n.div_ceil(8);
    let steps = n / 64;
    let mut used = 0usize;
    assert!(planes.len() >= WIDTH * plane);
    // SAFETY: the loads read `table` (16 bytes) and 8 bytes at `b * plane + 8 * s` of each
    // plane `b < 3`, with `8 * s + 7 < n / 8 <= plane` (checked above); every store writes 16
    // bytes of `exponents` at `64 * s + 16 * q` with `s < n / 64`, `q < 4`, inside its `n`.
    unsafe {
        let lut = _mm_loadu_si128(table.as_ptr() as *const __m128i);
        let spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let select = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
        let (one, two, four) = (_mm_set1_epi8(1), _mm_set1_epi8(2), _mm_set1_epi8(4));
        let esc = _mm_set1_epi8(ESCAPE as i8);
        let p = planes.as_ptr();
        for s in 0..steps {
            let at = 8 * s;
            let w0 = (p.add(at) as *const u64).read_unaligned();
            let w1 = (p.add(plane + at) as *const u64).read_unaligned();
            let w2 = (p.add(2 * plane + at) as *const u64).read_unaligned();
            let dst = exponents.as_mut_ptr().add(64 * s);
            let mut mask = 0u64;
            for q in 0..4 {
                let sh = 16 * q;
                // Each lane gets the byte holding its bit; the compare turns it into 0 or -1.
                let l0 = _mm_shuffle_epi8(_mm_cvtsi32_si128((w0 >> sh) as u16 as i32), spread);
                let l1 = _mm_shuffle_epi8(_mm_cvtsi32_si128((w1 >> sh) as u16 as i32), spread);
                let l2 = _mm_shuffle_epi8(_mm_cvtsi32_si128((w2 >> sh) as u16 as i32), spread);
                let m0 = _mm_cmpeq_epi8(_mm_and_si128(l0, select), select);
                let m1 = _mm_cmpeq_epi8(_mm_and_si128(l1, select), select);
                let m2 = _mm_cmpeq_epi8(_mm_and_si128(l2, select), select);
                let idx = _mm_or_si128(
                    _mm_or_si128(_mm_and_si128(m0, one), _mm_and_si128(m1, two)),
                    _mm_and_si128(m2, four),
                );
                _mm_storeu_si128(dst.add(16 * q) as *mut __m128i, _mm_shuffle_epi8(lut, idx));
                mask |= (_mm_movemask_epi8(_mm_cmpeq_epi8(idx, esc)) as u16 as u64) << sh;
            }
            while mask != 0 {
                let k = mask.trailing_zeros() as usize;
                *dst.add(k) = *escapes.get(used).ok_or_else(|| escape_error(escapes))?;
                used += 1;
                mask &= mask - 1;
            }
        }
    }
    decode_exponents_scalar(planes, table, escapes, exponents, steps * 64, used)
}

/// bf16 elements from exponents and `sign << 7 | mantissa` bytes.
fn join_bf16(exponents: &[u8], rests: &[u8], out: &mut [u8]) {
    let n = exponents.len();
    #[cfg(target_arch = "x86_64")]
    let done = {
        // SAFETY: SSE2 is part of every x86_64 CPU; the lengths are as `join_bf16_sse2` needs.
        unsafe { join_bf16_sse2(exponents, rests, out) };
        n / 16 * 16
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for i in done..n {
        let (e, m) = (exponents[i] as u16, rests[i] as u16);
        let x = (m & 0x80) << 8 | e << 7 | (m & 0x7F);
        out[2 * i..2 * i + 2].copy_from_slice(&x.to_le_bytes());
    }
}

/// The first `n / 16 * 16` elements of [`join_bf16`], 16 per step: low byte
/// `(e & 1) << 7 | mantissa`, high byte `sign << 7 | e >> 1`, interleaved.
///
/// # Safety
/// `rests` holds at least `exponents.len()` bytes and `out` at least twice that.
#[cfg(target_arch = "x86_64")]
unsafe fn join_bf16_sse2(exponents: &[u8], rests: &[u8], out: &mut [u8]) {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_loadu_si128, _mm_or_si128, _mm_set1_epi8, _mm_slli_epi16,
        _mm_srli_epi16, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };
    debug_assert!(rests.len() >= exponents.len() && out.len() >= 2 * exponents.len());
    // SAFETY: step `s < n / 16` reads 16 bytes at `16 * s` of `exponents` and `rests` and
    // writes 32 bytes at `32 * s` of `out`, all inside them (the caller's lengths).
    unsafe {
        let top = _mm_set1_epi8(0x80u8 as i8);
        let bottom = _mm_set1_epi8(0x7F);
        for s in 0..exponents.len() / 16 {
            let e = _mm_loadu_si128(exponents.as_ptr().add(16 * s) as *const __m128i);
            let m = _mm_loadu_si128(rests.as_ptr().add(16 * s) as *const __m128i);
            // Shifting 16-bit lanes then masking per byte shifts every byte on its own.
            let lo = _mm_or_si128(
                _mm_and_si128(m, bottom),
                _mm_and_si128(_mm_slli_epi16(e, 7), top),
            );
            let hi = _mm_or_si128(
                _mm_and_si128(m, top),
                _mm_and_si128(_mm_srli_epi16(e, 1), bottom),
            );
            let dst = out.as_mut_ptr().add(32 * s);
            _mm_storeu_si128(dst as *mut __m128i, _mm_unpacklo_epi8(lo, hi));
            _mm_storeu_si128(dst.add(16) as *mut __m128i, _mm_unpackhi_epi8(lo, hi));
        }
    }
}

/// Packs values of up to 24 bits LSB-first.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    bits: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter {
            out,
            acc: 0,
            bits: 0,
        }
    }
    fn put(&mut self, v: u32, width: u32) {
        self.acc |= (v as u64) << self.bits;
        self.bits += width;
        while self.bits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.bits -= 8;
        }
    }
    fn finish(self) {
        if self.bits > 0 {
            self.out.push(self.acc as u8);
        }
    }
}

/// Reads what [`BitWriter`] packed (the caller checked the length).
struct BitReader<'a> {
    bytes: &'a [u8],
    at: usize,
    acc: u64,
    bits: u32,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        BitReader {
            bytes,
            at: 0,
            acc: 0,
            bits: 0,
        }
    }
    fn get(&mut self, width: u32) -> u32 {
        while self.bits < width {
            let b = self.bytes.get(self.at).copied().unwrap_or(0);
            self.acc |= (b as u64) << self.bits;
            self.at += 1;
            self.bits += 8;
        }
        let v = (self.acc & ((1 << width) - 1)) as u32;
        self.acc >>= width;
        self.bits -= width;
        v
    }
}

#[cfg(test)]
pub(super) mod testing {
    //! Both exponent decoders, for tests that they agree.
    pub(in super::super) fn exponents_both_ways(
        planes: &[u8],
        table: &[u8; 16],
        escapes: &[u8],
        n: usize,
    ) -> [Result<Vec<u8>, String>; 2] {
        let mut a = vec![0u8; n];
        let scalar = super::decode_exponents_scalar(planes, table, escapes, &mut a, 0, 0)
            .map(|()| a)
            .map_err(|e| e.to_string());
        let mut b = vec![0u8; n];
        let fast = super::decode_exponents(planes, table, escapes, &mut b)
            .map(|()| b)
            .map_err(|e| e.to_string());
        [scalar, fast]
    }
}
