//! Alignment arithmetic and page-aligned host buffers.
//!
//! O_DIRECT and cuFile's direct path both want the file offset, the length and the memory
//! address of every transfer to be multiples of the logical block size. kvfs uses 4096 bytes
//! everywhere ([`DIRECT_ALIGN`]): it is the page size on x86-64 and the largest logical block
//! size of the NVMe drives we target, and the `.kvc` format already starts every layer's K and
//! V extent on a 4096-byte boundary. [`AlignedBuf`] is the host buffer used where no pinned
//! CUDA memory is available (host-only loads and the tests).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::error::{GdsError, Result};

/// Alignment of file offsets, lengths and buffer addresses for direct I/O, in bytes.
pub const DIRECT_ALIGN: u64 = 4096;

/// Rounds `v` down to a multiple of `a` (a power of two).
#[inline]
pub const fn align_down(v: u64, a: u64) -> u64 {
    v & !(a - 1)
}

/// Rounds `v` up to a multiple of `a` (a power of two).
#[inline]
pub const fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// A zero-initialised heap buffer whose address is a multiple of [`DIRECT_ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`DIRECT_ALIGN`]; `len` must be non-zero.
    pub fn new(len: usize) -> Result<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size (checked in `layout`).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| GdsError::Config(format!("cannot allocate {len} aligned bytes")))?;
        Ok(AlignedBuf { ptr, len })
    }

    fn layout(len: usize) -> Result<Layout> {
        if len == 0 {
            return Err(GdsError::Config("aligned buffer of 0 bytes".into()));
        }
        Layout::from_size_align(len, DIRECT_ALIGN as usize)
            .map_err(|e| GdsError::Config(format!("aligned buffer of {len} bytes: {e}")))
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points at len initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Self::layout(self.len).expect("layout was valid at allocation");
        // SAFETY: ptr was returned by alloc_zeroed with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(align_down(0, 4096), 0);
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(1, 4096), 4096);
        assert_eq!(align_up(8192, 4096), 8192);
    }

    #[test]
    fn buffer_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(3 * 4096 + 5).unwrap();
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN as usize, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert!(matches!(AlignedBuf::new(0), Err(GdsError::Config(_))));
    }
}
