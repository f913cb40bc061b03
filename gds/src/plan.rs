//! Extent batching: turning "these byte ranges of these files" into aligned reads that fill
//! a ring of fixed-size staging buffers.
//!
//! The caller (the loader) names what it wants as [`ReadExtent`]s, in the order their bytes
//! form the *source stream*: source offset 0 is the first byte of the first extent, and the
//! [`ScatterPlan`](crate::ScatterPlan) addresses that stream. [`plan_fills`] then
//!
//! 1. merges extents that continue each other in the same file (a chunk's layers are laid out
//!    back to back, so a whole chunk is usually one merged extent and one or few reads);
//! 2. widens every read to [`DIRECT_ALIGN`] on both ends (the bytes before the extent are the
//!    piece's `skip`; the bytes after it are read and ignored), as O_DIRECT and cuFile want;
//! 3. packs the pieces into buffers of `buf_size` bytes, each piece at an aligned buffer
//!    offset, splitting an extent that does not fit across several buffers.
//!
//! One [`Fill`] is what one ring slot holds at a time. Everything here is pure arithmetic,
//! tested without files; the same fills drive the O_DIRECT reader, the cuFile reader and the
//! store path (where `skip` must be 0 because O_DIRECT writes cannot start mid-block).

use std::os::fd::RawFd;

use crate::align::{DIRECT_ALIGN, align_down, align_up};
use crate::error::{GdsError, Result};

/// A byte range of an open file: the unit callers hand to loads and stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadExtent {
    /// The open file (opened with O_DIRECT where possible; see [`crate::direct`]).
    pub file: RawFd,
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A byte range of a file to write on the store path (same shape as a read extent).
pub type WriteExtent = ReadExtent;

/// One aligned transfer between a file and a region of a staging buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The file.
    pub file: RawFd,
    /// Aligned file offset where the transfer starts.
    pub file_offset: u64,
    /// Aligned length of the transfer.
    pub io_len: u64,
    /// Aligned offset of the transfer in the staging buffer.
    pub buf_offset: u64,
    /// Bytes at the start of the transfer that precede the wanted data.
    pub skip: u64,
    /// Wanted bytes, starting at `buf_offset + skip` in the buffer.
    pub len: u64,
    /// Source-stream offset of the first wanted byte.
    pub stream_offset: u64,
}

impl Piece {
    /// Range of the wanted bytes in the staging buffer.
    pub fn data_range(&self) -> std::ops::Range<usize> {
        let start = (self.buf_offset + self.skip) as usize;
        start..start + self.len as usize
    }

    /// Bytes the transfer must deliver at least (the file may end inside the aligned tail).
    pub fn needed(&self) -> u64 {
        self.skip + self.len
    }
}

/// The pieces that one staging buffer holds at one time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    /// Transfers, in source-stream order.
    pub pieces: Vec<Piece>,
    /// Bytes of the buffer in use (aligned).
    pub used: u64,
}

impl Fill {
    /// Source-stream offset just past the last wanted byte of this fill.
    pub fn stream_end(&self) -> u64 {
        self.pieces.last().map_or(0, |p| p.stream_offset + p.len)
    }
}

/// Merges extents of the same file that continue each other; drops empty ones.
/// Returns `(extent, stream_offset)` pairs.
pub fn merge_extents(extents: &[ReadExtent]) -> Vec<(ReadExtent, u64)> {
    let mut out: Vec<(ReadExtent, u64)> = Vec::with_capacity(extents.len());
    let mut stream = 0u64;
    for e in extents.iter().filter(|e| e.len > 0) {
        match out.last_mut() {
            Some((last, _)) if last.file == e.file && last.offset + last.len == e.offset => {
                last.len += e.len;
            }
            _ => out.push((*e, stream)),
        }
        stream += e.len;
    }
    out
}

/// Total bytes of the source stream the extents form.
pub fn stream_len(extents: &[ReadExtent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// Plans the aligned transfers for `extents` through buffers of `buf_size` bytes.
///
/// `buf_size` must be a multiple of [`DIRECT_ALIGN`] and at least two blocks (so that a
/// piece whose start is not aligned always fits in an empty buffer).
pub fn plan_fills(extents: &[ReadExtent], buf_size: u64) -> Result<Vec<Fill>> {
    check_buf_size(buf_size)?;
    let a = DIRECT_ALIGN;
    let mut fills = Vec::new();
    let mut cur = Fill::default();
    for (ext, stream_start) in merge_extents(extents) {
        let end = ext
            .offset
            .checked_add(ext.len)
            .ok_or_else(|| GdsError::InvalidPlan(format!("extent {ext:?} overflows")))?;
        let mut pos = ext.offset;
        let mut stream = stream_start;
        while pos < end {
            let start = align_down(pos, a);
            let skip = pos - start;
            let room = buf_size - cur.used;
            let io_len = align_up(end - start, a).min(room);
            if io_len <= skip {
                // Not even one wanted byte fits: close this buffer and retry in a new one.
                fills.push(std::mem::take(&mut cur));
                continue;
            }
            let len = (start + io_len).min(end) - pos;
            cur.pieces.push(Piece {
                file: ext.file,
                file_offset: start,
                io_len,
                buf_offset: cur.used,
                skip,
                len,
                stream_offset: stream,
            });
            cur.used += io_len;
            pos += len;
            stream += len;
            if cur.used == buf_size {
                fills.push(std::mem::take(&mut cur));
            }
        }
    }
    if !cur.pieces.is_empty() {
        fills.push(cur);
    }
    Ok(fills)
}

pub(crate) fn check_buf_size(buf_size: u64) -> Result<()> {
    if buf_size < 2 * DIRECT_ALIGN || buf_size % DIRECT_ALIGN != 0 {
        return Err(GdsError::Config(format!(
            "staging buffer size {buf_size} must be a multiple of {DIRECT_ALIGN} and at least {}",
            2 * DIRECT_ALIGN
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(file: RawFd, offset: u64, len: u64) -> ReadExtent {
        ReadExtent { file, offset, len }
    }

    /// Every wanted byte appears exactly once, in stream order, inside an aligned transfer.
    fn check_cover(extents: &[ReadExtent], fills: &[Fill], buf_size: u64) {
        let mut want: Vec<(RawFd, u64)> = Vec::new();
        for e in extents {
            for o in e.offset..e.offset + e.len {
                want.push((e.file, o));
            }
        }
        let mut got: Vec<(RawFd, u64)> = Vec::new();
        let mut stream = 0;
        for f in fills {
            assert!(f.used <= buf_size);
            let mut used = 0;
            for p in &f.pieces {
                assert_eq!(p.file_offset % DIRECT_ALIGN, 0);
                assert_eq!(p.io_len % DIRECT_ALIGN, 0);
                assert_eq!(p.buf_offset, used);
                assert!(p.skip < DIRECT_ALIGN && p.needed() <= p.io_len && p.len > 0);
                assert_eq!(p.stream_offset, stream);
                used += p.io_len;
                stream += p.len;
                for o in 0..p.len {
                    got.push((p.file, p.file_offset + p.skip + o));
                }
            }
            assert_eq!(used, f.used);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn contiguous_extents_merge_into_one_read() {
        let e = [ext(3, 0, 4096), ext(3, 4096, 8192), ext(3, 12288, 100)];
        let fills = plan_fills(&e, 1 << 20).unwrap();
        assert_eq!(fills.len(), 1);
        assert_eq!(fills[0].pieces.len(), 1);
        assert_eq!(fills[0].pieces[0].io_len, 16384);
        assert_eq!(fills[0].pieces[0].len, 12388);
        check_cover(&e, &fills, 1 << 20);
    }

    #[test]
    fn unaligned_extents_are_widened_and_split() {
        let e = [ext(3, 100, 20_000), ext(4, 5000, 3), ext(3, 50_000, 9000)];
        for buf in [8192, 12288, 16384, 65536] {
            let fills = plan_fills(&e, buf).unwrap();
            check_cover(&e, &fills, buf);
        }
        let fills = plan_fills(&e, 8192).unwrap();
        assert_eq!(fills[0].pieces[0].skip, 100);
        assert_eq!(fills[0].pieces[0].len, 8092);
    }

    #[test]
    fn random_extent_lists_are_covered() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..200 {
            let n = 1 + rnd(6);
            let mut e = Vec::new();
            for _ in 0..n {
                e.push(ext(rnd(2) as RawFd, rnd(40_000), rnd(20_000)));
            }
            let buf = DIRECT_ALIGN * (2 + rnd(6));
            let fills = plan_fills(&e, buf).unwrap();
            check_cover(&e, &fills, buf);
        }
    }

    #[test]
    fn bad_buffer_sizes_are_rejected() {
        for b in [0, 4096, 5000, 8193] {
            assert!(matches!(plan_fills(&[], b), Err(GdsError::Config(_))));
        }
        assert!(plan_fills(&[], 8192).unwrap().is_empty());
        let e = [ext(1, u64::MAX - 10, 100)];
        assert!(matches!(
            plan_fills(&e, 8192),
            Err(GdsError::InvalidPlan(_))
        ));
    }
}
