//! Where extents go: the back end that moves bytes between staging and the engine's memory.
//!
//! The loader plans reads (which file ranges, which destination rows) without knowing what the
//! destination addresses are. A [`Backend`] says whether they are host memory that a read may
//! target directly ([`Backend::host_addressable`]: then reads land in the engine's blocks with
//! no intermediate copy) and how to copy a staged run of rows in or out. [`HostMemory`] is the
//! only back end that exists. No CUDA back end implements this trait yet: GPU file I/O lives
//! in kvfs-gds (`kvfs_gds::GpuLoader` moves file extents into device memory
//! on its own), and this crate does not depend on it. A device back end would answer `false`
//! to `host_addressable`, and the loader would then always stage through its aligned buffers.

use crate::layout::{KvLayout, Run};
use std::fmt::Debug;
use std::io;

/// Moves bytes between host staging buffers and destination memory.
pub trait Backend: Send + Sync + Debug {
    /// Whether destination addresses are ordinary host memory, which reads may fill directly.
    fn host_addressable(&self) -> bool;

    /// Copies `src` to destination address `dst`.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` must lie inside a region of the layout the load uses (the
    /// loader checks this against the layout before calling).
    unsafe fn copy_in(&self, dst: usize, src: &[u8]) -> io::Result<()>;

    /// Copies from destination address `src` into `dst` (for `store`).
    ///
    /// # Safety
    /// As [`Backend::copy_in`], for `src .. src + dst.len()`.
    unsafe fn copy_out(&self, src: usize, dst: &mut [u8]) -> io::Result<()>;

    /// Copies `run`'s rows of `plane`, packed back to back in `src`, to where `layout` keeps
    /// them. By default one [`Backend::copy_in`] per contiguous piece.
    ///
    /// # Safety
    /// `run` must come from `layout.runs` for a block map `layout.check_map` accepted, so
    /// every piece lies inside a region of the layout.
    unsafe fn copy_rows_in(
        &self,
        layout: &KvLayout,
        plane: usize,
        run: &Run,
        src: &[u8],
    ) -> io::Result<()> {
        for (addr, off, len) in layout.pieces(plane, run) {
            // SAFETY: the caller guarantees every piece lies inside a layout region.
            unsafe { self.copy_in(addr, &src[off..off + len])? };
        }
        Ok(())
    }

    /// Copies `run`'s rows of `plane` into `dst`, packed back to back (for `store`).
    ///
    /// # Safety
    /// As [`Backend::copy_rows_in`].
    unsafe fn copy_rows_out(
        &self,
        layout: &KvLayout,
        plane: usize,
        run: &Run,
        dst: &mut [u8],
    ) -> io::Result<()> {
        for (addr, off, len) in layout.pieces(plane, run) {
            // SAFETY: the caller guarantees every piece lies inside a layout region.
            unsafe { self.copy_out(addr, &mut dst[off..off + len])? };
        }
        Ok(())
    }
}

/// Destination memory is host memory: plain `memcpy`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostMemory;

impl Backend for HostMemory {
    fn host_addressable(&self) -> bool {
        true
    }

    unsafe fn copy_in(&self, dst: usize, src: &[u8]) -> io::Result<()> {
        // SAFETY: the caller guarantees `dst` is valid for `src.len()` writable bytes inside
        // engine memory, which cannot overlap the loader's own staging buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn copy_out(&self, src: usize, dst: &mut [u8]) -> io::Result<()> {
        // SAFETY: the caller guarantees `src` is valid for `dst.len()` readable bytes inside
        // engine memory, which cannot overlap the loader's own buffer.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn copy_rows_in(
        &self,
        layout: &KvLayout,
        plane: usize,
        run: &Run,
        src: &[u8],
    ) -> io::Result<()> {
        // SAFETY: forwarded from the caller (every element lies inside a layout region).
        unsafe { strided(layout, plane, run, src.len(), src.as_ptr() as usize, true) };
        Ok(())
    }

    unsafe fn copy_rows_out(
        &self,
        layout: &KvLayout,
        plane: usize,
        run: &Run,
        dst: &mut [u8],
    ) -> io::Result<()> {
        // SAFETY: as above; `dst` is the loader's own buffer.
        unsafe {
            strided(
                layout,
                plane,
                run,
                dst.len(),
                dst.as_mut_ptr() as usize,
                false,
            )
        };
        Ok(())
    }
}

/// Moves `run`'s rows of `plane` between engine memory and a packed buffer at `packed`
/// (`packed_len` bytes) on host memory, into engine memory when `to_mem`, out of it
/// otherwise. Contiguous pieces are one memcpy each. A strided head vector (vLLM CPU's
/// transposed K: element `e` of token `t` at `e * block_size + t`) is, per head, a
/// `[tokens, head_dim]` matrix copied to or from its transpose: [`copy_matrix`] moves it in
/// 8x8 tiles, so both sides are read and written 8 contiguous values at a time instead of one
/// scattered element per step.
///
/// # Safety
/// Every value of the run must lie inside a layout region (the caller's contract), and the
/// packed buffer must hold `packed_len` bytes, which must cover the run's rows.
unsafe fn strided(
    layout: &KvLayout,
    plane: usize,
    run: &Run,
    packed_len: usize,
    packed: usize,
    to_mem: bool,
) {
    let s = layout.plane_strides(plane);
    let esz = layout.dtype().size();
    assert!(
        packed_len >= run.tokens * layout.row_bytes(),
        "packed buffer too short"
    );
    if s.elem == esz {
        for (addr, off, len) in layout.pieces(plane, run) {
            let (from, to) = if to_mem {
                (packed + off, addr)
            } else {
                (addr, packed + off)
            };
            // SAFETY: the piece lies inside a layout region and `off + len` inside the packed
            // buffer; engine memory and the loader's buffer never overlap.
            unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) };
        }
        return;
    }
    let (heads, elems) = (
        layout.row_bytes() / layout.head_bytes(),
        layout.head_bytes() / esz,
    );
    for h in 0..heads {
        let mem = Matrix {
            base: run.addr + h * s.head,
            token: s.token,
            elem: s.elem,
        };
        let buf = Matrix {
            base: packed + h * layout.head_bytes(),
            token: layout.row_bytes(),
            elem: esz,
        };
        let (from, to) = if to_mem { (buf, mem) } else { (mem, buf) };
        // SAFETY: forwarded: every element of the head's matrix lies inside a layout region
        // (engine side) or inside the packed buffer; the two never overlap.
        unsafe {
            match esz {
                1 => copy_matrix::<u8>(from, to, run.tokens, elems),
                2 => copy_matrix::<u16>(from, to, run.tokens, elems),
                4 => copy_matrix::<u32>(from, to, run.tokens, elems),
                _ => unreachable!("no dtype has {esz}-byte elements"),
            }
        }
    }
}

/// A `[tokens, elems]` matrix in memory: element `(t, e)` at `base + t * token + e * elem`
/// (byte strides).
#[derive(Debug, Clone, Copy)]
struct Matrix {
    base: usize,
    token: usize,
    elem: usize,
}

impl Matrix {
    fn at(&self, t: usize, e: usize) -> usize {
        self.base + t * self.token + e * self.elem
    }
}

/// Copies a `[tokens, elems]` matrix of `T` from `from` to `to`. When one side is
/// contiguous along tokens and the other along elements (vLLM CPU's K against packed rows,
/// in either direction) it is a transpose, done by [`transpose`] in 8x8 tiles; any other
/// strides go element by element.
///
/// # Safety
/// Every element of both matrices must be valid to read (`from`) or write (`to`), and the two
/// must not overlap; unaligned elements are allowed.
unsafe fn copy_matrix<T: Copy + 'static>(from: Matrix, to: Matrix, tokens: usize, elems: usize) {
    let sz = size_of::<T>();
    let whole = |m: &Matrix| m.token % sz == 0 && m.elem % sz == 0;
    if whole(&from) && whole(&to) {
        let (src, dst) = (from.base as *const T, to.base as *mut T);
        if from.elem == sz && to.token == sz {
            // SAFETY: forwarded; rows of `from` are tokens, rows of `to` elements.
            unsafe { transpose(src, from.token / sz, dst, to.elem / sz, tokens, elems) };
            return;
        }
        if from.token == sz && to.elem == sz {
            // SAFETY: forwarded; rows of `from` are elements, rows of `to` tokens.
            unsafe { transpose(src, from.elem / sz, dst, to.token / sz, elems, tokens) };
            return;
        }
    }
    for t in 0..tokens {
        for e in 0..elems {
            // SAFETY: (t, e) is inside both matrices (the caller's contract).
            unsafe {
                (to.at(t, e) as *mut T)
                    .write_unaligned((from.at(t, e) as *const T).read_unaligned())
            };
        }
    }
}

/// An 8x8 tile transpose: reads 8 rows of 8 values from `src` (rows `src_stride` values
/// apart) and writes them as 8 columns to `dst` (rows `dst_stride` apart).
type Tile<T> = unsafe fn(*const T, usize, *mut T, usize);

/// Writes the transpose of `src` (`rows` rows of `cols` contiguous values, `src_stride` values
/// apart) to `dst` (`cols` rows of `rows` values, `dst_stride` apart), 8x8 tiles at a time
/// (with SSE2 for 2-byte values on x86_64: eight 16-byte loads, 24 unpacks, eight stores);
/// the ragged edges value by value.
///
/// # Safety
/// Both matrices must be valid for their shapes (read for `src`, write for `dst`) and must not
/// overlap; unaligned values are allowed.
unsafe fn transpose<T: Copy + 'static>(
    src: *const T,
    src_stride: usize,
    dst: *mut T,
    dst_stride: usize,
    rows: usize,
    cols: usize,
) {
    const B: usize = 8;
    let tile: Tile<T> = tile_kernel::<T>();
    let (rf, cf) = (rows / B * B, cols / B * B);
    for r0 in (0..rf).step_by(B) {
        for c0 in (0..cf).step_by(B) {
            // SAFETY: rows r0..r0+8, columns c0..c0+8 are inside `src`; rows c0..c0+8, values
            // r0..r0+8 inside `dst`.
            unsafe {
                tile(
                    src.add(r0 * src_stride + c0),
                    src_stride,
                    dst.add(c0 * dst_stride + r0),
                    dst_stride,
                )
            };
        }
    }
    for r in 0..rows {
        for c in if r < rf { cf } else { 0 }..cols {
            // SAFETY: (r, c) is inside both matrices.
            unsafe {
                dst.add(c * dst_stride + r)
                    .write_unaligned(src.add(r * src_stride + c).read_unaligned())
            };
        }
    }
}

/// The fastest 8x8 tile transpose for `T` on this target.
fn tile_kernel<T: Copy + 'static>() -> Tile<T> {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<u16>() {
        // SAFETY: `T` is `u16` (checked just above), so the two fn pointer types are the same.
        return unsafe { std::mem::transmute::<Tile<u16>, Tile<T>>(tile_u16_sse2) };
    }
    tile_generic::<T>
}

/// An 8x8 tile transpose of any `T`, through an array the compiler keeps in registers.
///
/// # Safety
/// As [`Tile`]: 8 rows of 8 values readable at `src`, writable at `dst`, not overlapping.
#[allow(clippy::needless_range_loop)] // `c` indexes the tile's inner arrays, not `tile`
unsafe fn tile_generic<T: Copy>(src: *const T, ss: usize, dst: *mut T, ds: usize) {
    const B: usize = 8;
    // SAFETY: row r of the tile is inside `src` (the caller's contract).
    let tile: [[T; B]; B] =
        std::array::from_fn(|r| unsafe { (src.add(r * ss) as *const [T; B]).read_unaligned() });
    for c in 0..B {
        let column: [T; B] = std::array::from_fn(|r| tile[r][c]);
        // SAFETY: row c of the tile is inside `dst`.
        unsafe { (dst.add(c * ds) as *mut [T; B]).write_unaligned(column) };
    }
}

/// An 8x8 transpose of 2-byte values with SSE2 (part of every x86_64 CPU): unpack 16-, 32-
/// then 64-bit lanes.
///
/// # Safety
/// As [`Tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile_u16_sse2(src: *const u16, ss: usize, dst: *mut u16, ds: usize) {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_storeu_si128, _mm_unpackhi_epi16, _mm_unpackhi_epi32,
        _mm_unpackhi_epi64, _mm_unpacklo_epi16, _mm_unpacklo_epi32, _mm_unpacklo_epi64,
    };
    // SAFETY: each row is 8 readable u16 (16 bytes) at `src + r * ss`; unaligned loads.
    let r: [__m128i; 8] =
        std::array::from_fn(|i| unsafe { _mm_loadu_si128(src.add(i * ss) as *const __m128i) });
    // SAFETY: SSE2 is part of the x86_64 baseline: these register shuffles are always
    // available (they touch no memory).
    let c = unsafe {
        // a[2k] interleaves columns 0..4 of rows 2k and 2k + 1, a[2k + 1] columns 4..8
        let a = [
            _mm_unpacklo_epi16(r[0], r[1]),
            _mm_unpackhi_epi16(r[0], r[1]),
            _mm_unpacklo_epi16(r[2], r[3]),
            _mm_unpackhi_epi16(r[2], r[3]),
            _mm_unpacklo_epi16(r[4], r[5]),
            _mm_unpackhi_epi16(r[4], r[5]),
            _mm_unpacklo_epi16(r[6], r[7]),
            _mm_unpackhi_epi16(r[6], r[7]),
        ];
        // quads: b[k] holds two columns of rows 0..4 (k < 4) or 4..8
        let b = [
            _mm_unpacklo_epi32(a[0], a[2]),
            _mm_unpackhi_epi32(a[0], a[2]),
            _mm_unpacklo_epi32(a[1], a[3]),
            _mm_unpackhi_epi32(a[1], a[3]),
            _mm_unpacklo_epi32(a[4], a[6]),
            _mm_unpackhi_epi32(a[4], a[6]),
            _mm_unpacklo_epi32(a[5], a[7]),
            _mm_unpackhi_epi32(a[5], a[7]),
        ];
        // column c: rows 0..4 from b[c / 2], rows 4..8 from b[4 + c / 2]
        [
            _mm_unpacklo_epi64(b[0], b[4]),
            _mm_unpackhi_epi64(b[0], b[4]),
            _mm_unpacklo_epi64(b[1], b[5]),
            _mm_unpackhi_epi64(b[1], b[5]),
            _mm_unpacklo_epi64(b[2], b[6]),
            _mm_unpackhi_epi64(b[2], b[6]),
            _mm_unpacklo_epi64(b[3], b[7]),
            _mm_unpackhi_epi64(b[3], b[7]),
        ]
    };
    for (i, v) in c.into_iter().enumerate() {
        // SAFETY: row i of the tile is 8 writable u16 at `dst + i * ds`; unaligned store.
        unsafe { _mm_storeu_si128(dst.add(i * ds) as *mut __m128i, v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape, tiled or ragged, lands each element where the plain definition says, in
    /// both directions of a transpose, and writes nothing else.
    #[test]
    fn copy_matrix_transposes_every_shape() {
        for (tokens, elems) in [
            (1, 1),
            (8, 8),
            (13, 11),
            (16, 64),
            (128, 64),
            (7, 24),
            (9, 3),
        ] {
            // packed `[tokens, elems]` rows, and the transpose `[elems, tokens + 3]` (padded
            // rows, so a write past a row shows)
            let packed: Vec<u16> = (0..tokens * elems).map(|i| i as u16 + 1).collect();
            let ld = tokens + 3;
            let mut trans = vec![0u16; elems * ld];
            let p = Matrix {
                base: packed.as_ptr() as usize,
                token: elems * 2,
                elem: 2,
            };
            let t = Matrix {
                base: trans.as_mut_ptr() as usize,
                token: 2,
                elem: ld * 2,
            };
            // SAFETY: both matrices lie inside their vectors, which do not overlap.
            unsafe { copy_matrix::<u16>(p, t, tokens, elems) };
            for e in 0..elems {
                for c in 0..ld {
                    let want = if c < tokens { packed[c * elems + e] } else { 0 };
                    assert_eq!(trans[e * ld + c], want, "{tokens}x{elems} at ({c}, {e})");
                }
            }
            let mut back = vec![0u16; tokens * elems];
            let b = Matrix {
                base: back.as_mut_ptr() as usize,
                ..p
            };
            // SAFETY: as above.
            unsafe { copy_matrix::<u16>(t, b, tokens, elems) };
            assert_eq!(back, packed, "{tokens}x{elems} round trip");
            // neither side contiguous along a dimension: the element-wise path
            let mut spread = vec![0u16; tokens * elems * 2];
            let s = Matrix {
                base: spread.as_mut_ptr() as usize,
                token: elems * 4,
                elem: 4,
            };
            // SAFETY: as above.
            unsafe { copy_matrix::<u16>(p, s, tokens, elems) };
            let every_other: Vec<u16> = spread.iter().step_by(2).copied().collect();
            assert_eq!(every_other, packed, "{tokens}x{elems} spread");
            assert!(spread.iter().skip(1).step_by(2).all(|&v| v == 0));
        }
    }
}
