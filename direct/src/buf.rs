//! Alignment arithmetic and page-aligned host buffers.
//!
//! O_DIRECT and cuFile's direct path both want the file offset, the length and the memory
//! address of every transfer to be multiples of the logical block size. kvfs uses 4096 bytes
//! everywhere ([`DIRECT_ALIGN`]): it is the page size on x86-64 and the largest logical block
//! size of the NVMe drives we target, and the `.kvc` format already starts every layer's K and
//! V extent on a 4096-byte boundary, so whole extents and aligned groups need no widening.
//!
//! [`AlignedBuf`] is the one aligned host buffer: fixed-size and zeroed
//! ([`AlignedBuf::zeroed`], the staging buffers of kvfs-gds's host path), or empty and grown
//! on demand ([`AlignedBuf::new`] + [`AlignedBuf::slice`], the per-thread read buffer of
//! kvfs-loader: a load allocates nothing per read). Its bytes are always initialised (zeroed
//! when allocated), so handing out `&mut [u8]` is sound.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::error::DirectError;

/// Alignment of file offsets, lengths and buffer addresses for direct I/O, in bytes.
pub const DIRECT_ALIGN: usize = 4096;

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

/// Whether an address, a length and a file offset all meet [`DIRECT_ALIGN`].
pub fn aligned(addr: usize, len: usize, offset: u64) -> bool {
    let a = DIRECT_ALIGN;
    addr % a == 0 && len % a == 0 && offset % a as u64 == 0
}

/// A zero-initialised heap buffer whose address is a multiple of [`DIRECT_ALIGN`].
///
/// Dereferences to its current length: the `len` of [`AlignedBuf::zeroed`], or the last
/// length asked of [`AlignedBuf::slice`]. The allocation only grows.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf::new()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl AlignedBuf {
    /// An empty buffer that allocates on the first [`AlignedBuf::slice`].
    pub const fn new() -> AlignedBuf {
        AlignedBuf {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
        }
    }

    /// `len` zeroed bytes aligned to [`DIRECT_ALIGN`]; `len` must be non-zero.
    pub fn zeroed(len: usize) -> Result<AlignedBuf, DirectError> {
        if len == 0 {
            return Err(DirectError::Alloc {
                len,
                reason: "zero length".into(),
            });
        }
        let layout = Self::layout(len).map_err(|e| DirectError::Alloc {
            len,
            reason: e.to_string(),
        })?;
        // SAFETY: the layout has a non-zero size (len > 0).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| DirectError::Alloc {
            len,
            reason: "out of memory".into(),
        })?;
        Ok(AlignedBuf {
            ptr,
            len,
            cap: layout.size(),
        })
    }

    /// A slice of `len` bytes (contents unspecified but initialised), growing the allocation
    /// if needed. Aborts like `Vec` if memory runs out.
    pub fn slice(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            let layout = Self::layout(len).expect("aligned buffer layout");
            self.release();
            // SAFETY: the layout has a non-zero size (len > cap >= 0). Zeroed, so every byte
            // is initialised.
            let raw = unsafe { alloc_zeroed(layout) };
            self.ptr = NonNull::new(raw).unwrap_or_else(|| handle_alloc_error(layout));
            self.cap = layout.size();
        }
        self.len = len;
        self
    }

    /// Bytes allocated (at least the current length).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The layout of an allocation holding `len` bytes: rounded up to whole blocks.
    fn layout(len: usize) -> Result<Layout, std::alloc::LayoutError> {
        let size = len
            .checked_next_multiple_of(DIRECT_ALIGN)
            .unwrap_or(usize::MAX)
            .max(DIRECT_ALIGN);
        Layout::from_size_align(size, DIRECT_ALIGN)
    }

    fn release(&mut self) {
        if self.cap > 0 {
            let layout = Layout::from_size_align(self.cap, DIRECT_ALIGN)
                .expect("layout was valid at allocation");
            // SAFETY: ptr was returned by alloc_zeroed with this very layout, not freed since.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
            self.ptr = NonNull::dangling();
            self.cap = 0;
            self.len = 0;
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points at cap >= len initialised (zeroed at allocation) bytes owned by
        // self, or is dangling with len 0, which a slice allows.
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
        self.release();
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
        assert!(aligned(4096, 8192, 4096));
        assert!(!aligned(4097, 4096, 0));
        assert!(!aligned(4096, 100, 0));
        assert!(!aligned(4096, 4096, 7));
    }

    #[test]
    fn fixed_buffer_is_aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(3 * 4096 + 5).unwrap();
        assert_eq!(b.len(), 3 * 4096 + 5);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert!(matches!(
            AlignedBuf::zeroed(0),
            Err(DirectError::Alloc { len: 0, .. })
        ));
    }

    #[test]
    fn grown_buffer_is_aligned_and_keeps_its_allocation() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        assert!(b.slice(0).is_empty());
        let s = b.slice(5000);
        assert_eq!(s.len(), 5000);
        assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
        s.fill(9);
        let cap = b.capacity();
        assert_eq!(cap, 8192);
        assert_eq!(b.slice(100).len(), 100);
        assert_eq!(b.capacity(), cap, "a smaller slice reuses the allocation");
        assert_eq!(b.slice(20_000).len(), 20_000);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
    }
}
