//! Device paths: the CUDA staging sink, the cuFile (GDS) engine and [`GpuLoader`].
//!
//! Both device paths end in the same place: the wanted bytes of a [`Fill`](crate::plan::Fill) sit in a
//! *device* staging slot, and the scatter kernel ([`KERNEL_SRC`], compiled at run time by
//! NVRTC) copies every [`ScatterRun`](crate::scatter::ScatterRun) clipped to the fill's windows to its destination
//! block. One thread block per run, 16-byte vector copies when aligned; the run table is
//! uploaded once per load, and each window is one launch (`runs_overlapping` gives its run
//! range), so a 16 MiB fill costs one copy and a handful of launches, not one memcpy per
//! block per layer. Without NVRTC the same windows are scattered with asynchronous
//! device-to-device copies queued back to back on the stream (correct, slower).
//!
//! - **Staging** ([`CudaSink`] in a [`Ring`](crate::ring::Ring)): O_DIRECT reads land in pinned host buffers
//!   (`cuMemHostAlloc`); each is copied with `cuMemcpyHtoDAsync` into its device slot and an
//!   event is recorded right after the copy, so the ring refills that host buffer as soon as
//!   the copy is done while the kernel still runs: disk reads overlap copies and scatters.
//! - **GDS / compat** ([`GdsEngine`]): cuFile reads whole aligned pieces into two device
//!   slots registered once with `cuFileBufRegister`; files are registered once and cached by
//!   descriptor and inode; fills of several pieces go through the batch API. The read of
//!   fill `i + 1` overlaps the scatter of fill `i`.
//! - **Layer-wise**: after the fill that completes layer `l`, an event is recorded on the
//!   loader's stream; [`GpuLoader::wait_layer`] makes an engine stream wait for it
//!   (`cuStreamWaitEvent`) and [`GpuLoader::layer_event`] exposes the raw event.
//! - **Store**: the gather kernel (the scatter read backwards) fills a device slot, then
//!   the bytes go to the file (staging: copy to pinned memory and O_DIRECT write; GDS:
//!   `cuFileWrite`).
//!
//! Nothing here runs on a machine without CUDA: [`GpuLoader::new`] probes first and a
//! host-only machine gets [`GpuPath::HostOnly`](crate::probe::GpuPath::HostOnly) (or a typed error when a device path was
//! forced). The GPU behaviour is exercised by `tests/gpu.rs` through `scripts/gpu-check`.

//!
//! Files: the kernels are CUDA C in `kernels.cu` ([`KERNEL_SRC`]); `device.rs` holds the
//! context, memory, copies and kernel launches; `staging.rs` the staging ring's sink; `gds.rs`
//! the cuFile engine; `loader.rs` the [`GpuLoader`] that picks one of them.

mod device;
mod gds;
mod loader;
mod staging;

use cudarc::driver::DriverError;
use std::ffi::c_void;

use crate::error::GdsError;

pub use device::{Device, DeviceBuf, LayerHook, PinnedBuf};
pub use gds::{BATCH_MAX, BATCH_MIN_PIECES, GdsEngine};
pub use loader::{GpuLoader, GpuOptions};
pub use staging::CudaSink;

/// CUDA C source of the scatter and gather kernels (compiled with NVRTC at run time).
///
/// `runs` is the plan's run table (`{src, dst, len}` as u64). A launch covers one window
/// `[win_start, win_start + win_len)` of the source stream whose bytes are at `win`; block
/// `k` handles run `first + k` (grid-stride over `count`), clipped to the window.
pub const KERNEL_SRC: &str = include_str!("kernels.cu");

/// A raw `CUevent`, for engines that wait on layer readiness themselves.
pub type RawEvent = *mut c_void;
/// A raw `CUstream` of the engine.
pub type RawStream = *mut c_void;

fn cuda_err(op: &'static str) -> impl FnOnce(DriverError) -> GdsError {
    move |e| GdsError::Cuda {
        op,
        msg: e.to_string(),
    }
}
