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
}
