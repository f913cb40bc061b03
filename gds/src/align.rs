//! Alignment arithmetic and page-aligned host buffers, from kvfs-direct (the O_DIRECT stack
//! kvfs-loader uses too).
//!
//! O_DIRECT and cuFile's direct path both want the file offset, the length and the memory
//! address of every transfer to be multiples of the logical block size: 4096 bytes
//! ([`DIRECT_ALIGN`], here as a `u64` since kvfs-gds computes file offsets in `u64`).
//! [`AlignedBuf`] is the host buffer used where no pinned CUDA memory is available (host-only
//! loads and the tests); [`aligned_buf`] allocates one with this crate's error type.

pub use kvfs_direct::{AlignedBuf, align_down, align_up};

use crate::error::Result;

/// Alignment of file offsets, lengths and buffer addresses for direct I/O, in bytes.
pub const DIRECT_ALIGN: u64 = kvfs_direct::DIRECT_ALIGN as u64;

/// `len` zeroed bytes aligned to [`DIRECT_ALIGN`]; `len` must be non-zero
/// ([`GdsError::Config`](crate::GdsError::Config) otherwise).
pub fn aligned_buf(len: usize) -> Result<AlignedBuf> {
    Ok(AlignedBuf::zeroed(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GdsError;

    #[test]
    fn buffer_is_aligned_and_zeroed() {
        let b = aligned_buf(3 * 4096 + 5).unwrap();
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN as usize, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert!(matches!(aligned_buf(0), Err(GdsError::Config(_))));
    }
}
