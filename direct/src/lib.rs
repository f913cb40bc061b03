//! kvfs-direct: the one O_DIRECT stack of kvfs, shared by kvfs-loader (reads of chunk files
//! into engine memory) and kvfs-gds (reads into pinned staging buffers and cuFile's compat
//! path).
//!
//! - [`buf`]: [`DIRECT_ALIGN`], alignment arithmetic and [`AlignedBuf`], the page-aligned,
//!   zeroed host buffer (fixed with [`AlignedBuf::zeroed`], or grown on demand with
//!   [`AlignedBuf::slice`]);
//! - [`file`](mod@file): opening with `O_DIRECT` and falling back to buffered I/O where a file system
//!   refuses it (at `open` or at the first transfer), positioned transfer loops that handle
//!   `EINTR`, short transfers and that fall back, and [`probe_direct_io`];
//! - [`error`]: the [`DirectError`] every call returns.
//!
//! It owns nothing of kvfs's formats, keys, stores or GPUs, and depends on no other kvfs
//! crate: both kvfs-loader (which engines link, and which must stay free of CUDA) and
//! kvfs-gds (which must stay format-agnostic) depend on it.

pub mod buf;
pub mod error;
pub mod file;

pub use buf::{AlignedBuf, DIRECT_ALIGN, align_down, align_up, aligned};
pub use error::DirectError;
pub use file::{
    DirectSupport, OpenedFile, direct_fallbacks, is_direct, is_einval, note_fallback, open_read,
    open_with, open_write, probe_direct_io, read_at_least, read_exact_at, write_all_at,
};
