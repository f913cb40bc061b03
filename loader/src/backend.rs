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
        unsafe {
            strided(
                layout,
                plane,
                run,
                src.len(),
                |mem, packed| (packed, mem),
                src.as_ptr() as usize,
            )
        };
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
                |mem, packed| (mem, packed),
                dst.as_mut_ptr() as usize,
            )
        };
        Ok(())
    }
}

/// Moves `run`'s rows of `plane` between engine memory and a packed buffer at `packed`
/// (`packed_len` bytes) on host memory. `dir(mem, packed)` gives (from, to). Contiguous pieces
/// are one memcpy each; a strided head vector (vLLM CPU's transposed K) is an element loop,
/// which beats a call per element by an order of magnitude.
///
/// # Safety
/// Every value of the run must lie inside a layout region (the caller's contract), and the
/// packed buffer must hold `packed_len` bytes, which must cover the run's rows.
unsafe fn strided(
    layout: &KvLayout,
    plane: usize,
    run: &Run,
    packed_len: usize,
    dir: impl Fn(usize, usize) -> (usize, usize),
    packed: usize,
) {
    let s = layout.plane_strides(plane);
    let esz = layout.dtype().size();
    assert!(
        packed_len >= run.tokens * layout.row_bytes(),
        "packed buffer too short"
    );
    if s.elem == esz {
        for (addr, off, len) in layout.pieces(plane, run) {
            let (from, to) = dir(addr, packed + off);
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
    for t in 0..run.tokens {
        for h in 0..heads {
            let mem = run.addr + t * s.token + h * s.head;
            let buf = packed + t * layout.row_bytes() + h * layout.head_bytes();
            for e in 0..elems {
                let (from, to) = dir(mem + e * s.elem, buf + e * esz);
                // SAFETY: as above, for one element; unaligned accesses are allowed.
                unsafe {
                    match esz {
                        1 => *(to as *mut u8) = *(from as *const u8),
                        2 => {
                            (to as *mut u16).write_unaligned((from as *const u16).read_unaligned())
                        }
                        4 => {
                            (to as *mut u32).write_unaligned((from as *const u32).read_unaligned())
                        }
                        _ => std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, esz),
                    }
                }
            }
        }
    }
}
