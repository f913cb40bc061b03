//! The lossless codec: float elements split into streams of similar bytes, each stream
//! entropy-coded with zstd on its own.
//!
//! KV values of one plane share a narrow range of exponents, so the exponent byte of a float
//! carries 2-4 bits of information while its mantissa bits are close to random. Mixed in one
//! byte stream (as the raw little-endian bytes are) neither compresses well; separated, the
//! exponent stream shrinks to a third and the others stay near their size (ZipNN's
//! observation). The streams of one group:
//!
//! - bf16: `exponent` (8 bits) and `sign << 7 | mantissa` (8 bits);
//! - f32: `exponent`, `sign << 7 | mantissa[22:16]`, `mantissa[15:8]`, `mantissa[7:0]`;
//! - f16: high byte and low byte (its 5-bit exponent does not fill a byte);
//! - fp8: one stream of the bytes.
//!
//! Stored group: for each stream, a little-endian `u32` (bit 31 set: the stream is stored
//! as it is because zstd did not shrink it; bits 0-30: stored length), then its bytes. zstd
//! (level 1: its Huffman literal coder does the work here; higher levels spend time looking
//! for matches KV does not have) was chosen over lz4, which has no entropy stage and so
//! gains nothing on exponent bytes (docs/BENCHMARKS.md, "Codecs").

use super::{Codec, CodecError, GroupShape};
use crate::spec::Dtype;

const LEVEL: i32 = 1;
const STORED_RAW: u32 = 1 << 31;
const MAX_STREAMS: usize = 4;

/// zstd contexts and stream scratch, reused across groups.
pub(super) struct State {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    streams: [Vec<u8>; MAX_STREAMS],
}

fn streams_of(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 => 4,
        Dtype::Bf16 | Dtype::F16 => 2,
        Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => 1,
    }
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
            compressor: None,
            decompressor: None,
            streams: Default::default(),
        }
    }

    pub(super) fn encode(
        &mut self,
        shape: &GroupShape,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let n = shape.elements();
        let count = streams_of(shape.dtype);
        for s in &mut self.streams[..count] {
            s.resize(n, 0);
        }
        split(shape.dtype, raw, &mut self.streams);
        let compressor = match &mut self.compressor {
            Some(c) => c,
            None => self
                .compressor
                .insert(zstd::bulk::Compressor::new(LEVEL).map_err(|e| corrupt(e.to_string()))?),
        };
        for s in &self.streams[..count] {
            let at = out.len();
            let bound = zstd::zstd_safe::compress_bound(s.len());
            out.resize(at + 4 + bound, 0);
            let len = compressor
                .compress_to_buffer(s.as_slice(), &mut out[at + 4..])
                .map_err(|e| corrupt(format!("zstd: {e}")))?;
            if len >= s.len() {
                out.truncate(at + 4);
                out.extend_from_slice(s);
                out[at..at + 4].copy_from_slice(&(s.len() as u32 | STORED_RAW).to_le_bytes());
            } else {
                out.truncate(at + 4 + len);
                out[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
            }
        }
        Ok(())
    }

    pub(super) fn decode(
        &mut self,
        shape: &GroupShape,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<(), CodecError> {
        let n = shape.elements();
        let count = streams_of(shape.dtype);
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            None => self
                .decompressor
                .insert(zstd::bulk::Decompressor::new().map_err(|e| corrupt(e.to_string()))?),
        };
        let mut at = 0usize;
        for (i, s) in self.streams[..count].iter_mut().enumerate() {
            let word = stored
                .get(at..at + 4)
                .ok_or_else(|| corrupt(format!("stream {i} header is past the group's end")))?;
            let word = u32::from_le_bytes(word.try_into().unwrap());
            let len = (word & !STORED_RAW) as usize;
            let body = stored
                .get(at + 4..at + 4 + len)
                .ok_or_else(|| corrupt(format!("stream {i} ({len} bytes) overruns the group")))?;
            at += 4 + len;
            s.resize(n, 0);
            let got = if word & STORED_RAW != 0 {
                if len == n {
                    s.copy_from_slice(body);
                }
                len
            } else {
                decompressor
                    .decompress_to_buffer(body, s.as_mut_slice())
                    .map_err(|e| corrupt(format!("stream {i}: zstd: {e}")))?
            };
            if got != n {
                return Err(CodecError::DecodedSize {
                    codec: Codec::Lossless,
                    expected: n * count,
                    actual: got * count,
                });
            }
        }
        if at != stored.len() {
            return Err(corrupt(format!(
                "{} bytes after the last stream",
                stored.len() - at
            )));
        }
        join(shape.dtype, &self.streams, out);
        Ok(())
    }
}

/// Splits elements into streams (each `elements` bytes long already).
fn split(dtype: Dtype, raw: &[u8], streams: &mut [Vec<u8>; MAX_STREAMS]) {
    let [s0, s1, s2, s3] = streams;
    match dtype {
        Dtype::Bf16 => {
            for ((c, e), m) in raw.chunks_exact(2).zip(s0.iter_mut()).zip(s1.iter_mut()) {
                let x = u16::from_le_bytes([c[0], c[1]]);
                *e = (x >> 7) as u8;
                *m = ((x >> 8) as u8 & 0x80) | (x as u8 & 0x7F);
            }
        }
        Dtype::F32 => {
            for (i, c) in raw.chunks_exact(4).enumerate() {
                let x = u32::from_le_bytes(c.try_into().unwrap());
                s0[i] = (x >> 23) as u8;
                s1[i] = ((x >> 24) as u8 & 0x80) | ((x >> 16) as u8 & 0x7F);
                s2[i] = (x >> 8) as u8;
                s3[i] = x as u8;
            }
        }
        Dtype::F16 => {
            for ((c, h), l) in raw.chunks_exact(2).zip(s0.iter_mut()).zip(s1.iter_mut()) {
                *h = c[1];
                *l = c[0];
            }
        }
        Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => s0.copy_from_slice(raw),
    }
}

/// Joins streams back into elements: the inverse of [`split`].
fn join(dtype: Dtype, streams: &[Vec<u8>; MAX_STREAMS], out: &mut [u8]) {
    let [s0, s1, s2, s3] = streams;
    match dtype {
        Dtype::Bf16 => {
            for ((o, &e), &m) in out.chunks_exact_mut(2).zip(s0.iter()).zip(s1.iter()) {
                let x = ((m as u16 & 0x80) << 8) | ((e as u16) << 7) | (m as u16 & 0x7F);
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (i, o) in out.chunks_exact_mut(4).enumerate() {
                let (e, m) = (s0[i] as u32, s1[i] as u32);
                let x = ((m & 0x80) << 24)
                    | (e << 23)
                    | ((m & 0x7F) << 16)
                    | ((s2[i] as u32) << 8)
                    | s3[i] as u32;
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::F16 => {
            for ((o, &h), &l) in out.chunks_exact_mut(2).zip(s0.iter()).zip(s1.iter()) {
                o[0] = l;
                o[1] = h;
            }
        }
        Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => out.copy_from_slice(s0),
    }
}
